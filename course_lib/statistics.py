"""Is one way of asking really better than another? Paired differences with bootstrap intervals.

Two methods A and B scored on the same test facts are compared fact by fact. For relation
r = 1..R with n_r facts kept by both, let a_ri, b_ri in {0, 1} say whether each method ranks fact
i's gold object first, and s_r = sum_i (a_ri - b_ri). Then

* micro difference (facts pooled):      D_micro = sum_r s_r / sum_r n_r;
* macro difference (relations averaged): D_macro = (1/R) sum_r d_r, with d_r = s_r / n_r.

Each comes with a percentile bootstrap interval: the estimate recomputed on many resamples, and
the interval between the (1 - level)/2 and (1 + level)/2 quantiles of the recomputed values. For
micro, a resample draws n_r facts with replacement within each relation (stratified); for macro,
it draws R relations with replacement, each with its facts as they are (not resampled again).
Pairing is what makes the interval narrow enough to be useful: the facts both methods find hard
are hard for both, and that shared difficulty cancels in a_ri - b_ri.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import results

Side = Mapping[str, Mapping[int, bool]]  # relation -> fact index in its split file -> hit at 1
Rows = pd.DataFrame | Sequence[Mapping[str, Any]]  # results rows, one per relation


def _records(rows: Rows) -> list[Mapping[str, Any]]:
    return rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)


# ---------------------------------------------------------------------------------- the formulas
def micro(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """D_micro = sum_r s_r / sum_r n_r over the last axis (one estimate, or one per resample)."""
    return sums.sum(axis=-1) / sizes.sum()


def macro(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """D_macro = (1/R) sum_r s_r / n_r over the last axis (one estimate, or one per resample)."""
    return (sums / sizes).mean(axis=-1)


def stratified_resample_sums(values: Sequence[np.ndarray], n_boot: int,
                             rng: np.random.Generator) -> np.ndarray:
    """[n_boot, R]: for each resample and relation r, the sum of n_r draws with replacement from
    ``values[r]`` alone (the facts of relation r):

        s*_r = sum_{j=1..n_r} values[r][U_j],  U_j ~ uniform on {0, ..., n_r - 1}.

    Stratified, so every resample keeps each relation's size: the micro estimate then weighs the
    relations as the data does, and no resample borrows a fact from another relation.
    """
    out = np.empty((n_boot, len(values)))
    # One relation at a time bounds memory by the largest relation, not by all facts at once.
    for r, v in enumerate(values):
        out[:, r] = v[rng.integers(0, len(v), size=(n_boot, len(v)))].sum(axis=1)
    return out


def resample_relations(per_relation: np.ndarray, n_boot: int,
                       rng: np.random.Generator) -> np.ndarray:
    """[n_boot]: the mean of R draws with replacement from the R per-relation values d_r."""
    r = len(per_relation)
    return per_relation[rng.integers(0, r, size=(n_boot, r))].mean(axis=1)


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The (1 - level)/2 and (1 + level)/2 quantiles of the bootstrap samples."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def directions(sums: np.ndarray) -> tuple[int, int, int]:
    """(relations where A > B, where A < B, ties): the sign of each s_r (same n_r on both sides)."""
    return int((sums > 0).sum()), int((sums < 0).sum()), int((sums == 0).sum())


def excludes_zero(interval: tuple[float, float]) -> int:
    """+1 if the interval lies above 0, -1 if below, 0 if it holds 0."""
    lo, hi = interval
    return 1 if lo > 0 else -1 if hi < 0 else 0


# ---------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class PairedFacts:
    """Hits at 1 of methods A and B on the facts both kept, relation by relation.

    ``a[r][i]`` and ``b[r][i]`` are about the same fact. ``unpaired`` counts the facts kept by only
    one of the two (left out: a difference on them would be a difference in which facts count);
    ``unpaired_relations`` are the relations with no fact kept by both (left out of both estimates).
    """

    relations: tuple[str, ...]
    a: tuple[np.ndarray, ...]
    b: tuple[np.ndarray, ...]
    unpaired: int = 0
    unpaired_relations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.relations:
            raise ValueError("no fact is kept by both methods: nothing to compare")
        if not len(self.relations) == len(self.a) == len(self.b):
            raise ValueError(f"{len(self.relations)} relations but {len(self.a)} and {len(self.b)} "
                             "lists of hits")
        for rel, x, y in zip(self.relations, self.a, self.b):
            if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
                raise ValueError(f"{rel}: hits of shapes {x.shape} and {y.shape}; want two equal, "
                                 "non-empty lists")
            for hits in (x, y):
                if np.isnan(hits.astype(float)).any():
                    raise ValueError(f"{rel}: a hit is NaN; every paired fact needs an outcome on "
                                     "both sides")
                if not np.isin(hits, (0, 1)).all():
                    raise ValueError(f"{rel}: hits must be 0 or 1 (right or wrong at 1)")

    @property
    def sizes(self) -> np.ndarray:
        """n_r, per relation."""
        return np.array([len(x) for x in self.a], dtype=float)

    @property
    def differences(self) -> tuple[np.ndarray, ...]:
        """a_ri - b_ri, per relation."""
        return tuple(x.astype(float) - y.astype(float) for x, y in zip(self.a, self.b))


def pair(a: Side, b: Side) -> PairedFacts:
    """Pair two sides fact by fact: per relation, the facts (by index) both kept.

    The two sides must cover the same relations: a relation one of them never ran is a missing
    result, not a fact to drop.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        shown = [", ".join(names) or "none" for names in (only_a, only_b)]
        raise ValueError(f"the two sides cover different relations (only in A: {shown[0]}; "
                         f"only in B: {shown[1]})")
    rels, hits_a, hits_b, empty = [], [], [], []
    unpaired = 0
    for rel in sorted(a):
        both = sorted(a[rel].keys() & b[rel].keys())
        unpaired += len(a[rel]) + len(b[rel]) - 2 * len(both)
        if not both:
            empty.append(rel)
            continue
        rels.append(rel)
        hits_a.append(np.array([a[rel][i] for i in both], dtype=np.int8))
        hits_b.append(np.array([b[rel][i] for i in both], dtype=np.int8))
    if not rels:
        raise ValueError(f"no fact is kept by both methods in any of {len(a)} relation(s): nothing "
                         "to compare")
    return PairedFacts(tuple(rels), tuple(hits_a), tuple(hits_b), unpaired, tuple(empty))


def side(rows: Rows, *, majority: bool = False) -> dict[str, dict[int, bool]]:
    """One side of a comparison from results rows, one row per relation: each kept fact's hit at 1.

    With ``majority``, the rows' majority-answer baseline instead of their method. Raises
    ``results.TableError`` naming a row without per-fact outcomes, and ``ValueError`` for two rows
    of one relation (which would be compared?).
    """
    out: dict[str, dict[int, bool]] = {}
    for row in _records(rows):
        rel = str(row["relation"])
        if rel in out:
            raise ValueError(f"two rows for relation {rel} (e.g. {results.row_name(row)}): give "
                             "one row per relation on each side")
        if majority:
            out[rel] = results.majority_hits(row)
        else:
            out[rel] = {i: rank == 1 for i, rank in results.fact_ranks(row).items()}
    return out


def check_same_facts(a_rows: Rows, b_rows: Rows) -> None:
    """Raise unless each relation's rows on both sides index the same split file.

    A fact's index is its line in the split file, so rows of another dataset or split, or scored on
    another version of the file (its sha256 in the rows' identity), cannot be paired.
    """
    def files(rows: Rows) -> dict[str, tuple[str, str, str | None]]:
        return {str(r["relation"]): (str(r["dataset"]), str(r["split"]), _split_sha(r))
                for r in _records(rows)}

    fa, fb = files(a_rows), files(b_rows)
    for rel in fa.keys() & fb.keys():
        (da, sa, ha), (db, sb, hb) = fa[rel], fb[rel]
        if (da, sa) != (db, sb):
            raise ValueError(f"{rel}: one side is scored on {da}/{sa}, the other on {db}/{sb}: not "
                             "the same facts")
        if ha is not None and hb is not None and ha != hb:
            raise ValueError(f"{rel}: the two sides were scored on different versions of "
                             f"{da}/{rel}/{sa}.jsonl (sha256 {ha[:12]} and {hb[:12]}): fact "
                             "indices do not match")


def _split_sha(row: Mapping[str, Any]) -> str | None:
    """sha256 of the split file a row was scored on, from its identity (None where not recorded)."""
    try:
        data = json.loads(row.get("identity") or "{}").get("data") or {}
    except (ValueError, TypeError, AttributeError):
        return None
    return data.get(f"soft_prompts/db/{row['dataset']}/{row['relation']}/{row['split']}.jsonl")


# ---------------------------------------------------------------------------------- the comparison
@dataclass(frozen=True)
class PairedDifference:
    """A minus B in P@1 on the same facts, micro and macro, with percentile bootstrap intervals."""

    a: str
    b: str
    facts: int  # paired facts
    relations: int  # relations with at least one paired fact
    unpaired: int  # facts kept by only one side, left out
    micro: float
    micro_ci: tuple[float, float]
    macro: float
    macro_ci: tuple[float, float]
    a_higher: int  # relations where A's P@1 is above B's
    b_higher: int
    ties: int
    level: float
    n_boot: int
    unpaired_relations: tuple[str, ...] = ()  # relations with no fact kept by both, left out

    def verdict(self) -> str:
        """One sentence that claims a direction only where the interval excludes 0."""
        pct = f"{self.level:.0%}"
        (mlo, mhi), (alo, ahi) = self.micro_ci, self.macro_ci
        mi = f"micro {self.micro:+.3f} ({pct} CI {mlo:+.3f} to {mhi:+.3f})"
        ma = f"macro {self.macro:+.3f} ({pct} CI {alo:+.3f} to {ahi:+.3f})"
        ways = (f"{self.a} higher on {self.a_higher} of {self.relations} relations, lower on "
                f"{self.b_higher}, tied on {self.ties}; {self.facts} paired facts")
        if self.unpaired:
            ways += f" ({self.unpaired} kept by one side only, left out)"
        if self.unpaired_relations:
            ways += f"; no fact paired in {', '.join(self.unpaired_relations)}"
        word = {1: "above", -1: "below"}
        d_mi, d_ma = excludes_zero(self.micro_ci), excludes_zero(self.macro_ci)
        both = f"{mi}, {ma}; {ways}"
        if d_mi == d_ma == 0:
            return f"no difference the data can show between {self.a} and {self.b}: {both}"
        if d_mi == d_ma:
            return f"{self.a} is {word[d_mi]} {self.b}: {both}"
        if d_mi and d_ma:
            return (f"{self.a} is {word[d_mi]} {self.b} on facts pooled but {word[d_ma]} it "
                    f"averaged over relations: {both}")
        shown, hidden = ("on facts pooled", "averaged over relations")[:: 1 if d_mi else -1]
        return (f"{self.a} is {word[d_mi or d_ma]} {self.b} {shown}, but {hidden} there is no "
                f"difference the data can show: {both}")


def paired_difference(paired: PairedFacts, *, a: str = "A", b: str = "B", n_boot: int = 2000,
                      level: float = 0.95, rng: np.random.Generator | int = 0) -> PairedDifference:
    """D_micro and D_macro of A minus B with their percentile bootstrap intervals.

    Micro: each resample draws, within every relation, n_r of its facts with replacement
    (``stratified_resample_sums``). Macro: each resample draws R relations with replacement and
    averages their d_r, each relation's facts kept fixed (``resample_relations``). ``rng`` (a
    Generator or a seed) makes the intervals repeatable.
    """
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ValueError(f"n_boot must be a whole number >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, got {level!r}")
    rng = np.random.default_rng(rng)
    sizes = paired.sizes
    sums = np.array([d.sum() for d in paired.differences])
    micro_samples = micro(stratified_resample_sums(paired.differences, n_boot, rng), sizes)
    # Facts are kept fixed inside a resampled relation: resampling them too would count their
    # spread twice, since the spread of the d_r across relations already contains it
    # (Davison & Hinkley 1997, section 3.8: for many groups, resample the groups only).
    macro_samples = resample_relations(sums / sizes, n_boot, rng)
    above, below, ties = directions(sums)
    return PairedDifference(a, b, int(sizes.sum()), len(sizes), paired.unpaired,
                            float(micro(sums, sizes)), percentile_interval(micro_samples, level),
                            float(macro(sums, sizes)), percentile_interval(macro_samples, level),
                            above, below, ties, level, n_boot, paired.unpaired_relations)


def compare(a_rows: Rows, b_rows: Rows, *, a: str = "A", b: str = "B", a_majority: bool = False,
            b_majority: bool = False, n_boot: int = 2000, level: float = 0.95,
            rng: np.random.Generator | int = 0) -> PairedDifference:
    """``paired_difference`` of two sets of results rows (one row per relation on each side).

    ``a_majority`` / ``b_majority``: that side is its rows' majority-answer baseline.
    """
    check_same_facts(a_rows, b_rows)
    paired = pair(side(a_rows, majority=a_majority), side(b_rows, majority=b_majority))
    return paired_difference(paired, a=a, b=b, n_boot=n_boot, level=level, rng=rng)


# ---------------------------------------------------------------------------------- seeds
@dataclass(frozen=True)
class SeedSpread:
    """P@1 of one rung under several seeds: how far a single run can be from another."""

    n: int
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator)
    min: float
    max: float

    def describe(self) -> str:
        return (f"{self.mean:.3f} ± {self.std:.3f} (sd over {self.n} seeds; range "
                f"{self.min:.3f} to {self.max:.3f})")


def seed_spread(p_at_1: Iterable[float]) -> SeedSpread:
    """Over n >= 2 seeds: mean = (1/n) sum_s p_s, std = sqrt(sum_s (p_s - mean)^2 / (n - 1)),
    min and max."""
    p = np.asarray(list(p_at_1), dtype=float)
    if p.size < 2:
        raise ValueError(f"a spread over seeds needs at least 2 runs, got {p.size}")
    if not np.isfinite(p).all():
        raise ValueError(f"a P@1 is NaN or infinite ({p.tolist()}): a seed's run has no score")
    return SeedSpread(int(p.size), float(p.mean()), float(p.std(ddof=1)), float(p.min()),
                      float(p.max()))
