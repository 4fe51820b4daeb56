"""course_lib.install: what the notebooks' install cell does on Colab, without Colab or the network.

pip is replaced by a recorder; the installed distributions and course_lib's requirements are
given. Checked: requirements follow extras (course_lib[notebook] inside [book]) and markers;
installed packages in range are kept whatever their version; only what is missing or out of range
goes to pip, under constraints that pin everything already installed; a replaced package that
this Python had imported stops the notebook with a restart message, one never imported does not;
USE_DRIVE mounts Google Drive and moves course_lib's cache there (and only on Colab).
The real thing, in a venv with Colab's versions, is `make test-colab`.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from course_lib import data, install

REQUIRES = [
    "torch>=2.10.0",
    "numpy>=2.0.2",
    "gguf>=0.19.0",
    'tomli>=2; python_version < "3.0"',
    'ipykernel>=6.17.1; extra == "notebook"',
    'myst-nb>=1.4.0; extra == "notebook"',
    'course_lib[notebook]; extra == "book"',
    'jupyter-book>=1.0.4,<2; extra == "book"',
    'pytest>=9; extra == "test"',
]
COLAB = {"torch": "2.10.0+cu128", "numpy": "2.0.2", "ipykernel": "6.17.1", "course-lib": "0.1.0"}


@pytest.fixture
def fake(monkeypatch):
    """course_lib's requirements, the installed distributions, and a pip that records its calls."""
    state = {"installed": dict(COLAB), "calls": [], "after": {}}
    monkeypatch.setattr(install.metadata, "requires", lambda dist: list(REQUIRES))
    monkeypatch.setattr(install.metadata, "version", lambda dist: "0.1.0")
    monkeypatch.setattr(install, "_installed", lambda: dict(state["installed"]))

    def pip(args):
        constraints = Path(args[args.index("-c") + 1]).read_text() if "-c" in args else None
        state["calls"].append((args, constraints))
        state["installed"].update(state["after"])
        return 0

    monkeypatch.setattr(install, "_pip", pip)
    return state


def test_requirements_follow_extras_and_markers(fake):
    assert install.requirements(("notebook",)) == [
        "torch>=2.10.0", "numpy>=2.0.2", "gguf>=0.19.0", "ipykernel>=6.17.1", "myst-nb>=1.4.0"]
    book = install.requirements(("book",))
    assert "ipykernel>=6.17.1" in book and "jupyter-book<2,>=1.0.4" in book and "pytest>=9" not in book


def test_plan_keeps_what_is_in_range_whatever_its_version():
    found = install.plan(["torch>=2.10.0", "numpy>=2.1", "gguf>=0.19.0"], {"torch": "2.10.0+cu128", "numpy": "2.0.2"})
    assert found.kept == {"torch>=2.10.0": "2.10.0+cu128"}
    assert found.out_of_range == {"numpy>=2.1": "2.0.2"} and found.missing == ["gguf>=0.19.0"]


def test_nothing_to_install(fake, capsys):
    fake["installed"].update({"gguf": "0.19.0", "myst-nb": "1.4.0"})
    install.ensure("notebook")
    out = capsys.readouterr().out
    assert "5 of 5 requirements already installed and kept: torch 2.10.0+cu128" in out
    assert "Nothing to install." in out and fake["calls"] == []


def test_adds_what_is_missing_and_pins_everything_installed(fake, capsys):
    fake["after"] = {"gguf": "0.19.0", "myst-nb": "1.4.0", "sphinx": "8.2.3"}
    found = install.ensure("notebook")
    (args, constraints), = fake["calls"]
    assert args[-2:] == ["gguf>=0.19.0", "myst-nb>=1.4.0"] and found.missing == args[-2:]
    assert set(constraints.split()) == {f"{n}=={v}" for n, v in COLAB.items()}  # nothing may be replaced
    out = capsys.readouterr().out
    assert "Added 3 packages: gguf 0.19.0, myst-nb 1.4.0, sphinx 8.2.3." in out
    assert "Replaced: nothing." in out and "No restart needed" in out


def test_a_replaced_module_already_imported_asks_for_a_restart(fake, monkeypatch, capsys):
    fake["installed"].update({"gguf": "0.19.0", "myst-nb": "1.4.0", "numpy": "1.26.4"})  # out of range
    fake["after"] = {"numpy": "2.4.6"}
    # numpy's modules, as far as this test is concerned, are a module this process has imported.
    monkeypatch.setattr(install, "_import_names", lambda dist: {"json"})
    with pytest.raises(install.RestartRequired, match="RESTART NEEDED: this Python had already imported json"):
        install.ensure("notebook")
    (args, constraints), = fake["calls"]
    assert args[-1] == "numpy>=2.0.2" and "numpy==" not in constraints  # the one package that must change
    out = capsys.readouterr().out
    assert "numpy>=2.0.2: 1.26.4 is installed but out of range" in out and "numpy 1.26.4 -> 2.4.6" in out


def test_a_replaced_module_never_imported_needs_no_restart(fake, monkeypatch, capsys):
    fake["installed"].update({"gguf": "0.18.0", "myst-nb": "1.4.0"})
    fake["after"] = {"gguf": "0.19.0"}
    monkeypatch.setattr(install, "_import_names", lambda dist: {"a_module_nobody_imported"})
    install.ensure("notebook")
    out = capsys.readouterr().out
    assert "gguf 0.18.0 -> 0.19.0" in out and "No restart needed" in out


def test_when_pinning_everything_fails_pip_may_replace(fake, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(install, "_pip", lambda args: calls.append(args) or (1 if "-c" in args else 0))
    install.ensure("notebook")
    assert len(calls) == 2 and "-c" not in calls[1]
    assert "letting it replace what it must" in capsys.readouterr().out


def test_use_drive_on_colab_moves_the_cache(monkeypatch, tmp_path):
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mounted.append)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setenv(install.CACHE_ENV, "unset at the end")  # so that monkeypatch restores it
    monkeypatch.delenv(install.CACHE_ENV)
    monkeypatch.delenv("COURSE_LIB_DATA", raising=False)
    folder = tmp_path / "MyDrive" / "course_lib"
    assert install.use_drive(str(folder)) == folder
    assert mounted == ["/content/drive"] and folder.is_dir()
    assert data.cache_dir() == folder and data.data_root() == folder / "data"


def test_use_drive_elsewhere_does_nothing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "google.colab", None)  # import fails
    monkeypatch.setenv(install.CACHE_ENV, "unset at the end")
    monkeypatch.delenv(install.CACHE_ENV)
    assert install.use_drive() is None
    assert "not on Colab" in capsys.readouterr().out and install.CACHE_ENV not in __import__("os").environ


def test_the_real_requirements_of_this_checkout():
    reqs = install.requirements(("notebook",))
    assert any(r.startswith("torch>=") for r in reqs) and any(r.startswith("myst-nb>=") for r in reqs)
    assert not any(r.startswith(("jupyter-book", "pytest")) for r in reqs)
    assert install.plan(reqs).to_install == []  # this venv has everything the notebooks need


def test_a_source_folder_on_the_path_is_not_checked(monkeypatch, capsys):
    def missing(dist):
        raise install.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(install.metadata, "version", missing)
    assert install.ensure("notebook").to_install == []
    assert "imported from a source folder" in capsys.readouterr().out
