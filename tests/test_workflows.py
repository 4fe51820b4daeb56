"""The GitHub workflows say what the README promises (actionlint checks their syntax: `make test-workflows`).

* book.yml builds the site at the `ci` budget on a GitHub-hosted runner, with caches, on pushes and
  pull requests, and deploys it to GitHub Pages (only from pushes or by hand);
* book-gpu.yml runs the `gpu` budget only when started by hand or on a schedule, on a runner whose
  label is a repository variable, not written in the file;
* release-data.yml attaches the data archives to a release, checked against the registry;
* every action is used at its current major version (the table below: update it with the actions).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"

# The current major version of each action used (checked 2026-11: Node 24 majors; older ones run on
# the retired Node 20 runtime, which actionlint reports for the oldest).
CURRENT = {
    "actions/checkout": "v7",
    "actions/setup-python": "v7",
    "actions/setup-node": "v7",
    "actions/cache": "v6",
    "actions/upload-artifact": "v7",
    "actions/upload-pages-artifact": "v5",
    "actions/deploy-pages": "v5",
}


def load(name: str) -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1): map it back.
    data = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))
    return data


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def uses(workflow: dict) -> list[str]:
    return [s["uses"] for job in workflow["jobs"].values() for s in steps(job) if "uses" in s]


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.yml")))
def test_actions_at_their_current_major(name):
    for use in uses(load(name)):
        action, _, version = use.partition("@")
        assert action in CURRENT, f"{name}: {action} is not in this test's table of current versions"
        assert version == CURRENT[action], f"{name}: {use}, current is {action}@{CURRENT[action]}"


def test_site_is_built_on_hosted_runners_with_caches_and_deployed_to_pages():
    wf = load("book.yml")
    assert {"push", "pull_request", "workflow_dispatch"} <= set(wf["on"])
    assert wf["env"]["BOOK_BUDGET"] == "ci"
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    for job in (build, deploy):
        assert re.fullmatch(r"ubuntu-[\d.]+|ubuntu-latest", job["runs-on"]), job["runs-on"]
    used = [s.get("uses", "") for s in steps(build)]
    run = "\n".join(s.get("run", "") for s in steps(build))
    assert any(u.startswith("actions/cache@") for u in used), "no cache of course_lib's data and models"
    setup_python = next(s for s in steps(build) if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup_python["with"] == {"python-version": "3.11", "cache": "pip", "cache-dependency-path": "constraints.txt"}
    setup_node = next(s for s in steps(build) if s.get("uses", "").startswith("actions/setup-node@"))
    assert setup_node["with"]["cache"] == "npm"
    assert "bash scripts/setup.sh book" in run and "make book-build" in run and "course_lib download" in run
    assert any(u.startswith("actions/upload-pages-artifact@") for u in used)
    assert deploy["needs"] == "build" and "pull_request" not in deploy["if"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert [s["uses"].split("@")[0] for s in steps(deploy)] == ["actions/deploy-pages"]
    assert wf["permissions"] == {"contents": "read"}  # only the deploy job may write Pages


def test_gpu_build_is_manual_or_scheduled_on_a_configurable_runner():
    wf = load("book-gpu.yml")
    assert set(wf["on"]) == {"workflow_dispatch", "schedule"}, "the GPU build must never run on push"
    runs_on = wf["jobs"]["build"]["runs-on"]
    assert re.fullmatch(r"\$\{\{\s*vars\.GPU_RUNNER\s*\|\|\s*'[\w-]+'\s*\}\}", runs_on), runs_on
    assert "gpu" in wf["on"]["workflow_dispatch"]["inputs"]["budget"]["options"]
    assert "inputs.budget" in wf["env"]["BOOK_BUDGET"]
    run = "\n".join(s.get("run", "") for s in steps(wf["jobs"]["build"]))
    assert "nvidia-smi" in run and "torch.cuda.is_available()" in run and "bash scripts/setup.sh book" in run
    assert "cu" in wf["env"]["TORCH_INDEX_URL"]
    assert wf["jobs"]["deploy"]["if"] == "inputs.publish"


def test_release_job_attaches_the_checked_archives():
    wf = load("release-data.yml")
    assert wf["on"]["push"]["tags"] == ["v*"] and "workflow_dispatch" in wf["on"]
    job = wf["jobs"]["archives"]
    assert job["env"]["COURSE_LIB_ARCHIVE_URL_BASE"] == "off"
    run = "\n".join(s.get("run", "") for s in steps(job))
    assert "make_data_registry.py data --check --archives dist" in run
    assert "gh release upload" in run and wf["permissions"] == {"contents": "write"}
