"""Precision@k and MRR of a prompt (or a weighted set of prompts), with honest counts.

Every fact is either scored or dropped with a reason, and the counts travel with the numbers:
reproductions of LAMA disagree mostly because they keep different facts.

Scoring is one function, ``score_facts``, for hard prompts, soft prompts and mixtures alike: K
prompts (K = 1 for a single prompt), optional offsets, optional mixture log-weights. The answer
distribution is the weighted mixture of the K prompts' distributions over the answer space.
"""

from __future__ import annotations

import math
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
    RELATION = "relation"  # the objects this relation has anywhere in the dataset


class DropReason(str, Enum):
    MULTI_TOKEN = "object is not one token"
    NOT_IN_SPACE = "object outside the answer space"
    UNCOVERED = "no usable template for this model"


@dataclass
class Scored:
    """The facts kept, their gold ids and ranks (1 = top), the top-10 predictions, and the dropped counts."""

    facts: list[Fact]
    gold: torch.Tensor
    ranks: torch.Tensor
    top10: torch.Tensor
    dropped: Counter = field(default_factory=Counter)

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
    return (scores > gold_score).sum(dim=1) + 1


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
    return sorted({f.object for split in ("train", "dev", "test") for f in load_facts(dataset, relation, split)})


@torch.no_grad()
def score_facts(
    lm: ClozeLM,
    templates: Sequence[Template],
    facts: Sequence[Fact],
    *,
    log_weights: torch.Tensor | None = None,
    perturbation: Perturbation | None = None,
    allowed: torch.Tensor | None = None,
    data_dependent: bool = False,
    batch_size: int = 32,
    progress: bool | str = False,
) -> Scored:
    """Rank each fact's object under the (mixture of) prompts; drop and count what cannot be scored.

    ``log_weights[k]`` weights prompt k (uniform if None); with ``data_dependent`` each fact's
    weights are also scaled by each prompt's plausibility of its subject (see ``mixture``). Templates the model cannot answer (a
    causal LM with the blank before the subject) are left out of the mixture; if none is left,
    every fact is dropped as UNCOVERED.
    """
    prompts = [lm.encode_prompt(t) for t in templates]
    usable = [k for k, t in enumerate(templates) if lm.covers(t)]
    dropped: Counter = Counter()
    if not usable:
        dropped[DropReason.UNCOVERED.value] = len(facts)
        empty = torch.zeros(0, dtype=torch.long)
        return Scored([], empty, empty, torch.zeros(0, 10, dtype=torch.long), dropped)
    form = answer_form_template(lm, [prompts[k] for k in usable])
    kept: list[Fact] = []
    gold: list[int] = []
    for f in facts:
        tid = lm.answer_id(f.object, form)
        if tid is None:
            dropped[DropReason.MULTI_TOKEN.value] += 1
        elif allowed is not None and not bool(allowed[tid]):
            dropped[DropReason.NOT_IN_SPACE.value] += 1
        else:
            kept.append(f)
            gold.append(tid)
    lw = torch.zeros(len(templates)) if log_weights is None else log_weights.detach().float().cpu()
    lw = torch.log_softmax(lw[usable], dim=0)
    gold_t = torch.tensor(gold, dtype=torch.long)
    ranks = torch.empty(len(kept), dtype=torch.long)
    top10 = torch.empty(len(kept), 10, dtype=torch.long)
    # Similar lengths together: less padding, and the order is undone when results are stored.
    order = sorted(range(len(kept)), key=lambda i: len(kept[i].subject))
    per_batch = max(1, batch_size // len(usable))
    steps = range(0, len(order), per_batch)
    bar = tqdm(steps, desc=progress if isinstance(progress, str) else "scoring", disable=not progress, leave=False)
    for start in bar:
        idx = order[start : start + per_batch]
        subjects = [kept[i].subject for i in idx for _ in usable]
        which = [k for _ in idx for k in usable]
        batch = lm.build_batch(prompts, subjects, which)
        logp = lm.blank_log_probs(batch, perturbation).view(len(idx), len(usable), -1)
        weights = lw.to(logp.device)[None, :]
        if data_dependent:
            subject_ll = lm.subject_log_likelihood(batch, perturbation).view(len(idx), len(usable))
            weights = data_dependent_log_weights(weights, subject_ll)
        mix = torch.logsumexp(logp + weights[:, :, None], dim=1).cpu()
        g = gold_t[idx]
        ranks[idx] = ranks_of(mix, g, allowed)
        masked = mix if allowed is None else mix.masked_fill(~allowed, -math.inf)
        top10[idx] = masked.topk(min(10, masked.shape[1]), dim=1).indices
    return Scored(kept, gold_t, ranks, top10, dropped)
