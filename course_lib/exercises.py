"""Generate the student and worked versions of the exercise notebooks from one source each.

    python -m course_lib.exercises            # write exercises/NN_*.ipynb and solutions/NN_*.ipynb
    python -m course_lib.exercises --check    # exit 1, listing the files, if the committed ones are out of date
    python -m course_lib.exercises --export nbgrader DIR   # an nbgrader course folder (DIR/source/NN_*/...)
    python -m course_lib.exercises --export otter DIR      # student notebooks + OK-format tests for otter-grader
    python -m course_lib.exercises --times _build/executed/solutions   # minutes per exercise -> book/exercise_times.csv

The sources are ``exercises/source/NN_<name>.ipynb``. In a code cell, a solution region is the lines
between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` (nbgrader's own markers), optionally preceded by
``# HINT: text``. In a markdown cell, a written answer sits between the lines
``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->``.

* Student version (``exercises/``): the region becomes ``raise NotImplementedError("<hint>")`` at
  the region's indentation; a written answer becomes "*Your answer here.*".
* Worked version (``solutions/``): the markers and hints are dropped and the solution kept; code cells
  with a solution get the tag ``hide-input`` (the site folds them), and written answers are wrapped
  in a MyST ``{dropdown} Answer``.

Output is deterministic: no outputs, no execution counts, cell ids from the source, and JSON as
nbformat writes it (indent 1, sorted keys), so ``--check`` can compare bytes.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = Path("exercises") / "source"
STUDENT_DIR = Path("exercises")
SOLUTION_DIR = Path("solutions")

CODE_BEGIN, CODE_END, CODE_HINT = "# BEGIN SOLUTION", "# END SOLUTION", "# HINT:"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
DEFAULT_HINT = "write your solution here"
ANSWER_STUB = "*Your answer here.*"
HIDE_TAG = "hide-input"
INSTALL_TAG = "colab-install"  # the install cell (written by scripts/set_release.py)
CHECK_CALL = re.compile(r"^(?P<indent>\s*)(?P<call>(?:checks\.)?check_(?P<name>\w+)\((?P<args>.*)\))\s*$")
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
EXERCISE_HEADER = re.compile(r"^## Exercise (\d+)\.(\d+): (.+) \((implement|experiment|in words)\)\s*$", re.M)
HINT_STEP = re.compile(r"<details><summary>Hint (\d+): [^<]+</summary>")
TIMES_FILE = Path("book") / "exercise_times.csv"  # the instructors' page shows it


class SourceError(ValueError):
    """A malformed exercise source: the message names the file, the cell and the line."""


@dataclass
class Versions:
    student: dict[str, Any]
    solution: dict[str, Any]


def _lines(source: str | list[str]) -> list[str]:
    text = "".join(source) if isinstance(source, list) else source
    return text.splitlines()


def _join(lines: list[str]) -> list[str]:
    """nbformat's on-disk form: a list of lines, each but the last ending in a newline."""
    text = "\n".join(lines)
    return [line for line in text.splitlines(keepends=True)]


def _regions(lines: list[str], begin: str, end: str, where: str, hint_prefix: str | None):
    """Yield ("text", line) and ("region", (indent, hint, body_lines)) items; raise SourceError on bad markers."""
    items: list[tuple[str, Any]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if hint_prefix and stripped.startswith(hint_prefix):
            if i + 1 >= len(lines) or lines[i + 1].strip() != begin:
                raise SourceError(f"{where}, line {i + 1}: a '{hint_prefix}' line must come right before '{begin}'")
            i += 1
            continue
        if stripped == begin:
            hint = None
            if hint_prefix and i > 0 and lines[i - 1].strip().startswith(hint_prefix):
                hint = lines[i - 1].strip()[len(hint_prefix):].strip() or None
            indent = line[: len(line) - len(line.lstrip())]
            body: list[str] = []
            j = i + 1
            while j < len(lines) and lines[j].strip() != end:
                if lines[j].strip() == begin:
                    raise SourceError(f"{where}, line {j + 1}: '{begin}' inside a solution region (regions do not nest)")
                _forbid_marker_text(lines[j], where, j)
                body.append(lines[j])
                j += 1
            if j >= len(lines):
                raise SourceError(f"{where}, line {i + 1}: '{begin}' without a matching '{end}'")
            if not any(b.strip() for b in body):
                raise SourceError(f"{where}, line {i + 1}: an empty solution region")
            items.append(("region", (indent, hint, body)))
            i = j + 1
            continue
        if stripped == end:
            raise SourceError(f"{where}, line {i + 1}: '{end}' without a '{begin}' before it")
        _forbid_marker_text(line, where, i)
        items.append(("text", line))
        i += 1
    return items


def _forbid_marker_text(line: str, where: str, i: int) -> None:
    # nbgrader treats any line containing these words as a marker: keep them out of ordinary text.
    if "BEGIN SOLUTION" in line or "END SOLUTION" in line:
        raise SourceError(f"{where}, line {i + 1}: 'BEGIN SOLUTION' / 'END SOLUTION' may only appear as a whole marker line "
                          f"(nbgrader would take this line for one): {line.strip()!r}")


def _code_versions(lines: list[str], where: str) -> tuple[list[str], list[str], bool]:
    student, solution, found = [], [], False
    for kind, item in _regions(lines, CODE_BEGIN, CODE_END, where, CODE_HINT):
        if kind == "text":
            student.append(item)
            solution.append(item)
            continue
        found = True
        indent, hint, body = item
        student.append(f"{indent}raise NotImplementedError({json.dumps(hint or DEFAULT_HINT, ensure_ascii=False)})")
        solution.extend(body)
    return student, solution, found


def _markdown_versions(lines: list[str], where: str) -> tuple[list[str], list[str], bool]:
    student, solution, found = [], [], False
    for kind, item in _regions(lines, MD_BEGIN, MD_END, where, None):
        if kind == "text":
            student.append(item)
            solution.append(item)
            continue
        found = True
        _, _, body = item
        fence = "````" if any(b.lstrip().startswith("```") for b in body) else "```"
        student.append(ANSWER_STUB)
        solution.extend([f"{fence}{{dropdown}} Answer", *body, fence])
    return student, solution, found


def _clean_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: copy.deepcopy(v) for k, v in meta.items() if k not in {"nbgrader", "execution", "collapsed", "scrolled"}}
    if "tags" in out and not out["tags"]:
        del out["tags"]
    return out


def _cell(cell_type: str, cell_id: str, lines: list[str], metadata: dict[str, Any]) -> dict[str, Any]:
    cell: dict[str, Any] = {"cell_type": cell_type, "id": cell_id, "metadata": metadata, "source": _join(lines)}
    if cell_type == "code":
        cell["execution_count"] = None
        cell["outputs"] = []
    return cell


def _banner(kind: str, stem: str) -> list[str]:
    if kind == "student":
        return ["> **Your version.** Replace each `raise NotImplementedError(...)` with your code and run the check "
                "cell below it: it prints **✓ CHECK PASSED** or tells you what went wrong (which input, what was "
                "expected, a hint). Write your answers where it says *Your answer here.*"]
    return ["> **Worked version.** The solution code is folded away on the website (click to show it) and each "
            "written answer sits in an *Answer* dropdown. Try the exercises yourself first, in "
            f"`exercises/{stem}.ipynb`."]


def versions(source_nb: dict[str, Any], name: str) -> Versions:
    """The student and worked notebooks for one source notebook (``name`` for messages and banners)."""
    stem = Path(name).stem
    cells = source_nb.get("cells", [])
    ids = [c.get("id") for c in cells]
    if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
        raise SourceError(f"{name}: every cell needs a unique id (open and save it with Jupyter, nbformat >= 4.5)")
    student_cells, solution_cells = [], []
    for index, cell in enumerate(cells):
        where = f"{name}, cell {index} ({cell.get('cell_type')})"
        lines = _lines(cell.get("source", ""))
        meta = _clean_metadata(cell.get("metadata", {}))
        ctype = cell.get("cell_type")
        if ctype == "code":
            st, so, found = _code_versions(lines, where)
        elif ctype == "markdown":
            st, so, found = _markdown_versions(lines, where)
        else:
            st, so, found = lines, lines, False
        so_meta = copy.deepcopy(meta)
        if found and ctype == "code":
            tags = so_meta.setdefault("tags", [])
            if HIDE_TAG not in tags:
                tags.append(HIDE_TAG)
        if INSTALL_TAG in meta.get("tags", []):  # its Colab link names the version it sits in
            so = [line.replace(f"/{STUDENT_DIR}/{stem}.ipynb", f"/{SOLUTION_DIR}/{stem}.ipynb") for line in so]
        student_cells.append(_cell(ctype, cell["id"], st, meta))
        solution_cells.append(_cell(ctype, cell["id"], so, so_meta))
        if index == 0:  # after the title: say which version this is
            student_cells.append(_cell("markdown", f"{stem}-version-note", _banner("student", stem), {}))
            solution_cells.append(_cell("markdown", f"{stem}-version-note", _banner("solution", stem), {}))

    def wrap(cells_: list[dict[str, Any]]) -> dict[str, Any]:
        meta = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
        return {"cells": cells_, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}

    return Versions(wrap(student_cells), wrap(solution_cells))


def dumps(nb: dict[str, Any]) -> str:
    """Stable JSON, as nbformat writes notebooks (indent 1, sorted keys, UTF-8) plus a final newline."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def load_source(chapter: str, root: Path = ROOT) -> dict[str, Any]:
    """The source notebook of ``chapter`` ("05_mixtures"), as JSON."""
    return json.loads((root / SOURCE_DIR / f"{chapter}.ipynb").read_text(encoding="utf-8"))


def solution_functions(chapter: str, root: Path = ROOT) -> dict[str, Any]:
    """The worked version's functions and classes for ``chapter`` ("05_mixtures"), as a student's notebook has them.

    Only each code cell's top-level imports, functions and classes are run, in one fresh namespace
    (no checks, no experiments, no model), so the tests can hand the worked answers to the checks.
    """
    import ast

    solution = versions(load_source(chapter, root), f"{chapter}.ipynb").solution
    namespace: dict[str, Any] = {"__name__": f"worked_{chapter}"}
    kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    for cell in solution["cells"]:
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        tree.body = [node for node in tree.body if isinstance(node, kinds)]
        exec(compile(tree, f"{chapter}.ipynb", "exec"), namespace)  # noqa: S102 - the project's own notebooks
    return namespace


def sources(root: Path = ROOT) -> list[Path]:
    return sorted((root / SOURCE_DIR).glob("[0-9][0-9]_*.ipynb"))


def expected_outputs(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file (relative to ``root``) and its exact text."""
    out: dict[Path, str] = {}
    for src in sources(root):
        nb = json.loads(src.read_text(encoding="utf-8"))
        v = versions(nb, str(src.relative_to(root)))
        out[STUDENT_DIR / src.name] = dumps(v.student)
        out[SOLUTION_DIR / src.name] = dumps(v.solution)
    return out


def out_of_sync(root: Path = ROOT) -> list[str]:
    """Generated files that are missing, differ from their source, or have no source any more."""
    expected = expected_outputs(root)
    problems = []
    for rel, text in expected.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{rel}: differs from what {SOURCE_DIR / rel.name} generates")
    for folder in (STUDENT_DIR, SOLUTION_DIR):
        for path in sorted((root / folder).glob("*.ipynb")):
            rel = path.relative_to(root)
            if rel not in expected:
                problems.append(f"{rel}: no source {SOURCE_DIR / path.name} (stale: delete it)")
    return problems


def write(root: Path = ROOT) -> list[Path]:
    """Write every generated file; return those that changed."""
    changed = []
    for rel, text in expected_outputs(root).items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(rel)
    return changed


# ---------------------------------------------------------------------------------------------
# Minutes per exercise, measured in executed worked notebooks
# ---------------------------------------------------------------------------------------------
TIMES_COLUMNS = ("exercise", "title", "kind", "minutes at ci", "lines of code to write", "hint steps")


def _text(cell: dict[str, Any]) -> str:
    return "".join(cell.get("source", "")) if isinstance(cell.get("source"), list) else cell.get("source", "")


def _groups(nb: dict[str, Any]) -> list[tuple[re.Match | None, list[dict[str, Any]]]]:
    """The notebook's cells by exercise: (header match or None for the cells before the first, cells)."""
    groups: list[tuple[re.Match | None, list[dict[str, Any]]]] = [(None, [])]
    for cell in nb["cells"]:
        m = EXERCISE_HEADER.search(_text(cell)) if cell["cell_type"] == "markdown" else None
        if m:
            groups.append((m, []))
        else:
            groups[-1][1].append(cell)
    return groups


def _solution_lines(cells: list[dict[str, Any]]) -> int:
    inside, n = False, 0
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        for line in _lines(cell["source"]):
            if line.strip() in (CODE_BEGIN, CODE_END):
                inside = line.strip() == CODE_BEGIN
            elif inside and line.strip():
                n += 1
    return n


def exercise_times(executed: dict[str, Any], source: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per exercise of an executed worked notebook, and one for the whole notebook.

    The minutes are the sum of papermill's per-cell durations (``metadata.papermill.duration``)
    over the cells from the exercise's header to the next one: what running that exercise's cells
    of the worked version took. The whole-notebook row adds the set-up cells before the first
    exercise (imports, parameters). Lines of code and hint steps come from the source.
    """
    seconds = {}
    for match, cells in _groups(executed):
        key = f"{match[1]}.{match[2]}" if match else "setup"
        seconds[key] = sum(float((c.get("metadata", {}).get("papermill") or {}).get("duration") or 0.0) for c in cells)
    rows, chapter = [], None
    for match, cells in _groups(source)[1:]:
        number = f"{match[1]}.{match[2]}"
        chapter = match[1]
        if number not in seconds:
            raise ValueError(f"exercise {number} is not in the executed notebook: execute the current worked version")
        hints = sum(len(HINT_STEP.findall(_text(c))) for c in cells if c["cell_type"] == "markdown")
        rows.append({"exercise": number, "title": match[3], "kind": match[4],
                     "minutes at ci": round(seconds[number] / 60, 2), "lines of code to write": _solution_lines(cells),
                     "hint steps": hints})
    title = _text(source["cells"][0]).split(": ", 1)[-1]
    rows.append({"exercise": f"{chapter} (all)", "title": f"{title}: the whole notebook", "kind": "",
                 "minutes at ci": round(sum(seconds.values()) / 60, 2),
                 "lines of code to write": sum(r["lines of code to write"] for r in rows),
                 "hint steps": sum(r["hint steps"] for r in rows)})
    return rows


def times_table(executed_dir: Path, root: Path = ROOT) -> str:
    """CSV text of ``exercise_times`` for every chapter, from the executed worked notebooks in ``executed_dir``."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TIMES_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for src in sources(root):
        executed = executed_dir / src.name
        if not executed.is_file():
            raise FileNotFoundError(f"{executed}: no executed worked notebook (run scripts/execute_book.sh first)")
        for row in exercise_times(json.loads(executed.read_text(encoding="utf-8")),
                                  json.loads(src.read_text(encoding="utf-8"))):
            writer.writerow(row)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Exports for grading tools
# ---------------------------------------------------------------------------------------------
def _nbgrader_meta(grade_id: str, *, solution: bool, grade: bool, locked: bool, points: float | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
                            "solution": solution, "task": False}
    if grade:
        meta["points"] = points if points is not None else 1
    return meta


def nbgrader_source(source_nb: dict[str, Any], name: str) -> dict[str, Any]:
    """The source with nbgrader cell metadata: solution cells, and check cells as locked autograded tests.

    The BEGIN/END SOLUTION markers stay: they are nbgrader's own. Check calls get ``strict=True``
    so that a failed check raises, which is how nbgrader sees a failed test.
    """
    stem = Path(name).stem
    nb = copy.deepcopy(source_nb)
    for index, cell in enumerate(nb["cells"]):
        lines = _lines(cell.get("source", ""))
        meta = cell.setdefault("metadata", {})
        meta.pop("nbgrader", None)
        has_solution = any(line.strip() in (CODE_BEGIN, MD_BEGIN) for line in lines)
        checks = [m for m in map(CHECK_CALL.match, lines) if m] if cell["cell_type"] == "code" else []
        if has_solution and cell["cell_type"] == "code":
            meta["nbgrader"] = _nbgrader_meta(f"{stem}-cell{index}-solution", solution=True, grade=False, locked=False)
        elif has_solution:
            meta["nbgrader"] = _nbgrader_meta(f"{stem}-cell{index}-answer", solution=True, grade=True, locked=False, points=1)
        elif checks:
            new = []
            for line in lines:
                m = CHECK_CALL.match(line)
                if m and "strict=" not in m["args"]:
                    line = f"{m['indent']}{m['call'][:-1]}, strict=True)"
                new.append(line)
            cell["source"] = _join(new)
            meta["nbgrader"] = _nbgrader_meta(f"{stem}-cell{index}-check", solution=False, grade=True, locked=True,
                                              points=len(checks))
    nb["metadata"] = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return nb


OK_TEST = '''OK_FORMAT = True

test = {{
    "name": {name!r},
    "points": 1,
    "suites": [
        {{
            "cases": [
                {{
                    "code": {code!r},
                    "hidden": False,
                    "locked": False,
                }},
            ],
            "scored": True,
            "setup": "",
            "teardown": "",
            "type": "doctest",
        }},
    ],
}}
'''

def otter_requirements() -> str:
    """The requirements.txt of an otter assignment: course_lib at the release students install."""
    from .release import install_spec

    return install_spec("notebook") + "\n"


def export(kind: str, dest: Path, root: Path = ROOT) -> list[Path]:
    """Write an nbgrader course folder or otter-grader assignment folders under ``dest``."""
    from .checks import CHAPTER_CHECKS

    written = []
    for src in sources(root):
        nb = json.loads(src.read_text(encoding="utf-8"))
        stem = src.stem
        if kind == "nbgrader":
            path = dest / "source" / stem / src.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(nbgrader_source(nb, str(src.relative_to(root)))), encoding="utf-8")
            written.append(path)
        elif kind == "otter":
            folder = dest / stem
            (folder / "tests").mkdir(parents=True, exist_ok=True)
            path = folder / src.name
            path.write_text(dumps(versions(nb, str(src.relative_to(root))).student), encoding="utf-8")
            written.append(path)
            for fn in CHAPTER_CHECKS.get(stem, ()):
                code = f">>> from course_lib import checks\n>>> checks.check_{fn}({fn}, quiet=True).passed\nTrue"
                test = folder / "tests" / f"{fn}.py"
                test.write_text(OK_TEST.format(name=fn, code=code), encoding="utf-8")
                written.append(test)
            (folder / "requirements.txt").write_text(otter_requirements(), encoding="utf-8")
            written.append(folder / "requirements.txt")
        else:
            raise ValueError(f"unknown export {kind!r}; valid: nbgrader, otter")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.exercises", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 and list the files that are out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: %(default)s)")
    parser.add_argument("--export", choices=["nbgrader", "otter"], help="write a grading-tool folder instead (needs DEST)")
    parser.add_argument("dest", nargs="?", type=Path, help="where --export writes")
    parser.add_argument("--times", type=Path, metavar="DIR",
                        help="write the minutes per exercise measured in the executed worked notebooks in DIR")
    parser.add_argument("--out", type=Path, default=None, help=f"where --times writes (default: {TIMES_FILE})")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.times:
            out = args.out or root / TIMES_FILE
            out.write_text(times_table(args.times, root), encoding="utf-8")
            print(f"wrote {out}")
            return 0
        if args.export:
            if args.dest is None:
                parser.error("--export needs a destination folder")
            written = export(args.export, args.dest, root)
            print(f"wrote {len(written)} files under {args.dest}")
            return 0
        if args.check:
            problems = out_of_sync(root)
            if problems:
                print("exercise notebooks out of date (run `python -m course_lib.exercises`):")
                for p in problems:
                    print(f"  {p}")
                return 1
            print(f"exercise notebooks up to date ({len(sources(root))} sources)")
            return 0
        changed = write(root)
        stale = [p for p in out_of_sync(root) if "stale" in p]
        for p in changed:
            print(f"wrote {p}")
        for p in stale:
            print(f"warning: {p}")
        print(f"{len(sources(root))} sources, {len(changed)} files written")
        return 0
    except SourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
