"""Every version the project depends on is pinned exactly, in agreement everywhere, and installed.

pyproject.toml is the single source of truth. Checked here:

* every requirement of pyproject.toml (dependencies and every optional-dependencies extra) is an
  exact ``==`` pin;
* environment.yml's ``pip:`` list holds exactly those pins, no more, no fewer;
* tests/site/REQUIREMENTS.txt and scripts/setup.sh's ``--no-deps`` pins are exact too;
* the JavaScript of package.json is pinned to exact versions, and package-lock.json agrees;
* .github/workflows/book-gpu.yml installs the torch version that pyproject.toml pins;
* the installed version of every pinned package equals its pin, so a drifted virtualenv fails
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
ENVIRONMENT = ROOT / "environment.yml"
SITE_REQUIREMENTS = ROOT / "tests" / "site" / "REQUIREMENTS.txt"
SETUP_SH = ROOT / "scripts" / "setup.sh"
PACKAGE_JSON = ROOT / "package.json"
PACKAGE_LOCK = ROOT / "package-lock.json"
GPU_WORKFLOW = ROOT / ".github" / "workflows" / "book-gpu.yml"

FIX_HINT = "re-run `bash scripts/setup.sh` (FORCE=1 to re-run pip), or `make setup`"


# ------------------------------------------------------------------------------------------------
# Reading the pins
# ------------------------------------------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf8"))


def pyproject_requirements() -> list[str]:
    """The project's dependencies and the requirements of every optional-dependencies extra."""
    project = _pyproject()["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return reqs


def site_requirements() -> list[str]:
    lines = SITE_REQUIREMENTS.read_text(encoding="utf8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def no_deps_requirements() -> list[str]:
    """The pins scripts/setup.sh installs with --no-deps (its NO_DEPS_PINS=(...) line)."""
    match = re.search(r"^NO_DEPS_PINS=\((.*)\)\s*$", SETUP_SH.read_text(encoding="utf8"), re.M)
    assert match, f"no NO_DEPS_PINS=(...) line in {SETUP_SH.relative_to(ROOT)}"
    return re.findall(r'"([^"]+)"', match.group(1))


def environment_pip_requirements() -> list[str]:
    env = yaml.safe_load(ENVIRONMENT.read_text(encoding="utf8"))
    pip_lists = [d["pip"] for d in env.get("dependencies", []) if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, f"environment.yml must have exactly one `pip:` list, found {len(pip_lists)}"
    return [str(item) for item in pip_lists[0]]


def exact_pin(text: str) -> tuple[str, str] | None:
    """(canonical name, version) if ``text`` is one exact ``==`` pin, else None."""
    try:
        req = Requirement(text)
    except Exception:
        return None
    specs = list(req.specifier)
    if req.url or len(specs) != 1 or specs[0].operator != "==" or specs[0].version.endswith(".*"):
        return None
    return canonicalize_name(req.name), specs[0].version


def pin_key(text: str) -> str:
    """A normal form of a requirement for comparing sets (name normalised, extras sorted)."""
    req = Requirement(text)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{canonicalize_name(req.name)}{extras}{req.specifier}{marker}"


def all_installed_pins() -> list[tuple[str, str, str]]:
    """(name, pinned version, where) for every pin that must be installed in the project's venv."""
    out = []
    for where, reqs in (
        ("pyproject.toml", pyproject_requirements()),
        ("tests/site/REQUIREMENTS.txt", site_requirements()),
        ("scripts/setup.sh --no-deps", no_deps_requirements()),
    ):
        for text in reqs:
            pin = exact_pin(text)
            if pin is not None:  # non-exact ones fail the tests below
                out.append((pin[0], pin[1], where))
    return out


# ------------------------------------------------------------------------------------------------
# Exact pins everywhere
# ------------------------------------------------------------------------------------------------


def test_pyproject_pins_are_exact():
    reqs = pyproject_requirements()
    assert reqs, "pyproject.toml lists no dependencies"
    loose = [r for r in reqs if exact_pin(r) is None]
    assert not loose, f"pyproject.toml requirements not pinned with a single exact '==': {loose}"


def test_pyproject_names_are_unique():
    names = [canonicalize_name(Requirement(r).name) for r in pyproject_requirements()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"pinned more than once in pyproject.toml (dependencies + extras): {dupes}"


def test_site_requirements_are_exact():
    reqs = site_requirements()
    assert reqs, "tests/site/REQUIREMENTS.txt is empty"
    loose = [r for r in reqs if exact_pin(r) is None]
    assert not loose, f"tests/site/REQUIREMENTS.txt lines not pinned with '==': {loose}"


def test_no_deps_pins_are_exact():
    reqs = no_deps_requirements()
    assert reqs, "scripts/setup.sh has no --no-deps pins"
    loose = [r for r in reqs if exact_pin(r) is None]
    assert not loose, f"scripts/setup.sh NO_DEPS_PINS not pinned with '==': {loose}"
    # environment.yml tells conda users the same command.
    env_text = ENVIRONMENT.read_text(encoding="utf8")
    missing = [r for r in reqs if f"--no-deps {r}" not in env_text]
    assert not missing, f"environment.yml's instructions do not mention `pip install --no-deps` of {missing}"


# ------------------------------------------------------------------------------------------------
# environment.yml repeats pyproject.toml
# ------------------------------------------------------------------------------------------------


def test_environment_yml_pins_equal_pyproject():
    env_reqs = environment_pip_requirements()
    loose = [r for r in env_reqs if exact_pin(r) is None]
    assert not loose, f"environment.yml pip entries that are not exact '==' pins (no `-e .`, no ranges): {loose}"

    env_keys = [pin_key(r) for r in env_reqs]
    dupes = sorted({k for k in env_keys if env_keys.count(k) > 1})
    assert not dupes, f"environment.yml pins these twice: {dupes}"

    want, have = {pin_key(r) for r in pyproject_requirements()}, set(env_keys)
    only_pyproject, only_env = sorted(want - have), sorted(have - want)
    assert not (only_pyproject or only_env), (
        "environment.yml's pip list differs from pyproject.toml (dependencies + all extras):\n"
        f"  in pyproject.toml, missing or different in environment.yml: {only_pyproject}\n"
        f"  in environment.yml, not in pyproject.toml:                 {only_env}\n"
        "pyproject.toml is the source of truth: copy its pins into environment.yml."
    )


def test_environment_yml_python_fits_pyproject():
    env = yaml.safe_load(ENVIRONMENT.read_text(encoding="utf8"))
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and re.match(r"python\s*[=<>]", d)]
    assert len(pythons) == 1, f"environment.yml must pin python once, found {pythons}"
    version = re.sub(r"^python\s*=+\s*", "", pythons[0]).strip()
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert Version(version) in requires, f"environment.yml's python={version} is outside requires-python {requires}"


# ------------------------------------------------------------------------------------------------
# JavaScript and CI pins
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
    lock = json.loads(PACKAGE_LOCK.read_text(encoding="utf8"))
    packages = lock.get("packages", {})
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


def test_gpu_workflow_installs_the_pinned_torch():
    torch_pins = [p for p in (exact_pin(r) for r in pyproject_requirements()) if p and p[0] == "torch"]
    assert len(torch_pins) == 1, "pyproject.toml must pin torch exactly once"
    match = re.search(r'^\s*TORCH_VERSION:\s*"?([^"\s]+)"?\s*$', GPU_WORKFLOW.read_text(encoding="utf8"), re.M)
    assert match, f"no TORCH_VERSION in {GPU_WORKFLOW.relative_to(ROOT)}"
    assert match.group(1) == torch_pins[0][1], (
        f"{GPU_WORKFLOW.relative_to(ROOT)} installs torch {match.group(1)}, pyproject.toml pins {torch_pins[0][1]}"
    )


# ------------------------------------------------------------------------------------------------
# The installed environment matches the pins
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pinned", "where"), [pytest.param(*pin, id=pin[0]) for pin in all_installed_pins()]
)
def test_installed_version_matches_pin(name, pinned, where):
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{name}=={pinned} (pinned in {where}) is not installed: {FIX_HINT}", pytrace=False)
    # `==2.13.0` matches 2.13.0+cpu / 2.13.0+cu128 (PEP 440: a local label is ignored when the pin has none).
    if not SpecifierSet(f"=={pinned}").contains(Version(installed), prereleases=True):
        pytest.fail(
            f"{name}: installed {installed}, but {where} pins {pinned} (the environment has drifted): {FIX_HINT}",
            pytrace=False,
        )


def test_course_lib_installed_from_this_checkout():
    project = _pyproject()["project"]
    try:
        installed = metadata.version(project["name"])
    except metadata.PackageNotFoundError:
        pytest.fail(f"{project['name']} is not installed (pip install -e .): {FIX_HINT}", pytrace=False)
    assert installed == project["version"], (
        f"installed {project['name']} is {installed}, pyproject.toml says {project['version']}: {FIX_HINT}"
    )
