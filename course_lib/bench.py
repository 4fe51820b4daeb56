"""Benchmarks: how fast course_lib evaluates and trains, side by side with the obvious baselines.

Five benchmarks, each a function that returns a dict of raw numbers and prints a short table:

1. ``eval_throughput``: facts/s for P@1 with ``evaluation.score_facts`` against a naive loop (one
   forward pass per fact, logits at every position) and, for masked LMs, transformers'
   ``pipeline("fill-mask")``; plus the share of the machine's fp32 matmul peak that ours reaches
   counting useful FLOPs only, and where its time goes (attention, MLP, vocabulary projection,
   Python);
2. ``train_step``: one prompt-tuning step (``training.gold_log_probs`` + Adam, as in ``tune``)
   against Hugging Face PEFT's prompt tuning, in steps/s and peak memory, one subprocess each;
   also ours with the padded positions computed (``ClozeLM.unpad`` off), to show what skipping them gains;
3. ``mixtures``: time per epoch for K prompts trained together, against K times one prompt's;
4. ``depth``: time per step from a soft prompt (depth 0) to a deep perturbation (every layer);
5. ``scale``: facts/s and peak memory of evaluation at several batch sizes.

Timings on a shared machine drift by large factors from minute to minute, so a baseline is always
measured in the same run as ours, its repeats interleaved with ours, after warm-up; the tables
give medians and their ratios, and the ratios are what to read. ``run_all`` runs everything and
writes a markdown report, a PNG and the raw numbers as JSON (``python -m course_lib bench``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cloze import ClozeLM, Family
from .data import Fact, load_facts, load_prompts
from .evaluation import SCORING_BATCH, answer_form_template, score_facts
from .files import write_text
from .mixture import m_step_weights, responsibilities
from .models import DEFAULT_MODEL, choose_device, load_model
from .soft_prompts import SoftPrompt, resolve_depth
from .templates import Template
from .training import gold_log_probs

DATASET = "trex_original"
DEFAULT_RELATION = "P36"  # capital of: 703 test facts, 30 LPAQA paraphrases all with [X] before [Y], and Gemma knows some
MASKED_STANDIN = "bert-base-random"  # BERT-base shape, random weights, the tiny-bert tokenizer: no hub needed
MIXTURE_PROMPT_SET = "lpaqa-paraphrase"  # LPAQA's mined sets stop at 29 templates a relation; these reach 30
_RESULT_MARKER = "BENCH_RESULT "

# Sizes for the full run and the smoke run (--quick).
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(repeats=3, warmup=1, matmul_sizes=(1024, 2048), eval_facts=256, eval_batch=SCORING_BATCH,
                 train_batch=16, train_steps=5, mix_ks=(1, 5, 10, 30), mix_facts=16, mix_batch=16,
                 depths=(0, 1, 6, 12, "all"), depth_batch=16, scale_sizes=(1, 4, 16, 64, 256), scale_facts=128),
    "quick": dict(repeats=2, warmup=1, matmul_sizes=(1024, 2048), eval_facts=16, eval_batch=SCORING_BATCH,
                  train_batch=16, train_steps=2, mix_ks=(1, 5, 10, 30), mix_facts=2, mix_batch=2,
                  mix_warmup=0, depths=(0, 1, 6, 12, "all"), depth_batch=4, scale_sizes=(1, 4, 16), scale_facts=16),
}

GOALS = {
    "eval_speedup": 5.0,  # ours / naive facts/s on Gemma-3-270M, CPU
    "eval_efficiency": 0.60,  # useful GFLOP/s / matmul peak GFLOP/s
    "train_speedup": 3.0,  # PEFT step time / ours
}
GOAL_MODEL = DEFAULT_MODEL


# ============================================================================ measuring
def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, device: torch.device | None = None,
            warmup_fns: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each function, ``repeats`` times, after ``warmup`` untimed calls each.

    The functions take turns within each repeat (ours, baseline, ours, baseline, ...), so a slow
    minute on a shared machine slows every variant alike instead of whichever ran then.
    ``warmup_fns`` replaces a function by a cheaper one for the warm-up (a slow loop warms up on a
    few items as well as on all of them).
    """
    for _ in range(warmup):
        for name, fn in fns.items():
            (warmup_fns or {}).get(name, fn)()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if len(xs) else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


class MemoryMeter:
    """Peak memory since the last ``reset``: RSS on CPU (Linux: VmHWM, reset via clear_refs), CUDA allocator on GPU."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kind = "peak CUDA memory allocated" if self.device.type == "cuda" else "peak RSS"
        self.resettable = self.device.type == "cuda"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak RSS to the current RSS
                fh.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False  # then peak_mib is the process's peak so far

    def current_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        status = _proc_status()
        if "VmRSS" in status:
            return status["VmRSS"]
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except ImportError:
            return math.nan

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        status = _proc_status()
        if self.resettable and "VmHWM" in status:
            return status["VmHWM"]
        return max_rss_mib()


def _proc_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MiB (empty where /proc is missing)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    return out


def max_rss_mib() -> float:
    """The process's peak RSS since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    device = device or choose_device()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_peak(sizes: Sequence[int] = (1024, 2048), repeats: int = 3, device: torch.device | None = None) -> dict[str, Any]:
    """The machine's fp32 matmul rate now: GFLOP/s of torch.matmul on square matrices (median of all)."""
    device = device or choose_device()
    samples: dict[int, list[float]] = {}
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        times = measure({"mm": lambda: torch.matmul(a, b)}, repeats=repeats, warmup=1, device=device)["mm"]
        samples[n] = [2 * n**3 / t / 1e9 for t in times]
    flat = [x for xs in samples.values() for x in xs]
    return {"gflops": median(flat), "samples": {str(n): xs for n, xs in samples.items()}}


def _merge_peaks(*peaks: dict[str, Any]) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    for p in peaks:
        for n, xs in p["samples"].items():
            samples.setdefault(n, []).extend(xs)
    flat = [x for xs in samples.values() for x in xs]
    return {"gflops": median(flat), "samples": samples}


# ============================================================================ models and facts
def load_bench_model(name: str = DEFAULT_MODEL, device: str | None = None) -> ClozeLM:
    """A registered model, or ``bert-base-random``: BertForMaskedLM(BertConfig()) with random
    weights and the tiny-bert tokenizer, a stand-in for BERT-base where the hub is out of reach."""
    if name != MASKED_STANDIN:
        return load_model(name, device=device)
    import transformers

    from .testing import tiny_model

    _, tokenizer = tiny_model("tiny-bert")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BertForMaskedLM(transformers.BertConfig(attn_implementation="sdpa"))
    model.to(choose_device(device))
    return ClozeLM(model, tokenizer, Family.MASKED, name=MASKED_STANDIN, revision="random weights, seed 0")


def first_template(lm: ClozeLM, relation: str = DEFAULT_RELATION, dataset: str = DATASET) -> Template:
    """LAMA's manual template of the relation (it must be one the model can answer)."""
    template = load_prompts("lama", dataset, relation)[0]
    if not lm.covers(template):
        raise ValueError(f"{relation}'s LAMA template {template.text!r} puts the blank before the subject: "
                         f"{lm.name} cannot answer it; pick another relation")
    return template


def bench_facts(lm: ClozeLM, template: Template, n: int, relation: str = DEFAULT_RELATION, dataset: str = DATASET,
                splits: Sequence[str] = ("test", "dev", "train")) -> tuple[list[Fact], int]:
    """``n`` facts of the relation whose object is one token (so that every variant scores them all).

    A tiny test tokenizer spells few real objects as one token; the other facts then get a one-token
    object (the subject and hence the token count stay real). Returns (facts, how many were remapped).
    Facts repeat if the relation has fewer than ``n``.
    """
    pool = [f for s in splits for f in load_facts(dataset, relation, s)]
    good = [f for f in pool if lm.answer_id(f.object, template) is not None]
    remapped = 0
    if len(good) < n:
        from .testing import SINGLE_TOKEN_WORDS

        words = [w for w in SINGLE_TOKEN_WORDS if lm.answer_id(w, template) is not None]
        if not words:
            raise ValueError(f"{lm.name}: no one-token object to benchmark with")
        rest = [f for f in pool if lm.answer_id(f.object, template) is None]
        extra = [Fact(f.subject, words[i % len(words)]) for i, f in enumerate(rest[: n - len(good)])]
        remapped = len(extra)
        good += extra
    while len(good) < n:
        good += good[: n - len(good)]
    return good[:n], remapped


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the token/position embeddings and the output (vocabulary) projection."""
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False)}
    out = model.get_output_embeddings()
    if out is not None:
        skip |= {id(p) for p in out.parameters(recurse=False)}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def useful_flops(lm: ClozeLM, template: Template, facts: Sequence[Fact]) -> tuple[float, int]:
    """(FLOPs, real tokens): 2 x non-embedding params x real tokens + 2 x hidden x vocab per fact.

    Real tokens: the unpadded tokens ours feeds the model (a causal LM's input stops at the blank).
    Attention's own FLOPs, padding and logits nobody reads are not counted: this is work any
    implementation must do, so FLOPs / time measures how close to the machine's peak it gets.
    """
    batch = lm.build_batch([lm.encode_prompt(template)], [f.subject for f in facts])
    # BART: every token goes through the encoder and the decoder, whose parameters together make
    # non_embedding_params, so the same formula holds.
    tokens = int(batch.attention_mask.sum())
    flops = 2.0 * non_embedding_params(lm.model) * tokens + 2.0 * lm.hidden_size * lm.vocab_size * len(facts)
    return flops, tokens


# ============================================================================ baselines
def _masked_text(lm: ClozeLM, template: Template, subject: str) -> str:
    return template.fill(subject, lm.tokenizer.mask_token)


def _causal_prefix(template: Template, subject: str) -> str:
    return template.text[: template.text.index("[Y]")].rstrip().replace("[X]", subject)


@torch.no_grad()
def naive_p_at_1(lm: ClozeLM, template: Template, facts: Sequence[Fact]) -> float:
    """The obvious loop: tokenize one sentence, run the stock model (logits at every position), read the blank."""
    model, tok, device = lm.model, lm.tokenizer, lm.device
    hits = 0
    for f in facts:
        gold = lm.answer_id(f.object, template)
        if lm.family is Family.CAUSAL:
            enc = tok(_causal_prefix(template, f.subject), return_tensors="pt").to(device)
            logits = model(**enc, use_cache=False).logits[0]  # [S, V]
            row = logits[-1]
        else:
            enc = tok(_masked_text(lm, template, f.subject), return_tensors="pt").to(device)
            ids = enc["input_ids"]
            where = int((ids[0] == tok.mask_token_id).nonzero()[0, 0])
            kwargs = dict(enc)
            if lm.family is Family.SEQ2SEQ:
                start = torch.full((1, 1), lm.model.config.decoder_start_token_id, device=device)
                kwargs["decoder_input_ids"] = torch.cat([start, ids[:, :-1]], dim=1)
            logits = model(**kwargs, use_cache=False).logits[0]
            row = logits[where]
        hits += int(int(torch.log_softmax(row.float(), dim=-1).argmax()) == gold)
    return hits / max(len(facts), 1)


def pipeline_p_at_1(lm: ClozeLM, template: Template, facts: Sequence[Fact], batch_size: int, pipe=None) -> float:
    """transformers' fill-mask pipeline, top-1, batched (masked LMs only)."""
    pipe = pipe or make_pipeline(lm)
    texts = [_masked_text(lm, template, f.subject) for f in facts]
    with _quiet_transformers():
        outputs = pipe(texts, batch_size=batch_size, top_k=1)
    hits = 0
    for f, out in zip(facts, outputs):
        best = out[0] if isinstance(out, list) else out
        hits += int(best["token"] == lm.answer_id(f.object, template))
    return hits / max(len(facts), 1)


def make_pipeline(lm: ClozeLM):
    from transformers import pipeline

    with _quiet_transformers():
        return pipeline("fill-mask", model=lm.model, tokenizer=lm.tokenizer, device=lm.device)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' advice ("use a dataset for efficiency" and the like) for the block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


# ============================================================================ where the time goes
_CATEGORY_WORDS = (
    ("attention", ("attn", "attention")),
    ("MLP", ("mlp", "intermediate", "ffn", "fc1", "fc2", "feed_forward")),
    ("norms", ("norm", "ln_")),
)


def _category(child_name: str) -> str:
    name = child_name.lower()
    if name == "output":  # BERT's BertOutput: the MLP's second matrix (plus its LayerNorm)
        return "MLP"
    for category, words in _CATEGORY_WORDS:
        if any(w in name for w in words):
            return category
    return "other in layers"


@contextlib.contextmanager
def module_timer(lm: ClozeLM):
    """Wall seconds spent in each kind of module while the block runs (forward hooks; CPU or synced GPU)."""
    totals: dict[str, float] = {}
    started: dict[int, float] = {}
    device = lm.device
    watched: list[tuple[torch.nn.Module, str]] = [(lm.model, "model forward"), (lm.model.get_output_embeddings(), "vocabulary projection")]
    for row in lm.hooked_rows:
        for module, _ in row:
            if isinstance(module, torch.nn.Embedding) or module is lm.model.get_input_embeddings():
                watched.append((module, "embeddings"))
            else:
                watched.append((module, "layers"))
                watched += [(child, _category(name)) for name, child in module.named_children()]
    handles = []

    def pre(module, args):
        _sync(device)
        started[id(module)] = time.perf_counter()

    def post_for(category):
        def post(module, args, output):
            _sync(device)
            totals[category] = totals.get(category, 0.0) + time.perf_counter() - started.pop(id(module))

        return post

    try:
        for module, category in watched:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post_for(category)))
        yield totals
    finally:
        for h in handles:
            h.remove()


def time_breakdown(lm: ClozeLM, fn: Callable[[], Any]) -> dict[str, float]:
    """Fractions of ``fn``'s wall time by where it went (one untimed-against call, hooks on)."""
    with module_timer(lm) as t:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    inside = {k: t.get(k, 0.0) for k in ("attention", "MLP", "norms", "other in layers")}
    layers = t.get("layers", 0.0)
    forward = t.get("model forward", 0.0)
    parts = {
        **inside,
        "residual adds etc. in layers": max(layers - sum(inside.values()), 0.0),
        "embeddings": t.get("embeddings", 0.0),
        "vocabulary projection": t.get("vocabulary projection", 0.0),
        "rest of the forward (masks, rotary, final norm)": max(forward - layers - t.get("embeddings", 0.0) - t.get("vocabulary projection", 0.0), 0.0),
        "outside the model (tokenization, batching, ranking)": max(total - forward, 0.0),
    }
    return {"total_s": total, "fractions": {k: v / total for k, v in parts.items()}}


# ============================================================================ 1. evaluation throughput
def eval_throughput(lm: ClozeLM, *, relation: str = DEFAULT_RELATION, n_facts: int = 256, batch_size: int = SCORING_BATCH,
                    repeats: int = 3, warmup: int = 1, pipeline: bool | None = None, naive: bool = True,
                    matmul_sizes: Sequence[int] = (1024, 2048), breakdown: bool = True, compile: bool = False,
                    verbose: bool = True) -> dict[str, Any]:
    """Facts/s of P@1 over ``n_facts`` test facts: score_facts vs a naive loop (vs fill-mask pipeline).

    ``compile`` adds ours through ``torch.compile`` (``ClozeLM.compile``); its first call, which
    compiles, is timed apart as ``compile_s``.
    """
    template = first_template(lm, relation)
    facts, remapped = bench_facts(lm, template, n_facts, relation)
    flops, tokens = useful_flops(lm, template, facts)
    pipeline = lm.family is Family.MASKED if pipeline is None else pipeline
    p1: dict[str, float] = {}

    def ours(variant: str = "ours"):
        p1[variant] = score_facts(lm, [template], facts, batch_size=batch_size).metrics()["p_at_1"]

    fns: dict[str, Callable[[], Any]] = {"ours": ours}
    light: dict[str, Callable[[], Any]] = {}
    if naive:
        fns["naive loop"] = lambda: p1.__setitem__("naive loop", naive_p_at_1(lm, template, facts))
        light["naive loop"] = lambda: naive_p_at_1(lm, template, facts[:2])  # one fact at a time: two warm it up
    if pipeline:
        pipe = make_pipeline(lm)
        fns["fill-mask pipeline"] = lambda: p1.__setitem__("fill-mask pipeline", pipeline_p_at_1(lm, template, facts, batch_size, pipe))
    compile_s = None
    if compile:
        lm.compile()
        compiled, lm.compiled = lm.compiled, None  # "ours" stays eager

        def ours_compiled():
            lm.compiled = compiled
            try:
                ours("ours + torch.compile")
            finally:
                lm.compiled = None

        t0 = time.perf_counter()
        ours_compiled()
        compile_s = time.perf_counter() - t0
        fns["ours + torch.compile"] = ours_compiled
    peak_before = matmul_peak(matmul_sizes, repeats=max(2, repeats), device=lm.device)
    times = measure(fns, repeats=repeats, warmup=warmup, device=lm.device, warmup_fns=light)
    peak = _merge_peaks(peak_before, matmul_peak(matmul_sizes, repeats=max(2, repeats), device=lm.device))
    variants = {}
    for name, ts in times.items():
        m = median(ts)
        variants[name] = {"seconds": ts, "median_s": m, "facts_per_s": len(facts) / m, "p_at_1": p1[name],
                          "useful_gflops_per_s": flops / m / 1e9, "share_of_matmul_peak": flops / m / 1e9 / peak["gflops"]}
    result = {
        "benchmark": "eval_throughput", "model": lm.name, "family": lm.family.value, "relation": relation,
        "template": template.text, "facts": len(facts), "objects_remapped": remapped, "batch_size": batch_size,
        "repeats": repeats, "warmup": warmup, "real_tokens": tokens, "useful_gflop": flops / 1e9,
        "non_embedding_params": non_embedding_params(lm.model), "hidden": lm.hidden_size, "vocab": lm.vocab_size,
        "matmul_peak": peak, "variants": variants,
        "ratios": {f"ours / {name}": _ratio(variants["ours"]["facts_per_s"], v["facts_per_s"]) for name, v in variants.items() if name != "ours"},
        "threads": torch.get_num_threads(), "load_average": _loadavg(),
    }
    if compile_s is not None:
        result["compile_s"] = compile_s
    if breakdown:
        result["breakdown"] = time_breakdown(lm, ours)
    result["goals"] = _eval_goals(result)
    result["table"] = _eval_table(result)
    if verbose:
        print(render(result))
    return result


def _eval_goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    applies = r["model"] == GOAL_MODEL and _on_cpu()
    goals = []
    if "ours / naive loop" in r["ratios"]:
        x = r["ratios"]["ours / naive loop"]
        goals.append({"goal": f"ours >= {GOALS['eval_speedup']:g}x the naive loop", "value": x, "met": x >= GOALS["eval_speedup"], "applies": applies})
    s = r["variants"]["ours"]["share_of_matmul_peak"]
    goals.append({"goal": f"ours >= {GOALS['eval_efficiency']:.0%} of the fp32 matmul peak (useful FLOPs)", "value": s,
                  "met": s >= GOALS["eval_efficiency"], "applies": applies})
    return goals


def _eval_table(r: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for name, v in r["variants"].items():
        ratio = 1.0 if name == "ours" else r["ratios"][f"ours / {name}"]
        rows.append([name, f"{v['median_s']:.3f}", f"{v['facts_per_s']:.1f}", f"{ratio:.2f}x" if name != "ours" else "",
                     f"{v['useful_gflops_per_s']:.3g}", f"{v['share_of_matmul_peak']:.1%}", f"{v['p_at_1']:.3f}"])
    return {"title": f"Evaluation throughput: {r['model']}, {r['facts']} facts of {r['relation']}, batch {r['batch_size']} "
                     f"(matmul peak {r['matmul_peak']['gflops']:.1f} GFLOP/s)",
            "headers": ["variant", "median s", "facts/s", "ours is faster by", "useful GFLOP/s", "of peak", "P@1"], "rows": rows}


def _on_cpu() -> bool:
    return choose_device().type == "cpu"


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ============================================================================ 2. training step
def train_step(model: str = DEFAULT_MODEL, *, relation: str = DEFAULT_RELATION, batch_size: int = 16, steps: int = 5,
               warmup: int = 1, lr: float = 3e-3, variants: Sequence[str] = ("ours", "ours-padded", "peft"), verbose: bool = True) -> dict[str, Any]:
    """One prompt-tuning step, ours vs PEFT prompt tuning, each variant in its own worker process.

    PEFT rewires the model it wraps, and peak memory must be each variant's own: hence one process
    per variant. Both stay alive while the parent has them take turns (a step of ours, a step of
    PEFT, ...), so a change in the machine's load hits both alike. Each reports its step times and
    its peak memory during the steps, counted from after the model was loaded and paged in.
    """
    if _family_of(model) is not Family.CAUSAL:
        variants = [v for v in variants if v != "peft"]  # PEFT's CAUSAL_LM prompt tuning needs a causal LM
    workers = {}
    try:
        for v in variants:  # start all first: the model loads overlap
            workers[v] = start_worker(dict(task="train_step", variant=v, model=model, relation=relation, batch_size=batch_size,
                                           lr=lr, threads=torch.get_num_threads()))
        for v in variants:
            workers[v].call("ready")
        for _ in range(warmup):
            for v in variants:
                workers[v].call("warmup")
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(steps):
            for v in variants:
                times[v].append(float(workers[v].call("step")))
        raw = {v: workers[v].call("report") for v in variants}
    finally:
        for w in workers.values():
            w.close()
    out: dict[str, Any] = {}
    for v in variants:
        r = raw[v]
        out[v] = {"step_s": times[v], "median_s": median(times[v]), "steps_per_s": 1 / median(times[v]), **r}
    first = out[variants[0]]
    result = {"benchmark": "train_step", "model": model, "relation": relation, "batch_size": batch_size, "steps": steps,
              "warmup": warmup, "lr": lr, "variants": out, "prompt_tokens": first["prompt_tokens"], "threads": first["threads"],
              "load_average": _loadavg(), "ratios": {}, "goals": []}
    if "peft" in out and "ours" in out:
        ours, peft = out["ours"], out["peft"]
        result["ratios"] = {"peft / ours step time": _ratio(peft["median_s"], ours["median_s"]),
                            "peft / ours peak memory of the steps": _ratio(peft["step_peak_mib"], ours["step_peak_mib"])}
        applies = model == GOAL_MODEL and _on_cpu()
        x = result["ratios"]["peft / ours step time"]
        result["goals"] = [
            {"goal": f"ours >= {GOALS['train_speedup']:g}x faster per step than PEFT", "value": x, "met": x >= GOALS["train_speedup"], "applies": applies},
            {"goal": "ours uses no more memory than PEFT (process peak, MiB ours minus PEFT)", "value": ours["peak_mib"] - peft["peak_mib"],
             "met": ours["peak_mib"] <= peft["peak_mib"], "applies": applies},
        ]
    if "ours-padded" in out and "ours" in out:
        result["ratios"]["ours-padded / ours step time"] = _ratio(out["ours-padded"]["median_s"], out["ours"]["median_s"])
    rows = []
    for v, d in out.items():
        speed = f"{_ratio(d['median_s'], out['ours']['median_s']):.2f}x" if v != "ours" and "ours" in out else ""
        rows.append([v, f"{d['median_s']:.3f}", f"{d['steps_per_s']:.3f}", speed, f"{d['rss_after_load_mib']:.0f}",
                     f"{d['peak_mib']:.0f}", f"{d['step_peak_mib']:.0f}", d["tokens_per_batch"]])
    result["table"] = {"title": f"Prompt-tuning step: {model}, batch {batch_size}, {result['prompt_tokens']} tuned prompt tokens "
                                f"(PEFT: as many virtual tokens), steps interleaved",
                       "headers": ["variant", "median s/step", "steps/s", "ours is faster by", "MiB after load",
                                   f"{first['memory_kind']} MiB", "of which the steps", "tokens/batch (padded)"], "rows": rows}
    if verbose:
        print(render(result))
    return result


def _family_of(model: str) -> Family:
    if model == MASKED_STANDIN:
        return Family.MASKED
    from .models import spec

    return spec(model).family


# ---------------------------------------------------------------------------- worker processes
class WorkerProcess:
    """A ``python -m course_lib.bench --serve SPEC`` child answering one command per line on stdin."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import tempfile

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.spec = spec
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child cannot block on it
        self.proc = subprocess.Popen([sys.executable, "-m", "course_lib.bench", "--serve", json.dumps(spec)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)

    def call(self, command: str) -> Any:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died; reading below reports why
        for line in self.proc.stdout:  # other output (a library's print) is skipped
            if line.startswith(_RESULT_MARKER):
                return json.loads(line[len(_RESULT_MARKER):])
        self.proc.wait(timeout=60)
        self._stderr.seek(0)
        raise RuntimeError(f"benchmark worker {self.spec} died on {command!r} (exit {self.proc.returncode}):\n{self._stderr.read()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


class InProcessWorker:
    """The same protocol without a process (tests; memory numbers then include everything else)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.server = _server(spec)

    def call(self, command: str) -> Any:
        return json.loads(json.dumps(self.server(command)))  # the same JSON round trip as the pipe

    def close(self) -> None:
        pass


def start_worker(spec: dict[str, Any]) -> WorkerProcess | InProcessWorker:
    return WorkerProcess(spec)


def run_worker(spec: dict[str, Any]) -> Any:
    """A one-command worker: start it, ``run``, stop it."""
    worker = start_worker(spec)
    try:
        return worker.call("run")
    finally:
        worker.close()


def _serve(spec: dict[str, Any]) -> None:
    """The child's loop: set up for ``spec``, then answer each command on stdin with one result line."""
    handle = _server(spec)
    for line in sys.stdin:
        command = line.strip()
        if command:
            print(_RESULT_MARKER + json.dumps(handle(command)), flush=True)


def _server(spec: dict[str, Any]) -> Callable[[str], Any]:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))  # the parent's count (torch's default unless a script set --threads)
    lm = load_bench_model(spec["model"])
    if spec["task"] == "scale":
        def handle_scale(command: str) -> Any:
            if command != "run":
                raise ValueError(f"unknown command {command!r}")
            return scale(lm, verbose=False, **spec["kwargs"])

        return handle_scale
    if spec["task"] != "train_step":
        raise ValueError(f"unknown worker task {spec['task']!r}")
    return _train_server(lm, spec)


def _train_server(lm: ClozeLM, spec: dict[str, Any]) -> Callable[[str], Any]:
    _page_in(lm)
    meter = MemoryMeter(lm.device)
    template = first_template(lm, spec["relation"])
    B = spec["batch_size"]
    facts, _ = bench_facts(lm, template, B * 4, spec["relation"], splits=("train", "dev", "test"))
    batches = [facts[i : i + B] for i in range(0, len(facts), B)]  # 4 batches, taken in turn
    T = lm.encode_prompt(template).n_prompt_tokens
    if spec["variant"] in ("ours", "ours-padded"):
        lm.unpad = spec["variant"] == "ours"
        step, tokens = _ours_step(lm, template, spec["lr"])
    elif spec["variant"] == "peft":
        step, tokens = _peft_step(lm, template, T, spec["lr"])
    else:
        raise ValueError(f"unknown variant {spec['variant']!r}")
    rss_load = meter.current_mib()
    meter.reset()
    state = {"i": 0, "loss": math.nan}

    def handle(command: str) -> Any:
        if command == "ready":
            return True
        if command in ("warmup", "step"):
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            _sync(lm.device)
            t0 = time.perf_counter()
            state["loss"] = step(b)
            _sync(lm.device)
            return time.perf_counter() - t0
        if command == "report":
            peak = meter.peak_mib()
            return {"peak_mib": peak, "rss_after_load_mib": rss_load, "step_peak_mib": peak - rss_load, "max_rss_mib": max_rss_mib(),
                    "memory_kind": meter.kind, "prompt_tokens": T, "tokens_per_batch": tokens(batches[0]), "loss": state["loss"],
                    "threads": torch.get_num_threads()}
        raise ValueError(f"unknown command {command!r}")

    return handle


@torch.no_grad()
def _page_in(lm: ClozeLM) -> None:
    """Touch every weight: safetensors maps the file and pages weights in on first use, which would
    otherwise count the model itself as memory of the first step."""
    for p in lm.model.parameters():
        p.sum()


def _gold(lm: ClozeLM, template: Template, facts: Sequence[Fact]) -> torch.Tensor:
    return torch.tensor([lm.answer_id(f.object, template) for f in facts])


def _ours_step(lm: ClozeLM, template: Template, lr: float):
    """training.tune's inner loop for one prompt: gold_log_probs, log-loss, Adam on the offsets."""
    soft = SoftPrompt(lm, [template], 0)
    opt = torch.optim.Adam(soft.parameters(), lr=lr)

    def step(facts: Sequence[Fact]) -> float:
        logp, _ = gold_log_probs(lm, soft, [f.subject for f in facts], _gold(lm, template, facts), [0])
        loss = -logp.sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def tokens(facts: Sequence[Fact]) -> int:
        return int(soft.batch(lm, [f.subject for f in facts], [0] * len(facts)).input_ids.numel())

    return step, tokens


def _peft_step(lm: ClozeLM, template: Template, n_virtual: int, lr: float):
    """PEFT prompt tuning as its docs do it: virtual tokens prepended, labels on the answer, model(..., labels)."""
    import copy

    from peft import PromptTuningConfig, TaskType, get_peft_model

    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.padding_side = "left"  # the answer token goes last in every row
    model = get_peft_model(lm.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = lm.device

    def inputs(facts: Sequence[Fact]):
        enc = tokenizer([_causal_prefix(template, f.subject) for f in facts], return_tensors="pt", padding=True)
        gold = _gold(lm, template, facts)[:, None]
        ids = torch.cat([enc["input_ids"], gold], dim=1)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(gold)], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = gold[:, 0]
        return ids.to(device), mask.to(device), labels.to(device)

    def step(facts: Sequence[Fact]) -> float:
        ids, mask, labels = inputs(facts)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def tokens(facts: Sequence[Fact]) -> int:
        ids, _, _ = inputs(facts)
        return int(ids.shape[0] * (ids.shape[1] + n_virtual))

    model.train(False)
    return step, tokens


# ============================================================================ 3. mixtures
def mixture_templates(lm: ClozeLM, relation: str = DEFAULT_RELATION, prompt_set: str = MIXTURE_PROMPT_SET) -> list[Template]:
    """The relation's templates of the set that the model can answer, LPAQA's weight order (best first)."""
    templates = [t for t in load_prompts(prompt_set, DATASET, relation) if lm.covers(t)]
    if any(t.weight is not None for t in templates):
        templates.sort(key=lambda t: -(t.weight or 0.0))
    return templates


def training_epoch(lm: ClozeLM, templates: Sequence[Template], facts: Sequence[Fact], batch_size: int, lr: float, depth: int | str = 0):
    """(run, n): ``run()`` does one of training.tune's epochs over the n usable facts (no dev
    evaluation, no shuffling): E step, weighted log-loss, Adam, M step."""
    soft = SoftPrompt(lm, templates, depth)
    K = len(templates)
    opt = torch.optim.Adam(soft.parameters(), lr=lr)
    state = {"log_weights": torch.full((K,), -math.log(K))}
    form = answer_form_template(lm, soft.prompts)
    pairs = [(f.subject, lm.answer_id(f.object, form)) for f in facts]
    pairs = [(s, g) for s, g in pairs if g is not None]

    def run() -> None:
        resp_sum, seen = torch.zeros(K), 0
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            logp, _ = gold_log_probs(lm, soft, [s for s, _ in chunk], torch.tensor([g for _, g in chunk]), list(range(K)))
            prior = state["log_weights"][None, :].to(logp.device)
            r = responsibilities(prior, logp.detach()) if K > 1 else torch.ones_like(logp)
            loss = -(r * logp).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            resp_sum += r.detach().sum(0).cpu()
            seen += len(chunk)
        if K > 1:
            state["log_weights"] = m_step_weights(resp_sum, seen)

    return run, len(pairs)


def mixtures(lm: ClozeLM, *, relation: str = DEFAULT_RELATION, prompt_set: str = MIXTURE_PROMPT_SET, ks: Sequence[int] = (1, 5, 10, 30),
             n_facts: int = 16, batch_size: int = 16, repeats: int = 3, warmup: int = 1, lr: float = 3e-3,
             verbose: bool = True) -> dict[str, Any]:
    """Seconds per training epoch with K prompts batched together, against K x one prompt's."""
    templates = mixture_templates(lm, relation, prompt_set)
    usable = [k for k in ks if k <= len(templates)]
    skipped = [k for k in ks if k > len(templates)]
    if 1 not in usable:
        usable = [1] + usable
    form = answer_form_template(lm, [lm.encode_prompt(t) for t in templates[: max(usable)]])
    facts, remapped = bench_facts(lm, form, n_facts, relation, splits=("train", "dev", "test"))
    runs = {k: training_epoch(lm, templates[:k], facts, batch_size, lr) for k in usable}
    runs[1][0]()  # one warm-up epoch before any timing, whatever ``warmup`` says
    # Interleaved (K = 1, 5, ..., then again): time(1), the baseline of every ratio, sees the same load as the rest.
    timed = measure({str(k): runs[k][0] for k in usable}, repeats=repeats, warmup=warmup, device=lm.device)
    times = {k: timed[str(k)] for k in usable}
    t1 = median(times[1])
    per_k = {str(k): {"seconds": times[k], "median_s": median(times[k]), "facts": runs[k][1],
                      "sequences_per_epoch": runs[k][1] * k, "ratio_to_k_times_single": _ratio(median(times[k]), k * t1)}
             for k in usable}
    worst = max((v["ratio_to_k_times_single"] for k, v in per_k.items() if k != "1"), default=math.nan)
    result = {"benchmark": "mixtures", "model": lm.name, "relation": relation, "prompt_set": prompt_set,
              "templates_available": len(templates), "ks_skipped": skipped, "facts": len(facts), "objects_remapped": remapped,
              "batch_size": batch_size, "repeats": repeats, "warmup": warmup, "per_k": per_k,
              "goals": [{"goal": "time(K) <= K x time(1) for every K", "value": worst, "met": worst <= 1.0,
                         "applies": lm.name == GOAL_MODEL}],
              "threads": torch.get_num_threads(), "load_average": _loadavg()}
    result["table"] = {"title": f"Mixtures: {lm.name}, {len(facts)} training facts of {relation} ({prompt_set}), batch {batch_size} facts x K prompts",
                       "headers": ["K", "median s/epoch", "sequences/epoch", "time(K) / (K x time(1))"],
                       "rows": [[k, f"{v['median_s']:.3f}", v["sequences_per_epoch"], f"{v['ratio_to_k_times_single']:.2f}"] for k, v in per_k.items()]}
    if verbose:
        print(render(result))
    return result


# ============================================================================ 4. depth
def depth(lm: ClozeLM, *, relation: str = DEFAULT_RELATION, depths: Sequence[int | str] = (0, 1, 6, 12, "all"),
          batch_size: int = 16, repeats: int = 3, warmup: int = 1, lr: float = 3e-3, verbose: bool = True) -> dict[str, Any]:
    """Seconds per training step (one prompt, ``batch_size`` facts) with offsets on rows 0..depth."""
    template = first_template(lm, relation)
    facts, remapped = bench_facts(lm, template, batch_size, relation, splits=("train", "dev", "test"))
    chosen = sorted({resolve_depth(d, lm) for d in depths if d == "all" or int(d) <= lm.n_layers})  # deeper than the model: skipped
    names = {d: f"all ({d})" if d == lm.n_layers else str(d) for d in chosen}
    fns = {names[d]: training_epoch(lm, [template], facts, batch_size, lr, depth=d)[0] for d in chosen}
    times = measure(fns, repeats=repeats, warmup=warmup, device=lm.device)
    base = median(times[names[chosen[0]]])
    per = {names[d]: {"depth": d, "trained_rows": d + 1, "seconds": times[names[d]], "median_s": median(times[names[d]]),
                      "ratio_to_depth_0": _ratio(median(times[names[d]]), base)} for d in chosen}
    result = {"benchmark": "depth", "model": lm.name, "layers": lm.n_layers, "relation": relation, "batch_size": batch_size,
              "objects_remapped": remapped, "repeats": repeats, "warmup": warmup, "per_depth": per,
              "threads": torch.get_num_threads(), "load_average": _loadavg()}
    result["table"] = {"title": f"Depth: {lm.name} ({lm.n_layers} layers), one step of {batch_size} facts",
                       "headers": ["depth", "rows of offsets", "median s/step", "vs depth 0"],
                       "rows": [[name, v["trained_rows"], f"{v['median_s']:.3f}", f"{v['ratio_to_depth_0']:.2f}"] for name, v in per.items()]}
    if verbose:
        print(render(result))
    return result


# ============================================================================ 5. scale
def scale(lm: ClozeLM, *, relation: str = DEFAULT_RELATION, batch_sizes: Sequence[int] = (1, 4, 16, 64, 256), min_facts: int = 128,
          repeats: int = 3, warmup: int = 1, verbose: bool = True) -> dict[str, Any]:
    """Evaluation facts/s and peak memory at each batch size (max(min_facts, batch size) facts each)."""
    template = first_template(lm, relation)
    meter = MemoryMeter(lm.device)
    _page_in(lm)
    base_mib = meter.current_mib()
    per = {}
    for bs in sorted(batch_sizes):  # ascending: memory freed by a smaller run is reused, not double counted
        facts, _ = bench_facts(lm, template, max(min_facts, bs), relation)
        meter.reset()
        ts = measure({"score": lambda: score_facts(lm, [template], facts, batch_size=bs)}, repeats=repeats, warmup=warmup, device=lm.device)["score"]
        m = median(ts)
        peak = meter.peak_mib()
        per[str(bs)] = {"facts": len(facts), "seconds": ts, "median_s": m, "facts_per_s": len(facts) / m,
                        "peak_mib": peak, "peak_above_model_mib": peak - base_mib}
    result = {"benchmark": "scale", "model": lm.name, "relation": relation, "repeats": repeats, "warmup": warmup,
              "memory_kind": meter.kind, "model_mib": base_mib, "peak_resettable": meter.resettable, "per_batch_size": per,
              "threads": torch.get_num_threads(), "load_average": _loadavg()}
    result["table"] = {"title": f"Scale: {lm.name} evaluation by batch size ({meter.kind}; {base_mib:.0f} MiB with the model loaded, before scoring)",
                       "headers": ["batch size", "facts", "median s", "facts/s", f"{meter.kind} MiB", "above the model MiB"],
                       "rows": [[bs, v["facts"], f"{v['median_s']:.3f}", f"{v['facts_per_s']:.1f}", f"{v['peak_mib']:.0f}",
                                 f"{v['peak_above_model_mib']:.0f}"] for bs, v in per.items()]}
    if verbose:
        print(render(result))
    return result


# ============================================================================ report
def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    """A benchmark's table (markdown, readable as plain text) and its goals."""
    t = result["table"]
    out = [f"### {t['title']}", "", markdown_table(t["headers"], t["rows"])]
    goals = result.get("goals") or []
    if goals:
        out.append("")
        for g in goals:
            verdict = ("met" if g["met"] else "NOT met") if g["applies"] else f"({'met' if g['met'] else 'not met'}; the goal is set for {GOAL_MODEL} on CPU)"
            out.append(f"- goal: {g['goal']}: {_fmt(g['value'])} -> {verdict}")
    return "\n".join(out)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0, 0]
    names, values, colors = [], [], []
    for key in ("eval", "eval_masked"):
        r = results.get(key)
        if not r:
            continue
        for name, v in r["variants"].items():
            names.append(f"{r['model']}\n{name}")
            values.append(v["facts_per_s"])
            colors.append("C0" if name == "ours" else "C7")
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), [n.replace("\n", ": ") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("facts/s (log scale)")
    ax.set_title("1. evaluation throughput")
    ax = axes[0, 1]
    r = results.get("train_step")
    if r:
        vs = list(r["variants"])
        ax.bar(vs, [r["variants"][v]["median_s"] for v in vs], color=["C0" if v == "ours" else "C7" for v in vs])
        ax.set_ylabel("seconds per step")
        ax2 = ax.twinx()
        ax2.plot(vs, [r["variants"][v]["peak_mib"] for v in vs], "o", color="C3")
        ax2.set_ylabel(f"{r['variants'][vs[0]]['memory_kind']} MiB", color="C3")
        ax2.set_ylim(bottom=0)
        ax.set_title(f"2. prompt-tuning step, batch {r['batch_size']}")
    ax = axes[0, 2]
    r = results.get("mixtures")
    if r:
        ks = [int(k) for k in r["per_k"]]
        ax.plot(ks, [v["ratio_to_k_times_single"] for v in r["per_k"].values()], "o-")
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xlabel("K prompts")
        ax.set_ylabel("time(K) / (K x time(1))")
        ax.set_title("3. mixtures: epoch time")
    ax = axes[1, 0]
    r = results.get("depth")
    if r:
        ax.bar(list(r["per_depth"]), [v["median_s"] for v in r["per_depth"].values()], color="C0")
        ax.set_xlabel("depth (rows 0..d trained)")
        ax.set_ylabel("seconds per step")
        ax.set_title("4. depth")
    r = results.get("scale")
    if r:
        bs = [int(b) for b in r["per_batch_size"]]
        ax = axes[1, 1]
        ax.plot(bs, [v["facts_per_s"] for v in r["per_batch_size"].values()], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("facts/s")
        ax.set_title("5. evaluation throughput by batch size")
        ax = axes[1, 2]
        ax.plot(bs, [v["peak_mib"] for v in r["per_batch_size"].values()], "o-", color="C3")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{r['memory_kind']} MiB")
        ax.set_title("5. peak memory by batch size")
    fig.suptitle(f"course_lib benchmarks ({results['machine']['device']}, {results['machine']['torch_threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    # Atomic (files.write_text): the book's appendix reads these, and must never meet half a report.
    write_text(out / "report.json", json.dumps(results, indent=1, default=_json_default))
    png = plot(results, out / "report.png")
    m = results["machine"]
    load = m.get("load_average")
    load_end = results.get("load_average_end")
    lines = [
        "# course_lib benchmarks",
        "",
        f"{'Smoke run (--quick)' if results['quick'] else 'Full run'} on {m['cpu']} ({m['cpu_count']} CPUs, torch {m['torch']} "
        f"with {m['torch_threads']} threads, device {m['device']}), {m['date']}, {results['seconds']:.0f} s in all.",
        "",
        f"Load average at the start {_load_text(load)}, at the end {_load_text(load_end)}. Absolute timings move with the "
        "machine's load; each ratio compares variants measured in the same run, their repeats interleaved, so read the ratios.",
        "",
        f"![benchmarks]({png.name})",
        "",
    ]
    if results.get("notes"):
        lines += [f"- {n}" for n in results["notes"]] + [""]
    for key in ("eval", "eval_masked", "train_step", "mixtures", "depth", "scale"):
        r = results.get(key)
        if not r:
            continue
        lines += [render(r), ""]
        if r.get("breakdown"):
            b = r["breakdown"]
            lines += [f"Where ours spends its time ({r['model']}, one scoring pass of {b['total_s']:.2f} s, forward hooks):", ""]
            lines += [markdown_table(["part", "share"], [[k, f"{v:.0%}"] for k, v in sorted(b["fractions"].items(), key=lambda kv: -kv[1])]), ""]
    lines += ["Raw numbers: report.json.", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


def _load_notes(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    loads = [x for x in (m.get("load_average") or [])[:1] + (results.get("load_average_end") or [])[:1]]
    cpus = m.get("cpu_count") or 1
    if not loads or max(loads) <= cpus:
        return []
    return [f"The machine was oversubscribed (load average up to {max(loads):.1f} on {cpus} CPUs). torch's {m['torch_threads']} "
            "threads then wait for each other at every operation, so small operations (norms, rotary embeddings, "
            "elementwise attention work) take far longer than their FLOPs suggest, every variant runs several times "
            "slower, and ratios shrink toward 1. Rerun on an idle machine for numbers to quote; on a shared one, "
            "OMP_WAIT_POLICY=PASSIVE in the environment (threads sleep instead of spinning) or the scripts' --threads 1 "
            "gives steadier numbers."]


def _load_text(load: Sequence[float] | None) -> str:
    return "unknown" if not load else " / ".join(f"{x:.1f}" for x in load) + " (1 / 5 / 15 min)"


def _json_default(x: Any) -> Any:
    if isinstance(x, (torch.Tensor,)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def run_all(out: Path, quick: bool = False, model: str = DEFAULT_MODEL, masked_model: str | None = MASKED_STANDIN,
            relation: str = DEFAULT_RELATION) -> str:
    """Run the five benchmarks (and the masked-LM evaluation with the fill-mask pipeline); write the report.

    ``masked_model`` (default: a random-weight BERT-base) adds the pipeline comparison when ``model``
    is not a masked LM itself; None skips it. Returns the path of report.md.
    """
    s = SETTINGS["quick" if quick else "full"]
    out = Path(out)
    t0 = time.perf_counter()
    device = choose_device()
    results: dict[str, Any] = {"quick": quick, "model": model, "settings": s, "machine": machine_info(device), "notes": []}
    print(f"[bench] {model}, {'quick' if quick else 'full'} run, {torch.get_num_threads()} threads, load {_load_text(_loadavg())}", flush=True)
    lm = load_bench_model(model)
    common = dict(relation=relation, repeats=s["repeats"], warmup=s["warmup"])
    results["eval"] = eval_throughput(lm, n_facts=s["eval_facts"], batch_size=s["eval_batch"], matmul_sizes=s["matmul_sizes"], **common)
    if masked_model and lm.family is not Family.MASKED:
        masked = load_bench_model(masked_model)
        results["eval_masked"] = eval_throughput(masked, n_facts=s["eval_facts"], batch_size=s["eval_batch"],
                                                 matmul_sizes=s["matmul_sizes"], breakdown=False, **common)
        del masked
    # One warm-up epoch at K = 1 precedes all; the smoke run adds no warm-up round of every K (K = 30 is the slow one).
    results["mixtures"] = mixtures(lm, ks=s["mix_ks"], n_facts=s["mix_facts"], batch_size=s["mix_batch"],
                                   **{**common, "warmup": s.get("mix_warmup", s["warmup"])})
    if results["mixtures"]["ks_skipped"]:
        results["notes"].append(f"mixtures: K = {results['mixtures']['ks_skipped']} skipped, the relation has "
                                f"{results['mixtures']['templates_available']} usable templates")
    results["depth"] = depth(lm, depths=s["depths"], batch_size=s["depth_batch"], **common)
    del lm  # scale and the training step run in fresh subprocesses: their memory is theirs alone
    scaled = run_worker(dict(task="scale", model=model, threads=torch.get_num_threads(),
                             kwargs=dict(batch_sizes=s["scale_sizes"], min_facts=s["scale_facts"], **common)))
    print(render(scaled))
    results["scale"] = scaled
    results["train_step"] = train_step(model, relation=relation, batch_size=s["train_batch"], steps=s["train_steps"], warmup=s["warmup"])
    results["seconds"] = time.perf_counter() - t0
    results["load_average_end"] = _loadavg()
    results["notes"] += _load_notes(results)
    path = write_report(results, out)
    print(f"[bench] wrote {path}, {path.with_suffix('.png')} and {path.with_suffix('.json')} in {results['seconds']:.0f} s")
    return str(path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _serve(json.loads(sys.argv[2]))
    else:
        print("usage: python -m course_lib bench [--out DIR] [--quick]   (this module's own entry point serves its worker processes)",
              file=sys.stderr)
        raise SystemExit(2)
