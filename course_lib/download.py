"""Download the probing data from its public sources, checked against packaged sha256 sums.

The registry (``course_lib/data_registry.json``, built by ``scripts/make_data_registry.py``)
lists every file of the data folder: its sha256, size and public URL. ``fetch_file`` brings one
file into a local folder and returns its path; ``fetch_all`` does a whole folder or everything.

A download goes to a temporary file beside its destination, is checked against the registry's
sha256, and only then is moved into place (atomically, with ``os.replace``), so a half-written or
wrong file never sits at the destination.

Environment variables:

* ``COURSE_LIB_DATA_URL_BASE``: if set, every file is fetched from ``<base>/<relative path>``
  instead of its upstream URL: for mirrors, and for tests (``file:///path/to/shared/data``).
* neither that nor an explicit URL: the file comes with its source's archive (``course_lib.archives``,
  ``COURSE_LIB_ARCHIVE_URL_BASE``), and only if that cannot be had from its own upstream URL.
* ``COURSE_LIB_DATA``: not read here; ``course_lib.data`` uses it to read a local copy of the
  data folder instead of downloading. Error messages suggest it.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path, PurePosixPath
from typing import Iterable

from .files import atomic_path

__all__ = [
    "ChecksumMismatch",
    "DataNotFound",
    "UnknownDataFile",
    "load_registry",
    "fetch_file",
    "fetch_all",
    "sha256_file",
    "URL_BASE_ENV",
    "DATA_ENV",
]

URL_BASE_ENV = "COURSE_LIB_DATA_URL_BASE"
DATA_ENV = "COURSE_LIB_DATA"
REGISTRY_FILE = "data_registry.json"
REGISTRY_VERSION = 1

_CHUNK = 1 << 16
_BAR_MIN_BYTES = 1 << 20  # show a byte progress bar only for files at least this big
_TIMEOUT_S = 60
_HTTP_TRIES = 3
_USER_AGENT = "course_lib-data-download/1 (+python urllib)"
_HOW_TO_FIX = (
    f"To fix: set {DATA_ENV} to a folder holding a copy of the data (the project's shared/data), "
    f"or set {URL_BASE_ENV} to a mirror of it, or check that this machine can reach the URL."
)


class ChecksumMismatch(RuntimeError):
    """A downloaded file's sha256 is not the registry's. The bad bytes were not kept."""

    def __init__(self, relpath: str, url: str, expected: str, actual: str, size: int | None = None):
        self.relpath, self.url, self.expected, self.actual, self.size = relpath, url, expected, actual, size
        got = f" ({size:,} bytes)" if size is not None else ""
        super().__init__(
            f"checksum mismatch for {relpath} downloaded from {url}{got}: expected sha256 {expected}, "
            f"got {actual}. The download was discarded. The upstream file may have changed; "
            f"use a verified copy ({DATA_ENV}) or a mirror ({URL_BASE_ENV})."
        )


class DataNotFound(FileNotFoundError):
    """A data file is not present locally and could not be downloaded."""

    def __init__(self, message: str, *, relpath: str | None = None, urls: Iterable[str] = ()):
        self.relpath, self.urls = relpath, list(urls)
        super().__init__(message)

    def __str__(self) -> str:  # FileNotFoundError would otherwise show only args[0] oddly for 2+ args
        return self.args[0]


class UnknownDataFile(ValueError, KeyError):
    """A relative path that the registry does not know (catchable as ValueError or KeyError)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# registry


@functools.lru_cache(maxsize=1)
def _packaged_registry() -> dict:
    text = None
    try:
        from importlib import resources

        text = resources.files(__package__ or "course_lib").joinpath(REGISTRY_FILE).read_text(encoding="utf-8")
    except (ImportError, FileNotFoundError, TypeError, AttributeError, ModuleNotFoundError):
        pass
    if text is None:  # e.g. running from a source tree that importlib.resources cannot see
        text = (Path(__file__).resolve().parent / REGISTRY_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    if data.get("version") != REGISTRY_VERSION or not isinstance(data.get("files"), dict):
        raise RuntimeError(f"{REGISTRY_FILE}: expected version {REGISTRY_VERSION} with a 'files' table")
    return data["files"]


def load_registry() -> dict[str, dict]:
    """The packaged registry: relative path -> {"sha256", "size", "url", "verified", ...}.

    Returns a fresh copy each call, so callers may edit it (e.g. tests) without side effects.
    """
    return {k: dict(v) for k, v in _packaged_registry().items()}


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _normalize(relpath: str) -> str:
    rel = str(relpath).replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or rel.endswith("/"):
        raise UnknownDataFile(f"{relpath!r} is not a relative path of a data file (like 'lama/relations.jsonl')")
    return p.as_posix()


def _unknown(relpath: str, registry: dict) -> UnknownDataFile:
    keys = list(registry)
    close = difflib.get_close_matches(relpath, keys, n=5, cutoff=0.6)
    if not close:  # try by file name, then by folder
        name = PurePosixPath(relpath).name
        close = [k for k in keys if PurePosixPath(k).name == name][:5]
    if close:
        hint = "Did you mean: " + ", ".join(close) + "?"
    else:
        tops = sorted({k.split("/")[0] for k in keys})
        hint = "Known top-level entries: " + ", ".join(tops)
    return UnknownDataFile(f"unknown data file {relpath!r} (not in the data registry, {len(keys)} files). {hint}")


def _candidate_urls(relpath: str, entry: dict, url: str | None) -> list[str]:
    if url:
        return [url]
    base = os.environ.get(URL_BASE_ENV)
    if base:
        return [base.rstrip("/") + "/" + urllib.parse.quote(relpath, safe="/")]
    urls = [entry.get("url")] + list(entry.get("alt") or [])
    return [u for u in urls if u]


# --------------------------------------------------------------------------------------------
# downloading


def _bar(total: int | None, desc: str, show: bool):
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a requirement
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                file=sys.stderr)


def _download_to(url: str, tmp: Path, *, desc: str, expected_size: int | None, progress: bool) -> tuple[str, int]:
    """Stream ``url`` into ``tmp`` (created here); return (sha256, size)."""
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    h = hashlib.sha256()
    n = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:
        length = resp.headers.get("Content-Length") if resp.headers else None
        total = int(length) if length and length.isdigit() else expected_size
        bar = _bar(total, desc, progress and (total or 0) >= _BAR_MIN_BYTES)
        try:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), n


def _transient(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code in (408, 425, 429) or err.code >= 500
    return isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException))


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def fetch_file(
    relpath: str,
    dest_root: os.PathLike | str,
    *,
    registry: dict | None = None,
    url: str | None = None,
    progress: bool = True,
) -> Path:
    """Make ``dest_root/relpath`` a verified copy of a registry file; return its path.

    If the file is already there with the registry's sha256 nothing is downloaded. Otherwise it
    is downloaded from ``url`` if given, else from ``$COURSE_LIB_DATA_URL_BASE/relpath`` if that
    is set, else with its source's archive, else from the registry's URL (then its ``alt`` URLs). Raises
    ``UnknownDataFile`` (a ValueError) for a path the registry lacks, ``ChecksumMismatch`` if the
    downloaded bytes are wrong, ``DataNotFound`` if no URL works.
    """
    reg = load_registry() if registry is None else registry
    rel = _normalize(relpath)
    entry = reg.get(rel)
    if entry is None:
        raise _unknown(rel, reg)
    expected = str(entry["sha256"]).lower()
    expected_size = entry.get("size")
    dest = Path(dest_root) / rel

    stale = False
    if dest.is_file():
        if (expected_size is None or dest.stat().st_size == expected_size) and sha256_file(dest) == expected:
            return dest
        stale = True  # wrong bytes at the destination: replaced below, or removed if no good copy can be had
        warnings.warn(f"the cached copy of {rel} at {dest} does not match its sha256 in {REGISTRY_FILE} (edited or "
                      "damaged since it was downloaded); downloading it again", RuntimeWarning, stacklevel=2)

    if url is None and not os.environ.get(URL_BASE_ENV):
        # One archive per source instead of hundreds of single files (course_lib.archives).
        from .archives import fetch_from_archive

        if (got := fetch_from_archive(rel, dest_root, registry=reg, progress=progress)) is not None:
            return got

    urls = _candidate_urls(rel, entry, url)
    if not urls:
        note = f" ({entry['note']})" if entry.get("note") else ""
        raise DataNotFound(
            f"{rel} is not at {dest} and has no download URL{note}. "
            f"Set {DATA_ENV} to a folder holding a copy of the data, or {URL_BASE_ENV} to a mirror of it.",
            relpath=rel,
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    mismatch: ChecksumMismatch | None = None
    last_err: BaseException | None = None
    for u in urls:
        tries = _HTTP_TRIES if u.lower().startswith(("http://", "https://")) else 1
        for attempt in range(tries):
            try:
                # files.atomic_path publishes the file only if the block ends normally: a download
                # with the wrong sha256 raises _WrongBytes and leaves nothing behind.
                with atomic_path(dest) as tmp:
                    actual, size = _download_to(u, tmp, desc=rel, expected_size=expected_size, progress=progress)
                    if actual != expected:
                        raise _WrongBytes(actual, size)
                return dest
            except _WrongBytes as wrong:
                mismatch = ChecksumMismatch(rel, u, expected, wrong.actual, wrong.size)
                errors.append(f"{u}: sha256 {wrong.actual} != expected {expected}")
                break  # retrying the same URL would give the same bytes; try the next URL
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
                last_err = err
                retry = attempt + 1 < tries and _transient(err)
                if not retry:
                    errors.append(f"{u}: {_describe(err)}")
                    break
                time.sleep(2**attempt)

    if stale:  # the destination holds known-bad bytes and no good copy could be had: drop it
        _unlink(dest)
    if mismatch is not None:
        if len(urls) > 1:
            mismatch.args = (mismatch.args[0] + " Tried: " + "; ".join(errors),)
        raise mismatch
    tried = "; ".join(errors)
    raise DataNotFound(
        f"could not download {rel} to {dest}. Tried {tried}. {_HOW_TO_FIX}",
        relpath=rel,
        urls=urls,
    ) from last_err


class _WrongBytes(Exception):
    def __init__(self, actual: str, size: int):
        self.actual, self.size = actual, size


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"{type(err.reason).__name__}: {err.reason}"
    return f"{type(err).__name__}: {err}"


def fetch_all(
    dest_root: os.PathLike | str,
    prefixes: list[str] | None = None,
    *,
    registry: dict | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch every registry file under the given folder prefixes (all files if None).

    A prefix names a folder (``"soft_prompts/db/trex_original"``) or one file. Files that have no
    public URL (written for this project) are skipped with a warning when fetching everything
    without ``COURSE_LIB_DATA_URL_BASE``; asked for by prefix, they raise ``DataNotFound``.
    """
    reg = load_registry() if registry is None else registry
    if prefixes is None:
        selected = sorted(reg)
        if not os.environ.get(URL_BASE_ENV):
            no_url = [k for k in selected if not reg[k].get("url") and not reg[k].get("alt")]
            if no_url:
                warnings.warn(
                    f"skipping {len(no_url)} files with no public URL ({', '.join(no_url)}); "
                    f"copy them from shared/data or set {URL_BASE_ENV}",
                    stacklevel=2,
                )
                skip = set(no_url)
                selected = [k for k in selected if k not in skip]
    else:
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        selected_set: set[str] = set()
        for prefix in prefixes:
            p = str(prefix).replace("\\", "/").strip("/")
            hits = [k for k in reg if k == p or k.startswith(p + "/")]
            if not hits:
                folders = sorted({str(PurePosixPath(k).parent) for k in reg} | set(reg))
                close = difflib.get_close_matches(p, folders, n=5, cutoff=0.6)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise UnknownDataFile(f"no data file under {prefix!r}.{hint}")
            selected_set.update(hits)
        selected = sorted(selected_set)

    bar = None
    if progress and len(selected) > 1:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(selected), desc="data files", unit="file", file=sys.stderr)
        except ImportError:
            bar = None
    paths = []
    try:
        for rel in selected:
            paths.append(fetch_file(rel, dest_root, registry=reg, progress=progress))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m course_lib.download",
                                 description="Download (and verify) the probing data.")
    ap.add_argument("dest", type=Path, help="folder to fill (e.g. ~/.cache/course_lib/data)")
    ap.add_argument("prefixes", nargs="*", help="folders or files to fetch (default: all)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        paths = fetch_all(args.dest, args.prefixes or None, progress=not args.quiet)
    except (DataNotFound, ChecksumMismatch, UnknownDataFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{len(paths)} files verified under {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
