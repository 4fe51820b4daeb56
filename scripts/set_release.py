#!/usr/bin/env python
"""The one way to change the repository URL and the release tag students install.

_config.yml holds both (``repository.url`` and ``repository.branch``, which is a release TAG, not a
moving branch: Jupyter Book's Colab buttons open ``blob/<tag>/...``). This script writes them into
every copy:

* ``course_lib/release.py`` (the grading exports and the data archives read it at run time);
* the install cell (tagged ``colab-install``) of every notebook, with the notebook's own Colab link:
  book/*.ipynb and exercises/source/*.ipynb, then exercises/ and solutions/ regenerated from them;
* the marked blocks of book/instructors.md and README.md (between ``<!-- release:NAME -->`` and
  ``<!-- /release:NAME -->``).

    python scripts/set_release.py                           # rewrite every copy from _config.yml
    python scripts/set_release.py --tag v0.2.0 [--url URL]  # change _config.yml first, then the copies
    python scripts/set_release.py --check                   # exit 1, listing the copies that disagree

tests/test_release.py runs --check and looks for any other copy of the URL in the repository.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # course_lib.exercises regenerates exercises/ and solutions/

import yaml  # noqa: E402

from course_lib import exercises  # noqa: E402

CONFIG = ROOT / "_config.yml"
RELEASE_PY = ROOT / "course_lib" / "release.py"
INSTALL_TAG = "colab-install"
TAG_RE = re.compile(r"^v\d+\.\d+\.\d+$")
URL_RE = re.compile(r"^https://github\.com/[\w.-]+/[\w.-]+$")
NOTEBOOK_GLOBS = ("book/*.ipynb", "exercises/source/*.ipynb")
MARKED_FILES = ("book/instructors.md", "README.md")

INSTALL_CELL = '''\
# Set-up. On Colab (or wherever course_lib is missing) this installs course_lib {tag} and what it needs,
# keeping every package already installed in range (Colab's torch above all). It prints what it keeps,
# adds and replaces, and stops with a message if the runtime must be restarted. This notebook in Colab:
# {colab}
USE_DRIVE = False  # True (Colab): keep the data, the converted Gemma and trained prompts in your Google Drive
import importlib, importlib.util, os, subprocess, sys
if importlib.util.find_spec("course_lib") is None:
    # COURSE_LIB_INSTALL: another source for pip (a local checkout, a wheel), e.g. for testing
    source = os.environ.get("COURSE_LIB_INSTALL", "git+{url}@{tag}")
    print(f"Installing course_lib from {{source}} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", source], check=True)
    importlib.invalidate_caches()
from course_lib import install
install.ensure("notebook", drive=USE_DRIVE)'''

RELEASE_MODULE = '''\
"""The repository and the release tag students install: written by scripts/set_release.py from _config.yml.

Do not edit: change them with ``python scripts/set_release.py --tag vX.Y.Z [--url URL]``.
"""

REPOSITORY = "{url}"
TAG = "{tag}"


def install_spec(extras: str = "") -> str:
    """A pip requirement for course_lib at this release: ``course_lib[extras] @ git+<REPOSITORY>@<TAG>``."""
    return f"course_lib{{'[' + extras + ']' if extras else ''}} @ git+{{REPOSITORY}}@{{TAG}}"


def colab_url(path: str) -> str:
    """Colab's address of a notebook of the repository at this release (``path`` from the repository root)."""
    slug = REPOSITORY.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{{slug}}/blob/{{TAG}}/{{path}}"


def asset_url(name: str) -> str:
    """The address of a file attached to this release on GitHub (the data archives)."""
    return f"{{REPOSITORY}}/releases/download/{{TAG}}/{{name}}"
'''


def read_config() -> tuple[str, str]:
    repo = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))["repository"]
    return str(repo["url"]).rstrip("/"), str(repo["branch"])


def write_config(url: str | None, tag: str | None) -> None:
    text = CONFIG.read_text(encoding="utf-8")
    block = re.search(r"^repository:\n((?:[ #].*\n|\n)*)", text, re.M)
    assert block, "_config.yml has no top-level `repository:` block"
    body = block.group(1)
    if url:
        body = re.sub(r"^(  url: ).*$", lambda m: m.group(1) + url, body, count=1, flags=re.M)
    if tag:
        body = re.sub(r"^(  branch: ).*$", lambda m: m.group(1) + tag, body, count=1, flags=re.M)
    CONFIG.write_text(text[: block.start(1)] + body + text[block.end(1):], encoding="utf-8")


def colab(url: str, tag: str, path: str) -> str:
    return f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/{tag}/{path}"


def install_cell(url: str, tag: str, notebook_path: str) -> str:
    # The exercise sources link to the student version, which is what students open.
    path = notebook_path.replace("exercises/source/", "exercises/")
    return INSTALL_CELL.format(url=url, tag=tag, colab=colab(url, tag, path))


def marked_blocks(url: str, tag: str) -> dict[str, str]:
    """Generated markdown, by block name (used in README.md and book/instructors.md)."""
    spec = f"course_lib[notebook] @ git+{url}@{tag}"
    return {
        "assign": (
            "Give students the notebook `exercises/NN_<name>.ipynb`: a file to download, or its Colab\n"
            f"link, which opens release `{tag}` of the repository, e.g.\n"
            f"<{colab(url, tag, 'exercises/03_soft_prompts.ipynb')}>."
        ),
        "install": (
            "```bash\n"
            f'pip install "{spec}"\n'
            f'pip install "course_lib[book] @ git+{url}@{tag}"\n'
            "```"
        ),
        "colab": (
            f"Chapter 1, for example, at release `{tag}` of {url}:\n"
            f"<{colab(url, tag, 'book/01_asking.ipynb')}>."
        ),
    }


def expected(url: str, tag: str) -> dict[Path, str]:
    """Every generated file (absolute path) and its exact text, exercises/ and solutions/ excluded."""
    out: dict[Path, str] = {RELEASE_PY: RELEASE_MODULE.format(url=url, tag=tag)}
    for pattern in NOTEBOOK_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            nb = json.loads(path.read_text(encoding="utf-8"))
            cells = [c for c in nb["cells"] if INSTALL_TAG in c.get("metadata", {}).get("tags", [])]
            if len(cells) != 1:
                raise SystemExit(f"{path.relative_to(ROOT)}: expected one cell tagged {INSTALL_TAG}, "
                                 f"found {len(cells)}")
            text = install_cell(url, tag, path.relative_to(ROOT).as_posix())
            cells[0]["source"] = text.splitlines(keepends=True)
            # The file's own key order (json keeps it): only the install cell's lines may change.
            out[path] = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    blocks = marked_blocks(url, tag)
    for name in MARKED_FILES:
        path = ROOT / name
        text = path.read_text(encoding="utf-8")
        for block, body in blocks.items():
            pattern = re.compile(rf"(<!-- release:{block} -->\n)(?:.*?\n)?(<!-- /release:{block} -->)", re.S)
            text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
        out[path] = text
    return out


def check(url: str, tag: str) -> list[str]:
    problems = []
    if not URL_RE.match(url):
        problems.append(f"_config.yml repository.url {url!r} is not https://github.com/<owner>/<name>")
    if not TAG_RE.match(tag):
        problems.append(f"_config.yml repository.branch {tag!r} is not a release tag vX.Y.Z (students install tags)")
    for path, text in expected(url, tag).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            problems.append(f"{path.relative_to(ROOT)}: differs from what _config.yml generates")
    problems += [f"{p} (python -m course_lib.exercises)" for p in exercises.out_of_sync(ROOT)]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="set repository.url in _config.yml first (default: keep it)")
    ap.add_argument("--tag", help="set the release tag (repository.branch) in _config.yml first (default: keep it)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the copies that disagree")
    args = ap.parse_args(argv)
    if args.check:
        if args.url or args.tag:
            ap.error("--check reads _config.yml; it takes no --url or --tag")
        problems = check(*read_config())
        for p in problems:
            print(f"out of date: {p}")
        print("release copies agree with _config.yml" if not problems else "run: python scripts/set_release.py")
        return 1 if problems else 0
    if args.tag and not TAG_RE.match(args.tag):
        ap.error(f"--tag {args.tag!r}: a release tag looks like v0.1.0")
    if args.url and not URL_RE.match(args.url.rstrip("/")):
        ap.error(f"--url {args.url!r}: expected https://github.com/<owner>/<name>")
    if args.url or args.tag:
        write_config(args.url and args.url.rstrip("/"), args.tag)
    url, tag = read_config()
    changed = []
    for path, text in expected(url, tag).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path.relative_to(ROOT).as_posix())
    changed += [p.as_posix() for p in exercises.write(ROOT)]
    print(f"{url} @ {tag}: {len(changed)} files written" + "".join(f"\n  {c}" for c in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
