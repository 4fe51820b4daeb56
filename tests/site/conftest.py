"""Fixtures for the real-browser checks of the built book (marker ``site``).

The site is served from ``_build/html`` by a local ``http.server`` in a thread and driven by
Debian's headless Chromium through Selenium and ``/usr/bin/chromedriver``. Every host except
localhost resolves to nothing inside the browser, so any CDN request fails loudly.

Needs: ``bash scripts/build_book.sh`` first (these tests fail, never skip, without a site),
``apt-get install -y chromium chromium-driver`` and the pins in ``tests/site/REQUIREMENTS.txt``.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "_build"
SITE = BUILD / "html"
EXECUTED = BUILD / "jupyter_execute"
SCREENSHOTS = BUILD / "screenshots"
TOC = ROOT / "_toc.yml"

BUILD_HINT = "build the site first: bash scripts/build_book.sh"
CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
BROWSER_HINT = "install the browser: apt-get install -y chromium chromium-driver"

WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"

# Pages that must show a rendered widget whenever they are in the table of contents.
WIDGET_REQUIRED = {"book/01_asking"}

RENDER_TIMEOUT_S = 30


# --------------------------------------------------------------------------------------------
# Table of contents (read at collection time: no site needed to parametrise)
# --------------------------------------------------------------------------------------------


def _strip_suffix(name: str) -> str:
    return re.sub(r"\.(md|ipynb|rst)$", "", name)


def _walk_toc(node, out: list[str]) -> None:
    if isinstance(node, dict):
        if "file" in node:
            out.append(_strip_suffix(str(node["file"])))
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, None) or []:
                _walk_toc(child, out)
    elif isinstance(node, list):
        for child in node:
            _walk_toc(child, out)


@functools.lru_cache(maxsize=1)
def toc_pages() -> tuple[str, ...]:
    """Docnames in reading order: the root, then every file of every part/chapter/section."""
    toc = yaml.safe_load(TOC.read_text(encoding="utf8"))
    pages = [_strip_suffix(str(toc["root"]))]
    _walk_toc(toc, pages)
    return tuple(dict.fromkeys(pages))  # de-duplicate, keep order


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "site: real-browser checks of the built book in _build/html (headless Chromium)"
    )


_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == _HERE:
            item.add_marker(pytest.mark.site)


def pytest_generate_tests(metafunc):
    """Parametrise every test here that takes ``docname`` over the pages of _toc.yml."""
    if "docname" in metafunc.fixturenames and Path(str(metafunc.definition.fspath)).resolve().parent == _HERE:
        metafunc.parametrize("docname", toc_pages(), ids=list(toc_pages()))


@pytest.fixture(scope="session")
def toc() -> tuple[str, ...]:
    return toc_pages()


@pytest.fixture(scope="session")
def widget_required() -> set[str]:
    return set(WIDGET_REQUIRED)


# --------------------------------------------------------------------------------------------
# Site on disk
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def site_dir() -> Path:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"no built site at {SITE / 'index.html'}: {BUILD_HINT}", pytrace=False)
    missing = [p for p in toc_pages() if not (SITE / f"{p}.html").is_file()]
    if missing:
        pytest.fail(
            f"pages listed in _toc.yml are missing from {SITE}: {missing}; {BUILD_HINT}",
            pytrace=False,
        )
    return SITE


def executed_notebook(docname: str) -> dict | None:
    path = EXECUTED / f"{docname}.ipynb"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf8"))


def _page_html(docname: str) -> str:
    path = SITE / f"{docname}.html"
    return path.read_text(encoding="utf8") if path.is_file() else ""


# myst-nb 1.4.0 writes _build/jupyter_execute/<doc>.ipynb from the *unexecuted* notebook when
# jupyter-cache serves it (execute_notebooks: cache, second and later builds): no outputs, no
# widget state there. So the executed notebook is consulted only when it does hold outputs, and
# otherwise the same facts are read from what myst-nb rendered from the executed notebook:
# the widget-state <script> it embeds, and the sha256-named PNGs it extracts from outputs.
_STATE_SCRIPT = re.compile(
    r'<script type="application/vnd\.jupyter\.widget-state\+json">(.*?)</script>', re.S
)
_OUTPUT_PNG = re.compile(r'src="[^"]*_images/[0-9a-f]{64}\.png"')


def _has_outputs(nb: dict) -> bool:
    return any(cell.get("outputs") for cell in nb.get("cells", []))


def notebook_has_widget_state(docname: str) -> bool:
    """True iff the notebook executed for the build saved ipywidgets state."""
    nb = executed_notebook(docname)
    if nb is not None and _has_outputs(nb):
        state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE_MIME, {})
        if state.get("state"):
            return True
    match = _STATE_SCRIPT.search(_page_html(docname))
    if not match:
        return False
    try:
        return bool(json.loads(match.group(1)).get("state"))
    except json.JSONDecodeError:
        return True  # state is there but mangled: expect a widget, let the browser show it


def notebook_has_png(docname: str) -> bool:
    """True iff the executed notebook has an image/png output (a plot)."""
    nb = executed_notebook(docname)
    if nb is not None and _has_outputs(nb):
        for cell in nb.get("cells", []):
            for out in cell.get("outputs", []) or []:
                if "image/png" in (out.get("data") or {}):
                    return True
    return bool(_OUTPUT_PNG.search(_page_html(docname)))


# --------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


@pytest.fixture(scope="session")
def base_url(site_dir):
    handler = functools.partial(_QuietHandler, directory=str(site_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------
# Browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(
            "selenium is not installed: pip install -r tests/site/REQUIREMENTS.txt", pytrace=False
        )
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(exe):
            pytest.fail(f"{exe} not found: {BROWSER_HINT}", pytrace=False)

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach the network
    profile = tempfile.mkdtemp(prefix="site-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        # Offline proof: every host but the local server resolves to nothing.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(RENDER_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# One visit per page, shared by the per-page checks
# --------------------------------------------------------------------------------------------


@dataclass
class PageReport:
    docname: str
    url: str
    title: str = ""
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    widget_state_expected: bool = False
    widget_views: int = 0  # <script type="...widget-view+json"> tags on the page
    widgets_rendered: int = 0  # of those, how many got a visible rendered element
    dropdowns: int = 0
    math_nodes: int = 0  # Sphinx/MyST math elements to typeset
    mjx_containers: int = 0
    mjx_errors: int = 0
    images: list[dict] = field(default_factory=list)
    png_expected: bool = False
    screenshot: Path | None = None


_JS_FACTS = f"""
const views = Array.from(document.querySelectorAll('script[type="{WIDGET_VIEW_MIME}"]'));
// html-manager inserts a rendered element just before each view script.
const rendered = views.filter(s => {{
  const el = s.previousElementSibling;
  if (!el) return false;
  const box = el.getBoundingClientRect();
  return el.querySelector('.jupyter-widgets, .widget-box, [class*="widget-"]') !== null
         && box.width > 0 && box.height > 0;
}}).length;
return {{
  title: (document.querySelector('article h1, main h1, h1') || {{}}).textContent || '',
  widget_views: views.length,
  widgets_rendered: rendered,
  dropdowns: document.querySelectorAll('.widget-dropdown select').length,
  math_nodes: document.querySelectorAll('.math').length,
  mjx_containers: document.querySelectorAll('mjx-container').length,
  mjx_errors: document.querySelectorAll('mjx-merror').length,
  images: Array.from(document.querySelectorAll('img')).map(i => ({{
      src: i.getAttribute('src') || '', complete: i.complete, naturalWidth: i.naturalWidth,
      in_output: i.closest('.cell_output, .output') !== null}})),
}};
"""


def _drain_logs(driver) -> tuple[list[str], list[str]]:
    errors = [
        e.get("message", "") for e in driver.get_log("browser") if e.get("level") == "SEVERE"
    ]
    requests = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            requests.append(msg["params"]["request"]["url"])
    return errors, requests


def _wait(driver, predicate_js: str, timeout: float = RENDER_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(predicate_js):
            return True
        time.sleep(0.2)
    return False


def full_page_screenshot(driver, path: Path, width: int = 1280) -> Path:
    """Capture the whole page: grow the viewport to the document's height, then capture.

    (``captureBeyondViewport`` alone mis-draws sphinx-book-theme's sticky sidebar.)
    """
    import base64

    height = driver.execute_script(
        "return Math.ceil(Math.max(document.body.scrollHeight,"
        " document.documentElement.scrollHeight));"
    )
    height = max(600, min(int(height), 16000))
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        time.sleep(0.5)  # let the re-layout settle
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def page_url(base: str, docname: str) -> str:
    return f"{base}/{docname}.html"


@pytest.fixture(scope="session")
def visit(browser, base_url, site_dir):
    """visit(docname) -> PageReport, loading each page once per session."""
    cache: dict[str, PageReport] = {}

    def _visit(docname: str) -> PageReport:
        if docname in cache:
            return cache[docname]
        _drain_logs(browser)  # drop whatever earlier pages left behind
        report = PageReport(docname=docname, url=page_url(base_url, docname))
        report.widget_state_expected = notebook_has_widget_state(docname)
        report.png_expected = notebook_has_png(docname)
        browser.get(report.url)
        _wait(browser, "return document.readyState === 'complete'")
        # Widgets: html-manager renders asynchronously after the load event.
        _wait(
            browser,
            f"""const v = document.querySelectorAll('script[type="{WIDGET_VIEW_MIME}"]');
                return Array.from(v).every(s => s.previousElementSibling &&
                    s.previousElementSibling.querySelector('[class*="widget-"]'));""",
        )
        # Maths: wait for MathJax's startup typesetting to finish, if MathJax is on the page.
        _wait(
            browser,
            """if (!document.querySelector('.math')) return true;
               if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return false;
               if (window.__mjx_done === undefined) {
                 window.__mjx_done = false;
                 MathJax.startup.promise.then(() => { window.__mjx_done = true; });
               }
               return window.__mjx_done;""",
        )
        _wait(browser, "return Array.from(document.images).every(i => i.complete)")
        for key, value in browser.execute_script(_JS_FACTS).items():
            setattr(report, key, value)
        report.title = report.title.replace("#", "").strip()
        # book/07_x and exercises/07_x share a file name: keep the folder in the screenshot's name.
        name = docname.replace("/", "__")
        report.screenshot = full_page_screenshot(browser, SCREENSHOTS / f"{name}.png")
        report.console_errors, report.requests = _drain_logs(browser)
        cache[docname] = report
        return report

    return _visit


