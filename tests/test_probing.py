"""course_lib.probing: hard-prompt probing rows, and each method checked against a hand computation."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from course_lib import data
from course_lib.data import load_facts, load_prompts
from course_lib.evaluation import metrics_from_ranks, score_facts
from course_lib.models import load_model
from course_lib.probing import answer_mask, probe, take
from course_lib.results import KEY_COLUMNS, NUMBER_COLUMNS, summarize

REL = "P103"  # native language: many objects are single tokens even for the tiny models
N = 20


pytestmark = pytest.mark.usefixtures("one_thread", "shared")


@functools.cache
def bert():
    return load_model("tiny-bert", device="cpu")


def run(method, **kw):
    return probe(bert(), "trex_original", [REL], "lpaqa-mine", "test", method=method, max_facts=N, progress=False, **kw)


def hand_mixture_metrics(templates, weights, facts):
    """P@1, P@10, MRR of the mixture sum_k w_k p_k, computed fact by fact with blank_log_probs."""
    lm = bert()
    prompts = [lm.encode_prompt(t) for t in templates]
    form = next(t for t in templates if lm.encode_prompt(t).blank_prefix)
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    ranks = []
    for f in facts:
        gold = lm.answer_id(f.object, form)
        if gold is None:
            continue
        per_template = torch.stack(
            [lm.blank_log_probs(lm.build_batch([p], [f.subject]))[0].double().exp() for p in prompts]
        )
        mix = (w[:, None] * per_template).sum(0)
        ranks.append(int((mix >= mix[gold]).sum()))
    return metrics_from_ranks(torch.tensor(ranks)), len(ranks)


def check_counts(row, facts=N):
    assert row["facts"] == facts
    assert row["kept"] + row["dropped"] == facts
    assert row["truncated"] == 0  # LAMA's subjects are far shorter than any context
    assert sum(json.loads(row["dropped_reasons"]).values()) == row["dropped"]
    metrics = [row[m] for m in ("p_at_1", "p_at_10", "mrr")]
    if row["kept"] == 0:
        assert all(math.isnan(m) for m in metrics)
    else:
        assert all(0 <= m <= 1 for m in metrics) and row["p_at_1"] <= row["p_at_10"]


# --------------------------------------------------------------------------------------------


def test_probe_rows_for_two_relations():
    lm = bert()
    table = probe(lm, "trex_original", ["P36", "P19"], "lama", "test", max_facts=N, progress=False)
    assert len(table) == 2
    assert set(KEY_COLUMNS + NUMBER_COLUMNS + ["dropped_reasons", "template", "git_commit"]) <= set(table.columns)
    assert table["relation"].tolist() == ["P36", "P19"]
    keys = table[[c for c in KEY_COLUMNS if c != "relation"]].drop_duplicates().to_dict("records")
    assert keys == [dict(model="tiny-bert", dataset="trex_original", prompt_set="lama", method="hard", split="test",
                         answer_space="full")]
    assert table["template"].tolist() == ["The capital of [X] is [Y] .", "[X] was born in [Y] ."]
    for row in table.to_dict("records"):
        check_counts(row)
        facts = take(load_facts("trex_original", row["relation"], "test"), N)
        expected = score_facts(lm, load_prompts("lama", "trex_original", row["relation"]), facts)
        assert row["kept"] == expected.kept
        assert row["mrr"] == pytest.approx(expected.metrics()["mrr"], nan_ok=True)
    assert table["kept"].sum() > 0
    assert len(summarize(table)) == 1


def test_probe_several_answer_spaces():
    table = probe(bert(), "trex_original", ["P19"], "lama", "test", answer_space=["full", "common"], max_facts=N,
                  progress=False)
    assert table["answer_space"].tolist() == ["full", "common"]
    for row in table.to_dict("records"):
        check_counts(row)
    full, common = table.to_dict("records")
    assert common["kept"] <= full["kept"]


def test_each_gives_one_row_per_template():
    templates = load_prompts("lpaqa-mine", "trex_original", REL)
    table = run("each")
    assert table["template"].tolist() == [t.text for t in templates]
    assert (table["method"] == "each").all() and (table["relation"] == REL).all()
    facts = take(load_facts("trex_original", REL, "test"), N)
    for row, t in zip(table.to_dict("records"), templates):
        check_counts(row)
        expected = score_facts(bert(), [t], facts).metrics()
        assert row["mrr"] == pytest.approx(expected["mrr"])


def test_best_dev_picks_the_template_with_the_best_dev_p_at_1():
    lm = bert()
    templates = load_prompts("lpaqa-mine", "trex_original", REL)
    dev = take(load_facts("trex_original", REL, "dev"), N)
    dev_p1 = [
        score_facts(lm, [t], dev, allowed=answer_mask(lm, "full", "trex_original", REL, [t])).metrics()["p_at_1"]
        for t in templates
    ]
    best = max(range(len(templates)), key=lambda k: (dev_p1[k], -k))  # the first on ties
    assert best != 0  # this model and split make the choice matter
    (row,) = run("best-dev").to_dict("records")
    assert row["method"] == "best-dev"
    assert row["template"] == templates[best].text
    check_counts(row)
    test = take(load_facts("trex_original", REL, "test"), N)
    assert row["mrr"] == pytest.approx(score_facts(lm, [templates[best]], test).metrics()["mrr"])


@pytest.mark.parametrize("method", ["ensemble-uniform", "ensemble-weighted"])
def test_ensembles_equal_a_hand_computed_mixture(method):
    templates = load_prompts("lpaqa-mine", "trex_original", REL)
    weights = [t.weight for t in templates]
    assert len(set(weights)) > 1  # LPAQA's weights really differ
    facts = take(load_facts("trex_original", REL, "test"), N)
    expected, kept = hand_mixture_metrics(templates, weights if method == "ensemble-weighted" else [1.0] * len(templates),
                                          facts)
    (row,) = run(method).to_dict("records")
    check_counts(row)
    assert row["template"] == f"{len(templates)} templates"
    assert row["kept"] == kept > 0
    for m in ("p_at_1", "p_at_10", "mrr"):
        assert row[m] == pytest.approx(expected[m], abs=1e-9), m


def test_weighted_and_uniform_ensembles_differ():
    uniform = run("ensemble-uniform").iloc[0]
    weighted = run("ensemble-weighted").iloc[0]
    assert uniform["kept"] == weighted["kept"]
    assert uniform["mrr"] != pytest.approx(weighted["mrr"], abs=1e-6)


def test_weighted_ensemble_needs_weights():
    with pytest.raises(ValueError, match="no weights.*ensemble-uniform"):
        probe(bert(), "trex_original", [REL], "lpaqa-manual", method="ensemble-weighted", max_facts=5, progress=False)


def test_bad_arguments_are_refused_early():
    with pytest.raises(data.DataError, match="unknown relation 'P9'"):
        probe(bert(), "trex_original", ["P9"], progress=False)
    with pytest.raises(data.DataError, match="unknown split"):
        probe(bert(), "trex_original", ["P19"], split="validation", progress=False)
    with pytest.raises(ValueError, match="'best'"):
        probe(bert(), "trex_original", ["P19"], method="best", progress=False)
