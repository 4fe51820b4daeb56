"""One interface over three model families: the scores a language model gives the blank.

``ClozeLM`` wraps a stock ``transformers`` model and its tokenizer. For a batch of (template,
subject) pairs it returns the logits of the token that fills [Y]:

* masked LM (BERT, RoBERTa): [Y] becomes the mask token; read the mask position;
* seq2seq (BART, as Qin & Eisner use it): the masked sentence goes to the encoder and, shifted by
  one, to the decoder, which rebuilds it; read the decoder at the mask position;
* causal LM (Gemma, GPT-2, Llama, SmolLM): the sentence is cut before [Y]; read the last position.
  Text after [Y] cannot influence the answer, and a template whose subject comes after the blank
  does not let the model see the subject at all: such templates are reported as not covered.

Forward hooks on the stock modules do all the work that is special here: one gathers the read
position before the output projection (so only the blank's logits are computed, never the
vocabulary at every position), one per layer adds a prompt perturbation if one is active
(``course_lib.soft_prompts``), and a pair on each of the layers' linear maps drops the padding
before the matrix multiply and puts it back after (see ``ClozeLM.unpad``). No modeling code is
copied. Two more savings use only the stock models' own arguments: training reads one token's
log-probability in a single pass over the output layer (``token_log_probs``), and a causal LM runs
the part of each row before the prompt apart, through its key/value cache (``_prefix_split``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Iterator, Protocol, Sequence

import torch
from torch import nn

from .templates import Template
from .vocab_log_probs import vocab_log_probs


# Below this share of padded positions, gathering the real ones costs more than it saves (bench: unpad).
UNPAD_MIN_PADDING = 0.1
# Share of a single pass's work that running the prefixes apart must save to pay for a second pass
# (Gemma-3-270M on 2 CPU cores, batch 16: a 25% saving gave 1.08x, a 6% one lost 5%).
REUSE_PREFIX_MIN_SAVING = 0.2


class Family(str, Enum):
    MASKED = "masked"
    SEQ2SEQ = "seq2seq"
    CAUSAL = "causal"


class Stream(str, Enum):
    """Which token sequence a hooked module sees: the encoder's (or only) input, or BART's decoder input."""

    INPUT = "input"
    DECODER = "decoder"


@dataclass(frozen=True)
class EncodedPrompt:
    """A template tokenized once: the prompt's own token ids and where the slots go."""

    template: Template
    # ("text", ids) | ("subject", ()) | ("blank", ()); the slot's whitespace lives in the template.
    pieces: tuple[tuple[str, tuple[int, ...]], ...]
    prompt_token_ids: tuple[int, ...]  # the template's own tokens, in order: the tokens soft prompts tune
    blank_prefix: str  # whitespace before [Y]: decides how the object is tokenized (" Paris" vs "Paris")
    subject_prefix: str

    @property
    def n_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class ClozeBatch:
    """Padded tensors for a batch of (prompt, subject) examples, plus the bookkeeping the hooks need.

    ``prompt_slot[b, s]`` is ``k * max_tokens + p`` when position s of example b holds token p of
    prompt k, else -1: one index lets a hook gather every example's offsets in one step.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    read_index: torch.Tensor  # [B] position whose output predicts the blank
    prompt_index: torch.Tensor  # [B] which prompt (0..K-1) each example uses
    prompt_slot: torch.Tensor  # [B, S]
    subject_mask: torch.Tensor  # [B, S] True on subject tokens
    max_prompt_tokens: int
    decoder_input_ids: torch.Tensor | None = None
    decoder_prompt_slot: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def slots(self, stream: Stream) -> torch.Tensor:
        return self.decoder_prompt_slot if stream is Stream.DECODER else self.prompt_slot

    def to(self, device: torch.device | str) -> "ClozeBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["extras"] = {k: v.to(device) for k, v in self.extras.items()}
        return ClozeBatch(**moved)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class Perturbation(Protocol):
    """What the layer hooks ask while a perturbation is active (see ``soft_prompts.PromptOffsets``)."""

    def delta(self, row: int, stream: Stream, batch: ClozeBatch) -> torch.Tensor | None: ...


class ClozeLM:
    """A frozen language model asked to fill one blank. See the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, family: Family | str, name: str = "model", revision: str = "unknown") -> None:
        self.model = model.eval()
        self.revision = revision  # which weights exactly: a package version and checksum, or a hub commit
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.family = Family(family)
        self.name = name
        self._special_prefix, self._special_suffix = _special_tokens(tokenizer)
        if self.family is not Family.CAUSAL and tokenizer.mask_token_id is None:
            raise ValueError(f"{name}: a {self.family.value} model needs a tokenizer with a mask token")
        self.hooked_rows = self._find_rows()
        self._active: tuple[Perturbation, ClozeBatch] | None = None
        self._read: torch.Tensor | None = None
        # Unpadding: the linear maps inside the layers (most of the FLOPs) act on each position
        # alone, so they can skip padded positions. A batch of prompts and subjects of different
        # lengths is often a third padding, or more when K prompts are batched together. On when at
        # least ``unpad_min_padding`` of the batch's positions are padding (gathering has a cost).
        self.unpad = True
        self.unpad_min_padding = UNPAD_MIN_PADDING
        self._kept: tuple[int, int, torch.Tensor] | None = None  # (B, S, flat indices of real positions)
        self._packed_modules: set[nn.Module] = set()
        # While a list: the gather hook appends the read positions' hidden states to it and lets the
        # output layer compute nothing (``token_log_probs`` does the projection itself).
        self._captured: list[torch.Tensor] | None = None
        # token_log_probs in one pass over the output layer (course_lib.vocab_log_probs), where the
        # model's logits are exactly that layer's (checked once, _plain_head); off: logits + log_softmax.
        self.vocab_one_pass = True
        self._head_plain: bool | None = None
        # torch.compile'd forward passes, set by compile(); None: eager (the default).
        self.compiled: nn.Module | None = None
        # Causal LMs: run the part of each row before its first prompt token apart (_prefix_split).
        self.reuse_prefix = True
        self.reuse_prefix_min_saving = REUSE_PREFIX_MIN_SAVING
        self._install_hooks()
        self._encode = lru_cache(maxsize=4096)(self._encode_uncached)
        self._tokens = lru_cache(maxsize=1 << 16)(self._tokens_uncached)
        # bfloat16 autocast: None = on GPUs that support it (about twice the matmul throughput, and
        # ranks over the vocabulary barely move); True / False force it on (CPU included) or off.
        self.autocast: bool | None = None
        # Per-dimension (mean, std) of the frozen embedding table, filled once by soft_prompts.embedding_stats.
        self._embedding_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ structure
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def compile(self, **options) -> None:
        """Run forward passes through ``torch.compile`` (off by default: measure it first, with
        ``python bench/eval_throughput.py --compile``). The hooks are traced with the model; shapes
        are dynamic because every batch has its own length. ``lm.compiled = None`` goes back to eager."""
        self.compiled = torch.compile(self.model, dynamic=True, **options)

    @property
    def _runner(self) -> nn.Module:
        return self.compiled if self.compiled is not None else self.model

    @property
    def _pad_id(self) -> int:
        # Padded positions are masked out, so any id does where the tokenizer has no pad token (GPT-2).
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().out_features

    @property
    def n_layers(self) -> int:
        """Layers whose outputs a deep perturbation touches (encoder + decoder for BART)."""
        return len(self.hooked_rows) - 1

    def row_modules(self, row: int) -> list[tuple[nn.Module, Stream]]:
        """The stock modules whose outputs row ``row`` of an offset tensor perturbs, with the stream each reads.

        Row 0: the token-embedding module(s); row i: the i-th transformer layer (BART: the encoder's
        layers, then the decoder's). A chapter hooks these instead of an architecture's attribute
        names (``model.model.layers``, ``bert.encoder.layer``, ...).
        """
        return list(self.hooked_rows[row])

    def model_inputs(self, batch: ClozeBatch) -> dict[str, torch.Tensor]:
        """The stock model's keyword arguments for ``batch``, on the model's device: ``self.model(**inputs)``.

        BART also gets its decoder input (the sentence shifted right by one), so that every family
        is read the same way: the logits at ``batch.read_index`` predict the blank.
        """
        inputs = {"input_ids": batch.input_ids.to(self.device), "attention_mask": batch.attention_mask.to(self.device)}
        if self.family is Family.SEQ2SEQ:
            inputs["decoder_input_ids"] = batch.decoder_input_ids.to(self.device)
        return inputs

    def _find_rows(self) -> list[list[tuple[nn.Module, Stream]]]:
        """Row 0: the token-embedding modules; row i: the i-th transformer layer (encoder, then decoder)."""
        if self.family is Family.SEQ2SEQ:
            enc, dec = self.model.get_encoder(), self.model.get_decoder()
            rows = [[(enc.embed_tokens, Stream.INPUT), (dec.embed_tokens, Stream.DECODER)]]
            rows += [[(layer, Stream.INPUT)] for layer in enc.layers]
            rows += [[(layer, Stream.DECODER)] for layer in dec.layers]
            return rows
        rows = [[(self.model.get_input_embeddings(), Stream.INPUT)]]
        return rows + [[(layer, Stream.INPUT)] for layer in _layer_list(self.model)]

    def _install_hooks(self) -> None:
        for row, modules in enumerate(self.hooked_rows):
            for module, stream in modules:
                module.register_forward_hook(self._perturb_hook(row, stream))
        self.model.get_output_embeddings().register_forward_pre_hook(self._gather_hook)
        for module in self._position_wise_modules():
            module.register_forward_pre_hook(self._pack_hook)
            module.register_forward_hook(self._unpack_hook)

    def _position_wise_modules(self) -> list[nn.Module]:
        """The linear maps inside the transformer layers (nn.Linear, GPT-2's Conv1D): each position alone."""
        found: list[nn.Module] = []
        for modules in self.hooked_rows[1:]:
            for layer, _ in modules:
                found += [m for m in layer.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
        return found

    def _pack_hook(self, module: nn.Module, args):
        kept = self._kept
        if kept is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        B, S, idx = kept
        x = args[0]
        # Only the batch's own [B, S, features] streams (BART's cross-attention keys included: the
        # encoder and decoder streams share one padding pattern by construction, see build_batch).
        if x.dim() != 3 or x.shape[0] != B or x.shape[1] != S:
            return None
        self._packed_modules.add(module)
        return (x.reshape(B * S, x.shape[2]).index_select(0, idx), *args[1:])

    def _unpack_hook(self, module: nn.Module, args, output):
        if module not in self._packed_modules:
            return None
        self._packed_modules.discard(module)
        B, S, idx = self._kept
        full = output.new_zeros(B * S, output.shape[-1]).index_copy(0, idx, output)
        return full.view(B, S, output.shape[-1])

    def _perturb_hook(self, row: int, stream: Stream):
        def hook(module: nn.Module, args, output):
            if self._active is None:
                return None
            perturbation, batch = self._active
            delta = perturbation.delta(row, stream, batch)
            if delta is None:
                return None
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta

        return hook

    def _gather_hook(self, module: nn.Module, args):
        # Keep only the read position before the vocabulary projection: the projection is most of
        # the cost of a small model's forward pass, and only one position of it is ever used.
        if self._read is None:
            return None
        hidden = args[0]
        read = self._read.to(hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, read].unsqueeze(1) if read.dim() == 1 else hidden[rows[:, None], read]
        if self._captured is not None:
            self._captured.append(picked)
            return (picked[:, :0], *args[1:])
        return (picked, *args[1:])

    # ------------------------------------------------------------------ tokenization
    def encode_prompt(self, template: Template) -> EncodedPrompt:
        return self._encode(template)

    def _encode_uncached(self, template: Template) -> EncodedPrompt:
        pieces: list[tuple[str, tuple[int, ...]]] = []
        prompt_ids: list[int] = []
        blank_prefix = subject_prefix = ""
        for kind, text in template.pieces():
            if kind == "text":
                ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                pieces.append(("text", ids))
                prompt_ids.extend(ids)
            else:
                pieces.append((kind, ()))
                if kind == "blank":
                    blank_prefix = text
                else:
                    subject_prefix = text
        return EncodedPrompt(template, tuple(pieces), tuple(prompt_ids), blank_prefix, subject_prefix)

    def covers(self, template: Template) -> bool:
        """Whether this model can answer the template at all (see the module docstring)."""
        return self.family is not Family.CAUSAL or template.subject_first

    def answer_ids(self, word: str, template: Template | None = None) -> tuple[int, ...]:
        """Token ids of ``word`` as it would fill the blank of ``template``."""
        prefix = self.encode_prompt(template).blank_prefix if template is not None else " "
        return self._tokens(prefix + word)

    def answer_id(self, word: str, template: Template | None = None) -> int | None:
        """The single token that spells ``word`` at the blank, or None if it takes several (or none)."""
        ids = self.answer_ids(word, template)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            return None
        return ids[0]

    def _tokens_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def subject_ids(self, subject: str, prompt: EncodedPrompt) -> tuple[int, ...]:
        return tuple(self._tokens(prompt.subject_prefix + subject))

    # ------------------------------------------------------------------ batching
    def build_batch(
        self,
        prompts: Sequence[EncodedPrompt],
        subjects: Sequence[str],
        prompt_index: Sequence[int] | None = None,
        max_length: int | None = None,
    ) -> ClozeBatch:
        """Tokenize ``subjects[b]`` into ``prompts[prompt_index[b]]`` and pad (right) into one batch.

        Subjects longer than ``max_length`` tokens (default: the model's context) are cut from the
        left of the subject, keeping the prompt whole; callers count such cases via ``extras``.
        """
        if prompt_index is None:
            if len(prompts) != 1:
                raise ValueError("prompt_index is required when several prompts are batched together")
            prompt_index = [0] * len(subjects)
        limit = max_length or _context_length(self.model)
        T = max(1, max(p.n_prompt_tokens for p in prompts))
        rows: list[tuple[list[int], list[int], list[bool], int]] = []
        truncated = []
        for subject, k in zip(subjects, prompt_index):
            ids, slots, subj, read, cut = self._assemble(prompts[k], subject, k, T, limit)
            rows.append((ids, slots, subj, read))
            truncated.append(cut)
        S = max(len(r[0]) for r in rows)
        pad = self._pad_id
        B = len(rows)
        input_ids = torch.full((B, S), pad, dtype=torch.long)
        attention = torch.zeros((B, S), dtype=torch.long)
        slot = torch.full((B, S), -1, dtype=torch.long)
        subject_mask = torch.zeros((B, S), dtype=torch.bool)
        read = torch.empty(B, dtype=torch.long)
        for b, (ids, slots, subj, r) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            attention[b, :n] = 1
            slot[b, :n] = torch.tensor(slots)
            subject_mask[b, :n] = torch.tensor(subj)
            read[b] = r
        batch = ClozeBatch(
            input_ids, attention, read, torch.tensor(list(prompt_index)), slot, subject_mask, T,
            extras={"truncated": torch.tensor(truncated)},
        )
        if self.family is Family.SEQ2SEQ:
            # BART rebuilds its input: the decoder sees the same sentence shifted right by one.
            start = self.model.config.decoder_start_token_id
            batch.decoder_input_ids = torch.cat([torch.full((B, 1), start), input_ids[:, :-1]], dim=1)
            batch.decoder_prompt_slot = torch.cat([torch.full((B, 1), -1), slot[:, :-1]], dim=1)
        return batch

    def _assemble(self, prompt: EncodedPrompt, subject: str, k: int, T: int, limit: int):
        ids: list[int] = list(self._special_prefix)
        slots: list[int] = [-1] * len(ids)
        subj: list[bool] = [False] * len(ids)
        read = -1
        p = 0
        budget = limit - sum(len(t) for _, t in prompt.pieces) - len(self._special_prefix) - len(self._special_suffix) - 1
        sub_ids = self.subject_ids(subject, prompt)
        cut = len(sub_ids) > budget
        if cut:
            sub_ids = sub_ids[len(sub_ids) - max(budget, 1):]
        for kind, toks in prompt.pieces:
            if kind == "text":
                ids.extend(toks)
                slots.extend(range(k * T + p, k * T + p + len(toks)))
                subj.extend([False] * len(toks))
                p += len(toks)
            elif kind == "subject":
                ids.extend(sub_ids)
                slots.extend([-1] * len(sub_ids))
                subj.extend([True] * len(sub_ids))
            else:
                if self.family is Family.CAUSAL:
                    return ids, slots, subj, len(ids) - 1, cut
                read = len(ids)
                ids.append(self.tokenizer.mask_token_id)
                slots.append(-1)
                subj.append(False)
        ids.extend(self._special_suffix)
        slots.extend([-1] * len(self._special_suffix))
        subj.extend([False] * len(self._special_suffix))
        return ids, slots, subj, read, cut

    # ------------------------------------------------------------------ scoring
    def blank_logits(self, batch: ClozeBatch, perturbation: Perturbation | None = None) -> torch.Tensor:
        """Logits [B, V] at the blank. Differentiable w.r.t. the perturbation; the model stays frozen."""
        return self._logits_at(batch, batch.read_index, perturbation)[:, 0, :]

    def _logits_at(self, batch: ClozeBatch, read: torch.Tensor, perturbation: Perturbation | None) -> torch.Tensor:
        """Logits [B, R, V] at positions ``read`` ([B] or [B, R]) of the (decoder) output."""
        batch = batch.to(self.device) if batch.input_ids.device != self.device else batch
        read = read.to(self.device)
        split = self._prefix_split(batch, read, perturbation)
        if split is not None:
            return self._forward_after_prefix(batch, read, perturbation, *split)
        with self._reading(read), self._perturbed(perturbation, batch), self._unpadded(batch.attention_mask), self.autocast_context():
            kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            if self.family is Family.SEQ2SEQ:
                kwargs["decoder_input_ids"] = batch.decoder_input_ids
            return self._runner(**kwargs).logits.float()

    def subject_log_likelihood(self, batch: ClozeBatch, perturbation: Perturbation | None = None) -> torch.Tensor:
        """How plausible the model finds each subject in its slot: [B] log-probabilities.

        Causal LMs: the chain rule over the subject's tokens, each given everything to its left
        (a subject's first token at position 0, as in GPT-2 without BOS, cannot be scored and is
        skipped). Masked LMs and BART: every subject token is masked at once and the log-probs of
        the true tokens summed, a pseudo-likelihood. Used by data-dependent mixture weights.
        """
        mask = batch.subject_mask.clone()
        if self.family is Family.CAUSAL:
            mask[:, 0] = False
        lengths = mask.sum(1)
        R = max(1, int(lengths.max()))
        positions = torch.zeros(len(batch), R, dtype=torch.long)
        valid = torch.arange(R)[None, :] < lengths[:, None]
        for b in range(len(batch)):
            idx = mask[b].nonzero().flatten()
            positions[b, : len(idx)] = idx
        targets = batch.input_ids.gather(1, positions)
        if self.family is Family.CAUSAL:
            read, probe = positions - 1, batch
        else:
            read = positions
            masked = batch.input_ids.masked_fill(mask, self.tokenizer.mask_token_id)
            probe = ClozeBatch(**{**batch.__dict__, "input_ids": masked})
            if self.family is Family.SEQ2SEQ:
                start = torch.full((len(batch), 1), self.model.config.decoder_start_token_id)
                probe.decoder_input_ids = torch.cat([start, masked[:, :-1]], dim=1)
        token_logp = self.token_log_probs(probe, read.clamp_min(0), targets, perturbation)
        return (token_logp * valid.to(token_logp.device)).sum(1)

    def blank_log_probs(self, batch: ClozeBatch, perturbation: Perturbation | None = None) -> torch.Tensor:
        return torch.log_softmax(self.blank_logits(batch, perturbation), dim=-1)

    def token_log_probs(self, batch: ClozeBatch, read: torch.Tensor, targets: torch.Tensor,
                        perturbation: Perturbation | None = None) -> torch.Tensor:
        """log p(targets) at positions ``read`` ([B] or [B, R], as ``targets``), normalised over the vocabulary.

        What training needs: one token's log-probability per position, differentiable w.r.t. the
        perturbation, computed in one pass over the output layer (``course_lib.vocab_log_probs``)
        without ever holding the [B, V] logits.
        """
        targets = targets.to(self.device)
        if not (self.vocab_one_pass and self._plain_head()):
            logp = torch.log_softmax(self._logits_at(batch, read, perturbation), dim=-1)
            return logp.gather(2, targets.reshape(len(batch), -1, 1)).reshape(targets.shape)
        hidden = self._hidden_at(batch, read, perturbation)
        head = self.model.get_output_embeddings()
        flat = vocab_log_probs(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets.reshape(-1))
        return flat.reshape(targets.shape)

    def _hidden_at(self, batch: ClozeBatch, read: torch.Tensor, perturbation: Perturbation | None) -> torch.Tensor:
        """The output layer's input [B, R, H] at positions ``read``; the output layer itself computes nothing."""
        self._captured = []
        try:
            self._logits_at(batch, read, perturbation)
            return self._captured[0]
        finally:
            self._captured = None

    def _prefix_split(self, batch: ClozeBatch, read: torch.Tensor, perturbation: Perturbation | None):
        """Where to cut a causal LM's rows for ``_forward_after_prefix``, or None if a single pass is cheaper.

        The part of a row before its first prompt token (BOS and, for "[X] was born in", the
        subject) cannot depend on the prompt: a causal LM's position sees only its left. Run apart,
        it needs no backward pass, and rows that share it (the K prompts of a mixture share a
        subject's) run it once. A second pass has a fixed cost, so the cut is made only when those
        savings reach ``reuse_prefix_min_saving`` of the single pass's work.
        """
        if self.family is not Family.CAUSAL or not self.reuse_prefix or read.dim() != 1:
            return None
        has_slot = batch.prompt_slot >= 0
        first_slot = torch.where(has_slot.any(1), has_slot.int().argmax(1), read)
        cut = torch.minimum(first_slot, read)  # the read position always stays in the second pass
        P = int(cut.max())
        if P == 0:
            return None
        keyed = batch.input_ids[:, :P].masked_fill(torch.arange(P, device=cut.device)[None, :] >= cut[:, None], -1)
        distinct, which = torch.unique(keyed, dim=0, return_inverse=True)
        prefix_tokens, real = int(cut.sum()), int(batch.attention_mask.sum())
        repeated = prefix_tokens - int((distinct >= 0).sum())
        if torch.is_grad_enabled() and perturbation is not None:  # forward and backward: twice the work
            saving = (repeated + prefix_tokens) / (2 * real)
        else:
            saving = repeated / real
        return (cut, distinct, which) if saving >= self.reuse_prefix_min_saving else None

    def _forward_after_prefix(self, batch: ClozeBatch, read: torch.Tensor, perturbation: Perturbation | None,
                              cut: torch.Tensor, distinct: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """A causal LM's forward pass in two parts (see ``_prefix_split``): the distinct prefixes
        without autograd, then the rest of every row, reading the prefixes from the key/value cache."""
        B, S = batch.input_ids.shape
        P = distinct.shape[1]
        positions = torch.arange(S, device=self.device)
        pad = self._pad_id
        # Padded on the left, so that the cache's slot distances are the true token distances
        # (sliding-window layers, as Gemma's, count them), and the rest follows right after.
        source = positions[None, :P] - (P - (distinct >= 0).sum(1, keepdim=True))
        real = source >= 0
        prefix_ids = distinct.clamp_min(0).gather(1, source.clamp_min(0)).masked_fill(~real, pad)
        with torch.no_grad(), self._unpadded(real.long()), self._capturing(), self.autocast_context():
            cache = self._runner(input_ids=prefix_ids, attention_mask=real.long(), position_ids=source.clamp_min(0),
                               use_cache=True).past_key_values
        cache.batch_select_indices(which)
        prefix_mask = real.long()[which]

        rest = batch.attention_mask.sum(1) - cut
        R = int(rest.max())
        take = (cut[:, None] + positions[None, :R]).clamp_max(S - 1)
        rest_mask = (positions[None, :R] < rest[:, None]).long()
        second = ClozeBatch(
            batch.input_ids.gather(1, take).masked_fill(rest_mask == 0, pad), rest_mask, read - cut, batch.prompt_index,
            batch.prompt_slot.gather(1, take).masked_fill(rest_mask == 0, -1), batch.subject_mask.gather(1, take) & rest_mask.bool(),
            batch.max_prompt_tokens,
        )
        with self._reading(second.read_index), self._perturbed(perturbation, second), self._unpadded(rest_mask), self.autocast_context():
            return self._runner(input_ids=second.input_ids, attention_mask=torch.cat([prefix_mask, rest_mask], 1),
                              position_ids=cut[:, None] + positions[None, :R], past_key_values=cache, use_cache=True).logits.float()

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[None]:
        """A forward pass whose output layer computes nothing (for the key/value cache alone)."""
        saved_read, saved_captured = self._read, self._captured
        self._read, self._captured = torch.zeros(1, dtype=torch.long), []
        try:
            yield
        finally:
            self._read, self._captured = saved_read, saved_captured

    def _plain_head(self) -> bool:
        """Whether the model's logits are its output layer's, untouched: checked once on a probe sentence.

        Some models change them after the layer (Gemma 2 caps them with a tanh, BART adds a bias
        of its own); for those, ``token_log_probs`` takes the logits the model returns.
        """
        if self._head_plain is None:
            probe = self.build_batch([self.encode_prompt(Template("[X] is a [Y] ."))], ["Paris"])
            saved, self.autocast = self.autocast, False
            try:
                with torch.no_grad():
                    logits = self.blank_logits(probe)
                    head = self.model.get_output_embeddings()
                    mine = nn.functional.linear(self._hidden_at(probe, probe.read_index, None)[:, 0], head.weight, head.bias)
            finally:
                self.autocast = saved
            self._head_plain = bool(torch.allclose(mine.float(), logits, atol=1e-4, rtol=1e-4))
        return self._head_plain

    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype forward passes autocast to, or None for the model's own (see ``self.autocast``)."""
        if self.autocast is None:
            on = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        else:
            on = self.autocast
        return torch.bfloat16 if on else None

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """The precision the library's forward passes run in; a by-hand pass in it compares like with like."""
        dtype = self.autocast_dtype()
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def _reading(self, read_index: torch.Tensor) -> Iterator[None]:
        self._read = read_index
        try:
            yield
        finally:
            self._read = None

    @contextlib.contextmanager
    def _unpadded(self, attention_mask: torch.Tensor) -> Iterator[None]:
        mask = attention_mask.reshape(-1).bool()
        kept = int(mask.sum())
        if self.unpad and mask.numel() - kept >= self.unpad_min_padding * mask.numel():
            B, S = attention_mask.shape
            self._kept = (B, S, mask.nonzero().squeeze(1))
        try:
            yield
        finally:
            self._kept = None
            self._packed_modules.clear()

    @contextlib.contextmanager
    def _perturbed(self, perturbation: Perturbation | None, batch: ClozeBatch) -> Iterator[None]:
        self._active = None if perturbation is None else (perturbation, batch)
        try:
            yield
        finally:
            self._active = None

    def embedding_output(self, token_ids: torch.Tensor) -> torch.Tensor:
        """What row 0 perturbs: the embedding module's output (Gemma scales it by sqrt(hidden))."""
        module = self.hooked_rows[0][0][0]
        with torch.no_grad():
            return module(token_ids.to(self.device)).float()


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS]/[SEP], <s>/</s>, <bos>)."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise ValueError(f"cannot locate the text inside the tokenizer's special tokens: {full} vs {bare}")


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of a single-stack model: the longest ModuleList of blocks."""
    best: nn.ModuleList | None = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and not isinstance(module[0], (nn.Linear, nn.Embedding)):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return best


def _context_length(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return min(value - _unused_positions(model), 4096)
    return 512


def _unused_positions(model: nn.Module) -> int:
    """Rows of the position table no token can reach.

    RoBERTa-style models number positions from pad_token_id + 1 and give their position table a
    padding row (roberta-base: 514 rows, 512 tokens); counting those rows as context would overflow it.
    """
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return module.padding_idx + 1
    return 0
