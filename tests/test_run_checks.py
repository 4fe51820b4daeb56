"""course_lib.run_checks: the checks of whole procedures fail, specifically, on plausible wrong procedures.

tests/test_checks.py shows every check passing on its worked solution, failing on a stub, on an
exception and on course_lib's own answer. Here each check of a procedure (scoring by hand, an
ensemble, a tuning loop, a random start, EM inside the loop, a deep run, a control run) meets the
mistakes a student is likely to make, built on the library's building blocks like a real answer,
and must name them: a loop that never steps, a model that is trained too, a hook left behind, a
frozen read position that moved, weights that do not sum to one, facts that were not dropped.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import checks, exercises
from course_lib.data import Fact
from course_lib.soft_prompts import SoftPrompt, embedding_stats

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
W = {chapter: exercises.solution_functions(chapter) for chapter in checks.CHAPTER_CHECKS}


def run(name, fn, **kwargs):
    return getattr(checks, f"check_{name}")(fn, quiet=True, strict=False, **kwargs)


# ------------------------------------------------------------------ chapter 3: the tuning loop
def loop(lm, template, subjects, gold, *, lr, epochs, batch_size, step=True, shuffle=False, model_too=False):
    """The exercise's loop, with one of the usual mistakes switched on."""
    soft = SoftPrompt(lm, [template])
    params = list(soft.parameters())
    if model_too:
        for p in lm.model.parameters():
            p.requires_grad_(True)
        params += list(lm.model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(epoch)) if shuffle \
            else torch.arange(len(subjects))
        total = 0.0
        for start in range(0, len(subjects), batch_size):
            idx = order[start : start + batch_size]
            batch = soft.batch(lm, [subjects[int(i)] for i in idx], [0] * len(idx))
            loss = F.cross_entropy(lm.blank_logits(batch, soft.perturbation), gold[idx])
            optimizer.zero_grad()
            loss.backward()
            if step:
                optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(subjects))
    return soft, losses


def test_the_exercise_loop_passes():
    assert run("tune_soft_prompt", loop).passed


def test_a_loop_that_never_steps():
    result = run("tune_soft_prompt", lambda *a, **k: loop(*a, **k, step=False))
    assert "the loss did not fall" in result.message and "stepping" in result.message


def test_a_loop_that_shuffles_is_not_the_exercise_loop():
    result = run("tune_soft_prompt", lambda *a, **k: loop(*a, **k, shuffle=True))
    assert not result.passed and "problem:  wrong value" in result.message


def test_a_loop_that_trains_the_model():
    result = run("tune_soft_prompt", lambda *a, **k: loop(*a, **k, model_too=True))
    assert "problem:  changed the model" in result.message and "only the prompt's offsets" in result.message


def test_losses_as_tensors():
    def as_tensors(*args, **kwargs):
        soft, losses = loop(*args, **kwargs)
        return soft, [torch.tensor(x) for x in losses]

    result = run("tune_soft_prompt", as_tensors)
    assert "wrong type" in result.message and ".item()" in result.message


# ------------------------------------------------------------------ chapter 4: a random start
def start(lm, templates, generator, depth=0, *, statistics=True, full_length=False, library_stats=False):
    soft = SoftPrompt(lm, templates, depth)
    table = lm.embedding_output(torch.arange(lm.model.get_input_embeddings().num_embeddings)).double()
    mean, std = table.mean(0).float(), table.std(0, correction=0).float()
    if library_stats:
        mean, std = embedding_stats(lm)
    if not statistics:
        mean, std = torch.zeros(lm.hidden_size), torch.ones(lm.hidden_size)
    T = soft.offsets.shape[2]
    with torch.no_grad():
        for k, prompt in enumerate(soft.prompts):
            ids = list(prompt.prompt_token_ids) + [0] * ((T - len(prompt.prompt_token_ids)) if full_length else 0)
            ids = torch.tensor(ids, dtype=torch.long)
            eps = torch.randn(len(ids), lm.hidden_size, generator=generator)
            soft.offsets[k, 0, : len(ids)] = mean + std * eps - lm.embedding_output(ids)
    return soft


def test_random_start_variants():
    assert run("random_start", start).passed
    # embedding_stats is the library's answer to 4.1: the statistics must be the student's own.
    result = run("random_start", lambda *a, **k: start(*a, **k, library_stats=True))
    assert "uses course_lib's own answer" in result.message
    assert "problem:  wrong value" in run("random_start", lambda *a, **k: start(*a, **k, statistics=False)).message
    assert "must stay zero" in run("random_start", lambda *a, **k: start(*a, **k, full_length=True)).message


def test_random_start_from_the_global_generator():
    ns = dict(W["04_random_init"])
    exec("def unseeded(lm, templates, generator, depth=0):\n"  # noqa: S102 - a student's variant
         "    return random_start(lm, templates, torch.Generator().manual_seed(12345), depth)\n", ns)
    result = run("random_start", ns["unseeded"])
    assert "problem:  wrong value" in result.message and "prompt by prompt" in result.message


# ------------------------------------------------------------------ chapter 5: EM inside the loop
def mixture_loop(lm, templates, subjects, gold, *, lr, epochs, batch_size, m_step_each_batch=False,
                 unnormalised=False, no_detach=False):
    soft = SoftPrompt(lm, templates)
    K = len(templates)
    log_w = torch.full((K,), -math.log(K))
    optimizer = torch.optim.Adam(soft.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        total, resp = 0.0, torch.zeros(K)
        for start_ in range(0, len(subjects), batch_size):
            part = list(subjects[start_ : start_ + batch_size])
            batch = soft.batch(lm, [s for s in part for _ in range(K)], [k for _ in part for k in range(K)])
            logp = lm.blank_log_probs(batch, soft.perturbation)
            G = logp.gather(1, gold[start_ : start_ + batch_size].repeat_interleave(K)[:, None]).view(len(part), K)
            r = torch.softmax(log_w + (G if no_detach else G.detach()), -1)
            loss = -(r * G).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(part)
            resp += r.detach().sum(0)
            if m_step_each_batch:
                log_w = torch.log(r.detach().mean(0))
        if not m_step_each_batch:
            log_w = torch.log(resp) if unnormalised else torch.log(resp / len(subjects))
        losses.append(total / len(subjects))
    return soft, log_w, losses


def test_the_exercise_mixture_loop_passes():
    assert run("tune_mixture", mixture_loop).passed


def test_mixture_weights_must_sum_to_one():
    result = run("tune_mixture", lambda *a, **k: mixture_loop(*a, **k, unnormalised=True))
    assert "problem:  weights do not sum to one" in result.message


def test_mixture_m_step_once_per_epoch():
    result = run("tune_mixture", lambda *a, **k: mixture_loop(*a, **k, m_step_each_batch=True))
    assert "problem:  wrong value" in result.message and "mixture weights" in result.message


def test_mixture_responsibilities_are_targets():
    result = run("tune_mixture", lambda *a, **k: mixture_loop(*a, **k, no_detach=True))
    assert not result.passed and "problem:  wrong value" in result.message


# ------------------------------------------------------------------ chapter 6: a deep run
def _deep_variant(source_change):
    """The worked tune_deep with one change to its source, defined beside the worked deep_delta and Offsets."""
    ns = dict(W["06_deep_perturbations"])
    nb = exercises.versions(exercises.load_source("06_deep_perturbations"), "06").solution
    source = next("".join(c["source"]) for c in nb["cells"] if "def tune_deep(" in "".join(c["source"]))
    changed = source_change(source)
    assert changed != source, "the variant must change the worked solution"
    exec(changed, ns)  # noqa: S102 - a student's variant of the worked solution
    return ns["tune_deep"]


def test_deep_run_leaving_its_hooks():
    leave = "    lm.row_modules(0)[0][0].register_forward_hook(lambda module, inputs, output: None)\n    size = "
    fn = _deep_variant(lambda s: s.replace("    size = ", leave, 1))
    result = run("tune_deep", fn)
    assert "problem:  left a hook on the model" in result.message and "handle.remove()" in result.message


def test_deep_run_that_tunes_the_read_position_anyway():
    fn = _deep_variant(lambda s: s.replace("Offsets(offsets, row_scale, freeze_read)",
                                           "Offsets(offsets, row_scale, False)"))
    result = run("tune_deep", fn)
    assert "problem:  moved offsets that must stay zero" in result.message and "frozen read position" in result.message


def test_deep_run_without_row_units():
    fn = _deep_variant(lambda s: s.replace("row_scale = size / size[0]", "row_scale = torch.ones(depth + 1)"))
    result = run("tune_deep", fn)
    assert "problem:  wrong value" in result.message and "row_scale" in result.message


def test_deep_run_in_root_mean_square_units():
    # The library counts deep offsets in median |coordinate| units: the RMS, which a few massive
    # coordinates of a residual stream dominate, is another unit and must fail.
    rms = "torch.stack([torch.cat(v).pow(2).mean().sqrt() for v in values])"
    fn = _deep_variant(lambda s: s.replace("torch.stack([torch.cat(v).median() for v in values])", rms))
    result = run("tune_deep", fn)
    assert "problem:  wrong value" in result.message and "median |coordinate|" in result.message


def test_deep_run_that_forgets_reuse_prefix():
    fn = _deep_variant(lambda s: s.replace("        lm.reuse_prefix = saved\n", ""))
    result = run("tune_deep", fn)
    assert "problem:  changed the model's settings" in result.message and "reuse_prefix" in result.message


# ------------------------------------------------------------------ chapters 1, 2 and 8
def test_score_by_hand_must_drop_multi_token_objects():
    ns = W["01_asking"]

    def no_drop(lm, template, facts, batch_size=32):
        out = ns["score_by_hand"](lm, template, facts, batch_size)
        return {**out, "kept": len(facts), "dropped": 0}

    result = run("score_by_hand", no_drop)
    assert "problem:  wrong value" in result.message and "['kept']" in result.message


def test_ensemble_must_leave_out_and_renormalise():
    ns = W["02_many_ways_to_ask"]

    def everything(lm, templates, subjects, log_weights):
        per = []
        for t in templates:
            with torch.no_grad():
                per.append(lm.blank_log_probs(lm.build_batch([lm.encode_prompt(t)], list(subjects))).cpu())
        return ns["mixture_log_probs"](torch.stack(per, 1), log_weights)

    result = run("ensemble_log_probs", everything)
    assert not result.passed and "cannot answer" in result.message and "lm.covers" in result.message


def test_control_run_baseline_from_the_true_facts():
    ns = dict(W["08_learning_or_recalling"])

    def from_control(lm, template, train, dev, test, control, *, lr, epochs, batch_size):
        out = ns["control_run"](lm, template, train, dev, test, control, lr=lr, epochs=epochs, batch_size=batch_size)
        kept = ns["score_facts"](lm, [template], test).facts
        answerable = [f.object for f in control(list(train)) if lm.answer_id(f.object, template) is not None]
        return {**out, "majority": ns["majority_p_at_1"](answerable, [f.object for f in kept])}

    result = run("control_run", from_control)
    assert "problem:  wrong value" in result.message and "['majority']" in result.message


def test_control_run_that_ignores_the_control():
    ns = dict(W["08_learning_or_recalling"])

    def same_twice(lm, template, train, dev, test, control, *, lr, epochs, batch_size):
        return ns["control_run"](lm, template, train, dev, test, lambda facts: facts, lr=lr, epochs=epochs,
                                 batch_size=batch_size)

    assert not run("control_run", same_twice).passed


def test_shuffled_facts_must_keep_the_subjects():
    def objects_moved(facts, generator):
        perm = torch.randperm(len(facts), generator=generator)
        return [Fact(facts[int(p)].subject, f.object) for f, p in zip(facts, perm)]

    result = run("shuffled_facts", objects_moved)
    assert not result.passed and "problem:  wrong value" in result.message


def test_bootstrap_must_resample_within_relations():
    def pooled(hits, n_boot, generator, level=0.95):
        allh = torch.cat([h for h in hits]) if hits else torch.zeros(0)
        if len(allh) == 0:
            return {"micro": (math.nan, math.nan), "macro": (math.nan, math.nan)}
        idx = torch.randint(len(allh), (n_boot, len(allh)), generator=generator)
        m = allh.double()[idx].mean(1)
        q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
        lo, hi = torch.quantile(m, q).tolist()
        return {"micro": (lo, hi), "macro": (lo, hi)}

    result = run("bootstrap_intervals", pooled)
    assert not result.passed and "problem:  wrong value" in result.message
