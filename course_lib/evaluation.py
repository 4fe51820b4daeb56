"""Precision@k and MRR of a prompt (or a weighted set of prompts), with honest counts.

Every fact is either scored or dropped with a reason, and the counts travel with the numbers:
reproductions of LAMA disagree mostly because they keep different facts.

Scoring is one function, ``score_facts``, for hard prompts, soft prompts and mixtures alike: K
prompts (K = 1 for a single prompt), optional offsets, optional mixture log-weights. The answer
distribution is the weighted mixture of the K prompts' distributions over the answer space.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .cloze import ClozeLM, EncodedPrompt, Perturbation
from .data import Fact, common_vocab, load_facts
from .mixture import data_dependent_log_weights
from .templates import Template


class AnswerSpace(str, Enum):
    FULL = "full"  # the model's whole vocabulary
    COMMON = "common"  # LAMA's common vocabulary, as single tokens of this model
    RELATION = "relation"  # the objects this relation has in its training and dev facts (never test's)


class DropReason(str, Enum):
    MULTI_TOKEN = "object is not one token"
    NOT_IN_SPACE = "object outside the answer space"
    UNCOVERED = "no usable template for this model"


# Facts per scoring batch. The vocabulary projection streams the whole output matrix (262k x 640
# for Gemma) once per batch, so larger batches amortise it: on 2 CPU cores, Gemma-3-270M scores
# 55 facts/s at 128 against 45 at 32 (bench: eval_throughput, same run).
SCORING_BATCH = 128


@dataclass
class Scored:
    """The facts kept, their gold ids and ranks (1 = top), the top-10 predictions, and the dropped counts.

    ``index`` is each kept fact's position in the facts that were scored. Callers score the first
    facts of a split file (``probing.take``), so it is also the fact's line in that file: the same
    fact has the same index in every row scored on that split, which is what pairs rows fact by fact.
    ``truncated`` counts kept facts whose subject was cut to fit the model's context (under at
    least one prompt): they are scored, but on part of the subject.
    """

    facts: list[Fact]
    gold: torch.Tensor
    ranks: torch.Tensor
    top10: torch.Tensor
    index: torch.Tensor
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0

    @property
    def kept(self) -> int:
        return len(self.facts)

    def metrics(self) -> dict[str, float]:
        return metrics_from_ranks(self.ranks)


def metrics_from_ranks(ranks: torch.Tensor) -> dict[str, float]:
    """P@1, P@10 and MRR from 1-based ranks; NaN for no facts (never a silent 0)."""
    if ranks.numel() == 0:
        return {"p_at_1": math.nan, "p_at_10": math.nan, "mrr": math.nan}
    r = ranks.double()
    return {
        "p_at_1": (r <= 1).double().mean().item(),
        "p_at_10": (r <= 10).double().mean().item(),
        "mrr": (1.0 / r).mean().item(),
    }


def ranks_of(log_probs: torch.Tensor, gold: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each gold id among the allowed ids (ties count against the gold answer)."""
    scores = log_probs if allowed is None else log_probs.masked_fill(~allowed, -math.inf)
    gold_score = scores.gather(1, gold[:, None])
    # Count every id scoring at least as high as the gold one, itself included: a tie is no hit
    # (a model that gives many answers the same score must not be credited with P@1).
    ranks = (scores >= gold_score).sum(dim=1)
    # A NaN score for the gold answer compares false with everything (rank 0, a "hit"): rank it
    # last instead, so a model that outputs NaN can never look perfect.
    n_allowed = scores.shape[1] if allowed is None else int(allowed.sum())
    return torch.where(gold_score.squeeze(1).isnan(), torch.full_like(ranks, max(n_allowed, 1)), ranks)


def answer_form_template(lm: ClozeLM, prompts: Sequence[EncodedPrompt]) -> Template:
    """The template whose blank decides how answers are spelled (a word-initial space or not).

    A mixture must rank one set of answer tokens, so the first template with a space before the blank
    sets the spelling for all (for BERT's WordPiece the space does not matter).
    """
    for p in prompts:
        if p.blank_prefix:
            return p.template
    return prompts[0].template


def allowed_ids(lm: ClozeLM, space: AnswerSpace | str, template: Template, objects: Iterable[str] = ()) -> torch.Tensor | None:
    """A boolean mask over the vocabulary for the answer space (None for the full vocabulary)."""
    space = AnswerSpace(space)
    if space is AnswerSpace.FULL:
        return None
    words = common_vocab() if space is AnswerSpace.COMMON else objects
    mask = torch.zeros(lm.vocab_size, dtype=torch.bool)
    for w in words:
        tid = lm.answer_id(w, template)
        if tid is not None:
            mask[tid] = True
    return mask


def relation_objects(dataset: str, relation: str) -> list[str]:
    """The relation's candidate objects: those of its training and dev facts.

    Test objects are left out: a space built from them would guarantee every gold answer a place
    among the candidates (an oracle). A test fact whose object never occurs in train or dev is
    dropped from this space as NOT_IN_SPACE, and counted.
    """
    return sorted({f.object for split in ("train", "dev") for f in load_facts(dataset, relation, split)})


def majority_answer(objects: Iterable[str]) -> str | None:
    """The most frequent object; among equally frequent ones the first in alphabetical order (one rule,
    used by every table and chapter, so a baseline never depends on the order facts came in). None if empty."""
    counts = Counter(objects)
    if not counts:
        return None
    top = max(counts.values())
    return min(o for o, c in counts.items() if c == top)


def majority_p_at_1(answer: str | None, kept: Sequence[Fact]) -> float:
    """P@1 of always giving ``answer``, on the facts a prompt's score was computed on (NaN for none)."""
    if not kept:
        return math.nan
    return sum(f.object == answer for f in kept) / len(kept)


def score_facts(
    lm: ClozeLM,
    templates: Sequence[Template],
    facts: Sequence[Fact],
    *,
    log_weights: torch.Tensor | None = None,
    perturbation: Perturbation | None = None,
    allowed: torch.Tensor | None = None,
    data_dependent: bool = False,
    batch_size: int = SCORING_BATCH,
    progress: bool | str = False,
) -> Scored:
    """Rank each fact's object under the (mixture of) prompts; drop and count what cannot be scored.

    ``log_weights[k]`` weights prompt k (uniform if None); with ``data_dependent`` each fact's
    weights are also scaled by each prompt's plausibility of its subject (see ``mixture``).
    Templates the model cannot answer (a causal LM with the blank before the subject) are left out
    of the mixture; if none is left, every fact is dropped as UNCOVERED.
    """
    return score_facts_in_spaces(lm, templates, facts, {"": allowed}, log_weights=log_weights, perturbation=perturbation,
                                 data_dependent=data_dependent, batch_size=batch_size, progress=progress)[""]


@torch.no_grad()
def score_facts_in_spaces(
    lm: ClozeLM,
    templates: Sequence[Template],
    facts: Sequence[Fact],
    spaces: dict[str, torch.Tensor | None],
    *,
    log_weights: torch.Tensor | None = None,
    perturbation: Perturbation | None = None,
    data_dependent: bool = False,
    batch_size: int = SCORING_BATCH,
    progress: bool | str = False,
) -> dict[str, Scored]:
    """``score_facts`` for several answer spaces at once: one forward pass per batch serves them all."""
    prompts = [lm.encode_prompt(t) for t in templates]
    usable = [k for k, t in enumerate(templates) if lm.covers(t)]
    if not usable:
        empty = torch.zeros(0, dtype=torch.long)
        return {name: Scored([], empty, empty, torch.zeros(0, 10, dtype=torch.long), empty,
                             Counter({DropReason.UNCOVERED.value: len(facts)}))
                for name in spaces}
    form = answer_form_template(lm, [prompts[k] for k in usable])
    dropped = {name: Counter() for name in spaces}
    members: dict[str, list[int]] = {name: [] for name in spaces}  # indices into ``scorable``
    scorable: list[tuple[Fact, int]] = []
    position: list[int] = []  # of each scorable fact in ``facts``
    for i, f in enumerate(facts):
        tid = lm.answer_id(f.object, form)
        if tid is None:
            for name in spaces:
                dropped[name][DropReason.MULTI_TOKEN.value] += 1
            continue
        inside = [name for name, mask in spaces.items() if mask is None or bool(mask[tid])]
        for name in spaces:
            if name not in inside:
                dropped[name][DropReason.NOT_IN_SPACE.value] += 1
        if inside:
            for name in inside:
                members[name].append(len(scorable))
            scorable.append((f, tid))
            position.append(i)
    lw = torch.zeros(len(templates)) if log_weights is None else log_weights.detach().float().cpu()
    lw = torch.log_softmax(lw[usable], dim=0)
    gold_t = torch.tensor([g for _, g in scorable], dtype=torch.long)
    position_t = torch.tensor(position, dtype=torch.long)
    ranks = {name: torch.zeros(len(scorable), dtype=torch.long) for name in spaces}
    top10 = {name: torch.zeros(len(scorable), 10, dtype=torch.long) for name in spaces}
    cut = torch.zeros(len(scorable), dtype=torch.bool)
    # Similar token counts together: less padding; results are written back in the original order.
    first = prompts[usable[0]]
    order = sorted(range(len(scorable)), key=lambda i: len(lm.subject_ids(scorable[i][0].subject, first)))
    per_batch = max(1, batch_size // len(usable))
    bar = tqdm(total=len(order), desc=progress if isinstance(progress, str) else "scoring", disable=not progress, leave=False)
    start = 0
    while start < len(order):
        idx = order[start : start + per_batch]
        try:
            mix, was_cut = _mixture_log_probs(lm, prompts, usable, [scorable[i][0].subject for i in idx], lw, perturbation, data_dependent)
        except torch.OutOfMemoryError as err:
            if per_batch == 1:
                raise torch.OutOfMemoryError(
                    f"out of memory on {lm.device} scoring even 1 fact per batch ({len(usable)} prompts in one forward "
                    "pass), so a smaller batch_size cannot help: use another device (device='cpu', --device cpu), "
                    "fewer templates or a smaller model") from err
            per_batch = max(1, per_batch // 2)
            warnings.warn(f"out of memory on {lm.device}: scoring {per_batch} facts per batch from now on "
                          "(pass a smaller batch_size to avoid this)", RuntimeWarning, stacklevel=2)
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start += len(idx)
        bar.update(len(idx))
        cut[idx] = was_cut
        for name, mask in spaces.items():
            ranks[name][idx] = ranks_of(mix, gold_t[idx], mask)
            masked = mix if mask is None else mix.masked_fill(~mask, -math.inf)
            top10[name][idx] = masked.topk(10, dim=1).indices
    bar.close()
    out = {}
    for name in spaces:
        sel = torch.tensor(members[name], dtype=torch.long)
        out[name] = Scored([scorable[i][0] for i in members[name]], gold_t[sel], ranks[name][sel],
                           top10[name][sel], position_t[sel], dropped[name], int(cut[sel].sum()))
    return out


def _mixture_log_probs(lm: ClozeLM, prompts: Sequence[EncodedPrompt], usable: list[int], subjects: list[str],
                       log_weights: torch.Tensor, perturbation: Perturbation | None,
                       data_dependent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log sum_k pi_k p_k(. | subject) over the vocabulary, [B, V]: all K prompts in one forward pass
    (for one prompt, its logits: the same ranking up to a constant per row).

    Also [B] flags: whether the subject was cut to fit the context under any of the prompts.
    """
    batch = lm.build_batch(prompts, [s for s in subjects for _ in usable], [k for _ in subjects for k in usable])
    truncated = batch.extras["truncated"].view(len(subjects), len(usable)).any(dim=1)
    if len(usable) == 1 and not data_dependent:
        # One prompt: ranks and top answers need no normalisation, so the raw logits serve; this
        # skips two passes over the vocabulary per fact (log_softmax, logsumexp): ~10% of scoring.
        return lm.blank_logits(batch, perturbation).cpu(), truncated
    logp = lm.blank_log_probs(batch, perturbation).view(len(subjects), len(usable), -1)
    weights = log_weights.to(logp.device)[None, :]
    if data_dependent:
        subject_ll = lm.subject_log_likelihood(batch, perturbation).view(len(subjects), len(usable))
        weights = data_dependent_log_weights(weights, subject_ll)
    return torch.logsumexp(logp + weights[:, :, None], dim=1).cpu(), truncated
