"""What a run of the ladder costs before it is started: work counted in fact-passes, priced per machine.

A *fact-pass* is one fact read through the model under one prompt. Training passes run forward and
backward (the model is frozen, so the backward pass computes the activations' gradients only, about
as much arithmetic as the forward pass); scoring passes run forward alone. A rung's work follows from
the budget's caps: epochs x (training facts x K prompts to train, dev facts x K to pick the best
epoch), then the test facts x K. Unit costs turn work into seconds: per fact-pass (the arithmetic)
and per batch (Python, tokenization, kernel launches: what a tiny model costs). They are measured
on the machine at hand (the appendix), or, for a GPU nobody here has, derived from the model's FLOPs
and the device's datasheet (the preface's Colab estimate, marked as an estimate until measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd

from .data import DataError, load_facts, load_prompts, relations as dataset_relations
from .experiments import LADDER, Budget, Rung


@dataclass(frozen=True)
class Work:
    """Fact-passes of one run, and the batches they come in.

    ``train``: passes with a backward pass under a run's first prompt; ``train_extra``: under its
    other K-1 prompts, which cost less where they share work (a causal LM's subject prefix);
    ``score``: forward passes only. A training step holds ``batch_size`` facts under all K prompts.
    """

    train: float
    score: float
    train_steps: float = 0
    score_batches: float = 0
    train_extra: float = 0
    deep: bool = False


def rung_work(r: Rung, n_train: int, n_dev: int, n_test: int, k: int, epochs: int, batch_size: int) -> Work:
    """The fact-passes of rung ``r`` on one relation (an upper bound: early stopping ends runs sooner).

    ``k``: the prompts a mixture uses, and the candidates ``lpaqa-best-hard`` scores on dev. Scoring
    batches hold ``2 * batch_size`` fact-passes, as ``training.tune`` and ``run_rung`` score.
    """
    if not r.tuned:
        score = n_dev * k + n_test if r.best_on_dev else n_test
        return Work(0, score, 0, math.ceil(score / (2 * batch_size)))
    prompts = k if r.mixture else 1
    score = epochs * n_dev * prompts + n_test * prompts
    return Work(epochs * n_train, score, epochs * math.ceil(n_train / batch_size), math.ceil(score / (2 * batch_size)),
                train_extra=epochs * n_train * (prompts - 1), deep=r.depth != 0)


def ladder_work(budget: Budget, dataset: str = "trex_original", relations: list[str] | None = None,
                usable_templates=None) -> pd.DataFrame:
    """Fact-passes of every rung of the ladder on each relation at ``budget``: one row per (relation, rung).

    ``usable_templates(templates)`` counts the mined templates a model can use (a causal LM only
    those with the subject first, ``ClozeLM.covers``); by default all of them, as for a masked LM.
    """
    count = usable_templates or len
    rels = relations or list(budget.relations or dataset_relations(dataset))
    rows = []
    for rel in rels:
        n = {split: _capped(len(load_facts(dataset, rel, split)), cap)
             for split, cap in (("train", budget.max_train), ("dev", budget.max_dev), ("test", budget.max_test))}
        templates: dict[str, int] = {}  # usable templates per prompt set, counted once per relation
        for r in LADDER:
            if r.prompt_set not in templates:
                try:
                    templates[r.prompt_set] = count(load_prompts(r.prompt_set, dataset, rel))
                except DataError:  # no such prompts for this dataset (ConceptNet has no LPAQA sets)
                    templates[r.prompt_set] = 0
            k = max(1, _capped(templates[r.prompt_set], budget.max_templates))
            w = rung_work(r, n["train"], n["dev"], n["test"], k, budget.epochs, budget.batch_size)
            rows.append({"relation": rel, "rung": r.name, "K": k, **n, "train_passes": w.train,
                         "train_extra_passes": w.train_extra, "deep": w.deep, "score_passes": w.score,
                         "train_steps": w.train_steps, "score_batches": w.score_batches})
    return pd.DataFrame(rows)


def _capped(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, cap)


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per fact-pass and per batch.

    ``extra_prompt_pass``: a training pass under a mixture's second and later prompts (None: as
    ``train_pass``); ``deep_factor``: how much more a pass costs when every layer is perturbed.
    """

    train_pass: float
    score_pass: float
    train_step: float = 0.0
    score_batch: float = 0.0
    extra_prompt_pass: float | None = None
    deep_factor: float = 1.0

    def plus_overheads(self, overheads: "UnitCosts") -> "UnitCosts":
        """These per-pass costs with ``overheads``' per-batch costs (e.g. measured on a tiny model)."""
        return replace(self, train_step=overheads.train_step, score_batch=overheads.score_batch)


def seconds(work: pd.DataFrame, cost: UnitCosts) -> pd.Series:
    """Seconds of each row of ``ladder_work`` at ``cost``."""
    extra = cost.train_pass if cost.extra_prompt_pass is None else cost.extra_prompt_pass
    training = work["train_passes"] * cost.train_pass + work["train_extra_passes"] * extra
    training = training * work["deep"].map({True: cost.deep_factor, False: 1.0})
    return (training + work["score_passes"] * cost.score_pass
            + work["train_steps"] * cost.train_step + work["score_batches"] * cost.score_batch)


@dataclass(frozen=True)
class Device:
    """A device's arithmetic rate for this estimate: a peak from its datasheet times an assumed efficiency."""

    name: str
    peak_flops: float  # per second, in the precision the library would use on it
    efficiency: float  # the share of the peak that small-batch transformer passes reach (an assumption)
    source: str

    @property
    def flops(self) -> float:
        return self.peak_flops * self.efficiency


# Colab's free GPU. The T4 has no bfloat16 units and the library runs float32 there: 8.1 TFLOP/s
# peak (NVIDIA T4 datasheet). Small batches of short sequences keep well under the peak; half of
# it is an assumption until a run on a T4 measures it (book/09_performance_and_scale).
T4 = Device("NVIDIA T4 (Colab's free GPU), float32", 8.1e12, 0.5, "NVIDIA T4 Tensor Core GPU datasheet: 8.1 TFLOPS FP32")


def forward_flops(n_layer_params: int, hidden: int, vocab: int, tokens: int) -> float:
    """FLOPs of one forward pass of ``tokens`` tokens, with the vocabulary read at one position only.

    2 per weight per token in the layers (the attention scores over a dozen tokens are negligible
    next to them), plus the output projection at the blank.
    """
    return 2.0 * n_layer_params * tokens + 2.0 * hidden * vocab


def pass_costs(n_layer_params: int, hidden: int, vocab: int, tokens: int, device: Device) -> UnitCosts:
    """Seconds per fact-pass on ``device``: forward alone to score; forward and backward, twice that, to train.

    No per-batch overhead: add one measured elsewhere with ``UnitCosts.plus_overheads``.
    """
    f = forward_flops(n_layer_params, hidden, vocab, tokens)
    return UnitCosts(train_pass=2 * f / device.flops, score_pass=f / device.flops)


def layer_parameters(model) -> int:
    """Parameters inside the transformer layers (every ModuleList of blocks: BART's encoder and decoder)."""
    from torch import nn

    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) and not isinstance(m[0], (nn.Linear, nn.Embedding))]
    return sum(p.numel() for layers in lists for p in layers.parameters())


def measure_batch_costs(lm, templates, facts, batch_size: int, repeats: int = 3) -> UnitCosts:
    """Seconds per training step and per scoring batch of ``lm`` on this machine, median of ``repeats``.

    On a tiny model the arithmetic is negligible and what is left is the per-batch overhead
    (tokenization, Python, hooks, optimizer step) that a large model on a GPU pays as well. That
    overhead is single-threaded work, so it is timed on one thread in this process's CPU time: other
    programs on a busy machine then lengthen the wall clock, not the measurement.
    """
    import statistics
    import time

    import torch

    from .evaluation import score_facts
    from .soft_prompts import SoftPrompt
    from .training import gold_log_probs

    soft = SoftPrompt(lm, templates)
    optimizer = torch.optim.Adam(soft.parameters(), lr=1e-3)
    pairs = [(f.subject, lm.answer_id(f.object, templates[0])) for f in facts]
    pairs = [(s, g) for s, g in pairs if g is not None][:batch_size]
    if not pairs:
        raise ValueError(f"{lm.name}: no fact with a one-token object to time a training step on")
    subjects, gold = [s for s, _ in pairs], torch.tensor([g for _, g in pairs])
    K = len(templates)

    def step() -> None:
        optimizer.zero_grad()
        logp, _ = gold_log_probs(lm, soft, subjects, gold, list(range(K)))
        (-logp.mean()).backward()
        optimizer.step()

    def score() -> None:
        score_facts(lm, templates, facts[: 2 * batch_size], batch_size=2 * batch_size)

    timings = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, run in (("step", step), ("score", score)):
            run()  # warm-up: caches, allocator
            times = []
            for _ in range(repeats):
                t0 = time.process_time()
                run()
                times.append(time.process_time() - t0)
            timings[name] = statistics.median(times)
    finally:
        torch.set_num_threads(threads)
    return UnitCosts(0.0, 0.0, train_step=timings["step"], score_batch=timings["score"])
