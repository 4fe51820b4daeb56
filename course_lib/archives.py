"""The data as a few archives, one per public source, each checked by sha256 and unpacked once.

Without ``COURSE_LIB_DATA`` the data used to arrive as some 750 single-file downloads. Instead, the
first file needed from a source brings that source's whole archive (``soft-prompts.tar.gz``,
``lpaqa.tar.gz``...): it is downloaded next to the data (``<cache>/data/.archives/``), its sha256
checked against the packaged registry, and every member unpacked after checking it against the
sha256 of that file in the registry (an unknown or altered member stops everything). The archive
is kept, so a file deleted later is unpacked again without a download.

The archives are built from the data folder by ``scripts/make_data_registry.py --archives DIR``
(byte for byte reproducible: sorted members, no dates, no owners) and published as assets of
the release in ``course_lib.release``. ``COURSE_LIB_ARCHIVE_URL_BASE`` points at another copy of
them (a mirror; the tests' local server or ``file://`` folder), or is ``off`` for none (the
release job, which builds them). When an archive cannot be had, ``course_lib.download`` falls back
to the files' upstream addresses one by one.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import secrets
import sys
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path, PurePosixPath

from .download import REGISTRY_FILE, ChecksumMismatch, DataNotFound, load_registry, sha256_file

__all__ = ["ARCHIVE_URL_ENV", "BadArchive", "archives", "archive_of", "archive_url", "build", "fetch_archive",
           "unpack", "fetch_from_archive", "fetch_all_archives"]

ARCHIVE_URL_ENV = "COURSE_LIB_ARCHIVE_URL_BASE"
FOLDER = ".archives"  # under the data root: the downloaded archives and their "unpacked" marks
_RAW = "https://raw.githubusercontent.com/"
_TRIES = 4  # for http(s): a failed request is retried after 2, 6 and 18 s (or what Retry-After asks, <= 60 s)
_TIMEOUT_S = 60
_CHUNK = 1 << 16


class BadArchive(ValueError):
    """An archive member that is not one of the registry's files (unknown path, link, ``..``)."""


def build(data_dir: os.PathLike | str, members: list[str]) -> bytes:
    """A .tar.gz of these files of ``data_dir``, the same bytes every time (for the same zlib).

    Members sorted, no dates, owners or modes of the machine that built it; gzip without a name
    or a date. scripts/make_data_registry.py writes the sha256 of each into the registry.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for rel in sorted(members):
            data = (Path(data_dir) / rel).read_bytes()
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o644, 0, 0, "", "")
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), compresslevel=9, mtime=0)


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, dict]:
    text = (Path(__file__).resolve().parent / REGISTRY_FILE).read_text(encoding="utf-8")
    return json.loads(text).get("archives", {})


def archives() -> dict[str, dict]:
    """Archive name -> {"sha256", "size", "repo", "files"} (a copy)."""
    return {k: dict(v) for k, v in _table().items()}


def archive_of(relpath: str, entry: dict | None = None) -> str | None:
    """The archive holding a registry file: the one of the GitHub repository its URL points into."""
    if entry is None:
        entry = load_registry().get(relpath)
    url = (entry or {}).get("url") or ""
    if not url.startswith(_RAW):
        return None
    repo = "/".join(url[len(_RAW):].split("/")[:2])
    return next((name for name, a in _table().items() if a["repo"] == repo), None)


def archive_url(name: str) -> str:
    base = os.environ.get(ARCHIVE_URL_ENV)
    if base:
        return base.rstrip("/") + "/" + name
    from .release import asset_url

    return asset_url(name)


def _retry_after(err: BaseException, attempt: int) -> float | None:
    """Seconds to wait before trying again, or None when trying again cannot help."""
    if isinstance(err, urllib.error.HTTPError):
        if err.code not in (408, 425, 429) and err.code < 500:
            return None
        asked = err.headers.get("Retry-After") if err.headers else None
        if asked and asked.isdigit():
            return min(float(asked), 60.0)
    elif not isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError)):
        return None
    return 2.0 * 3**attempt


def _download(url: str, tmp: Path, size: int | None, progress: bool, desc: str) -> str:
    """Stream ``url`` into ``tmp``; return the sha256 of what arrived."""
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=size, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                       file=sys.stderr)
        except ImportError:  # progress is a nicety, never a requirement
            bar = None
    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "course_lib-data-archives/1"})
    try:
        with open(tmp, "wb") as out, urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return h.hexdigest()


def fetch_archive(name: str, dest_root: os.PathLike | str, *, progress: bool = True) -> Path:
    """``<dest_root>/.archives/<name>``, downloaded if missing or wrong, always checked by sha256."""
    info = _table().get(name)
    if info is None:
        raise DataNotFound(f"unknown data archive {name!r}; known: {', '.join(_table())}")
    path = Path(dest_root) / FOLDER / name
    if path.is_file() and path.stat().st_size == info["size"] and sha256_file(path) == info["sha256"]:
        return path
    url = archive_url(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tries = _TRIES if url.lower().startswith(("http://", "https://")) else 1
    for attempt in range(tries):
        tmp = path.parent / f".{name}.{secrets.token_hex(4)}.part"
        try:
            got = _download(url, tmp, info["size"], progress, name)
            if got != info["sha256"]:
                raise ChecksumMismatch(f"{FOLDER}/{name}", url, info["sha256"], got, tmp.stat().st_size)
            os.replace(tmp, path)
            return path
        except (urllib.error.URLError, OSError, ValueError) as err:
            wait = _retry_after(err, attempt) if attempt + 1 < tries else None
            if wait is None:
                raise DataNotFound(f"could not download the data archive {name} from {url}: {err}",
                                   relpath=name, urls=[url]) from err
            time.sleep(wait)
        finally:
            tmp.unlink(missing_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover


def _mark(dest_root: Path, name: str) -> Path:
    return dest_root / FOLDER / f"{name}.unpacked"


def unpack(name: str, dest_root: os.PathLike | str, *, only: set[str] | None = None,
           registry: dict | None = None, progress: bool = True) -> list[Path]:
    """Unpack (the ``only`` members of) an archive into ``dest_root``, each member checked first.

    A member must be a regular file that the registry lists, with the registry's sha256; anything
    else (an unknown path, a link, ``..``, altered bytes) raises before it is written. Each file is
    written atomically. Returns the paths written.
    """
    root = Path(dest_root)
    reg = load_registry() if registry is None else registry
    path = fetch_archive(name, root, progress=progress)
    written = []
    with tarfile.open(path, mode="r:gz") as tar:
        for member in tar:
            rel = member.name
            entry = reg.get(rel)
            if entry is None or not member.isfile() or ".." in PurePosixPath(rel).parts or rel.startswith("/"):
                what = "not a file of the data registry" if entry is None else "not a plain file"
                raise BadArchive(f"{path}: member {rel!r} is {what}; nothing more was unpacked. "
                                 "Delete the archive and try again, or report it.")
            if only is not None and rel not in only:
                continue
            data = tar.extractfile(member).read()
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:
                raise ChecksumMismatch(rel, f"{path}!{rel}", entry["sha256"], digest, len(data))
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
            with io.open(tmp, "wb") as out:
                out.write(data)
            os.replace(tmp, dest)
            written.append(dest)
    if only is None:
        _mark(root, name).write_text(_table()[name]["sha256"] + "\n", encoding="utf-8")
    return written


def fetch_from_archive(relpath: str, dest_root: os.PathLike | str, *, registry: dict | None = None,
                       progress: bool = True) -> Path | None:
    """Bring one registry file through its source's archive; None when there is no archive to be had.

    The first file of a source unpacks the whole archive; later, a missing file is unpacked alone
    from the kept archive. A download that fails is reported as a warning (the caller falls back
    to single-file downloads); a wrong checksum raises.
    """
    root = Path(dest_root)
    reg = load_registry() if registry is None else registry
    name = archive_of(relpath, reg.get(relpath))
    if name is None or os.environ.get(ARCHIVE_URL_ENV, "").lower() == "off":
        return None
    mark = _mark(root, name)
    done = mark.is_file() and mark.read_text(encoding="utf-8").strip() == _table()[name]["sha256"]
    try:
        unpack(name, root, only={relpath} if done else None, registry=reg, progress=progress)
    except DataNotFound as err:
        warnings.warn(f"{err}; downloading the files one by one from their sources instead", stacklevel=2)
        return None
    dest = root / relpath
    return dest if dest.is_file() else None


def fetch_all_archives(dest_root: os.PathLike | str, *, progress: bool = True) -> list[Path]:
    """Every archive downloaded, checked and unpacked into ``dest_root``: the data for offline use."""
    root = Path(dest_root)
    out = []
    for name in _table():
        out += unpack(name, root, progress=progress)
    return out
