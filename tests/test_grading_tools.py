"""The grading exports, run through the real nbgrader and otter-grader (`make test-grading`).

For every chapter: ``python -m course_lib.exercises --export nbgrader`` gives a course folder that
``nbgrader generate_assignment`` accepts (solutions cut out, checks locked), and ``--export otter``
one that ``otter generate`` turns into an autograder. Then one chapter is graded for real, twice
by each tool: a worked solution gets every autograded point, an untouched student notebook none.

Marker ``grading`` (its own phase: it executes notebooks). The tools come from the lock
(pyproject's ``grading`` extra): their dependencies fit the book's, so no separate venv is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from course_lib import checks, exercises

pytestmark = pytest.mark.grading

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = list(checks.CHAPTER_CHECKS)
GRADED = "01_asking"  # graded for real by both tools: its notebook runs in about a minute
BIN = Path(sys.executable).parent
TIMEOUT = 1800


def tool(*args: str, cwd: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(args)} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def solution_sources() -> dict[str, str]:
    """Cell id -> source of the worked version (solutions/), for filling in a student notebook."""
    nb = json.loads((ROOT / "solutions" / f"{GRADED}.ipynb").read_text(encoding="utf-8"))
    return {c["id"]: "".join(c["source"]) for c in nb["cells"]}


# ------------------------------------------------------------------ nbgrader
@pytest.fixture(scope="module")
def nbgrader_course(tmp_path_factory) -> Path:
    course = tmp_path_factory.mktemp("nbgrader") / "course"
    exercises.export("nbgrader", course)
    (course / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        f"c.CourseDirectory.root = {str(course)!r}\n"
        f"c.CourseDirectory.db_url = 'sqlite:///{course}/gradebook.db'\n"
        f"c.ExecutePreprocessor.timeout = {TIMEOUT}\n"
        f"c.Execute.timeout = {TIMEOUT}\n",
        encoding="utf-8")
    for chapter in CHAPTERS:  # generate_assignment also enters it into the gradebook
        tool("nbgrader", "generate_assignment", chapter, "--force", cwd=course)
    return course


def test_nbgrader_generates_every_assignment(nbgrader_course):
    for chapter in CHAPTERS:
        released = nbformat.read(nbgrader_course / "release" / chapter / f"{chapter}.ipynb", as_version=4)
        text = "\n".join(c.source for c in released.cells)
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text, chapter
        assert "YOUR CODE HERE" in text and "YOUR ANSWER HERE" in text, chapter
        tests = [c for c in released.cells if c.metadata.get("nbgrader", {}).get("grade")
                 and not c.metadata["nbgrader"].get("solution")]
        assert tests and all(c.metadata["nbgrader"]["locked"] for c in tests), chapter
        assert sum(c.source.count("strict=True") for c in tests) == len(checks.CHAPTER_CHECKS[chapter]), chapter


def _submit(course: Path, student: str, worked: bool) -> None:
    released = nbformat.read(course / "release" / GRADED / f"{GRADED}.ipynb", as_version=4)
    if worked:
        answers = solution_sources()
        for cell in released.cells:
            if cell.metadata.get("nbgrader", {}).get("solution"):
                cell.source = answers[cell.id]
    folder = course / "submitted" / student / GRADED
    folder.mkdir(parents=True)
    nbformat.write(released, folder / f"{GRADED}.ipynb")


def test_nbgrader_grades_a_worked_solution_fully_and_an_untouched_notebook_zero(nbgrader_course):
    course = nbgrader_course
    for student, worked in (("worked", True), ("untouched", False)):
        tool("nbgrader", "db", "student", "add", student, cwd=course)
        _submit(course, student, worked)
    tool("nbgrader", "autograde", GRADED, cwd=course)
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course}/gradebook.db") as gb:
        worked = gb.find_submission(GRADED, "worked")
        untouched = gb.find_submission(GRADED, "untouched")
        scores = {s: (sub.code_score, sub.max_code_score, sub.written_score, sub.max_written_score, sub.score)
                  for s, sub in (("worked", worked), ("untouched", untouched))}
    code, max_code, _, max_written, _ = scores["worked"]
    assert max_code == len(checks.CHAPTER_CHECKS[GRADED]) and code == max_code, scores
    assert max_written >= 1  # the questions in words: graded by hand (formgrader)
    assert scores["untouched"][0] == 0 and scores["untouched"][4] == 0, scores  # unchanged answers score 0 too


# ------------------------------------------------------------------ otter-grader
@pytest.fixture(scope="module")
def otter_assignments(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("otter")
    exercises.export("otter", root)
    for chapter in CHAPTERS:
        folder = root / chapter
        tool("otter", "generate", "-t", "tests", "-r", "requirements.txt", "-o", "autograder.zip", cwd=folder,
             timeout=600)
    return root


def test_otter_generates_every_autograder(otter_assignments):
    for chapter in CHAPTERS:
        archive = otter_assignments / chapter / "autograder.zip"
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            environment = z.read("environment.yml").decode()
        tests = sorted(n for n in names if n.startswith("tests/") and n.endswith(".py"))
        assert tests == sorted(f"tests/{fn}.py" for fn in checks.CHAPTER_CHECKS[chapter]), (chapter, names)
        # the grading image installs course_lib at the release students use (exercises.otter_requirements)
        assert exercises.otter_requirements().strip() in environment, environment


def _otter_run(folder: Path, submission: Path, out: Path) -> dict:
    out.mkdir()
    tool("otter", "run", "--no-logo", "-a", str(folder / "autograder.zip"), "-o", str(out), str(submission), cwd=out)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # Gradescope's format: one entry per test with its score, plus a summary entry without one.
    return {t["name"]: t["score"] for t in results["tests"] if "score" in t}


def test_otter_grades_a_worked_solution_fully_and_an_untouched_notebook_zero(otter_assignments, tmp_path):
    folder = otter_assignments / GRADED
    worked = tmp_path / "worked.ipynb"
    shutil.copy(ROOT / "solutions" / f"{GRADED}.ipynb", worked)
    untouched = tmp_path / "untouched.ipynb"
    shutil.copy(folder / f"{GRADED}.ipynb", untouched)
    names = checks.CHAPTER_CHECKS[GRADED]
    full = _otter_run(folder, worked, tmp_path / "out-worked")
    none = _otter_run(folder, untouched, tmp_path / "out-untouched")
    assert full == dict.fromkeys(names, 1.0), full
    assert none == dict.fromkeys(names, 0.0), none
