"""The ladder's rungs on datasets where a rung has no prompts or nothing to tune on: reported, not crashed."""

from __future__ import annotations

import json
import math

import pytest

from course_lib.experiments import run_rung, shard_from_env
from course_lib.models import load_model


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
