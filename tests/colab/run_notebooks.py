"""Run notebooks as a Colab student would, in a Colab-like venv, and check what the install cell did.

    .venv-colab/bin/python tests/colab/run_notebooks.py OUT_DIR RUNTIME_TXT NOTEBOOK...

Run by scripts/colab_check.sh with this venv's own Python (its kernel is the one the notebooks
get). Each notebook runs top to bottom in a fresh kernel, as on a fresh Colab VM, its first cell
being its own install cell (COURSE_LIB_INSTALL points it at this checkout). Checked:

* the first notebook's install cell installs course_lib and adds what is missing, replaces nothing,
  says no restart is needed; later notebooks' install cells find everything and install nothing;
* every package of the Colab runtime (RUNTIME_TXT) still has Colab's version afterwards;
* every check printed by a notebook passed (a worked exercise notebook);
* the installed course_lib holds course_lib and nothing else: no solutions/ to import;
* the data came as the source archives (their "unpacked" marks are in the cache).
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        text = out.get("text") or out.get("data", {}).get("text/plain", "")
        parts.append("".join(text) if isinstance(text, list) else text)
        if out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    return "".join(parts)


def runtime_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def fail(message: str) -> None:
    print(f"FAILED: {message}", flush=True)
    sys.exit(1)


def main() -> int:
    out_dir, runtime, notebooks = Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"  # the kernels' working folder, as /content is on Colab: not the checkout
    work.mkdir(exist_ok=True)
    colab = runtime_pins(runtime)
    for i, path in enumerate(notebooks):
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        client = NotebookClient(nb, timeout=1800, kernel_name="python3", allow_errors=False,
                                resources={"metadata": {"path": str(work)}})
        try:
            client.execute()
        finally:
            nbformat.write(nb, out_dir / path.name)
        install = next(c for c in nb.cells if "colab-install" in c.metadata.get("tags", []))
        said = outputs(install)
        print(f"--- {path} executed in {time.perf_counter() - start:.0f} s; its install cell said:\n{said.strip()}",
              flush=True)
        if i == 0:
            for expected in ("Installing course_lib from", "Added ", "No restart needed"):
                if expected not in said:
                    fail(f"{path}: the install cell did not say {expected!r}")
        elif "Nothing to install." not in said:
            fail(f"{path}: the install cell of a later notebook installed something")
        marks = re.findall(r"CHECK (PASSED|FAILED): (\w+)", "".join(outputs(c) for c in nb.cells))
        if any(verdict == "FAILED" for verdict, _ in marks):
            fail(f"{path}: checks failed: {marks}")
        if marks:
            print(f"    {len(marks)} checks passed: {', '.join(name for _, name in marks)}")

    # Colab's packages that course_lib's ranges admit must be untouched; any other may only have been
    # replaced by a version in range (and the cell said so, above).
    from course_lib import install

    reqs = install.requirements(("notebook",))
    found = install.plan(reqs, {install._canon(n): v for n, v in colab.items()})
    out_of_range = {install._canon(r) for r in found.out_of_range}
    now = {n: metadata.version(n) for n in colab}
    changed = {n: (v, now[n]) for n, v in colab.items() if now[n].split("+")[0] != v}
    wrongly = {n: c for n, c in changed.items() if install._canon(n) not in out_of_range}
    if wrongly:
        fail(f"the install cells replaced Colab's packages that were in range: {wrongly}")
    if install.plan(reqs).to_install:
        fail(f"after the install cell, still missing or out of range: {install.plan(reqs).to_install}")
    print(f"Colab's {len(colab)} packages: kept {len(colab) - len(changed)} at Colab's versions; replaced, being "
          f"out of course_lib's ranges: {', '.join(f'{n} {a} -> {b}' for n, (a, b) in changed.items()) or 'none'}")

    dist = metadata.distribution("course_lib")
    tops = sorted({f.parts[0] for f in dist.files or []} - {"..", "__pycache__"})
    if [t for t in tops if t != "course_lib" and not t.endswith(".dist-info")]:
        fail(f"the installed course_lib holds more than course_lib: {tops}")
    if importlib.util.find_spec("solutions") is not None or importlib.util.find_spec("exercises") is not None:
        fail("the worked solutions are importable from the student's install")
    location = Path(importlib.util.find_spec("course_lib").origin).parent
    if not str(location).startswith(sys.prefix) or "site-packages" not in str(location):
        fail(f"course_lib was imported from {location}, not from the installed copy")
    print(f"installed course_lib: {', '.join(tops)} (no solutions), imported from {location}")

    cache = Path(os.environ["COURSE_LIB_CACHE"]) / "data" / ".archives"
    marks = sorted(p.name for p in cache.glob("*.unpacked"))
    if not marks:
        fail(f"no data archive was unpacked under {cache}")
    print(f"data archives unpacked: {', '.join(marks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
