"""course_lib.costs: the ladder's work counted by hand, and its pricing."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from course_lib import costs, data, experiments
from course_lib.experiments import Budget, rung
from course_lib.models import load_model


def test_rung_work_counts_fact_passes_by_hand():
    # 10 train, 4 dev, 6 test facts; K = 3 mined prompts; 2 epochs; batches of 4 (scoring: 8)
    w = costs.rung_work(rung("lama-hard"), 10, 4, 6, 3, 2, 4)
    assert (w.train, w.score, w.train_steps, w.score_batches) == (0, 6, 0, 1)
    w = costs.rung_work(rung("lpaqa-best-hard"), 10, 4, 6, 3, 2, 4)
    assert (w.train, w.score) == (0, 4 * 3 + 6)  # every candidate on dev, the best one on test
    w = costs.rung_work(rung("soft-lama"), 10, 4, 6, 3, 2, 4)
    assert (w.train, w.train_extra, w.score, w.train_steps, w.score_batches) == (2 * 10, 0, 2 * 4 + 6, 2 * 3, 2)
    assert not w.deep
    w = costs.rung_work(rung("mixture-soft-deep"), 10, 4, 6, 3, 2, 4)
    assert (w.train, w.train_extra, w.score, w.train_steps) == (2 * 10, 2 * 10 * 2, (2 * 4 + 6) * 3, 2 * 3)
    assert w.deep


def test_ladder_work_reads_the_split_sizes_and_caps(shared):
    b = Budget(("P36",), max_train=7, max_dev=None, max_test=5, epochs=3, max_templates=2, batch_size=4)
    work = costs.ladder_work(b).set_index("rung")
    n_dev = len(data.load_facts("trex_original", "P36", "dev"))
    assert set(work.index) == {r.name for r in experiments.LADDER}
    assert (work["train"] == 7).all() and (work["dev"] == n_dev).all() and (work["test"] == 5).all()
    lpaqa = [r.name for r in experiments.LADDER if r.prompt_set.startswith("lpaqa")]
    assert (work.loc[lpaqa, "K"] == 2).all() and work.loc["lama-hard", "K"] == 1  # LAMA has one template
    assert work.loc["mixture-soft", "train_passes"] == 3 * 7
    assert work.loc["mixture-soft", "train_extra_passes"] == 3 * 7 * (2 - 1)
    # a model that can use one mined template: K = 1
    one = costs.ladder_work(b, usable_templates=lambda templates: 1).set_index("rung")
    assert (one["K"] == 1).all() and one.loc["mixture-soft", "train_extra_passes"] == 0


def test_pricing_adds_arithmetic_and_per_batch_overheads():
    device = costs.Device("test", peak_flops=2e12, efficiency=0.5, source="made up")
    unit = costs.pass_costs(n_layer_params=1000, hidden=10, vocab=100, tokens=4, device=device)
    forward = 2 * 1000 * 4 + 2 * 10 * 100
    assert math.isclose(unit.score_pass, forward / 1e12) and math.isclose(unit.train_pass, 2 * forward / 1e12)
    table = pd.DataFrame([{"train_passes": 10, "train_extra_passes": 4, "deep": False, "score_passes": 20,
                           "train_steps": 2, "score_batches": 3},
                          {"train_passes": 10, "train_extra_passes": 4, "deep": True, "score_passes": 0,
                           "train_steps": 0, "score_batches": 0}])
    priced = unit.plus_overheads(costs.UnitCosts(0, 0, train_step=0.5, score_batch=0.25))
    got = costs.seconds(table, priced)
    assert math.isclose(float(got.iloc[0]), 14 * unit.train_pass + 20 * unit.score_pass + 2 * 0.5 + 3 * 0.25)
    # measured prices: extra prompts cheaper (a shared prefix), deep passes dearer
    measured = costs.UnitCosts(train_pass=1.0, score_pass=0.5, extra_prompt_pass=0.25, deep_factor=1.5)
    assert costs.seconds(table, measured).tolist() == [10 + 4 * 0.25 + 20 * 0.5, (10 + 4 * 0.25) * 1.5]


def test_layer_parameters_count_every_stack_of_layers():
    bart = load_model("tiny-bart").model
    expected = sum(p.numel() for stack in (bart.get_encoder().layers, bart.get_decoder().layers)
                   for p in stack.parameters())
    assert costs.layer_parameters(bart) == expected > 0


@pytest.mark.usefixtures("one_thread")
def test_measure_batch_costs_times_a_real_step_and_batch(shared):
    lm = load_model("tiny-bert")
    templates = data.load_prompts("lama", "trex_original", "P103")[:1]
    facts = data.load_facts("trex_original", "P103", "train")[:40]
    before = [p.clone() for p in lm.model.parameters()]
    unit = costs.measure_batch_costs(lm, templates, facts, batch_size=8, repeats=1)
    assert unit.train_step > 0 and unit.score_batch > 0 and unit.train_pass == unit.score_pass == 0
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters()))  # the model stays frozen


def test_colab_budget_sits_between_ci_and_gpu():
    ci, colab, gpu = (experiments.budget(n) for n in ("ci", "colab", "gpu"))
    assert ci.max_train < colab.max_train and colab.relations and len(colab.relations) < 41
    assert ci.epochs < colab.epochs < gpu.epochs


def test_each_rung_counts_the_templates_of_its_own_prompt_set(shared):
    b = Budget(("P36",), max_train=7, max_dev=5, max_test=5, epochs=1, max_templates=None, batch_size=4)
    work = costs.ladder_work(b).set_index("rung")
    mined = len(data.load_prompts("lpaqa-mine", "trex_original", "P36"))
    paraphrased = len(data.load_prompts("lpaqa-paraphrase", "trex_original", "P36"))
    assert mined != paraphrased
    assert work.loc["mixture-soft", "K"] == mined and work.loc["mixture-soft-paraphrase", "K"] == paraphrased
