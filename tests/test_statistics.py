"""Paired differences of two methods on the same facts, their bootstrap intervals, and the per-fact
outcomes every results row carries so that two rows can be paired.

The formulas are checked against explicit loops over relations and facts; the bootstrap against a
by-hand loop over resamples and against cases whose interval is known exactly.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib import statistics as stats
from course_lib.results import (FACT_RANKS, MAJORITY_HITS, TableError, fact_ranks, fact_ranks_json,
                                majority_hits, read_stored, read_table, write_table)


def paired(hits: dict[str, tuple[list[int], list[int]]]) -> stats.PairedFacts:
    """PairedFacts from {relation: (A's hits, B's hits)}."""
    rels = sorted(hits)
    return stats.PairedFacts(tuple(rels), tuple(np.array(hits[r][0]) for r in rels),
                             tuple(np.array(hits[r][1]) for r in rels))


def random_hits(rng: random.Random, relations: int, p_a: float, p_b: float,
                sizes: tuple[int, int] = (5, 40)) -> dict[str, tuple[list[int], list[int]]]:
    out = {}
    for r in range(relations):
        n = rng.randint(*sizes)
        out[f"R{r}"] = ([int(rng.random() < p_a) for _ in range(n)],
                        [int(rng.random() < p_b) for _ in range(n)])
    return out


# ------------------------------------------------------------ point estimates
def test_micro_is_the_pooled_difference_and_macro_the_mean_of_per_relation_differences() -> None:
    hits = random_hits(random.Random(1), relations=6, p_a=0.5, p_b=0.3)
    total, n = 0, 0
    per_relation = []
    for a, b in hits.values():
        s = 0
        for x, y in zip(a, b):
            s += x - y
        total += s
        n += len(a)
        per_relation.append(s / len(a))
    d = stats.paired_difference(paired(hits), n_boot=10)
    assert d.micro == pytest.approx(total / n)
    assert d.macro == pytest.approx(sum(per_relation) / len(per_relation))
    # The relations differ in size, so the two averages differ: the test tells them apart.
    assert abs(d.micro - d.macro) > 1e-6
    by_hand = [sum(x > 0 for x in per_relation), sum(x < 0 for x in per_relation),
               sum(x == 0 for x in per_relation)]
    assert [d.a_higher, d.b_higher, d.ties] == by_hand
    assert d.facts == n and d.relations == 6


def test_identical_methods_differ_by_zero_with_interval_zero_to_zero() -> None:
    hits = random_hits(random.Random(2), relations=4, p_a=0.4, p_b=0.4)
    same = {r: (a, a) for r, (a, _) in hits.items()}
    d = stats.paired_difference(paired(same))
    assert (d.micro, d.micro_ci, d.macro, d.macro_ci) == (0.0, (0.0, 0.0), 0.0, (0.0, 0.0))
    assert (d.a_higher, d.b_higher, d.ties) == (0, 0, 4)
    assert d.verdict().startswith("no difference the data can show between A and B")


def test_right_everywhere_against_wrong_everywhere_is_one_with_interval_one_to_one() -> None:
    sizes = {"P1": 3, "P2": 11, "P3": 7}
    right = paired({r: ([1] * n, [0] * n) for r, n in sizes.items()})
    d = stats.paired_difference(right, a="soft", b="hard")
    assert (d.micro, d.micro_ci, d.macro, d.macro_ci) == (1.0, (1.0, 1.0), 1.0, (1.0, 1.0))
    assert d.verdict().startswith("soft is above hard: micro +1.000 (95% CI +1.000 to +1.000)")
    assert "soft higher on 3 of 3 relations, lower on 0, tied on 0; 21 paired facts" in d.verdict()
    wrong = paired({r: ([0] * n, [1] * n) for r, n in sizes.items()})
    flipped = stats.paired_difference(wrong, a="soft", b="hard")
    assert (flipped.micro, flipped.micro_ci) == (-1.0, (-1.0, -1.0))
    assert flipped.verdict().startswith("soft is below hard")


# ------------------------------------------------------------ the bootstrap
def by_hand_intervals(hits: dict[str, tuple[list[int], list[int]]], n_boot: int,
                      seed: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """The two bootstraps as plain loops over resamples, relations and facts."""
    rng = random.Random(seed)
    diffs = [[x - y for x, y in zip(a, b)] for a, b in hits.values()]
    n = sum(len(d) for d in diffs)
    micros, macros = [], []
    for _ in range(n_boot):
        total = 0
        for d in diffs:
            for _ in range(len(d)):
                total += d[rng.randrange(len(d))]  # a fact of this relation, never of another
        micros.append(total / n)
        means = [sum(d) / len(d) for d in diffs]
        macros.append(sum(means[rng.randrange(len(means))] for _ in means) / len(means))

    def interval(xs: list[float]) -> tuple[float, float]:
        return float(np.quantile(xs, 0.025)), float(np.quantile(xs, 0.975))

    return interval(micros), interval(macros)


def test_bootstrap_intervals_agree_with_a_by_hand_loop() -> None:
    rng = random.Random(3)
    # Relations far apart (A well above B in half, below in the other half): drawing facts across
    # relations would widen the micro interval by half.
    apart = {**random_hits(rng, relations=6, p_a=0.9, p_b=0.1),
             **{f"S{r}": v for r, v in random_hits(rng, relations=6, p_a=0.2, p_b=0.6).items()}}
    # Alike relations of few facts: the d_r differ by sampling noise alone, so resampling the facts
    # inside resampled relations too would count that noise twice and widen the macro interval.
    alike = random_hits(rng, relations=12, p_a=0.5, p_b=0.4, sizes=(3, 10))
    for hits in (apart, alike):
        d = stats.paired_difference(paired(hits), n_boot=4000, rng=5)
        micro, macro = by_hand_intervals(hits, n_boot=4000, seed=5)
        # Two independent Monte Carlo runs: their endpoints differ by about 0.004 at most.
        assert d.micro_ci == pytest.approx(micro, abs=0.015)
        assert d.macro_ci == pytest.approx(macro, abs=0.015)


def test_same_seed_same_intervals_other_seed_other_draws() -> None:
    p = paired(random_hits(random.Random(4), relations=5, p_a=0.5, p_b=0.45))
    one = stats.paired_difference(p, rng=7)
    again = stats.paired_difference(p, rng=np.random.default_rng(7))
    assert one == again
    # Another seed, other resamples (intervals of discrete P@1 differences may still coincide).
    draws = [stats.stratified_resample_sums(p.differences, 100, np.random.default_rng(seed))
             for seed in (7, 8)]
    assert not np.array_equal(*draws)


def test_the_stratified_bootstrap_never_draws_a_fact_of_another_relation() -> None:
    # Every fact of relation r is worth r + 1, and relations have different sizes: any draw from
    # another relation would change that relation's resampled sum away from n_r * (r + 1).
    sizes = [1, 4, 9, 2]
    values = [np.full(n, r + 1.0) for r, n in enumerate(sizes)]
    sums = stats.stratified_resample_sums(values, n_boot=500, rng=np.random.default_rng(0))
    assert sums.shape == (500, 4)
    assert (sums == np.array([n * (r + 1.0) for r, n in enumerate(sizes)])).all()
    # And inside a relation it does resample: distinct values give sums that vary, within the
    # relation's own range.
    values = [np.arange(n) + 100.0 * r for r, n in enumerate(sizes)]
    sums = stats.stratified_resample_sums(values, n_boot=500, rng=np.random.default_rng(0))
    for r, n in enumerate(sizes):
        assert (sums[:, r] >= n * values[r].min()).all()
        assert (sums[:, r] <= n * values[r].max()).all()
        assert n == 1 or sums[:, r].std() > 0


def test_with_many_facts_and_a_true_difference_the_interval_covers_it() -> None:
    rng = random.Random(6)
    covered = {"micro": 0, "macro": 0}
    runs = 60
    for k in range(runs):
        # A right with probability 0.5, B with 0.4, independently, in 8 relations of 150 facts.
        hits = random_hits(rng, relations=8, p_a=0.5, p_b=0.4, sizes=(150, 150))
        d = stats.paired_difference(paired(hits), n_boot=500, rng=k)
        covered["micro"] += d.micro_ci[0] <= 0.1 <= d.micro_ci[1]
        covered["macro"] += d.macro_ci[0] <= 0.1 <= d.macro_ci[1]
        assert d.micro_ci[0] > 0  # a true difference of 0.1 on 1,200 facts is shown
    # 95% intervals: about 57 of 60 cover; 50 or fewer would be a broken interval (p < 0.001).
    assert covered["micro"] > 50 and covered["macro"] > 47


def test_verdict_says_which_scale_shows_a_difference() -> None:
    base = dict(a="A", b="B", facts=100, relations=4, unpaired=0, micro=0.1, macro=0.05, a_higher=3,
                b_higher=1, ties=0, level=0.95, n_boot=10)
    only_micro = stats.PairedDifference(**base, micro_ci=(0.02, 0.18), macro_ci=(-0.04, 0.14))
    assert only_micro.verdict().startswith("A is above B on facts pooled, but averaged over "
                                           "relations there is no difference the data can show")
    only_macro = stats.PairedDifference(**base, micro_ci=(-0.01, 0.2), macro_ci=(0.01, 0.09))
    assert only_macro.verdict().startswith("A is above B averaged over relations, but on facts "
                                           "pooled there")
    touching = stats.PairedDifference(**base, micro_ci=(0.0, 0.2), macro_ci=(0.0, 0.1))
    assert touching.verdict().startswith("no difference the data can show")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=12),
                min_size=1, max_size=6),
       st.integers(0, 2**32 - 1))
def test_properties_of_any_paired_difference(relations: list[list[tuple[bool, bool]]],
                                             seed: int) -> None:
    hits = {f"R{i}": ([int(a) for a, _ in facts], [int(b) for _, b in facts])
            for i, facts in enumerate(relations)}
    d = stats.paired_difference(paired(hits), n_boot=200, rng=seed)
    pooled = [a - b for x, y in hits.values() for a, b in zip(x, y)]
    assert d.micro == pytest.approx(sum(pooled) / len(pooled))
    assert d.macro == pytest.approx(np.mean([np.mean(np.subtract(x, y)) for x, y in hits.values()]))
    for lo, hi in (d.micro_ci, d.macro_ci):
        assert -1 <= lo <= hi <= 1
    assert d.a_higher + d.b_higher + d.ties == len(hits)
    # Swapping the sides negates everything, draw for draw.
    swapped = stats.paired_difference(paired({r: (b, a) for r, (a, b) in hits.items()}), n_boot=200,
                                      rng=seed)
    assert swapped.micro == pytest.approx(-d.micro) and swapped.macro == pytest.approx(-d.macro)
    assert swapped.micro_ci == pytest.approx((-d.micro_ci[1], -d.micro_ci[0]))
    assert swapped.macro_ci == pytest.approx((-d.macro_ci[1], -d.macro_ci[0]))
    assert (swapped.a_higher, swapped.b_higher) == (d.b_higher, d.a_higher)
    # Never overstated: a direction is claimed only where an interval excludes 0.
    verdict = d.verdict()
    if "A is above" in verdict:
        assert d.micro_ci[0] > 0 or d.macro_ci[0] > 0
    if "A is below" in verdict:
        assert d.micro_ci[1] < 0 or d.macro_ci[1] < 0
    if d.micro_ci[0] <= 0 <= d.micro_ci[1] and d.macro_ci[0] <= 0 <= d.macro_ci[1]:
        assert verdict.startswith("no difference the data can show")


# ------------------------------------------------------------ pairing and bad input
def test_pairing_keeps_the_facts_both_kept_and_says_how_many_it_left_out() -> None:
    a = {"P1": {0: True, 1: False, 2: True, 5: True}, "P2": {0: True}, "P3": {3: True}}
    b = {"P1": {1: True, 2: True, 4: False}, "P2": {0: False}, "P3": {4: False}}
    p = stats.pair(a, b)
    assert p.relations == ("P1", "P2")  # P3 has no fact kept by both
    assert [x.tolist() for x in p.a] == [[0, 1], [1]] and [x.tolist() for x in p.b] == [[1, 1], [0]]
    assert p.unpaired == 3 + 2 and p.unpaired_relations == ("P3",)
    d = stats.paired_difference(p, n_boot=10)
    assert (d.unpaired, d.unpaired_relations, d.relations) == (5, ("P3",), 2)
    assert d.verdict().endswith("(5 kept by one side only, left out); no fact paired in P3")


def test_bad_input_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="only in A: P2; only in B: none"):
        stats.pair({"P1": {0: True}, "P2": {0: True}}, {"P1": {0: True}})
    with pytest.raises(ValueError, match="no fact is kept by both"):
        stats.pair({"P1": {0: True}}, {"P1": {1: True}})
    with pytest.raises(ValueError, match="NaN"):
        paired({"P1": ([1, float("nan")], [0, 1])})
    with pytest.raises(ValueError, match="0 or 1"):
        paired({"P1": ([1, 2], [0, 1])})
    with pytest.raises(ValueError, match="shapes"):
        paired({"P1": ([1, 0], [0])})
    with pytest.raises(ValueError, match="no fact is kept by both"):
        stats.PairedFacts((), (), ())
    with pytest.raises(ValueError, match="n_boot"):
        stats.paired_difference(paired({"P1": ([1], [0])}), n_boot=0)


# ------------------------------------------------------------ seeds
def test_seed_spread_against_a_by_hand_computation() -> None:
    p = [0.31, 0.27, 0.35, 0.30]
    mean = sum(p) / len(p)
    std = math.sqrt(sum((x - mean) ** 2 for x in p) / (len(p) - 1))
    s = stats.seed_spread(p)
    assert (s.n, s.min, s.max) == (4, 0.27, 0.35)
    assert (s.mean, s.std) == (pytest.approx(mean), pytest.approx(std))
    assert s.describe() == f"{mean:.3f} ± {std:.3f} (sd over 4 seeds; range 0.270 to 0.350)"
    with pytest.raises(ValueError, match="at least 2"):
        stats.seed_spread([0.3])
    with pytest.raises(ValueError, match="NaN"):
        stats.seed_spread([0.3, float("nan")])


# ------------------------------------------------------------ the rows' column
def a_row(relation: str, method: str, index: list[int], ranks: list[int],
          majority: list[int] | None = None) -> dict:
    row = {"model": "m", "dataset": "trex_original", "relation": relation, "prompt_set": "lama",
           "method": method, "split": "test", "answer_space": "full",
           "facts": max(index, default=-1) + 2, "kept": len(index),
           "p_at_1": float(np.mean(np.array(ranks) == 1)) if ranks else math.nan,
           FACT_RANKS: fact_ranks_json(index, ranks)}
    if majority is not None:
        row[MAJORITY_HITS] = json.dumps(majority)
    return row


def test_fact_ranks_survive_write_table_and_read_back(tmp_path: Path) -> None:
    rows = [a_row("P36", "soft-lama", [0, 2, 3, 7], [1, 12, 1, 430], majority=[2, 7]),
            a_row("P103", "soft-lama", [], [], majority=[])]
    path = write_table(rows, tmp_path / "t.csv")
    for back in (read_table(path).to_dict("records"), read_stored(path, strict=True).rows):
        assert fact_ranks(back[0]) == {0: 1, 2: 12, 3: 1, 7: 430}
        assert majority_hits(back[0]) == {0: False, 2: True, 3: False, 7: True}
        assert fact_ranks(back[1]) == {} and majority_hits(back[1]) == {}


def test_a_table_without_the_column_still_loads_and_the_statistics_name_the_row(tmp_path) -> None:
    old = [{k: v for k, v in a_row(rel, "lama-hard", [0], [1]).items() if k != FACT_RANKS}
           for rel in ("P36", "P19")]
    table = read_table(write_table(old, tmp_path / "old.csv"))
    assert len(table) == 2 and FACT_RANKS not in table.columns
    new = [a_row(rel, "soft-lama", [0], [1]) for rel in ("P36", "P19")]
    named = "row m/trex_original/P36/lama/lama-hard/test/full: no fact_ranks"
    with pytest.raises(TableError, match=named):
        stats.compare(new, table)
    with pytest.raises(TableError, match="P36/lama/soft-lama/test/full: no majority_hits"):
        stats.compare(new, new, a_majority=True)


def test_a_fact_ranks_cell_that_disagrees_with_the_row_is_refused() -> None:
    row = a_row("P36", "soft-lama", [0, 1], [1, 2])
    with pytest.raises(TableError, match="lists 2 facts .* where the row kept 3"):
        fact_ranks({**row, "kept": 3})
    with pytest.raises(TableError, match="2 distinct"):
        fact_ranks({**row, FACT_RANKS: fact_ranks_json([0, 1, 1], [1, 2, 2]), "kept": 3})
    with pytest.raises(TableError, match="names facts the row did not keep"):
        majority_hits({**row, MAJORITY_HITS: "[5]"})


def test_rows_of_another_split_or_another_version_of_the_file_are_not_paired() -> None:
    a, b = a_row("P36", "soft-lama", [0], [1]), a_row("P36", "lama-hard", [0], [2])
    with pytest.raises(ValueError, match="trex_original/test, the other on trex_original/dev"):
        stats.compare([a], [{**b, "split": "dev"}])
    path = "soft_prompts/db/trex_original/P36/test.jsonl"
    with pytest.raises(ValueError, match="different versions"):
        stats.compare([{**a, "identity": json.dumps({"data": {path: "aa" * 32}})}],
                      [{**b, "identity": json.dumps({"data": {path: "bb" * 32}})}])
    with pytest.raises(ValueError, match="two rows for relation P36"):
        stats.compare([a, a], [b])


# ------------------------------------------------------------ rows the library makes
@pytest.fixture(scope="module")
def gpt2():
    from course_lib.models import load_model

    return load_model("tiny-gpt2")


def check_outcomes(row: dict, test: list) -> None:
    """The row's per-fact ranks give its P@1, and its majority hits its majority P@1, on the facts
    at those lines of the split file."""
    ranks = fact_ranks(row)
    assert len(ranks) == row["kept"] and set(ranks) <= set(range(len(test)))
    if ranks:
        assert sum(r == 1 for r in ranks.values()) / len(ranks) == pytest.approx(row["p_at_1"])
    if MAJORITY_HITS in row:
        hits = majority_hits(row)
        assert all((test[i].object == row["majority_answer"]) == hit for i, hit in hits.items())
        assert sum(hits.values()) / len(hits) == pytest.approx(row["majority_p_at_1"])


def test_run_rung_rows_carry_ranks_that_give_their_p_at_1(gpt2, tmp_path, monkeypatch) -> None:
    from course_lib import data
    from course_lib.experiments import budget, run_rung
    from course_lib.probing import take

    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path))
    test = take(data.load_facts("trex_original", "P103", "test"), budget("ci").max_test)
    # In the relation's answer space, where the tiny model gets some facts right (none in full).
    hard, soft, again = (run_rung(gpt2, "trex_original", "P103", name, "ci",
                                  answer_space="relation", progress=False)
                         for name in ("lama-hard", "soft-lama", "soft-lama"))
    for row in (hard, soft):
        check_outcomes(row, test)
        assert 0 < row["p_at_1"] < 1
    assert again == soft  # from the results cache, ranks and all
    d = stats.compare([soft], [hard], a="soft-lama", b="lama-hard", n_boot=200)
    assert fact_ranks(soft).keys() == fact_ranks(hard).keys() and d.unpaired == 0
    assert d.micro == pytest.approx(soft["p_at_1"] - hard["p_at_1"])
    baseline = stats.compare([soft], [hard], b_majority=True, n_boot=200)
    assert baseline.micro == pytest.approx(soft["p_at_1"] - hard["majority_p_at_1"])
    # A relation left untuned has no score of its own, so nothing to pair.
    untuned = run_rung(gpt2, "google_re", "date_of_birth", "soft-lama", "ci", progress=False)
    assert FACT_RANKS not in untuned and MAJORITY_HITS not in untuned
    with pytest.raises(TableError, match="date_of_birth/lama/soft-lama/test/full: no fact_ranks"):
        stats.side([untuned])


def test_probe_rows_carry_ranks_per_answer_space(gpt2) -> None:
    from course_lib import data
    from course_lib.probing import probe

    table = probe(gpt2, "trex_original", ["P103", "P36"], "lama", answer_space=["full", "relation"],
                  max_facts=80, progress=False)
    for row in table.to_dict("records"):
        check_outcomes(row, data.load_facts("trex_original", row["relation"], "test")[:80])
    # The relation space keeps only facts whose object occurs in train or dev (here 2 of P36's
    # fewer): compared with the full space on the facts both kept, the others counted.
    spaces = {s: table[table["answer_space"] == s] for s in ("full", "relation")}
    d = stats.compare(spaces["relation"], spaces["full"], n_boot=50)
    assert d.facts == spaces["relation"]["kept"].sum()
    assert d.unpaired == spaces["full"]["kept"].sum() - spaces["relation"]["kept"].sum() > 0


def test_probe_resume_recomputes_a_row_without_fact_ranks(tmp_path, monkeypatch, capsys) -> None:
    from course_lib.cli import main

    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "probe.csv"
    argv = ["probe", "--relations", "P103", "--max-facts", "10", "--model", "tiny-gpt2",
            "--out", str(out)]
    assert main(argv) == 0
    old = pd.read_csv(out).drop(columns=[FACT_RANKS, "row_sha256"])
    write_table(old, out)  # as an older course_lib wrote it: sealed, without the column
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "no per-fact ranks" in capsys.readouterr().out
    assert fact_ranks(read_table(out).iloc[0].to_dict())
