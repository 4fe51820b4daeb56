"""One repository URL and one release tag, set in _config.yml and copied only by scripts/set_release.py.

* every generated copy (course_lib/release.py, every notebook's install cell and Colab link, the
  marked blocks of README.md and book/instructors.md, exercises/ and solutions/) is what the
  generator writes from _config.yml (`set_release.py --check`);
* nowhere in the repository does another URL or ref of the repository appear: any Colab link,
  ``git+`` install or release download names the configured repository at the configured tag;
* the tag is a release tag (vX.Y.Z) equal to the package's version, never a moving branch;
* the generator given another URL and tag changes the install cells and nothing else of a notebook.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import set_release  # noqa: E402

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]
URL, TAG = CONFIG["url"].rstrip("/"), CONFIG["branch"]
SLUG = URL.removeprefix("https://github.com/")

COLAB = re.compile(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/([^/\s\"'<>]+)/")
GIT_PLUS = re.compile(r"git\+(https://github\.com/[\w.-]+/[\w.-]+?)(?:\.git)?@([\w.+-]+)")
ASSET = re.compile(r"(https://github\.com/[\w.-]+/[\w.-]+)/releases/download/([^/\s\"']+)/")
REPO_REF = re.compile(rf"github\.com/{re.escape(SLUG)}(?:/(?:blob|tree)/|@)([\w.+-]+)")


def repository_files() -> list[Path]:
    """Tracked files and untracked ones git does not ignore (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


def test_every_generated_copy_agrees_with_the_config():
    proc = subprocess.run([sys.executable, "scripts/set_release.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_tag_is_the_release_of_this_version():
    assert set_release.TAG_RE.match(TAG), f"repository.branch must be a release tag vX.Y.Z, not {TAG!r}"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert TAG == f"v{version}", f"students install {TAG}, but pyproject.toml's version is {version}"
    from course_lib import release

    assert (release.REPOSITORY, release.TAG) == (URL, TAG)
    assert release.install_spec("notebook") == f"course_lib[notebook] @ git+{URL}@{TAG}"


def test_no_other_copy_of_the_url_or_ref_anywhere():
    wrong = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for slug, ref in COLAB.findall(text):
            if (slug, ref) != (SLUG, TAG):
                wrong.append(f"{rel}: Colab link to {slug} at {ref}")
        for url, ref in GIT_PLUS.findall(text):
            if (url, ref) != (URL, TAG):
                wrong.append(f"{rel}: pip install of {url}@{ref}")
        for url, ref in ASSET.findall(text):
            if (url, ref) != (URL, TAG):
                wrong.append(f"{rel}: release asset of {url} at {ref}")
        wrong += [f"{rel}: {SLUG} at {ref}" for ref in REPO_REF.findall(text) if ref != TAG]
    assert not wrong, ("copies that disagree with _config.yml (change them with scripts/set_release.py):\n"
                       + "\n".join(wrong))


def test_every_notebook_links_to_itself_in_colab():
    notebooks = sorted(ROOT.glob("book/*.ipynb")) + sorted(ROOT.glob("exercises/*.ipynb")) + sorted(
        ROOT.glob("solutions/*.ipynb"))
    assert len(notebooks) >= 26
    for path in notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = [c for c in nb["cells"] if set_release.INSTALL_TAG in c["metadata"].get("tags", [])]
        assert len(cells) == 1, path
        source = "".join(cells[0]["source"])
        rel = path.relative_to(ROOT).as_posix()
        assert f"https://colab.research.google.com/github/{SLUG}/blob/{TAG}/{rel}" in source, rel
        assert f'"git+{URL}@{TAG}"' in source and "install.ensure(" in source, rel


def test_the_generator_changes_the_install_cells_and_nothing_else():
    new_url, new_tag = "https://github.com/another-org/another-name", "v9.8.7"
    generated = set_release.expected(new_url, new_tag)
    assert len(generated) >= 1 + 18 + 2
    for path, text in generated.items():
        assert URL not in text and f"@{TAG}" not in text, path
        if path.suffix == ".ipynb":
            now, then = json.loads(path.read_text(encoding="utf-8")), json.loads(text)
            changed = [i for i, (a, b) in enumerate(zip(now["cells"], then["cells"])) if a != b]
            assert len(now["cells"]) == len(then["cells"]) and len(changed) == 1, path
            assert set_release.INSTALL_TAG in then["cells"][changed[0]]["metadata"]["tags"]
            assert f"git+{new_url}@{new_tag}" in "".join(then["cells"][changed[0]]["source"])
    assert "REPOSITORY = \"https://github.com/another-org/another-name\"" in generated[set_release.RELEASE_PY]
