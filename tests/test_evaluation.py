"""course_lib.evaluation and results.summarize: ranks, metrics, answer spaces and honest counts."""

from __future__ import annotations

import functools
import math

import pandas as pd
import pytest
import torch

from course_lib import data, evaluation
from course_lib.data import Fact, common_vocab
from course_lib.evaluation import (
    AnswerSpace,
    DropReason,
    Scored,
    allowed_ids,
    metrics_from_ranks,
    ranks_of,
    relation_objects,
    score_facts,
    score_facts_in_spaces,
)
from course_lib.models import load_model
from course_lib.results import summarize
from course_lib.templates import Template

BORN = Template("[X] was born in [Y] .")
FACTS = [
    Fact("Dante", "Florence"),
    Fact("Victor Hugo", "Paris"),
    Fact("Marie Curie", "Kaliningrad"),  # several tokens
    Fact("Goethe", "Germany"),
    Fact("Newton", "Italy"),  # one token, outside the small answer space below
    Fact("Einstein", "Berlin"),
    Fact("Shakespeare", "Kaliningradsk"),  # several tokens
]
SMALL_SPACE = ["Florence", "Paris", "Germany", "Berlin", "Rome", "Tokyo", "Kaliningrad"]


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def bert():
    return load_model("tiny-bert", device="cpu")


def hand_log_probs(lm, template: Template, subjects: list[str]) -> torch.Tensor:
    """The blank's log-probs, one subject at a time (no batching to get wrong)."""
    prompt = lm.encode_prompt(template)
    return torch.cat([lm.blank_log_probs(lm.build_batch([prompt], [s])) for s in subjects]).detach()


# --------------------------------------------------------------------------------------------
# metrics and ranks by hand


def test_metrics_from_ranks():
    m = metrics_from_ranks(torch.tensor([1, 2, 10, 11, 1]))
    assert m["p_at_1"] == pytest.approx(2 / 5)
    assert m["p_at_10"] == pytest.approx(4 / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1) / 5)
    assert metrics_from_ranks(torch.tensor([3])) == {"p_at_1": 0.0, "p_at_10": 1.0, "mrr": pytest.approx(1 / 3)}


def test_metrics_of_nothing_are_nan_not_zero():
    m = metrics_from_ranks(torch.zeros(0, dtype=torch.long))
    assert set(m) == {"p_at_1", "p_at_10", "mrr"}
    assert all(math.isnan(v) for v in m.values())
    empty = torch.zeros(0, dtype=torch.long)
    nothing = Scored([], empty, empty, torch.zeros(0, 10, dtype=torch.long), empty)
    assert all(math.isnan(v) for v in nothing.metrics().values())


def test_ranks_of():
    scores = torch.tensor(
        [
            [0.5, 0.1, 0.9, 0.5],  # gold 0: beaten by 2, tied with 3
            [0.5, 0.1, 0.9, 0.5],  # gold 2: the top
            [0.5, 0.1, 0.9, 0.5],  # gold 1: the bottom
            [0.2, 0.2, 0.2, 0.2],  # gold 3: all tied
        ]
    ).log()
    gold = torch.tensor([0, 2, 1, 3])
    assert ranks_of(scores, gold).tolist() == [3, 1, 4, 4]
    allowed = torch.tensor([True, True, False, True])  # id 2 is not an answer
    assert ranks_of(scores[[0, 2, 3]], gold[[0, 2, 3]], allowed).tolist() == [2, 3, 3]
    only_gold = torch.tensor([True, False, False, False])
    assert ranks_of(scores[:1], gold[:1], only_gold).tolist() == [1]


def test_a_tie_is_not_a_hit():
    flat = torch.zeros(3, 50)
    ranks = ranks_of(flat, torch.tensor([0, 7, 49]))
    assert ranks.tolist() == [50, 50, 50]
    assert metrics_from_ranks(ranks)["p_at_1"] == 0.0


# --------------------------------------------------------------------------------------------
# scoring on a tiny model


def test_score_facts_ranks_match_a_hand_computation():
    lm = bert()
    scored = score_facts(lm, [BORN], FACTS, batch_size=3)
    kept = [f for f in FACTS if lm.answer_id(f.object, BORN) is not None]
    assert scored.facts == kept  # in the order given, despite length-sorted batches
    gold = torch.tensor([lm.answer_id(f.object, BORN) for f in kept])
    assert scored.gold.tolist() == gold.tolist()
    logp = hand_log_probs(lm, BORN, [f.subject for f in kept])
    expected = [int((logp[i] >= logp[i, g]).sum()) for i, g in enumerate(gold.tolist())]
    assert scored.ranks.tolist() == expected
    assert scored.top10.tolist() == logp.topk(10, dim=1).indices.tolist()
    assert scored.metrics() == metrics_from_ranks(torch.tensor(expected))


def test_answer_space_restricts_the_ranking():
    lm = bert()
    allowed = allowed_ids(lm, AnswerSpace.RELATION, BORN, SMALL_SPACE)
    ids = {lm.answer_id(w, BORN) for w in SMALL_SPACE} - {None}
    assert sorted(allowed.nonzero().flatten().tolist()) == sorted(ids)
    assert len(ids) == len(SMALL_SPACE) - 1  # Kaliningrad is not one token: not an answer
    full = score_facts(lm, [BORN], FACTS)
    small = score_facts(lm, [BORN], FACTS, allowed=allowed)
    assert [f.object for f in small.facts] == ["Florence", "Paris", "Germany", "Berlin"]
    logp = hand_log_probs(lm, BORN, [f.subject for f in small.facts])
    for i, g in enumerate(small.gold.tolist()):
        among = [t for t in ids if logp[i, t] >= logp[i, g]]
        assert small.ranks[i] == len(among)
        assert set(small.top10[i, : len(ids)].tolist()) == ids  # only answers rank before the rest
    assert (small.ranks <= len(ids)).all()
    by_object = dict(zip([f.object for f in full.facts], full.ranks.tolist()))
    assert all(r <= by_object[f.object] for f, r in zip(small.facts, small.ranks.tolist()))
    assert allowed_ids(lm, "full", BORN) is None


def test_dropped_counts_add_up():
    lm = bert()
    allowed = allowed_ids(lm, "relation", BORN, SMALL_SPACE)
    scored = score_facts(lm, [BORN], FACTS, allowed=allowed)
    assert dict(scored.dropped) == {DropReason.MULTI_TOKEN.value: 2, DropReason.NOT_IN_SPACE.value: 1}
    assert scored.kept + sum(scored.dropped.values()) == len(FACTS)
    full = score_facts(lm, [BORN], FACTS)
    assert dict(full.dropped) == {DropReason.MULTI_TOKEN.value: 2}
    assert full.kept == 5


def test_several_spaces_at_once_equal_one_at_a_time():
    lm = bert()
    spaces = {"full": None, "small": allowed_ids(lm, "relation", BORN, SMALL_SPACE)}
    together = score_facts_in_spaces(lm, [BORN], FACTS, spaces, batch_size=4)
    for name, mask in spaces.items():
        alone = score_facts(lm, [BORN], FACTS, allowed=mask, batch_size=4)
        got = together[name]
        assert got.facts == alone.facts and got.dropped == alone.dropped
        assert torch.equal(got.ranks, alone.ranks) and torch.equal(got.gold, alone.gold)
        assert torch.equal(got.top10, alone.top10)


# --------------------------------------------------------------------------------------------
# out of memory: smaller batches, same results


def out_of_memory_above(limit: int, sizes: list[int]):
    """``_mixture_log_probs`` as a device would run it with room for ``limit`` facts per batch."""
    real = evaluation._mixture_log_probs

    def forward(lm, prompts, usable, subjects, *args):
        sizes.append(len(subjects))
        if len(subjects) > limit:
            raise torch.OutOfMemoryError(f"simulated: no room for {len(subjects)} facts")
        return real(lm, prompts, usable, subjects, *args)

    return forward


TWO = [BORN, Template("[X] is a native of [Y] .")]


def test_out_of_memory_halves_the_batch_and_changes_no_result(monkeypatch: pytest.MonkeyPatch):
    lm = bert()
    spaces = {"full": None, "small": allowed_ids(lm, "relation", BORN, SMALL_SPACE)}
    unconstrained = score_facts_in_spaces(lm, TWO, FACTS, spaces, batch_size=8)
    sizes: list[int] = []
    monkeypatch.setattr(evaluation, "_mixture_log_probs", out_of_memory_above(1, sizes))
    with pytest.warns(RuntimeWarning, match="out of memory on cpu") as caught:
        constrained = score_facts_in_spaces(lm, TWO, FACTS, spaces, batch_size=8)
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}  # 8 rows = 4 facts x 2 prompts, halved twice
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "scoring 2 facts per batch" in messages[0] and "scoring 1 facts per batch" in messages[1]
    for name in spaces:
        got, want = constrained[name], unconstrained[name]
        assert got.facts == want.facts and got.dropped == want.dropped and got.truncated == want.truncated
        assert torch.equal(got.ranks, want.ranks) and torch.equal(got.top10, want.top10)


def test_out_of_memory_with_one_fact_per_batch_says_what_to_do(monkeypatch: pytest.MonkeyPatch):
    sizes: list[int] = []
    monkeypatch.setattr(evaluation, "_mixture_log_probs", out_of_memory_above(0, sizes))
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError, match="even 1 fact per batch.*another device") as err:
        score_facts(bert(), TWO, FACTS, batch_size=8)
    assert sizes == [4, 2, 1]
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError) and "simulated" in str(err.value.__cause__)


def test_common_vocabulary_space(shared):
    lm = bert()
    words = common_vocab()
    assert len(words) == 21_018 and "Paris" in words
    mask = allowed_ids(lm, "common", BORN)
    single = {lm.answer_id(w, BORN) for w in words} - {None}
    assert mask.dtype == torch.bool and mask.shape == (lm.vocab_size,)
    assert set(mask.nonzero().flatten().tolist()) == single
    assert 10 < len(single) < lm.vocab_size
    assert mask[lm.answer_id("Paris", BORN)] and not mask[lm.tokenizer.mask_token_id]


def test_relation_objects_come_from_train_and_dev_only(shared):
    objects = relation_objects("trex_original", "P36")
    seen = {f.object for s in ("train", "dev") for f in data.load_facts("trex_original", "P36", s)}
    test_only = {f.object for f in data.load_facts("trex_original", "P36", "test")} - seen
    assert objects == sorted(seen)
    assert test_only and not test_only & set(objects)  # no oracle: some test answers are not candidates
    assert len(objects) > 100 and "Paris" in objects


def test_majority_answer_breaks_ties_alphabetically_whatever_the_order():
    from course_lib.evaluation import majority_answer, majority_p_at_1

    assert majority_answer(["b", "a", "b", "a", "c"]) == "a"
    assert majority_answer(["a", "b", "a", "b", "c"]) == "a"
    assert majority_answer(["c", "c", "a"]) == "c"
    assert majority_answer([]) is None
    facts = [Fact("x", o) for o in ["French", "French", "Italian", "German"]]
    assert majority_p_at_1("French", facts) == 0.5
    assert math.isnan(majority_p_at_1("French", []))


# --------------------------------------------------------------------------------------------
# summaries: micro vs macro


def table(rows):
    base = dict(model="m", dataset="trex_original", prompt_set="lama", method="hard", split="test", answer_space="full")
    return pd.DataFrame([{**base, **r} for r in rows])


def test_micro_pools_facts_and_macro_averages_relations():
    t = table(
        [
            dict(relation="A", facts=100, kept=90, dropped=10, p_at_1=0.9, p_at_10=1.0, mrr=0.95),
            dict(relation="B", facts=20, kept=10, dropped=10, p_at_1=0.1, p_at_10=0.5, mrr=0.2),
            # nothing kept: its zeros must not drag the macro average down
            dict(relation="C", facts=30, kept=0, dropped=30, p_at_1=0.0, p_at_10=0.0, mrr=0.0),
        ]
    )
    (row,) = summarize(t).to_dict("records")
    assert (row["relations"], row["facts"], row["kept"], row["dropped"]) == (3, 150, 100, 50)
    assert row["micro_p_at_1"] == pytest.approx((0.9 * 90 + 0.1 * 10) / 100)
    assert row["macro_p_at_1"] == pytest.approx(0.5)
    assert row["micro_p_at_10"] == pytest.approx((90 + 5) / 100)
    assert row["macro_p_at_10"] == pytest.approx(0.75)
    assert row["micro_mrr"] == pytest.approx((0.95 * 90 + 0.2 * 10) / 100)
    assert row["macro_mrr"] == pytest.approx(0.575)


def test_summary_groups_and_nan_for_nothing_kept():
    t = table(
        [
            dict(relation="A", method="hard", facts=10, kept=4, dropped=6, p_at_1=0.5, p_at_10=0.5, mrr=0.5),
            dict(relation="B", method="hard", facts=10, kept=6, dropped=4, p_at_1=1.0, p_at_10=1.0, mrr=1.0),
            dict(relation="A", method="each", facts=10, kept=0, dropped=10, p_at_1=math.nan, p_at_10=math.nan, mrr=math.nan),
            dict(relation="B", method="each", facts=10, kept=0, dropped=10, p_at_1=math.nan, p_at_10=math.nan, mrr=math.nan),
        ]
    )
    s = summarize(t).set_index("method")
    assert list(s.index) == ["hard", "each"]
    assert s.loc["hard", "micro_p_at_1"] == pytest.approx(0.8)
    assert s.loc["hard", "macro_p_at_1"] == pytest.approx(0.75)
    for col in ("micro_p_at_1", "macro_p_at_1", "micro_mrr", "macro_p_at_10"):
        assert math.isnan(s.loc["each", col])
    assert (s.loc["each", "kept"], s.loc["each", "dropped"], s.loc["each", "relations"]) == (0, 20, 2)


def test_nan_gold_score_ranks_last_not_first() -> None:
    log_probs = torch.tensor([[0.1, float("nan"), -1.0], [0.0, -1.0, -2.0]])
    ranks = ranks_of(log_probs, torch.tensor([1, 0]))
    assert ranks.tolist() == [3, 1]
    allowed = torch.tensor([True, True, False])
    assert ranks_of(log_probs, torch.tensor([1, 0]), allowed).tolist() == [2, 1]


def test_summary_averages_the_baselines_like_the_scores():
    t = table([
        dict(relation="A", facts=100, kept=80, dropped=20, p_at_1=0.5, p_at_10=1, mrr=0.6, majority_p_at_1=0.6,
             hard_p_at_1=0.2),
        dict(relation="B", facts=20, kept=20, dropped=0, p_at_1=0.9, p_at_10=1, mrr=0.9, majority_p_at_1=0.0,
             hard_p_at_1=0.4),
    ])
    (row,) = summarize(t).to_dict("records")
    assert row["micro_majority_p_at_1"] == pytest.approx(0.6 * 80 / 100)
    assert row["macro_majority_p_at_1"] == pytest.approx(0.3)
    assert row["micro_hard_p_at_1"] == pytest.approx((0.2 * 80 + 0.4 * 20) / 100)
    # tables without baseline columns (a probe of hard prompts) summarise as before
    assert "micro_majority_p_at_1" not in summarize(t.drop(columns=["majority_p_at_1", "hard_p_at_1"])).columns
