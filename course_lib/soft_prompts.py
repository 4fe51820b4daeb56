"""Soft prompts and deep perturbations: one offset tensor, as in the paper's own code.

A soft prompt is a template plus offsets of shape [rows, prompt tokens, hidden], zero at the start,
so a zero offset *is* the hard prompt. Row 0 is added to the prompt tokens' input embeddings, row
i to their hidden states after layer i. Training row 0 alone is the paper's soft prompt; training
every row is its deep perturbation ("-D"); ``depth`` picks anything between. Subject, blank and
special tokens are never perturbed: ``ClozeBatch.prompt_slot`` marks only the template's tokens.

K prompts (a mixture) share one parameter of shape [K, rows, T, hidden], T the longest prompt, so
every example of a batch, whatever its prompt, is perturbed by one gather per layer.

Two choices keep the paper's meaning on every family:

* **Where the answer is read.** A masked LM reads the blank at ``[MASK]``, a position no offset
  touches. A causal LM reads it at the last word before ``[Y]`` ("... is"), which is a prompt token,
  and BART's decoder reads it at a position whose input is the word before the blank. Tuning that
  position, at the input or (deeper) in its last hidden state, can push the answer distribution
  towards frequent objects without the subject mattering at all. ``Read.FROZEN`` (the default)
  leaves the read position unperturbed at every row, as ``[MASK]`` is; ``Read.TUNED`` tunes it like
  any other prompt token, for the ablation.
* **Deep offsets in each layer's units.** The residual stream of a pre-norm decoder grows with
  depth (its typical coordinate about 300-fold over Gemma's layers), so one step size for every row
  leaves the upper offsets negligible. With ``row_scale`` (measured once, ``calibrate_row_scale``),
  row i's offset is ``offsets[:, i] * row_scale[i]``, where ``row_scale[i]`` is the typical size of a
  coordinate of the prompt's hidden states after layer i relative to its input vectors: every row
  then moves by the same relative amount per step, and row 0 (the soft prompt) is unchanged.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import torch
from torch import nn

from .cloze import ClozeBatch, ClozeLM, EncodedPrompt, Stream
from .templates import Template


class Init(str, Enum):
    TEMPLATE = "template"  # start at the template's own word vectors (zero offset)
    RANDOM = "random"  # replace them by draws matching the embedding table's mean and spread


class Read(str, Enum):
    FROZEN = "frozen"  # no offset at the position the answer is read from, as at a masked LM's [MASK]
    TUNED = "tuned"  # that position is tuned like any other prompt token (the causal shortcut, for ablations)


def resolve_depth(depth: int | str, lm: ClozeLM) -> int:
    """``"all"`` means every layer; an int d trains rows 0..d (0 = input embeddings only)."""
    if depth == "all":
        return lm.n_layers
    d = int(depth)
    if not 0 <= d <= lm.n_layers:
        raise ValueError(f"depth must be between 0 and {lm.n_layers} (the model's layers) or 'all', got {depth!r}")
    return d


class PromptOffsets(nn.Module):
    """Trainable offsets for K prompts; implements ``cloze.Perturbation`` for the layer hooks."""

    def __init__(self, n_prompts: int, n_rows: int, n_tokens: int, hidden: int, read: Read | str = Read.FROZEN) -> None:
        super().__init__()
        self.offsets = nn.Parameter(torch.zeros(n_prompts, n_rows, max(n_tokens, 1), hidden))
        self.read = Read(read)
        # Row i's offsets are in units of row_scale[i] (ones until calibrate_row_scale measures them).
        self.register_buffer("row_scale", torch.ones(n_rows))

    @property
    def n_rows(self) -> int:
        return self.offsets.shape[1]

    def delta(self, row: int, stream: Stream, batch: ClozeBatch) -> torch.Tensor | None:
        if row >= self.n_rows:
            return None
        K, _, T, H = self.offsets.shape
        if batch.max_prompt_tokens != T:
            raise ValueError(f"batch built for {batch.max_prompt_tokens} prompt tokens, offsets have {T}")
        # One extra zero row: positions that are not prompt tokens gather it and stay unperturbed.
        table = torch.cat([self.offsets[:, row].reshape(K * T, H) * self.row_scale[row], self.offsets.new_zeros(1, H)])
        slots = batch.slots(stream).to(table.device)
        index = torch.where(slots < 0, K * T, slots)
        if self.read is Read.FROZEN:
            rows = torch.arange(len(index), device=index.device)
            index = index.index_put((rows, batch.read_index.to(index.device)), torch.tensor(K * T, device=index.device))
        return table[index]


class SoftPrompt(nn.Module):
    """K templates, encoded for one model, and their offsets. K = 1 for a single soft prompt."""

    def __init__(self, lm: ClozeLM, templates: Sequence[Template], depth: int | str = 0,
                 read: Read | str = Read.FROZEN) -> None:
        super().__init__()
        self.templates = list(templates)
        self.prompts: list[EncodedPrompt] = [lm.encode_prompt(t) for t in self.templates]
        self.depth = resolve_depth(depth, lm)
        T = max(p.n_prompt_tokens for p in self.prompts)
        self.perturbation = PromptOffsets(len(self.prompts), self.depth + 1, T, lm.hidden_size, read).to(lm.device)

    @property
    def offsets(self) -> nn.Parameter:
        return self.perturbation.offsets

    def batch(self, lm: ClozeLM, subjects: Sequence[str], prompt_index: Sequence[int]) -> ClozeBatch:
        return lm.build_batch(self.prompts, subjects, prompt_index)

    def input_vectors(self, lm: ClozeLM, k: int = 0) -> torch.Tensor:
        """The prompt's input vectors as the model sees them: word embeddings plus row-0 offsets."""
        ids = torch.tensor(self.prompts[k].prompt_token_ids, dtype=torch.long)
        base = lm.embedding_output(ids)
        return base + self.offsets[k, 0, : len(ids)].detach().to(base.device)


@torch.no_grad()
def prompt_hidden_scale(lm: ClozeLM, soft: SoftPrompt, subjects: Sequence[str]) -> torch.Tensor:
    """[rows] typical size of one coordinate of the prompt tokens' vectors at each row: the median |value|.

    Row 0: the input vectors (word embeddings as the model reads them); row i: the output of layer i
    (``ClozeLM.row_modules``), at the positions whose offsets row i would perturb, over ``subjects`` x
    prompts. The median, not the root mean square: a decoder's residual stream carries a few
    "massive" coordinates (in Gemma-3-270M's last layer about 200 times the typical one), and a unit
    set by them would make every step huge in all the other coordinates.
    """
    K = len(soft.prompts)
    batch = soft.batch(lm, [s for s in subjects for _ in range(K)], [k for _ in subjects for k in range(K)])
    values: dict[int, list[torch.Tensor]] = {row: [] for row in range(soft.perturbation.n_rows)}

    def recorder(row: int, stream: Stream):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            mask = (batch.slots(stream) >= 0).to(hidden.device)
            if hidden.shape[:2] == mask.shape:  # skip passes over other shapes (e.g. a cached prefix)
                values[row].append(hidden[mask].detach().float().abs().flatten().cpu())
        return hook

    handles = [module.register_forward_hook(recorder(row, stream))
               for row in range(soft.perturbation.n_rows) for module, stream in lm.row_modules(row)]
    saved, lm.reuse_prefix = lm.reuse_prefix, False  # one plain pass: every position seen at every row
    try:
        lm.blank_logits(batch)
    finally:
        lm.reuse_prefix = saved
        for h in handles:
            h.remove()
    return torch.stack([torch.cat(values[row]).median() for row in range(soft.perturbation.n_rows)])


def calibrate_row_scale(lm: ClozeLM, soft: SoftPrompt, subjects: Sequence[str]) -> torch.Tensor:
    """Set and return ``row_scale``: each row's typical coordinate size relative to row 0's (module docstring)."""
    size = prompt_hidden_scale(lm, soft, subjects)
    scale = size / size[0].clamp_min(1e-12)
    soft.perturbation.row_scale.copy_(scale.to(soft.perturbation.row_scale.device))
    return scale


def embedding_stats(lm: ClozeLM, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of the embedding table, as the model sees it.

    Read through the embedding module (in chunks, the table can be 262k rows) so that scaled
    embeddings such as Gemma's sqrt(hidden) factor are measured in the space the offsets live in.
    """
    # The table is frozen, so one pass per model serves every call (random inits, default_lr).
    if (cached := getattr(lm, "_embedding_stats", None)) is not None:
        return cached
    total = torch.zeros(lm.hidden_size, dtype=torch.float64)
    total_sq = torch.zeros(lm.hidden_size, dtype=torch.float64)
    n = lm.model.get_input_embeddings().num_embeddings
    for start in range(0, n, chunk):
        e = lm.embedding_output(torch.arange(start, min(n, start + chunk))).double().cpu()
        total += e.sum(0)
        total_sq += (e * e).sum(0)
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt()
    lm._embedding_stats = (mean.float(), std.float())
    return lm._embedding_stats


@torch.no_grad()
def init_random(soft: SoftPrompt, lm: ClozeLM, generator: torch.Generator) -> None:
    """Random initialisation: row-0 offsets that turn each template word's vector into a fresh draw.

    The draw matches the embedding table's per-dimension mean and spread, as in the paper; the
    template still decides how many vectors there are and where the subject and blank go.
    """
    mean, std = embedding_stats(lm)
    for k, prompt in enumerate(soft.prompts):
        ids = torch.tensor(prompt.prompt_token_ids, dtype=torch.long)
        if len(ids) == 0:
            continue
        draw = mean + std * torch.randn(len(ids), lm.hidden_size, generator=generator)
        soft.offsets[k, 0, : len(ids)] = (draw - lm.embedding_output(ids).cpu()).to(soft.offsets.device)


def nearest_tokens(lm: ClozeLM, vectors: torch.Tensor, k: int = 5, chunk: int = 16384) -> list[list[str]]:
    """The k vocabulary tokens whose embeddings are closest (cosine) to each vector."""
    n = lm.model.get_input_embeddings().num_embeddings
    v = torch.nn.functional.normalize(vectors.float().to(lm.device), dim=-1)
    best_sim = torch.full((len(v), 0), -math.inf, device=lm.device)
    best_id = torch.zeros((len(v), 0), dtype=torch.long, device=lm.device)
    # In chunks: the whole normalised table of a 262k-token vocabulary would take most of a GiB.
    for start in range(0, n, chunk):
        ids = torch.arange(start, min(n, start + chunk), device=lm.device)
        sims = v @ torch.nn.functional.normalize(lm.embedding_output(ids), dim=-1).T
        sims, idx = torch.cat([best_sim, sims], 1), torch.cat([best_id, ids.expand(len(v), -1)], 1)
        best_sim, pos = sims.topk(min(k, sims.shape[1]), dim=-1)
        best_id = idx.gather(1, pos)
    return [[lm.tokenizer.decode([int(i)]) for i in row] for row in best_id.cpu()]
