"""Writing files safely: atomic replacement, a lock for files several processes update, checked output paths.

Every file the library publishes (results tables, results-cache entries, checkpoints, cached
tables, downloaded data) goes through ``atomic_path``: the bytes are written to a temporary file
with a name no other writer uses, in the destination's folder, flushed to disk, and renamed over
the destination. A reader therefore sees the old file or the new one, never half of either, and
two writers never write into the same temporary file.

``locked`` serialises read-modify-write cycles on one file (two ``probe --resume`` runs sharing an
``--out``); ``check_output_file`` and ``check_output_dir`` find an unusable output path before a
command spends minutes on work it could not save.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["UnusablePath", "UnwritablePath", "atomic_path", "write_bytes", "write_text", "locked", "check_output_file",
           "check_output_dir", "sha256_bytes", "sha256_file", "describe_os_error"]


class UnusablePath(ValueError):
    """An output path that cannot be what the command needs (a folder given for a file, a file under a file)."""


class UnwritablePath(OSError):
    """An output folder this process cannot write in (read-only, full, no permission); the message says which."""

    def __str__(self) -> str:
        return str(self.args[-1]) if self.args else ""


# The host and process in a temporary name tell a later writer which leftovers are orphans: a
# process on this host that no longer runs will never rename its temporary file into place.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists, it is someone else's
        return True
    return True


def _remove_orphans(path: Path) -> None:
    """Delete temporary files of ``path`` left by killed writers on this host (never a live writer's)."""
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for tmp in siblings:
        m = _TMP.match(tmp.name)
        if not (m and m["name"] == path.name and m["host"] == _HOST) or int(m["pid"]) == os.getpid():
            continue
        if not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform or file system can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without error.

    The block writes the file (by any means: ``open``, ``save_file``, ``to_csv``); its contents are
    flushed to disk before the rename. On an exception, or if the block wrote nothing, the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.filename in (None, str(tmp)):
            err.filename = str(path)  # the file the user asked for, not a temporary name they never saw
        raise
    _fsync_dir(path.parent)
    _remove_orphans(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see ``atomic_path``)."""
    return write_bytes(path, text.encode("utf-8"))


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a sidecar ``.NAME.lock`` file) for a read-modify-write cycle.

    Every process that updates ``path`` through this lock sees the others' writes: the lock is
    taken before the file is read and released after the new version is renamed into place. The
    lock file stays (removing it would race with a process about to lock it).
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _lock(fd)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


try:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # Windows
    import msvcrt

    def _lock(fd: int) -> None:
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                return
            except OSError:  # LK_LOCK gives up after 10 s; keep waiting, as flock does
                continue

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


# ------------------------------------------------------------------------------------------ output paths
def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def _check_folder_writable(folder: Path, what: str) -> None:
    """Create the folder if needed and write (and delete) a small file in it: the only reliable test.

    ``os.access`` says yes to root on a read-only mount and knows nothing of a full disk.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".course_lib-write-test-")
        try:
            # One block: on a full disk even this fails, before the command's work starts.
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        why = describe_os_error(err, with_path=False)
        raise UnwritablePath(err.errno, f"{what} {folder}: cannot write there: {why}") from None


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Make sure a file can be written at ``path``; raise UnusablePath or OSError naming ``what`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UnusablePath(f"{what} {path}: is a folder; give a file name (e.g. {path / 'results.csv'})")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise UnusablePath(f"{what} {path}: {existing} is a file, not a folder")
    _check_folder_writable(path.parent, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Make sure ``path`` is (or can be made) a folder files can be written in."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UnusablePath(f"{what} {path}: {existing} is a file, not a folder")
    _check_folder_writable(path, what)
    return path


def describe_os_error(err: OSError, with_path: bool = True) -> str:
    """A one-line account of a file-system error, with a hint for the common environment problems."""
    hints = {
        errno.ENOSPC: "the disk is full; free some space or write elsewhere",
        errno.EROFS: "a read-only file system; write elsewhere",
        errno.EACCES: "permission denied; write elsewhere or fix the permissions",
        errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    }
    text = err.strerror or str(err)
    if err.errno in hints and hints[err.errno].split(";")[0] not in text.lower():
        text = f"{text} ({hints[err.errno]})"
    if with_path and err.filename:
        return f"{err.filename}: {text}"
    return text


# ------------------------------------------------------------------------------------------ checksums
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
