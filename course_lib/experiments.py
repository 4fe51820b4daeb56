"""The paper's method ladder as runnable experiments, with budgets and a results cache.

A *rung* names one way of asking (LAMA's hard template ... a deep mixture of soft prompts); a
*budget* says how much of the data and training a run may use (``ci``: minutes on 2 CPU cores;
``laptop``; ``gpu``: the full grid). The CLI and the book call the same ``run_rung``; its rows are
cached on disk keyed by everything that decides them, so re-executing a chapter is cheap.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .cloze import ClozeLM
from .data import DataError, cache_dir, check_relations, load_facts, load_prompts
from .evaluation import answer_form_template, score_facts
from .mixture import effective_prompts
from .probing import answer_mask, best_template_on_dev, take
from .results import counts_of, make_row
from .templates import Template
from .training import TuneConfig, tune


@dataclass(frozen=True)
class Budget:
    relations: tuple[str, ...] | None  # None: every relation of the dataset
    max_train: int | None
    max_dev: int | None
    max_test: int | None
    epochs: int
    max_templates: int | None  # prompts per mixture, and candidates for "best on dev"
    batch_size: int = 16
    patience: int = 3


BUDGETS: dict[str, Budget] = {
    "ci": Budget(("P36", "P103"), max_train=48, max_dev=40, max_test=80, epochs=2, max_templates=3),
    "laptop": Budget(("P36", "P103", "P176", "P19", "P37", "P138", "P413", "P279"), 400, 200, None, 6, 5),
    "gpu": Budget(None, None, None, None, 20, None, batch_size=32, patience=4),
}


@dataclass(frozen=True)
class Rung:
    name: str
    prompt_set: str  # where the templates come from
    tuned: bool
    init: str = "template"
    mixture: bool = False
    depth: int | str = 0
    data_dependent: bool = False


LADDER: tuple[Rung, ...] = (
    Rung("lama-hard", "lama", tuned=False),
    Rung("lpaqa-best-hard", "lpaqa-mine", tuned=False),
    Rung("soft-lama", "lama", tuned=True),
    Rung("soft-random", "lama", tuned=True, init="random"),
    Rung("mixture-soft", "lpaqa-mine", tuned=True, mixture=True),
    Rung("mixture-soft-deep", "lpaqa-mine", tuned=True, mixture=True, depth="all"),
)
RUNGS = {r.name: r for r in LADDER}
GRIDS = {"paper": [r.name for r in LADDER]}


def budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; valid: {', '.join(BUDGETS)}")
    return BUDGETS[name]


def rung(name: str) -> Rung:
    if name not in RUNGS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(RUNGS)}")
    return RUNGS[name]


def select_templates(lm: ClozeLM, dataset: str, relation: str, r: Rung, b: Budget) -> list[Template]:
    """The templates a rung uses: LAMA's; the best mined one on dev; or the top mined ones for a mixture."""
    try:
        templates = [t for t in load_prompts(r.prompt_set, dataset, relation) if lm.covers(t)]
    except DataError:  # e.g. ConceptNet has no LPAQA prompts: the rung is reported as not covered
        return []
    if not templates:
        return []
    if r.prompt_set == "lama" and not r.mixture:
        return templates[:1]
    if any(t.weight is not None for t in templates):
        # LPAQA's own weights rank its templates; a budget keeps the top ones.
        templates = sorted(templates, key=lambda t: -(t.weight or 0.0))
    if b.max_templates is not None:
        templates = templates[: b.max_templates]
    if r.mixture:
        return templates
    best, _ = best_template_on_dev(lm, dataset, relation, templates, "full", b.max_dev, b.batch_size * 2)
    return [best]


def _cache_key(lm: ClozeLM, dataset: str, relation: str, r: Rung, b: Budget, config: TuneConfig, answer_space: str) -> str:
    blob = json.dumps({"model": lm.name, "dataset": dataset, "relation": relation, "rung": asdict(r),
                       "budget": asdict(b), "config": asdict(config), "space": answer_space, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def results_cache_dir() -> Path:
    return Path(os.environ.get("COURSE_LIB_RESULTS_CACHE", cache_dir() / "results"))


def _read_cached(path: Path) -> dict[str, Any] | None:
    # Entries are renamed into place complete, so a half-written one never exists; a file that
    # still fails to parse (a disk error, a hand edit) is treated as missing and recomputed.
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_cached(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row, default=float))
    os.replace(tmp, path)


def run_rung(
    lm: ClozeLM,
    dataset: str,
    relation: str,
    rung_name: str,
    budget_name: str = "ci",
    *,
    config: TuneConfig | None = None,
    answer_space: str = "full",
    split: str = "test",
    checkpoint_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """One results row: a rung of the ladder on one relation, trained (if tuned) and evaluated."""
    r, b = rung(rung_name), budget(budget_name)
    config = replace(config or TuneConfig(), init=r.init, depth=r.depth, data_dependent=r.data_dependent,
                     epochs=(config.epochs if config else b.epochs), batch_size=b.batch_size, patience=b.patience)
    key = _cache_key(lm, dataset, relation, r, b, config, answer_space) + f"-{split}"
    cache_path = results_cache_dir() / f"{relation}-{rung_name}-{key}.json"
    if use_cache and (cached := _read_cached(cache_path)) is not None:
        return cached
    t0 = time.perf_counter()
    test = take(load_facts(dataset, relation, split), b.max_test)
    templates = select_templates(lm, dataset, relation, r, b)
    row_key = dict(model=lm.name, dataset=dataset, relation=relation, prompt_set=r.prompt_set, method=r.name,
                   split=split, answer_space=answer_space)
    extra: dict[str, Any] = {"budget": budget_name, "seed": config.seed, "templates": json.dumps([t.text for t in templates])}
    if not templates:
        # No prompt of this rung exists or can be answered by this model: every fact is dropped as uncovered.
        empty = score_facts(lm, [], test)
        return make_row(lm, row_key, counts_of(empty, len(test)), empty.metrics(), **extra)
    allowed = answer_mask(lm, answer_space, dataset, relation, templates)
    if r.tuned:
        train = take(load_facts(dataset, relation, "train"), b.max_train)
        dev = take(load_facts(dataset, relation, "dev"), b.max_dev)
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = Path(checkpoint_dir) / lm.name / dataset / relation / f"{rung_name}-{key}.safetensors"
        if not any(lm.answer_id(f.object, answer_form_template(lm, [lm.encode_prompt(t) for t in templates])) for f in train):
            # Nothing to tune on (e.g. Google-RE dates are several tokens for Gemma): report, don't crash.
            # The counts say why test facts drop; no metric is given, since nothing was tuned.
            untuned = score_facts(lm, templates, test, allowed=allowed)
            extra["note"] = "no training fact has a single-token object for this model: not tuned"
            nan = {m: math.nan for m in untuned.metrics()}
            return make_row(lm, row_key, counts_of(untuned, len(test)), nan, **extra)
        result = tune(lm, templates, train, dev, config, allowed=allowed, checkpoint=ckpt, progress=progress)
        scored = score_facts(lm, templates, test, log_weights=result.log_weights, perturbation=result.soft.perturbation,
                             allowed=allowed, data_dependent=config.data_dependent, batch_size=b.batch_size * 2)
        extra.update(best_epoch=result.best_epoch, best_dev_p_at_1=result.best_dev_p1,
                     epochs_run=len(result.history), history=json.dumps(result.history),
                     weights=json.dumps(torch.softmax(result.log_weights, 0).tolist()),
                     effective_prompts=effective_prompts(result.log_weights),
                     seconds_per_epoch=float(sum(h["seconds"] for h in result.history) / max(len(result.history), 1)),
                     config=json.dumps(asdict(config)))
    else:
        scored = score_facts(lm, templates, test, allowed=allowed, batch_size=b.batch_size * 2)
    extra["seconds"] = time.perf_counter() - t0
    row = make_row(lm, row_key, counts_of(scored, len(test)), scored.metrics(), **extra)
    if use_cache:
        _write_cached(cache_path, row)
    return row


def reproduce(
    lm: ClozeLM,
    dataset: str = "trex_original",
    grid: str = "paper",
    budget_name: str = "ci",
    relations: Sequence[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    answer_space: str = "full",
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The method ladder over the budget's relations; ``shard=(i, n)`` runs every n-th job from i."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    b = budget(budget_name)
    rels = check_relations(dataset, list(relations or b.relations or []) or None)
    jobs = [(rel, name) for rel in rels for name in GRIDS[grid]]
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    rows = []
    for rel, name in tqdm(jobs[i::n], desc=f"reproduce {grid} ({budget_name})", disable=not progress):
        rows.append(run_rung(lm, dataset, rel, name, budget_name, answer_space=answer_space,
                             checkpoint_dir=checkpoint_dir, progress=False))
    return pd.DataFrame(rows)


def merge_tables(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate shard tables; a job present twice (a rerun shard) keeps its last row."""
    table = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    keys = ["model", "dataset", "relation", "prompt_set", "method", "split", "answer_space"]
    return table.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)

