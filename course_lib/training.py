"""Tuning soft prompts (and mixtures of them) on the log-loss of the gold object, model frozen.

One loop serves every rung of the paper's ladder: K = 1 or many prompts, depth 0 or all layers,
template or random initialisation. Each epoch ends with a checkpoint (safetensors: tensors plus
JSON metadata, written atomically), so a killed run resumes where it stopped and ends exactly
where an uninterrupted run with the same seed ends.

A checkpoint is resumed only by the run it belongs to: its metadata holds the run's identity
(model and weights, templates, settings, checksums of the training and dev facts and of the
answer space) and a sha256 of every tensor and of the metadata itself, all checked on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cloze import ClozeLM
from .data import Fact, facts_sha256
from .files import atomic_path
from .evaluation import answer_form_template, score_facts
from .mixture import data_dependent_log_weights, m_step_weights, responsibilities
from .soft_prompts import Init, Read, SoftPrompt, calibrate_row_scale, embedding_stats, init_random
from .templates import Template


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupted, truncated, or from another run."""


class CheckpointMismatch(CheckpointError, ValueError):
    """A sound checkpoint written by another run (other model, templates, settings or data) at the path asked for."""


class NothingToTune(ValueError):
    """No training fact has an object the model can give in one token: there is no loss to descend."""


MAX_SEED = 2**32 - 1


@dataclass
class TuneConfig:
    """Everything that decides a tuning run's result (the seed included)."""

    init: str = Init.TEMPLATE.value
    depth: int | str = 0
    lr: float | None = None  # None: ``default_lr`` of the model being tuned
    epochs: int = 10
    batch_size: int = 16
    patience: int = 3
    seed: int = 0
    data_dependent: bool = False
    learn_weights: bool = True
    read: str = Read.FROZEN.value  # leave the position the answer is read from unperturbed (soft_prompts.Read)
    row_scaling: bool = True  # deep offsets in units of each layer's hidden-state size (soft_prompts.calibrate_row_scale)

    def __post_init__(self) -> None:
        self.init = Init(self.init).value
        self.read = Read(self.read).value
        for name in ("epochs", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TuneConfig.{name} must be at least 1, got {getattr(self, name)!r}")
        # The seed feeds torch.Generator.manual_seed, also as seed * 100003 + epoch: keep that in 64 bits.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"TuneConfig.seed must be a whole number from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TuneConfig.lr must be a positive number or None (the model's default_lr), got {self.lr!r}")


# Training facts whose prompt hidden states set a deep run's row_scale: a few dozen fix each row's
# size to a few percent, and the same facts on a resumed run give the same scale.
ROW_SCALE_FACTS = 64

# Adam moves every coordinate by about the learning rate per step, whatever the gradient's size,
# so a learning rate only means something against the spread of the space it moves in: Gemma
# multiplies its word vectors by sqrt(640), BERT's coordinates spread by a few hundredths.
LR_PER_SPREAD = 0.1


def default_lr(lm: ClozeLM) -> float:
    """``LR_PER_SPREAD`` times the median spread (standard deviation) of the embedding table's coordinates."""
    _, std = embedding_stats(lm)
    return LR_PER_SPREAD * float(std.median())


def resolved(config: TuneConfig, lm: ClozeLM) -> TuneConfig:
    """``config`` with its learning rate made concrete for ``lm`` (what checkpoints and results record)."""
    return config if config.lr is not None else replace(config, lr=default_lr(lm))


@dataclass
class TuneResult:
    soft: SoftPrompt
    log_weights: torch.Tensor
    config: TuneConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_dev_p1: float = math.nan
    resumed_from: int | None = None


def gold_log_probs(lm: ClozeLM, soft: SoftPrompt, subjects: Sequence[str], gold: torch.Tensor, prompts: Sequence[int], data_dependent: bool = False):
    """[B, K] log p_k(gold | subject) under each prompt (and [B, K] subject log-likelihoods or None)."""
    K = len(prompts)
    batch = soft.batch(lm, [s for s in subjects for _ in prompts], [k for _ in subjects for k in prompts])
    targets = gold[:, None].expand(-1, K).reshape(-1)
    logp = lm.token_log_probs(batch, batch.read_index, targets, soft.perturbation).view(len(subjects), K)
    subject_ll = lm.subject_log_likelihood(batch, soft.perturbation).view(len(subjects), K) if data_dependent else None
    return logp, subject_ll


def _accumulate_gradients(lm: ClozeLM, soft: SoftPrompt, subjects: Sequence[str], gold: torch.Tensor,
                          log_weights: torch.Tensor, data_dependent: bool, chunk: int) -> tuple[float, torch.Tensor]:
    """Backpropagate the batch's responsibility-weighted log-loss, ``chunk`` facts per forward pass.

    Chunks add up to exactly the whole batch's gradient (each is scaled by its share of the
    batch), so a smaller chunk after an out-of-memory error changes memory, not results.
    Returns the batch's mean loss and its responsibilities [B, K].
    """
    K, B = len(soft.prompts), len(subjects)
    total, resps = 0.0, []
    for lo in range(0, B, chunk):
        logp, subject_ll = gold_log_probs(lm, soft, subjects[lo : lo + chunk], gold[lo : lo + chunk], list(range(K)), data_dependent)
        prior = log_weights[None, :].to(logp.device)
        if subject_ll is not None:
            prior = data_dependent_log_weights(prior, subject_ll.detach())
        r = responsibilities(prior, logp.detach()) if K > 1 else torch.ones_like(logp)
        loss = -(r * logp).sum() / B
        if not torch.isfinite(loss):
            return math.nan, r.detach()
        loss.backward()
        total += loss.item()
        resps.append(r.detach())
    return total, torch.cat(resps)


def _mask_sha256(allowed: torch.Tensor | None) -> str | None:
    return None if allowed is None else tensor_sha256(allowed.to(torch.uint8))


def _identity(lm: ClozeLM, templates: Sequence[Template], config: TuneConfig, train_facts: Sequence[Fact],
              dev_facts: Sequence[Fact], allowed: torch.Tensor | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: model name and weights, templates, the result-deciding
    config, the training and dev facts and the answer space (as checksums), and the caller's ``extra`` fields."""
    cfg = asdict(config)
    cfg.pop("epochs")  # more epochs may be asked of a finished run
    return {"model": lm.name, "revision": lm.revision, "templates": [t.text for t in templates], "config": cfg,
            "train_facts": facts_sha256(train_facts), "dev_facts": facts_sha256(dev_facts),
            "allowed_answers": _mask_sha256(allowed), **(extra or {})}


# Version 2 added the tensor and metadata checksums and the data in the identity; version-1 files
# cannot be verified.
CHECKPOINT_FORMAT = 2
_CHECKPOINT_TENSORS = ("offsets", "log_weights", "best.offsets", "best.log_weights")
_CHECKPOINT_FIELDS = ("epoch", "history", "best_epoch", "best_dev_p1", "tensor_sha256")


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: one flipped bit changes it."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically (a kill during the write leaves the previous checkpoint intact), with checksums."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    sums = {k: tensor_sha256(v) for k, v in sorted(tensors.items())}
    meta = {**meta, "format": CHECKPOINT_FORMAT, "tensor_sha256": sums}
    text = json.dumps(meta)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"meta": text,
                                                   "meta_sha256": hashlib.sha256(text.encode()).hexdigest()})
        except SafetensorError as err:
            # safetensors reports a full disk or a read-only file system as its own error: made an
            # OSError again, so that callers (and the command line) treat it as the environment problem it is.
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a checkpoint, verified against the checksums stored with them.

    A file written before checksums existed (no ``format`` in its metadata) is returned as it is,
    with ``meta["format"] == 1``: it can be read, not trusted.
    """
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            stored = fh.metadata() or {}
        text = stored["meta"]
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise ValueError("the metadata is not a JSON object")
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable course_lib checkpoint ({type(err).__name__}: {err}); delete it to start over") from None
    if "format" not in meta:
        return tensors, {**meta, "format": 1}
    if stored.get("meta_sha256") != hashlib.sha256(text.encode()).hexdigest():
        raise CheckpointError(f"{path}: its metadata does not match the checksum stored with it (a damaged or edited "
                              "file); delete it to start over")
    sums = meta.get("tensor_sha256")
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise CheckpointError(f"{path}: the tensors ({', '.join(sorted(tensors))}) are not the ones its metadata "
                              f"lists ({', '.join(sorted(sums or {}))}); delete it to start over")
    bad = [k for k in sorted(tensors) if tensor_sha256(tensors[k]) != sums[k]]
    if bad:
        raise CheckpointError(f"{path}: tensor {', '.join(repr(k) for k in bad)} does not match the checksum stored "
                              "with it (the file is damaged); delete it to start over")
    return tensors, meta


def _optimizer_tensors(opt: torch.optim.Adam) -> dict[str, torch.Tensor]:
    state = opt.state_dict()["state"].get(0)
    if not state:
        return {}
    # Copies, not views: Adam updates step and moments in place, and the snapshot taken at an
    # epoch's start must still hold that state when a NaN epoch is rolled back.
    return {"adam.step": torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).clone(),
            "adam.exp_avg": state["exp_avg"].clone(), "adam.exp_avg_sq": state["exp_avg_sq"].clone()}


def _restore_optimizer(opt: torch.optim.Adam, tensors: dict[str, torch.Tensor]) -> None:
    if "adam.step" not in tensors:
        return
    state = opt.state_dict()
    device = opt.param_groups[0]["params"][0].device
    state["state"][0] = {"step": tensors["adam.step"].reshape(()).clone(),
                         "exp_avg": tensors["adam.exp_avg"].to(device), "exp_avg_sq": tensors["adam.exp_avg_sq"].to(device)}
    opt.load_state_dict(state)


def tune(
    lm: ClozeLM,
    templates: Sequence[Template],
    train_facts: Sequence[Fact],
    dev_facts: Sequence[Fact],
    config: TuneConfig | None = None,
    *,
    allowed: torch.Tensor | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    identity: dict[str, Any] | None = None,
) -> TuneResult:
    """Tune offsets (and mixture weights by EM) for ``templates``; keep the best state on dev P@1.

    ``checkpoint`` names a .safetensors file: written at each epoch's end, resumed from if present
    and written by the same run (else ``CheckpointMismatch`` names what differs). ``identity`` adds
    fields to the run's identity, under the caller's names (e.g. ``max_train``), so that a mismatch
    is reported in the terms the caller used. ``stop_after_epoch`` ends the run early, as an
    interruption would (for tests and the book).
    """
    config = resolved(config or TuneConfig(), lm)
    templates = [t for t in templates if lm.covers(t)]
    if not templates:
        raise ValueError(f"none of the templates can be answered by {lm.name} (a causal LM needs [X] before [Y])")
    soft = SoftPrompt(lm, templates, config.depth, read=config.read)
    K = len(templates)
    if Init(config.init) is Init.RANDOM:
        init_random(soft, lm, torch.Generator().manual_seed(config.seed))
    log_weights = torch.full((K,), -math.log(K))
    form = answer_form_template(lm, soft.prompts)
    pairs = [(f.subject, lm.answer_id(f.object, form)) for f in train_facts]
    pairs = [(s, g) for s, g in pairs if g is not None]
    if not pairs:
        raise NothingToTune("no training fact has a single-token object for this model: nothing to tune on")
    if soft.depth > 0 and config.row_scaling:
        calibrate_row_scale(lm, soft, [s for s, _ in pairs[:ROW_SCALE_FACTS]])
    opt = torch.optim.Adam(soft.parameters(), lr=config.lr)
    result = TuneResult(soft, log_weights, config)
    best = {"offsets": soft.offsets.detach().clone(), "log_weights": log_weights.clone()}
    start_epoch = 0
    path = Path(checkpoint) if checkpoint is not None else None
    identity = _identity(lm, templates, config, train_facts, dev_facts, allowed, identity)
    if path is not None and path.exists():
        tensors, meta = load_checkpoint(path)
    if path is not None and path.exists() and meta["format"] < CHECKPOINT_FORMAT:
        # Nothing in an old file can be checked (neither its bytes nor its data): not resumed.
        warnings.warn(f"{path}: written by an older course_lib, without checksums or the identity of its data, so it "
                      "cannot be verified; training starts over and replaces it", RuntimeWarning, stacklevel=2)
    elif path is not None and path.exists():
        if meta.get("identity") != identity:
            diff = _difference(meta.get("identity"), identity)
            raise CheckpointMismatch(f"{path} was written for another run ({diff}); use another checkpoint path or "
                                     "delete it")
        # A readable file with the right identity can still lack parts (a hand edit, an older writer):
        # refuse it by name rather than fail on a KeyError halfway through restoring.
        missing = [k for k in _CHECKPOINT_TENSORS if k not in tensors] + [k for k in _CHECKPOINT_FIELDS if k not in meta]
        if missing:
            raise CheckpointError(f"{path}: an incomplete checkpoint (no {', '.join(missing)}); delete it to start over")
        if tensors["offsets"].shape != soft.offsets.shape:
            raise CheckpointError(f"{path}: offsets of shape {tuple(tensors['offsets'].shape)}, expected {tuple(soft.offsets.shape)}")
        with torch.no_grad():
            soft.offsets.copy_(tensors["offsets"])
        log_weights = tensors["log_weights"].clone()
        best = {"offsets": tensors["best.offsets"].to(soft.offsets.device), "log_weights": tensors["best.log_weights"]}
        _restore_optimizer(opt, tensors)
        result.history = meta["history"]
        result.best_epoch, result.best_dev_p1 = meta["best_epoch"], meta["best_dev_p1"]
        start_epoch = meta["epoch"] + 1
        result.resumed_from = meta["epoch"]
    stale = sum(1 for h in result.history if h["epoch"] > result.best_epoch)
    chunk = config.batch_size  # facts per forward pass; halved on out-of-memory errors
    for epoch in range(start_epoch, config.epochs):
        if stale >= config.patience:
            break
        t0 = time.perf_counter()
        snapshot = (soft.offsets.detach().clone(), _optimizer_tensors(opt), log_weights.clone())
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch)).tolist()
        resp_sum = torch.zeros(K)
        seen, loss_sum, nan = 0, 0.0, False
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for start in bar:
            idx = order[start : start + config.batch_size]
            subjects = [pairs[i][0] for i in idx]
            gold = torch.tensor([pairs[i][1] for i in idx])
            opt.zero_grad(set_to_none=True)
            while True:
                try:
                    loss, r = _accumulate_gradients(lm, soft, subjects, gold, log_weights, config.data_dependent, chunk)
                    break
                except torch.OutOfMemoryError as err:
                    if chunk == 1:
                        raise torch.OutOfMemoryError(
                            f"out of memory on {lm.device} even with 1 training fact per forward pass ({K} prompts, "
                            f"depth {config.depth}), so a smaller batch_size cannot help: use another device "
                            "(device='cpu', --device cpu), fewer templates or a smaller model") from err
                    opt.zero_grad(set_to_none=True)
                    chunk = max(1, chunk // 2)
                    warnings.warn(f"out of memory on {lm.device}: processing each batch of {config.batch_size} in "
                                  f"pieces of {chunk} (same gradients; pass a smaller batch_size to avoid this)",
                                  RuntimeWarning, stacklevel=2)
                    if lm.device.type == "cuda":
                        torch.cuda.empty_cache()
            if not math.isfinite(loss):
                nan = True
                break
            opt.step()
            resp_sum += r.sum(0).cpu()
            seen += len(idx)
            loss_sum += loss * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        if nan:
            with torch.no_grad():
                soft.offsets.copy_(snapshot[0])
            _restore_optimizer(opt, snapshot[1])
            log_weights = snapshot[2]
            warnings.warn(f"epoch {epoch + 1}: the loss became NaN or infinite; the epoch was stopped and the state "
                          "from its start restored (try a smaller learning rate)", RuntimeWarning, stacklevel=2)
        elif K > 1 and config.learn_weights:
            log_weights = m_step_weights(resp_sum, seen)
        scored = score_facts(lm, templates, dev_facts, log_weights=log_weights, perturbation=soft.perturbation,
                             allowed=allowed, data_dependent=config.data_dependent, batch_size=config.batch_size * 2)
        dev_p1 = scored.metrics()["p_at_1"]
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "dev_p_at_1": dev_p1,
                  "dev_kept": scored.kept, "nan": nan, "seconds": time.perf_counter() - t0}
        result.history.append(record)
        if dev_p1 > result.best_dev_p1 or math.isnan(result.best_dev_p1):
            result.best_epoch, result.best_dev_p1 = epoch, dev_p1
            best = {"offsets": soft.offsets.detach().clone(), "log_weights": log_weights.clone()}
            stale = 0
        else:
            stale += 1
        if path is not None:
            meta = {"identity": identity, "epoch": epoch, "history": result.history,
                    "best_epoch": result.best_epoch, "best_dev_p1": result.best_dev_p1}
            save_checkpoint(path, {"offsets": soft.offsets, "log_weights": log_weights, "best.offsets": best["offsets"],
                                   "best.log_weights": best["log_weights"], **_optimizer_tensors(opt)}, meta)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    with torch.no_grad():
        soft.offsets.copy_(best["offsets"])
    result.log_weights = best["log_weights"]
    return result


def _difference(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "no run identity stored"
    from .results import describe_differences

    diffs = describe_differences(old, new, then="in the checkpoint")
    return "differs in " + diffs if diffs else "unknown difference"
