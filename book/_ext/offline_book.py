"""Local Sphinx extension for the book (loaded through ``sphinx.local_extensions`` in _config.yml).

1. Works around a Sphinx 7.4 bug that duplicates inline ``<script>`` bodies added with
   ``app.add_js_file(None, body=...)`` after the HTML builder is initialised: the builder keeps
   them with filename ``None``, ``prepare_writing`` re-adds the registry copy with filename ``""``,
   and the two never compare equal. sphinx-thebe's ``const THEBE_JS_URL = ...`` then appears
   twice on every page and the browser reports
   "SyntaxError: Identifier 'THEBE_JS_URL' has already been declared".
2. Keeps the site offline: any ``<script src>`` or stylesheet pointing at another host is a
   warning (an error under ``-W``), e.g. myst-nb's CDN defaults for ipywidgets coming back.
"""

from __future__ import annotations

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _normalise_inline_scripts(app: Sphinx, env) -> None:
    builder = app.builder
    js_files = getattr(builder, "_js_files", None)
    if not js_files:
        return
    for i, asset in enumerate(js_files):
        if asset.filename is None:
            js_files[i] = type(asset)("", priority=asset.priority, **asset.attributes)
    # keep the first of any now-identical entries, in order
    builder._js_files[:] = list(dict.fromkeys(js_files))


def _check_offline(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    remote = []
    for asset in list(context.get("script_files", [])) + list(context.get("css_files", [])):
        name = str(getattr(asset, "filename", asset) or "")
        if "://" in name or name.startswith("//"):
            remote.append(name)
    for name in remote:
        logger.warning(
            "page %s loads %s from the network; the book must render offline "
            "(serve it from the static folder, see _config.yml)",
            pagename,
            name,
            type="offline_book",
            subtype="remote_asset",
        )


def setup(app: Sphinx) -> dict:
    app.connect("env-updated", _normalise_inline_scripts)
    app.connect("html-page-context", _check_offline, priority=900)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
