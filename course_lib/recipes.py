"""Plain versions of the method's procedures, written the way the exercises ask for them.

The library's own ``training.tune`` is built for speed and for resuming (one pass over the output
layer, early stopping on dev, checkpoints). The exercises ask students to write each procedure
plainly instead: a tuning loop, EM inside it, deep offsets in each layer's units, a control run.
This module holds those plain versions. The self-checks (``course_lib.run_checks``) compare a
student's code with them on tiny models, and the exercises' experiments call them on the real
model, so that an experiment runs whatever the state of the student's own functions.

Each function here is short on purpose and follows its exercise's specification to the letter
(the order of the batches, when the weights are updated), so that a correct answer matches it to
floating-point noise on a fixed input.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cloze import ClozeBatch, ClozeLM, Stream
from .data import Fact
from .evaluation import majority_answer, score_facts
from .soft_prompts import SoftPrompt, prompt_hidden_scale
from .templates import Template


# ---------------------------------------------------------------------------------------------
# Chapter 3: the tuning loop
# ---------------------------------------------------------------------------------------------
def tune_soft_prompt(lm: ClozeLM, template: Template, subjects: Sequence[str], gold: torch.Tensor, *,
                     lr: float, epochs: int, batch_size: int) -> tuple[SoftPrompt, list[float]]:
    """Tune one soft prompt with Adam on the mean log-loss of the gold answers; the model stays frozen.

    The facts are visited in the order given, ``batch_size`` at a time, every epoch (no shuffling,
    no early stopping: the exercise's loop). Returns the soft prompt and each epoch's mean loss.
    """
    soft = SoftPrompt(lm, [template])
    opt = torch.optim.Adam(soft.parameters(), lr=lr)
    gold = gold.to(lm.device)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for start in range(0, len(subjects), batch_size):
            part = list(subjects[start : start + batch_size])
            batch = soft.batch(lm, part, [0] * len(part))
            loss = F.cross_entropy(lm.blank_logits(batch, soft.perturbation), gold[start : start + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(part)
        losses.append(total / max(len(subjects), 1))
    return soft, losses


# ---------------------------------------------------------------------------------------------
# Chapter 5: EM inside the tuning loop
# ---------------------------------------------------------------------------------------------
def gold_log_probs_by_prompt(lm: ClozeLM, soft: SoftPrompt, subjects: Sequence[str],
                             gold: torch.Tensor) -> torch.Tensor:
    """[B, K] log p_k(gold_b | subject_b) under each of the soft prompt's K prompts (differentiable)."""
    K = len(soft.prompts)
    batch = soft.batch(lm, [s for s in subjects for _ in range(K)], [k for _ in subjects for k in range(K)])
    log_probs = lm.blank_log_probs(batch, soft.perturbation)
    targets = gold.to(log_probs.device).repeat_interleave(K)
    return log_probs.gather(1, targets[:, None]).view(len(subjects), K)


def tune_mixture(lm: ClozeLM, templates: Sequence[Template], subjects: Sequence[str], gold: torch.Tensor, *,
                 lr: float, epochs: int, batch_size: int, floor: float = 0.0
                 ) -> tuple[SoftPrompt, torch.Tensor, list[float]]:
    """Tune K soft prompts and their mixture weights pi by EM, online, as ``training.tune`` schedules it.

    Per batch: the E step gives responsibilities r = softmax(log pi + G) from the gold log-probs G
    (held fixed), and Adam takes one step on the offsets for the loss -mean_b sum_k r_bk G_bk. At
    the end of each epoch, the M step sets pi to the mean responsibility over the epoch's facts
    (textbook EM; ``floor`` > 0 floors it as ``mixture.m_step_weights`` does). Returns the soft
    prompts, the final log pi [K] and each epoch's mean loss.
    """
    soft = SoftPrompt(lm, templates)
    K = len(soft.prompts)
    log_weights = torch.full((K,), -math.log(K))
    opt = torch.optim.Adam(soft.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        total, resp_sum = 0.0, torch.zeros(K)
        for start in range(0, len(subjects), batch_size):
            part = list(subjects[start : start + batch_size])
            G = gold_log_probs_by_prompt(lm, soft, part, gold[start : start + batch_size])
            r = torch.softmax(log_weights.to(G.device) + G.detach(), dim=-1)
            loss = -(r * G).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(part)
            resp_sum += r.sum(dim=0).cpu()
        pi = (resp_sum / max(len(subjects), 1)).clamp_min(floor)
        log_weights = torch.log(pi / pi.sum())
        losses.append(total / max(len(subjects), 1))
    return soft, log_weights, losses


# ---------------------------------------------------------------------------------------------
# Chapter 6: deep offsets in each layer's units, the read position left alone
# ---------------------------------------------------------------------------------------------
def deep_delta(offsets: torch.Tensor, row_scale: torch.Tensor, row: int, slots: torch.Tensor,
               read_index: torch.Tensor, freeze_read: bool) -> torch.Tensor | None:
    """The offset to add at each position after row ``row``: [B, S, H], or None past the last row.

    ``offsets`` [R, T, H]: row i's offset for prompt token p is ``offsets[i, p] * row_scale[i]``.
    ``slots`` [B, S]: the prompt token at each position, -1 where there is none (no offset).
    With ``freeze_read``, position ``read_index[b]`` of example b gets no offset either.
    """
    R, T, H = offsets.shape
    if row >= R:
        return None
    table = torch.cat([offsets[row] * row_scale[row], offsets.new_zeros(1, H)])
    slots = slots.to(table.device)
    index = torch.where(slots < 0, T, slots)
    if freeze_read:
        rows = torch.arange(len(index), device=index.device)
        index = index.index_put((rows, read_index.to(index.device)), torch.tensor(T, device=index.device))
    return table[index]


class DeepOffsets:
    """A perturbation for ``ClozeLM``'s layer hooks (``cloze.Perturbation``) made of ``deep_delta``."""

    def __init__(self, offsets: torch.Tensor, row_scale: torch.Tensor, freeze_read: bool = True,
                 delta_fn: Callable = deep_delta) -> None:
        self.offsets, self.row_scale, self.freeze_read, self.delta_fn = offsets, row_scale, freeze_read, delta_fn

    def delta(self, row: int, stream: Stream, batch: ClozeBatch) -> torch.Tensor | None:
        slots = batch.slots(stream)
        return self.delta_fn(self.offsets, self.row_scale, row, slots, batch.read_index, self.freeze_read)


@torch.no_grad()
def prompt_row_scale(lm: ClozeLM, template: Template, subjects: Sequence[str], depth: int) -> torch.Tensor:
    """[depth + 1]: each row's median |coordinate| at the prompt's positions, over row 0's.

    The library's unit for deep offsets (``TuneConfig.row_scaling``), so that the exercise's run and
    the library's runs count a step of a deep offset alike.
    """
    size = prompt_hidden_scale(lm, SoftPrompt(lm, [template], depth), subjects)
    return size / size[0].clamp_min(1e-12)


def tune_deep(lm: ClozeLM, template: Template, subjects: Sequence[str], gold: torch.Tensor, *, depth: int,
              lr: float, epochs: int, batch_size: int, freeze_read: bool = True, scale_rows: bool = True,
              seed: int | None = None, dev_facts: Sequence[Fact] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Tune a deep perturbation of rows 0..depth for one template, as the chapter 6 exercise asks.

    Row i's offsets count in units of ``prompt_row_scale`` (ones without ``scale_rows``); with
    ``freeze_read`` the position the answer is read from is never perturbed. Facts in the order
    given, ``batch_size`` at a time, Adam, no early stopping: the exercise's loop. For a real run,
    ``seed`` shuffles the facts every epoch and ``dev_facts`` keeps the epoch with the best dev P@1,
    as ``training.tune`` does (a single order and the last epoch can land anywhere with few facts).
    Returns the offsets [depth + 1, T, H], the row scale [depth + 1] and each epoch's mean loss.
    """
    prompt = lm.encode_prompt(template)
    row_scale = prompt_row_scale(lm, template, subjects, depth) if scale_rows else torch.ones(depth + 1)
    row_scale = row_scale.to(lm.device)
    offsets = nn.Parameter(torch.zeros(depth + 1, max(prompt.n_prompt_tokens, 1), lm.hidden_size, device=lm.device))
    perturbation = DeepOffsets(offsets, row_scale, freeze_read)
    opt = torch.optim.Adam([offsets], lr=lr)
    gold = gold.to(lm.device)
    losses, best, best_p1 = [], offsets.detach().clone(), math.nan
    for epoch in range(epochs):
        order = torch.arange(len(subjects)) if seed is None else \
            torch.randperm(len(subjects), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        total = 0.0
        for start in range(0, len(subjects), batch_size):
            idx = order[start : start + batch_size]
            batch = lm.build_batch([prompt], [subjects[int(i)] for i in idx])
            loss = F.cross_entropy(lm.blank_logits(batch, perturbation), gold[idx.to(gold.device)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / max(len(subjects), 1))
        if dev_facts is not None:
            frozen = DeepOffsets(offsets.detach(), row_scale, freeze_read)
            p1 = score_facts(lm, [template], dev_facts, perturbation=frozen).metrics()["p_at_1"]
            if math.isnan(best_p1) or p1 > best_p1:  # as training.tune: the first epoch, then any better one
                best, best_p1 = offsets.detach().clone(), p1
    final = best if dev_facts is not None else offsets.detach()
    return final, row_scale.cpu(), losses


# ---------------------------------------------------------------------------------------------
# Chapter 7: error bars for averages over relations
# ---------------------------------------------------------------------------------------------
def bootstrap_intervals(hits: Sequence[torch.Tensor], n_boot: int, generator: torch.Generator,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the micro and macro averages of per-fact hits, resampling within relations.

    ``hits[r]`` holds relation r's facts, 1 for a hit and 0 for a miss. Each replicate draws every
    relation's facts afresh with replacement (``torch.randint(n_r, (n_boot, n_r))``, relation by
    relation in the order given, relations with no fact skipped), in float64. Returns
    ``{"micro": (lo, hi), "macro": (lo, hi)}``; NaN when no relation has a fact.
    """
    means, sizes = [], []
    for h in hits:
        n = len(h)
        if n == 0:
            continue
        idx = torch.randint(n, (n_boot, n), generator=generator)
        means.append(h.double()[idx].mean(dim=1))
        sizes.append(float(n))
    if not means:
        return {"micro": (math.nan, math.nan), "macro": (math.nan, math.nan)}
    p = torch.stack(means, dim=1)  # [n_boot, relations]
    n = torch.tensor(sizes, dtype=torch.float64)
    micro = (p * n).sum(dim=1) / n.sum()
    macro = p.mean(dim=1)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    return {name: tuple(float(v) for v in torch.quantile(x, q)) for name, x in (("micro", micro), ("macro", macro))}


# ---------------------------------------------------------------------------------------------
# Chapter 8: a control run
# ---------------------------------------------------------------------------------------------
def shuffled_facts(facts: Sequence[Fact], generator: torch.Generator) -> list[Fact]:
    """The same subjects and the same objects, the objects permuted: ``torch.randperm`` with ``generator``.

    Fact b keeps its subject and takes the object of fact ``perm[b]``: the answer distribution is
    unchanged, the link between a subject and its own object is broken (except by chance).
    """
    perm = torch.randperm(len(facts), generator=generator)
    return [Fact(f.subject, facts[int(p)].object) for f, p in zip(facts, perm)]


def trainable(lm: ClozeLM, template: Template, facts: Sequence[Fact]) -> tuple[list[str], torch.Tensor]:
    """The subjects and gold ids of the facts whose object is one token at the template's blank."""
    pairs = [(f.subject, lm.answer_id(f.object, template)) for f in facts]
    pairs = [(s, g) for s, g in pairs if g is not None]
    return [s for s, _ in pairs], torch.tensor([g for _, g in pairs], dtype=torch.long)


def control_run(lm: ClozeLM, template: Template, train_facts: Sequence[Fact], dev_facts: Sequence[Fact],
                test_facts: Sequence[Fact], control: Callable[[Sequence[Fact]], Sequence[Fact]], *, lr: float,
                epochs: int, batch_size: int) -> dict[str, float]:
    """Tune a soft prompt on the true facts and one on the control's; score both on the same test facts.

    Each side is tuned with the library's ``training.tune`` (shuffled batches, the epoch with the best
    dev P@1 kept): the true side on ``train_facts`` and ``dev_facts``, the control side on
    ``control(train_facts)`` and ``control(dev_facts)``, since the control replaces everything the prompt
    learns from. Both are scored with ``evaluation.score_facts`` on ``test_facts``. Returns their P@1
    (``"true"``, ``"control"``; NaN for a side with no single-token object to train on), the P@1 of
    always giving the majority answer of the answerable true training objects (``"majority"``) on
    the kept test facts, and how many test facts were kept (``"kept"``, a float).
    """
    from .training import NothingToTune, TuneConfig, tune

    out: dict[str, float] = {}
    config = TuneConfig(lr=lr, epochs=epochs, batch_size=batch_size)
    sides = (("true", list(train_facts), list(dev_facts)),
             ("control", list(control(list(train_facts))), list(control(list(dev_facts)))))
    for name, train, dev in sides:
        try:
            result = tune(lm, [template], train, dev, config, progress=False)
        except NothingToTune:
            out[name] = math.nan
            continue
        out[name] = score_facts(lm, [template], test_facts, perturbation=result.soft.perturbation).metrics()["p_at_1"]
    kept = score_facts(lm, [template], test_facts).facts  # which facts are kept depends on the template alone
    answer = majority_answer([f.object for f in train_facts if lm.answer_id(f.object, template) is not None])
    out["majority"] = sum(f.object == answer for f in kept) / len(kept) if kept else math.nan
    out["kept"] = float(len(kept))
    return out


# ---------------------------------------------------------------------------------------------
# Uncertainty of a P@1, for the experiments
# ---------------------------------------------------------------------------------------------
def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96); NaN for n = 0.

    Unlike p +- z sqrt(p(1 - p) / n), it never leaves [0, 1] and is not empty at p = 0 or 1.
    """
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: torch.Tensor, b: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over paired per-fact scores (hits), and a bootstrap percentile interval of it.

    The same facts are resampled for both sides, so what the two methods share (easy and hard
    facts) cancels out: a paired interval is narrower than two separate ones. NaN for no facts.
    """
    d = a.double() - b.double()
    if d.numel() == 0:
        return math.nan, math.nan, math.nan
    idx = torch.randint(len(d), (n_boot, len(d)), generator=torch.Generator().manual_seed(seed))
    means = d[idx].mean(dim=1)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return float(d.mean()), lo, hi
