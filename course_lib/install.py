"""Make a running Python (Colab above all) ready for the book without replacing what it already has.

Every notebook's first code cell (tagged ``colab-install``, written by ``scripts/release.py``)
installs ``course_lib`` itself without dependencies when it is missing, then calls::

    from course_lib import install
    install.ensure("notebook", drive=USE_DRIVE)

``ensure`` reads course_lib's own requirements (its dependencies and the ``notebook`` extra, as
ranges: see pyproject.toml), and for each one looks at what is installed:

* in range: kept, whatever its version (Colab's torch, numpy, pandas, ipykernel, ipywidgets...);
* missing or out of range: installed with pip, under a constraints file that pins every
  distribution already installed, so that pip may add packages but replaces none. Only when that
  cannot be resolved does pip get a free hand, and what it replaced is reported.

It prints what it kept, added and replaced. When it replaced a package whose modules this Python
has already imported (the running kernel would keep the old ones), it raises ``RestartRequired``
after saying so: "Run all" stops there instead of going on with stale modules.

With ``drive=True`` on Colab it mounts Google Drive and points ``COURSE_LIB_CACHE`` at a folder in
it, so the data, the converted Gemma model and the trained prompts survive from one notebook (one
Colab VM) to the next.

Only the standard library is imported at module level: this runs before anything else is installed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RestartRequired", "Plan", "plan", "ensure", "use_drive", "DRIVE_FOLDER", "CACHE_ENV"]

CACHE_ENV = "COURSE_LIB_CACHE"  # read by course_lib.data.cache_dir
DRIVE_MOUNT = "/content/drive"
DRIVE_FOLDER = f"{DRIVE_MOUNT}/MyDrive/course_lib"
_PIP_ENV = "COURSE_LIB_PIP_ARGS"  # extra pip arguments (e.g. an index for tests); rarely needed


class RestartRequired(RuntimeError):
    """Packages this Python had already imported were replaced: restart the runtime, then run again."""


def _packaging():
    # packaging is everywhere pip is, but not always importable by itself in a bare venv.
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
        from packaging.version import Version
    except ImportError:  # pragma: no cover - depends on the environment
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
        from pip._vendor.packaging.version import Version
    return Requirement, canonicalize_name, Version


@dataclass
class Plan:
    """What ``ensure`` found: requirement text -> installed version (kept), or what must be installed."""

    kept: dict[str, str] = field(default_factory=dict)  # requirement -> installed version
    missing: list[str] = field(default_factory=list)  # requirements with nothing installed
    out_of_range: dict[str, str] = field(default_factory=dict)  # requirement -> installed version

    @property
    def to_install(self) -> list[str]:
        return [*self.missing, *self.out_of_range]

    def _ipython_display_(self) -> None:
        """Nothing: ensure() already printed its summary when a cell ends with it."""


def requirements(extras: tuple[str, ...] = ("notebook",), dist: str = "course_lib") -> list[str]:
    """course_lib's requirements for these extras, markers evaluated for this Python and stripped.

    An extra that names course_lib's own extras (``course_lib[notebook]``) is followed.
    """
    Requirement, canonicalize_name, _ = _packaging()
    out: list[str] = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None:
            wanted = req.marker.evaluate({"extra": ""}) or any(req.marker.evaluate({"extra": e}) for e in extras)
            if not wanted:
                continue
            req.marker = None
        if canonicalize_name(req.name) == canonicalize_name(dist):
            out.extend(r for r in requirements(tuple(sorted(req.extras)), dist) if r not in out)
        elif str(req) not in out:
            out.append(str(req))
    return out


def _installed() -> dict[str, str]:
    """canonical name -> version of every distribution this Python sees (first one on sys.path wins)."""
    _, canonicalize_name, _ = _packaging()
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def plan(reqs: list[str], installed: dict[str, str] | None = None) -> Plan:
    """Sort requirements into kept / missing / out of range against what is installed."""
    Requirement, canonicalize_name, Version = _packaging()
    have = _installed() if installed is None else installed
    result = Plan()
    for text in reqs:
        req = Requirement(text)
        version = have.get(canonicalize_name(req.name))
        if version is None:
            result.missing.append(text)
        elif req.specifier.contains(Version(version), prereleases=True):
            result.kept[text] = version
        else:
            result.out_of_range[text] = version
    return result


def _import_names(dist_name: str) -> set[str]:
    """Top-level modules a distribution provides (to tell whether this Python has imported them)."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        return set()
    names = set((dist.read_text("top_level.txt") or "").split())
    for f in dist.files or []:
        top = f.parts[0]
        if top.endswith((".dist-info", ".data")) or top in ("..", "__pycache__"):
            continue
        names.add(top[:-3] if top.endswith(".py") else top)
    return {n for n in names if n.isidentifier()}


def _pip(args: list[str]) -> int:
    extra = os.environ.get(_PIP_ENV, "").split()
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *extra, *args]
    print("  $ pip install " + " ".join([*extra, *args]), flush=True)
    return subprocess.run(cmd).returncode


def _short(req: str) -> str:
    return req.split(";")[0].replace(" ", "")


def use_drive(folder: str = DRIVE_FOLDER) -> Path | None:
    """On Colab: mount Google Drive and keep course_lib's cache there. Elsewhere: say so, do nothing."""
    try:
        from google.colab import drive  # type: ignore[import-not-found]
    except ImportError:
        print("USE_DRIVE: not on Colab, so nothing to mount; the cache stays where it is.")
        return None
    drive.mount(DRIVE_MOUNT)
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(path)
    print(f"USE_DRIVE: data, converted models and trained prompts are kept in {path} ({CACHE_ENV}).")
    return path


def ensure(*extras: str, drive: bool = False, dist: str = "course_lib") -> Plan:
    """Install what course_lib needs and is missing; replace nothing in range; say if a restart is needed."""
    extras = extras or ("notebook",)
    if drive:
        use_drive()
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:  # imported from a source folder (PYTHONPATH): no metadata to check
        print(f"{dist} is imported from a source folder, not installed: its requirements are not checked.")
        return Plan()
    reqs = requirements(tuple(extras), dist)
    before = _installed()
    found = plan(reqs, before)
    kept = ", ".join(f"{_canon(r)} {v}" for r, v in found.kept.items())
    print(f"{dist} {version} ({'+'.join(extras)}): {len(found.kept)} of {len(reqs)} requirements already "
          f"installed and kept: {kept or 'none'}.")
    if not found.to_install:
        print("Nothing to install.")
        return found
    for req, have in found.out_of_range.items():
        print(f"  {_short(req)}: {have} is installed but out of range, so it will be replaced.")
    print(f"Installing {len(found.to_install)}: {', '.join(_short(r) for r in found.to_install)}")
    with tempfile.TemporaryDirectory() as tmp:
        # Pin everything already installed, except what must change: pip may add, not replace.
        change = {_canon(r) for r in found.out_of_range}
        pins = [f"{name}=={v}" for name, v in sorted(before.items()) if name not in change]
        constraints = Path(tmp) / "installed.txt"
        constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        rc = _pip(["-c", str(constraints), *found.to_install])
        if rc != 0:
            print("pip could not add them without replacing an installed package; letting it replace what it must.")
            rc = _pip(found.to_install)
    if rc != 0:
        raise RuntimeError(f"pip install failed (exit {rc}); see its messages above")
    after = _installed()
    added = sorted(n for n in after if n not in before)
    replaced = sorted(n for n in after if n in before and after[n] != before[n])
    print(f"Added {len(added)} package{'s' if len(added) != 1 else ''}: "
          f"{', '.join(f'{n} {after[n]}' for n in added) or 'none'}.")
    print(f"Replaced: {', '.join(f'{n} {before[n]} -> {after[n]}' for n in replaced) or 'nothing'}.")
    stale = sorted({m for n in replaced for m in _import_names(n) if m in sys.modules})
    if stale:
        message = (f"RESTART NEEDED: this Python had already imported {', '.join(stale)}, which pip just replaced. "
                   "Restart the runtime (Colab: Runtime > Restart session), then run this notebook again from "
                   "the top: this cell will find everything installed and do nothing.")
        print(message)
        raise RestartRequired(message)
    print("No restart needed: nothing that was replaced had been imported yet.")
    return found


def _canon(req: str) -> str:
    Requirement, canonicalize_name, _ = _packaging()
    return canonicalize_name(Requirement(req).name)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m course_lib.install", description=__doc__.split("\n\n")[0])
    ap.add_argument("extras", nargs="*", default=["notebook"], help="extras to satisfy (default: notebook)")
    ap.add_argument("--drive", action="store_true", help="on Colab, keep the cache in Google Drive (default: off)")
    args = ap.parse_args(argv)
    try:
        ensure(*args.extras, drive=args.drive)
    except RestartRequired:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
