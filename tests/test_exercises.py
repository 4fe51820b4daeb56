"""The exercise notebooks: one source each, generated student and worked versions, and their checks.

Fast tests (always run): the committed exercises/ and solutions/ are exactly what
``python -m course_lib.exercises`` generates from exercises/source/; the generator's rules and
errors; every chapter's notebook has the book's first cells, the three kinds of exercise and a check
cell per function to implement; the nbgrader and otter exports.

Slow tests (marker ``notebooks``, their own CI phase): every solutions/ notebook executes at the
``ci`` budget and every check in it passes; every exercises/ notebook executes to the end (the checks
catch the unfinished stubs) and every check in it fails.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from course_lib import checks, exercises

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = list(checks.CHAPTER_CHECKS)
CHECK_CALL = re.compile(r"checks\.check_(\w+)\(")
EXERCISE_HEADER = re.compile(r"^## Exercise (\d+)\.(\d+): .+ \((implement|experiment|in words)\)\s*$", re.M)


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def text(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def check_cells(nb: dict) -> dict[int, list[str]]:
    """Index of each code cell that calls checks, and the checks it calls."""
    return {i: CHECK_CALL.findall(text(c)) for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "code" and CHECK_CALL.search(text(c))}


# ------------------------------------------------------------------ generated files are in sync
def test_committed_versions_are_in_sync_with_the_sources():
    proc = subprocess.run([sys.executable, "-m", "course_lib.exercises", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        "exercises/ or solutions/ differ from what exercises/source/ generates; run "
        f"`python -m course_lib.exercises` and commit the result:\n{proc.stdout}{proc.stderr}")


def test_every_chapter_has_a_source_and_both_versions():
    for chapter in CHAPTERS:
        for folder in ("exercises/source", "exercises", "solutions"):
            assert (ROOT / folder / f"{chapter}.ipynb").is_file(), f"missing {folder}/{chapter}.ipynb"


# ------------------------------------------------------------------ the generator's rules
def _nb(*cells):
    out = []
    for i, (kind, source) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"c{i}", "metadata": {}, "source": source}
        if kind == "code":
            cell.update(execution_count=3, outputs=[{"output_type": "stream", "name": "stdout", "text": "old"}])
        out.append(cell)
    return {"cells": out, "metadata": {"kernelspec": {"name": "python3", "display_name": "x"}, "widgets": {}},
            "nbformat": 4, "nbformat_minor": 5}


SAMPLE = _nb(
    ("markdown", "# Exercises 9: Sample"),
    ("code", "def f(x):\n    \"\"\"Doc.\"\"\"\n    # HINT: add one\n    # BEGIN SOLUTION\n    y = x + 1\n    return y\n    # END SOLUTION\n"),
    ("code", "checks.check_em_step(f)"),
    ("markdown", "Why?\n\n<!-- BEGIN SOLUTION -->\nBecause.\n\n```python\nx = 1\n```\n<!-- END SOLUTION -->\n"),
    ("code", "for i in range(2):\n    # BEGIN SOLUTION\n    print(i)\n    # END SOLUTION\n    pass"),
)


def test_student_and_worked_versions():
    v = exercises.versions(SAMPLE, "99_sample.ipynb")
    st, so = v.student["cells"], v.solution["cells"]
    assert len(st) == len(so) == len(SAMPLE["cells"]) + 1  # a note on which version this is, after the title
    assert "Your version" in text(st[1]) and "Worked version" in text(so[1])
    assert text(st[2]) == 'def f(x):\n    """Doc."""\n    raise NotImplementedError("add one")'
    assert text(so[2]) == 'def f(x):\n    """Doc."""\n    y = x + 1\n    return y'
    assert so[2]["metadata"]["tags"] == ["hide-input"] and "tags" not in st[2]["metadata"]
    assert text(st[4]) == "Why?\n\n*Your answer here.*"
    assert text(so[4]) == "Why?\n\n````{dropdown} Answer\nBecause.\n\n```python\nx = 1\n```\n````"  # a longer fence
    assert text(st[5]) == 'for i in range(2):\n    raise NotImplementedError("write your solution here")\n    pass'
    for cell in st + so:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
        assert "SOLUTION" not in text(cell) and "HINT" not in text(cell)
    assert v.student["metadata"] == {"kernelspec": exercises.KERNELSPEC, "language_info": {"name": "python"}}
    assert exercises.dumps(v.student) == exercises.dumps(exercises.versions(SAMPLE, "99_sample.ipynb").student)


@pytest.mark.parametrize("source, message", [
    ("# BEGIN SOLUTION\nx = 1\n", "without a matching"),
    ("x = 1\n# END SOLUTION\n", "without a '# BEGIN SOLUTION' before it"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\nx\n# END SOLUTION\n", "do not nest"),
    ("# HINT: lonely\nx = 1\n", "must come right before"),
    ("# BEGIN SOLUTION\n# END SOLUTION\n", "empty solution region"),
    ("print('BEGIN SOLUTION')\n", "whole marker line"),
])
def test_malformed_sources_are_rejected(source, message):
    with pytest.raises(exercises.SourceError, match=re.escape(message)) as err:
        exercises.versions(_nb(("markdown", "# T"), ("code", source)), "99_bad.ipynb")
    assert "99_bad.ipynb, cell 1 (code), line" in str(err.value)


def test_cells_need_unique_ids():
    nb = _nb(("markdown", "# T"), ("code", "x = 1"))
    nb["cells"][1]["id"] = "c0"
    with pytest.raises(exercises.SourceError, match="unique id"):
        exercises.versions(nb, "99_bad.ipynb")


def test_check_mode_lists_what_is_out_of_date(tmp_path, capsys):
    (tmp_path / "exercises" / "source").mkdir(parents=True)
    (tmp_path / "solutions").mkdir()
    (tmp_path / "exercises" / "source" / "09_sample.ipynb").write_text(json.dumps(SAMPLE))
    assert exercises.main(["--check", "--root", str(tmp_path)]) == 1
    assert "exercises/09_sample.ipynb: missing" in capsys.readouterr().out
    assert exercises.main(["--root", str(tmp_path)]) == 0
    first = (tmp_path / "solutions" / "09_sample.ipynb").read_bytes()
    assert exercises.main(["--root", str(tmp_path)]) == 0  # idempotent, byte for byte
    assert (tmp_path / "solutions" / "09_sample.ipynb").read_bytes() == first
    assert exercises.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "solutions" / "09_sample.ipynb").write_text(first.decode().replace("y = x + 1", "y = x + 2"))
    (tmp_path / "exercises" / "10_orphan.ipynb").write_text("{}")
    capsys.readouterr()
    assert exercises.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "solutions/09_sample.ipynb: differs" in out and "exercises/10_orphan.ipynb: no source" in out


def test_nbgrader_export(tmp_path):
    nb = exercises.nbgrader_source(SAMPLE, "99_sample.ipynb")
    meta = [c["metadata"].get("nbgrader") for c in nb["cells"]]
    assert meta[0] is None
    assert meta[1] == {"grade": False, "grade_id": "99_sample-cell1-solution", "locked": False, "schema_version": 3,
                       "solution": True, "task": False}
    assert meta[2]["grade"] and meta[2]["locked"] and not meta[2]["solution"] and meta[2]["points"] == 1
    assert text(nb["cells"][2]) == "checks.check_em_step(f, strict=True)"
    assert meta[3]["solution"] and meta[3]["grade"]  # a written answer: graded by hand
    assert "# BEGIN SOLUTION" in text(nb["cells"][1])  # nbgrader's own markers stay for it to clear
    ids = [m["grade_id"] for m in meta if m]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-zA-Z0-9_\-]+", i) for i in ids)
    allowed = {"schema_version", "grade", "locked", "solution", "task", "grade_id", "points"}
    assert all(set(m) <= allowed for m in meta if m)
    written = exercises.export("nbgrader", tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        f"source/{c}/{c}.ipynb" for c in CHAPTERS]


def test_otter_export(tmp_path):
    written = exercises.export("otter", tmp_path)
    for chapter, names in checks.CHAPTER_CHECKS.items():
        folder = tmp_path / chapter
        assert (folder / f"{chapter}.ipynb").read_text() == (ROOT / "exercises" / f"{chapter}.ipynb").read_text()
        assert "course_lib" in (folder / "requirements.txt").read_text()
        for name in names:
            scope: dict = {}
            exec((folder / "tests" / f"{name}.py").read_text(), scope)  # noqa: S102 - our own generated file
            assert scope["OK_FORMAT"] is True and scope["test"]["name"] == name
            case = scope["test"]["suites"][0]["cases"][0]["code"]
            assert f">>> checks.check_{name}({name}, quiet=True).passed\nTrue" in case
    assert len(written) == sum(len(n) + 2 for n in checks.CHAPTER_CHECKS.values())


# ------------------------------------------------------------------ the notebooks' structure
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_structure(chapter):
    source = load(ROOT / "exercises" / "source" / f"{chapter}.ipynb")
    cells = source["cells"]
    n = int(chapter[:2])
    assert cells[0]["cell_type"] == "markdown" and text(cells[0]).startswith(f"# Exercises {n}: ")
    assert cells[1]["metadata"].get("tags") == ["colab-install"]
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    assert f"git+{repo['url']}@{repo['branch']}" in text(cells[1])  # the release tag (tests/test_release.py)
    assert cells[2]["metadata"].get("tags") == ["parameters"]
    assert re.search(r'^MODEL = "gemma-3-270m"', text(cells[2]), re.M)
    assert re.search(r'^BUDGET = os\.environ\.get\("BOOK_BUDGET", "ci"\)', text(cells[2]), re.M)
    markdown = "\n".join(text(c) for c in cells if c["cell_type"] == "markdown")
    headers = EXERCISE_HEADER.findall(markdown)
    assert len(headers) >= 3 and {h[2] for h in headers} == {"implement", "experiment", "in words"}, headers
    assert all(int(h[0]) == n for h in headers) and [int(h[1]) for h in headers] == list(range(1, len(headers) + 1))
    # every function to implement is checked, right after it, by the chapter's own check
    called = [name for names in check_cells(source).values() for name in names]
    assert called == list(checks.CHAPTER_CHECKS[chapter])
    for i, names in check_cells(source).items():
        before = text(cells[i - 1]) if cells[i - 1]["cell_type"] == "code" else text(cells[i - 2])
        for name in names:
            assert f"def {name}(" in before and "# BEGIN SOLUTION" in before, f"{chapter}: check_{name} not after {name}"
    # word answers exist in both versions' forms
    student = load(ROOT / "exercises" / f"{chapter}.ipynb")
    solution = load(ROOT / "solutions" / f"{chapter}.ipynb")
    assert sum("*Your answer here.*" in text(c) for c in student["cells"]) >= 2
    assert sum("{dropdown} Answer" in text(c) for c in solution["cells"]) >= 2
    stubs = sum(text(c).count("raise NotImplementedError(") for c in student["cells"] if c["cell_type"] == "code")
    assert stubs == len(checks.CHAPTER_CHECKS[chapter])
    hidden = [c for c in solution["cells"] if "hide-input" in c["metadata"].get("tags", [])]
    assert len(hidden) == len(checks.CHAPTER_CHECKS[chapter])
    for nb in (source, student, solution):
        nbformat.validate(nbformat.from_dict(nb))


EXERCISE = re.compile(r"^## Exercise (\d+)\.(\d+): (.+) \((implement|experiment|in words)\)\s*$", re.M)
HINT_STEP = re.compile(r"<details><summary>Hint (\d+): [^<]+</summary>")


def exercise_groups(nb: dict) -> list[dict]:
    """Each exercise of a notebook: its number, title, kind and cells (from its header to the next one)."""
    groups: list[dict] = []
    for cell in nb["cells"]:
        m = EXERCISE.search(text(cell)) if cell["cell_type"] == "markdown" else None
        if m:
            groups.append({"number": f"{m[1]}.{m[2]}", "title": m[3], "kind": m[4], "cells": []})
        elif groups:
            groups[-1]["cells"].append(cell)
    return groups


def solution_lines(cell: dict) -> list[str]:
    """The code lines of a cell's solution regions, without blanks, comments and short lines."""
    lines, inside = [], False
    for line in text(cell).splitlines():
        if line.strip() in (exercises.CODE_BEGIN, exercises.CODE_END):
            inside = line.strip() == exercises.CODE_BEGIN
            continue
        stripped = line.strip()
        if inside and len(stripped.replace(" ", "")) >= 12 and not stripped.startswith(("#", '"""')):
            lines.append(stripped)
    return lines


def squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_titles_are_the_chapters_titles(chapter):
    first = text(load(ROOT / "book" / f"{chapter}.ipynb")["cells"][0]).splitlines()[0]
    m = re.fullmatch(r"# (\d+)\. (.+)", first)
    assert m, first
    source = load(ROOT / "exercises" / "source" / f"{chapter}.ipynb")
    assert text(source["cells"][0]) == f"# Exercises {int(m[1])}: {m[2]}"
    assert f"`book/{chapter}.ipynb`" in text(source["cells"][3])


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_hints_are_a_ladder_that_never_states_the_answer(chapter):
    source = load(ROOT / "exercises" / "source" / f"{chapter}.ipynb")
    student = load(ROOT / "exercises" / f"{chapter}.ipynb")
    stubs = " ".join(re.findall(r'raise NotImplementedError\((".*?")\)', " ".join(text(c) for c in student["cells"])))
    for group in exercise_groups(source):
        if group["kind"] != "implement":
            continue
        hints = [text(c) for c in group["cells"] if c["cell_type"] == "markdown" and HINT_STEP.search(text(c))]
        steps = [int(n) for h in hints for n in HINT_STEP.findall(h)]
        assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) >= 2, (group["number"], steps)
        # collapsed: every step is closed (a <details> block, folded in Jupyter, Colab and on the site)
        assert all(h.count("<details>") == h.count("</details>") for h in hints)
        shown = squash(" ".join(hints)) + squash(stubs)
        for cell in group["cells"]:
            if cell["cell_type"] == "code":
                for line in solution_lines(cell):
                    assert squash(line) not in shown, f"exercise {group['number']}: a hint gives the line {line!r}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_an_open_experiment_with_its_uncertainty_and_a_worked_answer_that_shows_its_results(chapter):
    source = load(ROOT / "exercises" / "source" / f"{chapter}.ipynb")
    groups = exercise_groups(source)
    kinds = [g["kind"] for g in groups]
    assert kinds.count("implement") >= 2 and "experiment" in kinds and "in words" in kinds, kinds
    open_ = [g for g in groups if g["kind"] == "experiment"
             and any(c["cell_type"] == "code" and text(c).startswith("# Your choice") for c in g["cells"])]
    assert open_, f"{chapter}: no experiment where the student picks the setting"
    solution = load(ROOT / "solutions" / f"{chapter}.ipynb")
    code = "\n".join(text(c) for c in solution["cells"] if c["cell_type"] == "code")
    glued = set(re.findall(r'glue\("(\w+)"', code))
    used = set(re.findall(r"\{glue:\w+\}`(\w+)", "\n".join(text(c) for c in solution["cells"])))
    assert used <= glued, f"answers refer to results no cell glues: {used - glued}"
    for group in open_:
        statement = " ".join(text(c) for c in group["cells"] if c["cell_type"] == "markdown")
        assert "interval" in statement, f"exercise {group['number']} asks for no uncertainty"
        answer = [text(c) for c in group["cells"] if "<!-- BEGIN SOLUTION -->" in text(c)]
        assert answer and "{glue:text}`" in answer[0], f"exercise {group['number']}: the worked answer shows no result"


# ------------------------------------------------------------------ executing them (slow)
def execute(path: Path, out: Path) -> tuple[dict, str]:
    """Run a notebook at the ci budget in its own folder; return it and how long it took (wall, kernel CPU)."""
    import resource

    import papermill as pm

    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    pm.execute_notebook(str(path), str(out), parameters={"BUDGET": "ci"}, kernel_name="python3", cwd=str(path.parent),
                        progress_bar=False, log_output=False, request_save_on_cell_execute=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    return load(out), f"{time.perf_counter() - start:.0f} s wall, {used:.0f} s CPU"


def built_solution(chapter: str) -> Path | None:
    """The book build's executed worked notebook, if it was executed at ci from the current notebook and library."""
    built = ROOT / "_build" / "executed" / "solutions" / f"{chapter}.ipynb"
    stamp = ROOT / "_build" / "executed" / ".budget"
    if not built.is_file() or not stamp.is_file() or stamp.read_text().strip() != "ci":
        return None
    newer = [p for p in [ROOT / "solutions" / f"{chapter}.ipynb", *(ROOT / "course_lib").glob("*.py")]
             if p.stat().st_mtime > built.stat().st_mtime]
    return None if newer else built


@pytest.mark.notebooks
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_solution_notebook_runs_and_every_check_passes(chapter, tmp_path):
    # The book build executes the worked notebooks (they are the site's exercise pages): check its copy
    # when it is current, and execute the notebook here otherwise.
    built = built_solution(chapter)
    if built is not None:
        nb, seconds = load(built), "the book build's executed copy"
    else:
        nb, seconds = execute(ROOT / "solutions" / f"{chapter}.ipynb", tmp_path / f"{chapter}.ipynb")
    outcomes = checks.outcomes_in_notebook(nb)
    expected = list(checks.CHAPTER_CHECKS[chapter])
    assert [name for _, name, _ in outcomes] == expected, outcomes
    failed = [(i, name) for i, name, ok in outcomes if not ok]
    assert not failed, "\n".join(text({"source": [o.get("text", "") for o in nb["cells"][i]["outputs"]]}) for i, _ in failed)
    assert set(check_cells(nb)) == {i for i, _, _ in outcomes}  # every check cell printed its verdict
    # every result a worked answer refers to was glued by an executed cell, and every experiment printed
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    glued = {o.get("metadata", {}).get("scrapbook", {}).get("name") for o in outputs}
    markdown = "\n".join(text(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    used = set(re.findall(r"\{glue:\w+\}`(\w+)", markdown))
    assert used and used <= glued, f"answers refer to results no executed cell glued: {used - glued}"
    from myst_nb.core.variables import format_plain_text  # what the site's {glue:text} role does

    plain = {o["metadata"]["scrapbook"]["name"]: o["data"].get("application/papermill.record/text/plain", "")
             for o in outputs if "scrapbook" in o.get("metadata", {})}
    for key, spec in re.findall(r"\{glue:text\}`(\w+)(?::([^`]+))?`", markdown):
        format_plain_text(plain[key], spec or "s")  # raises where the site would warn (e.g. numpy's repr)
    for group in exercise_groups(nb):
        if group["kind"] == "experiment":
            shown = [o for c in group["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                     if o.get("output_type") in ("stream", "display_data", "execute_result") and "scrapbook" not in
                     o.get("metadata", {})]
            assert shown, f"experiment {group['number']} shows no output"
    print(f"{chapter}: solutions executed in {seconds}")


@pytest.mark.notebooks
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_exercise_notebook_runs_and_every_check_fails_on_the_stubs(chapter, tmp_path):
    nb, seconds = execute(ROOT / "exercises" / f"{chapter}.ipynb", tmp_path / f"{chapter}.ipynb")  # raises on any error
    outcomes = checks.outcomes_in_notebook(nb)
    assert [name for _, name, _ in outcomes] == list(checks.CHAPTER_CHECKS[chapter]), outcomes
    assert not any(ok for _, _, ok in outcomes), "a check passed on an unfinished stub"
    for i, name, _ in outcomes:
        printed = "".join(text({"source": o.get("text", "")}) for o in nb["cells"][i]["outputs"])
        assert f"CHECK FAILED: {name}\n  problem:  not implemented yet: " in printed, printed
        assert "Traceback" not in printed
    print(f"{chapter}: exercises executed in {seconds}")


# ------------------------------------------------------------------ the instructors' page
INSTRUCTORS = ROOT / "book" / "instructors.md"


def grading_script() -> str:
    page = INSTRUCTORS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    script = [b for b in blocks if b.startswith('"""Grade submitted exercise notebooks')]
    assert len(script) == 1, "the instructors' page must keep its grading script"
    return script[0]


def test_instructors_page_lists_every_notebook_and_function():
    page = INSTRUCTORS.read_text(encoding="utf-8")
    for chapter, names in checks.CHAPTER_CHECKS.items():
        assert f"`exercises/{chapter}.ipynb`" in page
        for name in names:
            assert f"`{name}`" in page
    assert "course.include_solutions" in page and "nbgrader" in page and "otter" in page
    compile(grading_script(), "grade.py", "exec")


def test_instructors_page_says_first_how_to_publish_without_solutions():
    page = INSTRUCTORS.read_text(encoding="utf-8")
    first = page.split("\n\n")[1]  # the paragraph after the title
    assert "course.include_solutions: false" in first and "_config.yml" in first


def test_minutes_per_exercise_are_measured_and_cover_every_exercise():
    page = INSTRUCTORS.read_text(encoding="utf-8")
    assert re.search(r"```\{csv-table\}[^\n]*\n:file: exercise_times.csv\n:header-rows: 1\n```", page)
    import csv

    rows = list(csv.DictReader((ROOT / exercises.TIMES_FILE).read_text(encoding="utf-8").splitlines()))
    assert list(rows[0]) == list(exercises.TIMES_COLUMNS)
    expected = []
    for chapter in CHAPTERS:
        groups = exercise_groups(load(ROOT / "exercises" / "source" / f"{chapter}.ipynb"))
        expected += [(g["number"], g["title"], g["kind"]) for g in groups] + [(f"{int(chapter[:2])} (all)", None, "")]
    assert [(r["exercise"], r["title"] if r["kind"] else None, r["kind"]) for r in rows] == expected, (
        "book/exercise_times.csv lists other exercises than the sources: build the book and run `make exercise-times`")
    for r in rows:
        assert math.isfinite(float(r["minutes at ci"])) and float(r["minutes at ci"]) >= 0
        if r["kind"] == "implement":
            assert int(r["lines of code to write"]) >= 1 and int(r["hint steps"]) >= 2, r


def test_exercise_times_add_up_papermill_durations():
    source = _nb(("markdown", "# Exercises 9: Sample"), ("code", "import x"),
                 ("markdown", "## Exercise 9.1: one (implement)"),
                 ("markdown", "<details><summary>Hint 1: a</summary>\n\nx\n\n</details>"),
                 ("code", "def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION"),
                 ("code", "check(f)"), ("markdown", "## Exercise 9.2: two (in words)"), ("markdown", "Why?"))
    executed = json.loads(json.dumps(source))
    for cell, seconds in zip(executed["cells"], [0, 6, 0, 0, 30, 54, 0, 0]):
        cell["metadata"]["papermill"] = {"duration": seconds}
    rows = exercises.exercise_times(executed, source)
    assert rows == [
        {"exercise": "9.1", "title": "one", "kind": "implement", "minutes at ci": 1.4, "lines of code to write": 1,
         "hint steps": 1},
        {"exercise": "9.2", "title": "two", "kind": "in words", "minutes at ci": 0.0, "lines of code to write": 0,
         "hint steps": 0},
        {"exercise": "9 (all)", "title": "Sample: the whole notebook", "kind": "", "minutes at ci": 1.5,
         "lines of code to write": 1, "hint steps": 1}]
    stale = json.loads(json.dumps(executed))
    stale["cells"] = stale["cells"][:6]  # executed before exercise 9.2 existed
    with pytest.raises(ValueError, match="exercise 9.2 is not in the executed notebook"):
        exercises.exercise_times(stale, source)


def test_a_rubric_for_every_question_in_words_and_two_schedules():
    page = INSTRUCTORS.read_text(encoding="utf-8")
    rubrics = page.split("## Rubrics for the answers in words", 1)[1].split("\n## ", 1)[0]
    for chapter in CHAPTERS:
        for group in exercise_groups(load(ROOT / "exercises" / "source" / f"{chapter}.ipynb")):
            if group["kind"] == "in words":
                heading = f"### Exercise {group['number']}: {group['title']}\n"
                assert heading in rubrics, f"no rubric for exercise {group['number']}"
                points = rubrics.split(heading, 1)[1].split("\n### ", 1)[0]
                assert re.search(r"\d points?:", points), f"exercise {group['number']}: the rubric gives no points"
    assert "**A one-week module**" in page and "**A three-week module**" in page
    prerequisites = page.split("## Prerequisites per chapter", 1)[1].split("\n## ", 1)[0]
    for chapter in CHAPTERS:
        title = text(load(ROOT / "book" / f"{chapter}.ipynb")["cells"][0]).splitlines()[0][2:]
        assert f"| {title} |" in prerequisites, title


@pytest.mark.notebooks
def test_grading_script_grades_a_submission(tmp_path):
    cells = [
        "import torch",
        "def responsibilities(log_weights, gold_log_probs):\n    return torch.softmax(log_weights + gold_log_probs, dim=-1)",
        "def em_step(log_weights, gold_log_probs):\n    raise NotImplementedError('not yet')",
        "1 / 0  # a broken cell must not stop the grading",
        "def data_dependent_log_weights(w, s):\n    return torch.log_softmax(torch.log_softmax(w, -1) + s, -1)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = dict(exercises.KERNELSPEC)
    submission = tmp_path / "alice" / "05_mixtures.ipynb"
    submission.parent.mkdir()
    nbformat.write(nb, submission)
    (tmp_path / "grade.py").write_text(grading_script())
    proc = subprocess.run([sys.executable, "grade.py", "05_mixtures", str(submission)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{submission}: 2/4" in proc.stdout
    rows = (tmp_path / "grades-05_mixtures.csv").read_text().splitlines()
    assert rows[0] == "notebook,score,out of,responsibilities,em_step,data_dependent_log_weights,tune_mixture"
    assert rows[1].endswith(",2,4,True,False,True,False")
