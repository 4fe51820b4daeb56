"""Versions: ranges in pyproject.toml, exact versions in ONE lock (constraints.txt), and both agree.

* pyproject.toml declares compatible ranges: every requirement has a lower bound (``>=``), none is
  an exact pin (a user's environment, Colab's above all, is kept wherever it is in range);
* constraints.txt pins every package exactly, once; each of pyproject's requirements is locked at
  a version inside its range;
* environment.yml's ``pip:`` list repeats the lock's versions of pyproject's requirements, no more,
  no fewer; tests/site/REQUIREMENTS.txt and scripts/setup.sh's --no-deps packages agree with the lock;
* the JavaScript of package.json is pinned to exact versions, and package-lock.json agrees;
* the GitHub workflows install through scripts/setup.sh (the lock), never a version of their own;
* the Python versions that pyproject.toml's classifiers list are the ones README.md claims and the
  ones `make test-pythons` resolves;
* the installed version of every locked package equals the lock, so a drifted virtualenv fails
  here, naming the package (a local build label such as ``2.13.0+cpu`` satisfies ``==2.13.0``).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "constraints.txt"
ENVIRONMENT = ROOT / "environment.yml"
SITE_REQUIREMENTS = ROOT / "tests" / "site" / "REQUIREMENTS.txt"
SETUP_SH = ROOT / "scripts" / "setup.sh"
PACKAGE_JSON = ROOT / "package.json"
PACKAGE_LOCK = ROOT / "package-lock.json"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
README = ROOT / "README.md"

FIX_HINT = "re-run `bash scripts/setup.sh` (FORCE=1 to re-run pip), or `make setup`"


# ------------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf8"))


def pyproject_requirements() -> list[Requirement]:
    """The project's dependencies and the requirements of every extra, without its self-references."""
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(Requirement(r) for r in extra)
    return [r for r in reqs if canonicalize_name(r.name) != canonicalize_name(project["name"])]


def lock_lines() -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in LOCK.read_text(encoding="utf8").splitlines()]
    return [line for line in lines if line]


def exact_pin(text: str) -> tuple[str, str] | None:
    """(canonical name, version) if ``text`` is one exact ``==`` pin, else None."""
    try:
        req = Requirement(text)
    except Exception:
        return None
    specs = list(req.specifier)
    if req.url or req.marker or len(specs) != 1 or specs[0].operator != "==" or specs[0].version.endswith(".*"):
        return None
    return canonicalize_name(req.name), specs[0].version


def lock() -> dict[str, str]:
    return dict(p for p in map(exact_pin, lock_lines()) if p)


def site_requirements() -> list[str]:
    lines = SITE_REQUIREMENTS.read_text(encoding="utf8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def no_deps_names() -> list[str]:
    """The packages scripts/setup.sh installs with --no-deps (its NO_DEPS=(...) line)."""
    match = re.search(r"^NO_DEPS=\((.*)\)\s*$", SETUP_SH.read_text(encoding="utf8"), re.M)
    assert match, f"no NO_DEPS=(...) line in {SETUP_SH.relative_to(ROOT)}"
    return [canonicalize_name(n) for n in re.findall(r'"([^"]+)"', match.group(1))]


def environment_pip_requirements() -> list[str]:
    env = yaml.safe_load(ENVIRONMENT.read_text(encoding="utf8"))
    pip_lists = [d["pip"] for d in env.get("dependencies", []) if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, f"environment.yml must have exactly one `pip:` list, found {len(pip_lists)}"
    return [str(item) for item in pip_lists[0]]


# ------------------------------------------------------------------------------------------------
# pyproject.toml: ranges with tested lower bounds
# ------------------------------------------------------------------------------------------------


def test_pyproject_declares_ranges_with_lower_bounds():
    reqs = pyproject_requirements()
    assert reqs, "pyproject.toml lists no dependencies"
    no_lower = [str(r) for r in reqs if not any(s.operator == ">=" for s in r.specifier)]
    assert not no_lower, f"requirements without a tested lower bound (>=): {no_lower}"
    exact = [str(r) for r in reqs if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not exact, f"exact pins belong in constraints.txt, not pyproject.toml: {exact}"


def test_pyproject_names_are_unique():
    names = [canonicalize_name(r.name) for r in pyproject_requirements()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"required more than once in pyproject.toml (dependencies + extras): {dupes}"


# ------------------------------------------------------------------------------------------------
# constraints.txt: the one lock
# ------------------------------------------------------------------------------------------------


def test_lock_pins_are_exact_and_unique():
    lines = lock_lines()
    assert len(lines) > 50, "constraints.txt should lock dependencies of dependencies too (python scripts/lock.py)"
    loose = [line for line in lines if exact_pin(line) is None]
    assert not loose, f"constraints.txt lines that are not one exact '==' pin: {loose}"
    names = [exact_pin(line)[0] for line in lines]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"locked more than once: {dupes}"


def test_lock_satisfies_every_pyproject_range():
    locked = lock()
    missing = [str(r) for r in pyproject_requirements() if canonicalize_name(r.name) not in locked]
    assert not missing, f"pyproject.toml requirements that constraints.txt does not lock: {missing}"
    outside = [f"{r} (locked {locked[canonicalize_name(r.name)]})" for r in pyproject_requirements()
               if not r.specifier.contains(Version(locked[canonicalize_name(r.name)]), prereleases=True)]
    assert not outside, f"locked versions outside pyproject.toml's ranges: {outside}"


def test_environment_yml_repeats_the_lock():
    env_reqs = environment_pip_requirements()
    loose = [r for r in env_reqs if exact_pin(r) is None]
    assert not loose, f"environment.yml pip entries that are not exact '==' pins (no `-e .`, no ranges): {loose}"
    have = dict(map(exact_pin, env_reqs))
    assert len(have) == len(env_reqs), "environment.yml pins a package twice"
    locked = lock()
    want = {canonicalize_name(r.name): locked.get(canonicalize_name(r.name)) for r in pyproject_requirements()}
    assert have == want, (
        "environment.yml's pip list must be constraints.txt's versions of pyproject.toml's requirements:\n"
        f"  differing or missing in environment.yml: {sorted(set(want.items()) - set(have.items()))}\n"
        f"  not expected in environment.yml:         {sorted(set(have.items()) - set(want.items()))}"
    )


def test_environment_yml_python_fits_pyproject():
    env = yaml.safe_load(ENVIRONMENT.read_text(encoding="utf8"))
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and re.match(r"python\s*[=<>]", d)]
    assert len(pythons) == 1, f"environment.yml must pin python once, found {pythons}"
    version = re.sub(r"^python\s*=+\s*", "", pythons[0]).strip()
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert Version(version) in requires, f"environment.yml's python={version} is outside requires-python {requires}"


def test_site_requirements_and_no_deps_packages_agree_with_the_lock():
    locked = lock()
    reqs = site_requirements()
    assert reqs, "tests/site/REQUIREMENTS.txt is empty"
    loose = [r for r in reqs if exact_pin(r) is None]
    assert not loose, f"tests/site/REQUIREMENTS.txt lines not pinned with '==': {loose}"
    differ = [r for r in reqs if locked.get(exact_pin(r)[0]) != exact_pin(r)[1]]
    assert not differ, f"tests/site/REQUIREMENTS.txt differs from constraints.txt (python scripts/lock.py): {differ}"
    unlocked = [n for n in no_deps_names() if n not in locked]
    assert no_deps_names() and not unlocked, f"scripts/setup.sh --no-deps packages not locked: {unlocked}"
    env_text = ENVIRONMENT.read_text(encoding="utf8")
    missing = [n for n in no_deps_names() if f"--no-deps {n}=={locked[n]}" not in env_text]
    assert not missing, f"environment.yml's instructions do not mention `pip install --no-deps` of {missing}"


# ------------------------------------------------------------------------------------------------
# Python versions: classifiers = README's claim (`make test-pythons` resolves each)
# ------------------------------------------------------------------------------------------------


def claimed_pythons() -> list[str]:
    prefix = "Programming Language :: Python :: "
    return [c[len(prefix):] for c in _pyproject()["project"].get("classifiers", [])
            if c.startswith(prefix) and re.fullmatch(r"3\.\d+", c[len(prefix):])]


def test_python_versions_agree_everywhere():
    versions = claimed_pythons()
    assert versions, "pyproject.toml's classifiers name no Python 3.x version"
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert all(Version(v) in requires for v in versions), f"{versions} vs requires-python {requires}"
    assert Version(f"{min(map(Version, versions))}") == Version(str(requires).removeprefix(">=")), (
        "requires-python's lower bound must be the oldest Python version claimed")
    match = re.search(r"^Python versions: (3\.\d+(?:(?:, | and )3\.\d+)*)", README.read_text(encoding="utf8"), re.M)
    assert match, "README.md must have a line `Python versions: 3.x, 3.y and 3.z ...`"
    said = sorted(set(re.findall(r"3\.\d+", match.group(1))), key=Version)
    assert said == sorted(versions, key=Version), f"README says {said}, pyproject.toml's classifiers {versions}"


# ------------------------------------------------------------------------------------------------
# JavaScript and CI
# ------------------------------------------------------------------------------------------------

EXACT_SEMVER = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
DEPENDENCY_FIELDS = ("dependencies", "devDependencies", "optionalDependencies", "peerDependencies")


def test_package_json_versions_are_exact():
    pkg = json.loads(PACKAGE_JSON.read_text(encoding="utf8"))
    deps = {name: v for field in DEPENDENCY_FIELDS for name, v in pkg.get(field, {}).items()}
    assert deps, "package.json lists no dependencies"
    loose = {name: v for name, v in deps.items() if not EXACT_SEMVER.match(str(v))}
    assert not loose, f"package.json dependencies not pinned to an exact version (no ^, ~, ranges, tags): {loose}"


def test_package_lock_agrees_with_package_json():
    pkg = json.loads(PACKAGE_JSON.read_text(encoding="utf8"))
    lock_js = json.loads(PACKAGE_LOCK.read_text(encoding="utf8"))
    packages = lock_js.get("packages", {})
    root = packages.get("", {})
    for field in DEPENDENCY_FIELDS:
        assert root.get(field, {}) == pkg.get(field, {}), (
            f"package-lock.json's {field} differ from package.json's: run `npm install` and commit the lock"
        )
    wrong = {
        name: (want, packages.get(f"node_modules/{name}", {}).get("version"))
        for field in DEPENDENCY_FIELDS
        for name, want in pkg.get(field, {}).items()
        if packages.get(f"node_modules/{name}", {}).get("version") != want
    }
    assert not wrong, f"package-lock.json resolves these to other versions (pinned, locked): {wrong}"


def test_workflows_install_through_setup_sh_only():
    assert WORKFLOWS, "no GitHub workflows"
    for path in WORKFLOWS:
        text = path.read_text(encoding="utf8")
        own = re.findall(r"pip install[^\n]*==", text)
        assert not own, f"{path.name} pins versions of its own ({own}); install with scripts/setup.sh (the lock)"
        if "pip install" in text or "setup.sh" in text:
            assert "scripts/setup.sh" in text, f"{path.name} installs Python packages without scripts/setup.sh"


# ------------------------------------------------------------------------------------------------
# The installed environment matches the lock
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "locked"), sorted(lock().items()))
def test_installed_version_matches_lock(name, locked):
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{name}=={locked} (constraints.txt) is not installed: {FIX_HINT}", pytrace=False)
    # `==2.13.0` matches 2.13.0+cpu / 2.13.0+cu128 (PEP 440: a local label is ignored when the pin has none).
    if not SpecifierSet(f"=={locked}").contains(Version(installed), prereleases=True):
        pytest.fail(f"{name}: installed {installed}, but constraints.txt locks {locked} (the environment has "
                    f"drifted): {FIX_HINT}", pytrace=False)


def test_course_lib_installed_from_this_checkout():
    project = _pyproject()["project"]
    try:
        installed = metadata.version(project["name"])
    except metadata.PackageNotFoundError:
        pytest.fail(f"{project['name']} is not installed (pip install -e .): {FIX_HINT}", pytrace=False)
    assert installed == project["version"], (
        f"installed {project['name']} is {installed}, pyproject.toml says {project['version']}: {FIX_HINT}"
    )
