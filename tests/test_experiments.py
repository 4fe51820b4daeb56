"""The ladder's rungs on datasets where a rung has no prompts or nothing to tune on: reported, not crashed."""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess

import pytest
import torch
import transformers

import course_lib
from course_lib.evaluation import SCORING_BATCH
from course_lib.experiments import _cache_key, budget, run_rung, rung, shard_from_env
from course_lib.models import load_model
from course_lib.probing import probe
from course_lib.results import git_state
from course_lib.training import TuneConfig


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2")


def test_rung_without_prompts_is_reported_as_uncovered(gpt2, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path))
    row = run_rung(gpt2, "conceptnet", "HasProperty", "mixture-soft", "ci", progress=False)
    assert row["kept"] == 0 and row["dropped"] == row["facts"] > 0
    assert json.loads(row["dropped_reasons"]) == {"no usable template for this model": row["facts"]}
    assert math.isnan(row["p_at_1"])


def test_rung_with_no_single_token_training_fact_is_not_tuned(gpt2, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path))
    row = run_rung(gpt2, "google_re", "date_of_birth", "soft-lama", "ci", progress=False)
    assert "not tuned" in row["note"]
    assert row["kept"] + row["dropped"] == row["facts"]
    assert math.isnan(row["p_at_1"])


@pytest.mark.parametrize("env, shard", [
    ({}, (0, 1)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (7, 8)),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (1, 4)),
])
def test_shard_from_env_reads_slurm_arrays_and_launcher_ranks(env: dict, shard: tuple) -> None:
    assert shard_from_env(env) == shard


@pytest.mark.parametrize("env, named", [
    ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8"}, "numbered 0..n-1"),
    ({"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_COUNT"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "invalid literal"),
])
def test_shard_from_env_names_what_is_wrong(env: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        shard_from_env(env)


PROVENANCE = ["seed", "config", "course_lib", "torch", "transformers", "python", "model_revision", "device", "git_commit", "git_dirty"]


@pytest.mark.parametrize("source", ["probe", "lama-hard", "soft-lama"])
def test_every_row_records_what_made_it(gpt2, tmp_path, monkeypatch, source: str) -> None:
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path))
    if source == "probe":
        row = probe(gpt2, "trex_original", ["P103"], "lama", max_facts=8, progress=False).iloc[0].to_dict()
    else:
        row = run_rung(gpt2, "trex_original", "P103", source, "ci", seed=4, progress=False)
    assert set(PROVENANCE) <= row.keys()
    assert (row["model_revision"], row["device"]) == ("random weights, seed 0", "cpu")
    assert (row["course_lib"], row["torch"], row["transformers"], row["python"]) == (
        course_lib.__version__, torch.__version__, transformers.__version__, platform.python_version())
    assert row["git_commit"] and row["git_dirty"] in (True, False, None)
    config = json.loads(row["config"])
    if source == "probe":
        assert row["seed"] is None
        assert config == {"prompt_set": "lama", "method": "hard", "batch_size": SCORING_BATCH, "max_facts": 8, "answer_space": "full"}
    elif source == "lama-hard":
        assert row["seed"] is None  # the seed asked for decides nothing here
        assert config["rung"]["name"] == "lama-hard" and config["budget"]["max_test"] == 80 and config["answer_space"] == "full"
    else:
        assert row["seed"] == config["seed"] == 4 and config["lr"] > 0 and config["epochs"] == 2


def test_the_results_cache_key_includes_the_models_revision(gpt2) -> None:
    other = load_model("tiny-gpt2", seed=1)  # same name, other weights
    args = ("trex_original", "P103", rung("lama-hard"), budget("ci"), TuneConfig(), "full")
    assert other.name == gpt2.name and other.revision != gpt2.revision
    assert _cache_key(other, *args) != _cache_key(gpt2, *args)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_flags_uncommitted_changes_to_tracked_files(tmp_path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    assert git_state(tmp_path) == ("unknown", None)  # no commit yet
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "--short", "HEAD")
    assert git_state(tmp_path) == (commit, False)
    (tmp_path / "results.csv").write_text("a\n")  # untracked output: still clean
    assert git_state(tmp_path) == (commit, False)
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path) == (commit, True)


def test_rows_carry_the_majority_answer_and_the_untuned_prompt_beside_the_tuned_score(gpt2, tmp_path, monkeypatch):
    """Every row says what always answering the training facts' majority object and the untuned prompt score
    on the same kept test facts, so a gain can be read against both."""
    from course_lib import data
    from course_lib.evaluation import majority_answer, score_facts
    from course_lib.probing import take

    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path))
    b = budget("ci")
    hard = run_rung(gpt2, "trex_original", "P103", "lama-hard", "ci", progress=False)
    soft = run_rung(gpt2, "trex_original", "P103", "soft-lama", "ci", progress=False)
    template = data.load_prompts("lama", "trex_original", "P103")[0]
    train = take(data.load_facts("trex_original", "P103", "train"), b.max_train)
    test = take(data.load_facts("trex_original", "P103", "test"), b.max_test)
    by_hand = majority_answer(f.object for f in train if gpt2.answer_id(f.object, template) is not None)
    kept = score_facts(gpt2, [template], test).facts
    for row in (hard, soft):
        assert row["majority_answer"] == by_hand
        assert row["majority_p_at_1"] == pytest.approx(sum(f.object == by_hand for f in kept) / len(kept))
        assert row["hard_p_at_1"] == pytest.approx(hard["p_at_1"])


def test_every_rung_of_the_ladder_names_its_templates_choice():
    from course_lib.experiments import LADDER

    names = [r.name for r in LADDER]
    assert len(set(names)) == len(names)
    assert {"autoprompt-hard", "mixture-soft-random", "mixture-soft-paraphrase", "mixture-soft-data-dependent"} <= set(names)
    for r in LADDER:
        assert not (r.mixture and r.best_on_dev)
        assert r.tuned or (r.init == "template" and r.depth == 0 and not r.mixture)


def test_run_rung_takes_the_read_position_as_a_setting_of_its_own_row(gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path))
    frozen = run_rung(gpt2, "trex_original", "P103", "soft-lama", "ci", progress=False)
    tuned = run_rung(gpt2, "trex_original", "P103", "soft-lama", "ci", read="tuned", progress=False)
    assert json.loads(frozen["config"])["read"] == "frozen" and json.loads(tuned["config"])["read"] == "tuned"
    assert len(list(tmp_path.glob("P103-soft-lama-*.json"))) == 2  # two cached rows, one per setting
