"""course_lib.mixture (EM over prompt weights) and mixture scoring in course_lib.evaluation."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.cloze import ClozeLM
from course_lib.data import Fact
from course_lib.evaluation import ranks_of, score_facts
from course_lib.mixture import (
    data_dependent_log_weights,
    effective_prompts,
    em_step,
    m_step_weights,
    mixture_log_likelihood,
    responsibilities,
)
from course_lib.models import load_model
from course_lib.soft_prompts import SoftPrompt
from course_lib.templates import Template


@functools.cache
def lm_for(name: str) -> ClozeLM:
    return load_model(name, device="cpu")


def random_problem(seed: int, B: int, K: int, skew: float = 3.0):
    """Arbitrary weights and gold log-probabilities (each a log of a probability, so <= 0)."""
    g = torch.Generator().manual_seed(seed)
    log_weights = skew * torch.randn(K, generator=g, dtype=torch.float64)
    gold = torch.log(torch.rand(B, K, generator=g, dtype=torch.float64).clamp_min(1e-12)) * (1 + 5 * torch.rand(K, generator=g, dtype=torch.float64))
    return log_weights, gold


# ---------------------------------------------------------------------------------------- EM
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 40), K=st.integers(1, 8))
def test_em_step_keeps_a_distribution_and_never_lowers_the_likelihood(seed: int, B: int, K: int) -> None:
    log_weights, gold = random_problem(seed, B, K)
    new, r = em_step(log_weights, gold)
    assert new.shape == (K,)
    assert torch.isfinite(new).all()
    pi = new.exp()
    assert (pi >= 0).all()
    assert abs(float(pi.sum()) - 1) < 1e-9
    torch.testing.assert_close(r.sum(1), torch.ones(B, dtype=r.dtype), atol=1e-9, rtol=0)
    before = float(mixture_log_likelihood(log_weights, gold).sum())
    after = float(mixture_log_likelihood(new, gold).sum())
    assert after >= before - 1e-6 * max(1.0, abs(before))


def test_em_iterations_climb_monotonically() -> None:
    for seed in range(20):
        lw, gold = random_problem(seed, 30, 5)
        last = float(mixture_log_likelihood(lw, gold).sum())
        for _ in range(15):
            lw, _ = em_step(lw, gold)
            now = float(mixture_log_likelihood(lw, gold).sum())
            assert now >= last - 1e-9
            last = now


def test_em_strictly_improves_when_one_prompt_explains_the_data_better() -> None:
    # Prompt 0 gives every gold answer probability 0.5, prompt 1 gives 0.01; uniform start.
    gold = torch.log(torch.tensor([[0.5, 0.01]] * 10, dtype=torch.float64))
    lw = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    new, r = em_step(lw, gold)
    # E step by hand: r_0 = 0.5 * 0.5 / (0.5 * 0.5 + 0.5 * 0.01) = 0.5 / 0.51.
    torch.testing.assert_close(r[:, 0], torch.full((10,), 0.5 / 0.51, dtype=torch.float64))
    torch.testing.assert_close(new.exp(), torch.tensor([0.5 / 0.51, 0.01 / 0.51], dtype=torch.float64))
    before = float(mixture_log_likelihood(lw, gold).sum())
    after = float(mixture_log_likelihood(new, gold).sum())
    assert after > before + 1.0  # 10 * (log(0.5^2/0.51 + 0.01^2/0.51) - log(0.255)) ~ 6.7


def test_responsibilities_are_the_posterior_over_prompts() -> None:
    lw, gold = random_problem(3, 6, 4)
    r = responsibilities(torch.log_softmax(lw, 0), gold)
    joint = torch.softmax(lw, 0)[None, :] * gold.exp()
    torch.testing.assert_close(r, joint / joint.sum(1, keepdim=True))
    torch.testing.assert_close(r.sum(1), torch.ones(6, dtype=r.dtype))
    # Per-fact weights ([B, K]) broadcast the same way.
    per_fact = torch.log_softmax(torch.randn(6, 4, dtype=torch.float64), 1)
    r2 = responsibilities(per_fact, gold)
    joint2 = per_fact.exp() * gold.exp()
    torch.testing.assert_close(r2, joint2 / joint2.sum(1, keepdim=True))


def test_m_step_floors_a_prompt_no_fact_chose() -> None:
    lw = m_step_weights(torch.tensor([3.0, 0.0, 1.0]), 4)
    assert torch.isfinite(lw).all()
    torch.testing.assert_close(lw.exp().sum(), torch.tensor(1.0))
    torch.testing.assert_close(lw.exp()[[0, 2]], torch.tensor([0.75, 0.25]), atol=1e-6, rtol=0)
    assert lw.exp()[1] > 0


@pytest.mark.parametrize("K", [1, 2, 5, 17])
def test_effective_prompts(K: int) -> None:
    assert effective_prompts(torch.zeros(K)) == pytest.approx(K)
    assert effective_prompts(torch.randn(1).expand(K) + 3.0) == pytest.approx(K)  # only differences matter
    one_hot = torch.full((K,), -1e4)
    one_hot[K // 2] = 0.0
    assert effective_prompts(one_hot) == pytest.approx(1.0, abs=1e-6)
    one_hot[K // 2] = -math.inf  # not a crash on -inf weights
    one_hot[0] = 0.0
    assert effective_prompts(one_hot) == pytest.approx(1.0, abs=1e-6)
    if K >= 2:
        two = torch.full((K,), -math.inf)
        two[:2] = 0.0
        assert effective_prompts(two) == pytest.approx(2.0)


def test_data_dependent_weights_normalize_per_fact_and_favour_plausible_subjects() -> None:
    prior = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    subject_ll = torch.tensor([[-2.0, -9.0, -9.0], [-9.0, -1.0, -9.0], [-5.0, -5.0, -5.0]])
    w = data_dependent_log_weights(prior, subject_ll)
    assert w.shape == (3, 3)
    torch.testing.assert_close(torch.logsumexp(w, 1), torch.zeros(3), atol=1e-6, rtol=0)
    assert w[0].argmax() == 0 and w[1].argmax() == 1
    # Equal plausibility everywhere: the prior alone.
    torch.testing.assert_close(w[2], torch.log_softmax(prior, 0))
    by_hand = torch.softmax(prior, 0) * subject_ll.exp()
    torch.testing.assert_close(w.exp(), by_hand / by_hand.sum(1, keepdim=True))
    # Unnormalised prior log-weights give the same answer.
    torch.testing.assert_close(data_dependent_log_weights(prior + 7.0, subject_ll), w)


# ---------------------------------------------------------------------------------------- subject likelihood
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3"])
def test_subject_log_likelihood_is_the_chain_rule(name: str) -> None:
    lm = lm_for(name)
    templates = [Template("The native language of [X] is [Y] ."), Template("[X] was born in [Y] .")]
    prompts = [lm.encode_prompt(t) for t in templates]
    subjects = ["Victor Hugo", "Marie Curie of Kaliningrad", "Dante", "Kaliningrad Dante"]
    batch = lm.build_batch(prompts, subjects, [0, 0, 1, 1])
    with torch.no_grad():
        got = lm.subject_log_likelihood(batch)
    for b in range(len(subjects)):
        keep = batch.attention_mask[b].bool()
        ids = batch.input_ids[b, keep]
        subj = batch.subject_mask[b, keep]
        assert subj.sum() >= 1
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=ids[None]).logits[0].float(), -1)
        positions = [p for p in range(1, len(ids)) if subj[p]]  # position 0 has nothing to its left
        expected = sum(float(logp[p - 1, ids[p]]) for p in positions)
        assert float(got[b]) == pytest.approx(expected, abs=1e-4), b
        if b < 2:  # text before the subject: every subject token is scored, several of them
            assert len(positions) == int(subj.sum()) >= 2


def test_subject_log_likelihood_sees_the_prompt_perturbation() -> None:
    lm = lm_for("tiny-gpt2")
    soft = SoftPrompt(lm, [Template("The native language of [X] is [Y] .")], 0)
    batch = soft.batch(lm, ["Victor Hugo"], [0])
    with torch.no_grad():
        plain = lm.subject_log_likelihood(batch, soft.perturbation)
        soft.offsets.normal_(0, 3.0)
        moved = lm.subject_log_likelihood(batch, soft.perturbation)
    assert (plain - moved).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------- mixture scoring
MIX_TEMPLATES = {
    "tiny-bert": [Template("[X] was born in [Y] ."), Template("[Y] is the capital of [X] ."), Template("[X] lives in [Y].")],
    "tiny-gpt2": [Template("[X] was born in [Y] ."), Template("The capital of [X] is [Y] ."), Template("[X] lives in [Y].")],
}
FACTS = [Fact("Dante", "Florence"), Fact("Italy", "Rome"), Fact("Victor Hugo", "France"), Fact("Goethe", "Germany"),
         Fact("Marie Curie", "Paris"), Fact("Japan", "Tokyo"), Fact("Newton", "England")]


@pytest.mark.parametrize("name", list(MIX_TEMPLATES))
@pytest.mark.parametrize("data_dependent", [False, True])
def test_score_facts_is_the_weighted_mixture_of_the_prompts(name: str, data_dependent: bool) -> None:
    lm = lm_for(name)
    templates = MIX_TEMPLATES[name]
    log_weights = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    soft = SoftPrompt(lm, templates, 1)
    with torch.no_grad():
        soft.offsets.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    got = score_facts(lm, templates, FACTS, log_weights=log_weights, perturbation=soft.perturbation,
                      data_dependent=data_dependent, batch_size=6)
    assert got.kept == len(FACTS)
    # By hand: each fact alone, each template alone, then log sum_k pi_k(x) p_k(y | x).
    mixes = []
    for f in FACTS:
        per_prompt, subject_ll = [], []
        for k in range(len(templates)):
            batch = soft.batch(lm, [f.subject], [k])
            with torch.no_grad():
                per_prompt.append(lm.blank_log_probs(batch, soft.perturbation)[0])
                subject_ll.append(lm.subject_log_likelihood(batch, soft.perturbation)[0])
        w = torch.log_softmax(log_weights, 0)
        if data_dependent:
            w = torch.log_softmax(w + torch.stack(subject_ll), 0)
        mixes.append(torch.logsumexp(torch.stack(per_prompt) + w[:, None], 0))
    mix = torch.stack(mixes)
    gold = torch.tensor([lm.answer_id(f.object, templates[0]) for f in FACTS])
    assert torch.equal(got.gold, gold)
    assert torch.equal(got.ranks, ranks_of(mix, gold))
    assert torch.equal(got.top10, mix.topk(10, dim=1).indices)
    # The weights matter: a one-prompt mixture ranks differently.
    alone = score_facts(lm, templates[2:], FACTS, perturbation=None)
    assert not torch.equal(alone.ranks, got.ranks)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_k_prompts_share_one_forward_pass_per_batch(name: str) -> None:
    lm = lm_for(name)
    templates = MIX_TEMPLATES[name]
    K = len(templates)
    calls: list[int] = []
    handle = lm.model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        score_facts(lm, templates, FACTS[:4], batch_size=4 * K)
        assert calls == [4 * K]  # all 4 facts under all K prompts: one pass
        calls.clear()
        score_facts(lm, templates, FACTS, batch_size=2 * K)
        assert calls == [2 * K, 2 * K, 2 * K, K]  # 7 facts, 2 per batch
        calls.clear()
        score_facts(lm, templates, FACTS[:4], batch_size=4 * K, data_dependent=True)
        assert calls == [4 * K, 4 * K]  # one more pass, for the subjects' likelihood
    finally:
        handle.remove()
