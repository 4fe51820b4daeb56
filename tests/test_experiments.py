"""The ladder's rungs on datasets where a rung has no prompts or nothing to tune on: reported, not crashed."""

from __future__ import annotations

import json
import math

import pytest

from course_lib.experiments import run_rung
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
