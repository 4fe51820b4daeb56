"""The paper's method ladder as runnable experiments, with budgets and a results cache.

A *rung* names one way of asking (LAMA's hard template ... a deep mixture of soft prompts); a
*budget* says how much of the data and training a run may use (``ci``: minutes on 2 CPU cores;
``laptop``; ``gpu``: the full grid). The CLI and the book call the same ``run_rung``; its rows are
cached on disk keyed by everything that decides them, so re-executing a chapter is cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .cloze import ClozeLM
from .data import DataError, cache_dir, check_relations, load_facts, load_prompts
from .evaluation import score_facts
from .mixture import effective_prompts
from .probing import answer_mask, best_template_on_dev, take
from .results import counts_of, make_row
from .templates import Template
from .training import NothingToTune, TuneConfig, resolved, tune


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
    # Sized for a free Colab session on a T4 with bert-base-cased: chapter 7's ladder on T-REx is
    # estimated at about 6 minutes there (course_lib.costs; the preface prices every budget).
    "colab": Budget(("P36", "P103", "P176", "P19"), 400, 200, 400, 8, 5, batch_size=32),
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
    blob = json.dumps({"model": lm.name, "revision": lm.revision, "dataset": dataset, "relation": relation, "rung": asdict(r),
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


def tune_and_score(
    lm: ClozeLM,
    dataset: str,
    relation: str,
    templates: Sequence[Template],
    config: TuneConfig,
    row_key: dict[str, str],
    *,
    max_train: int | None = None,
    max_dev: int | None = None,
    max_test: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """Tune ``templates`` on the relation's train facts (best state on dev), score the split: one results row.

    ``row_key`` names the row (see ``results.make_row``); its split is the one scored. ``extra``
    columns are added to the row. A relation with no single-token training object is reported
    (counts, no metric), not crashed on.
    """
    config = resolved(config, lm)
    split, answer_space = row_key["split"], row_key["answer_space"]
    test = take(load_facts(dataset, relation, split), max_test)
    allowed = answer_mask(lm, answer_space, dataset, relation, templates)
    train = take(load_facts(dataset, relation, "train"), max_train)
    dev = take(load_facts(dataset, relation, "dev"), max_dev)
    extra.update(seed=config.seed, config=json.dumps(asdict(config)), templates=json.dumps([t.text for t in templates]))
    try:
        result = tune(lm, templates, train, dev, config, allowed=allowed, checkpoint=checkpoint, progress=progress)
    except NothingToTune:
        # E.g. Google-RE dates are several tokens for Gemma. The counts say why test facts drop;
        # no metric is given, since nothing was tuned.
        untuned = score_facts(lm, templates, test, allowed=allowed)
        extra["note"] = "no training fact has a single-token object for this model: not tuned"
        return make_row(lm, row_key, counts_of(untuned, len(test)), {m: math.nan for m in untuned.metrics()}, **extra)
    scored = score_facts(lm, templates, test, log_weights=result.log_weights, perturbation=result.soft.perturbation,
                         allowed=allowed, data_dependent=config.data_dependent, batch_size=config.batch_size * 2)
    extra.update(best_epoch=result.best_epoch, best_dev_p_at_1=result.best_dev_p1, epochs_run=len(result.history),
                 history=json.dumps(result.history), weights=json.dumps(torch.softmax(result.log_weights, 0).tolist()),
                 effective_prompts=effective_prompts(result.log_weights),
                 seconds_per_epoch=float(sum(h["seconds"] for h in result.history) / max(len(result.history), 1)))
    if checkpoint is not None:
        extra.update(checkpoint=str(checkpoint), resumed_from_epoch=result.resumed_from)
    return make_row(lm, row_key, counts_of(scored, len(test)), scored.metrics(), **extra)


def run_rung(
    lm: ClozeLM,
    dataset: str,
    relation: str,
    rung_name: str,
    budget_name: str = "ci",
    *,
    lr: float | None = None,
    seed: int = 0,
    answer_space: str = "full",
    split: str = "test",
    checkpoint_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """One results row: a rung of the ladder on one relation, trained (if tuned) and evaluated.

    The budget decides the data and the training length; ``lr`` (default: ``training.default_lr``
    of the model) and ``seed`` are the only training settings a caller changes.
    """
    r, b = rung(rung_name), budget(budget_name)
    config = TuneConfig(init=r.init, depth=r.depth, data_dependent=r.data_dependent, lr=lr, seed=seed,
                        epochs=b.epochs, batch_size=b.batch_size, patience=b.patience)
    if r.tuned:
        config = resolved(config, lm)  # the concrete step size is part of the key
    key = _cache_key(lm, dataset, relation, r, b, config, answer_space) + f"-{split}"
    cache_path = results_cache_dir() / f"{relation}-{rung_name}-{key}.json"
    if use_cache and (cached := _read_cached(cache_path)) is not None:
        return cached
    t0 = time.perf_counter()
    templates = select_templates(lm, dataset, relation, r, b)
    row_key = dict(model=lm.name, dataset=dataset, relation=relation, prompt_set=r.prompt_set, method=r.name,
                   split=split, answer_space=answer_space)
    # A hard rung samples nothing and trains nothing: no seed decides it. A tuned rung's row gets
    # its seed and full TuneConfig from tune_and_score.
    extra: dict[str, Any] = {"budget": budget_name, "seed": seed if r.tuned else None,
                             "config": json.dumps({"rung": asdict(r), "budget": asdict(b), "answer_space": answer_space}, sort_keys=True),
                             "templates": json.dumps([t.text for t in templates])}
    if not templates:
        # No prompt of this rung exists or can be answered by this model: every fact is dropped as uncovered.
        test = take(load_facts(dataset, relation, split), b.max_test)
        empty = score_facts(lm, [], test)
        return make_row(lm, row_key, counts_of(empty, len(test)), empty.metrics(), **extra)
    if r.tuned:
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = Path(checkpoint_dir) / lm.name / dataset / relation / f"{rung_name}-{key}.safetensors"
        row = tune_and_score(lm, dataset, relation, templates, config, row_key, max_train=b.max_train,
                             max_dev=b.max_dev, max_test=b.max_test, checkpoint=ckpt, progress=progress, budget=budget_name)
        if row.get("note"):
            return row  # not tuned: nothing worth caching
    else:
        test = take(load_facts(dataset, relation, split), b.max_test)
        allowed = answer_mask(lm, answer_space, dataset, relation, templates)
        scored = score_facts(lm, templates, test, allowed=allowed, batch_size=b.batch_size * 2)
        row = make_row(lm, row_key, counts_of(scored, len(test)), scored.metrics(), **extra)
    row["seconds"] = time.perf_counter() - t0
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


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's (i, n): a Slurm array task, a rank of torchrun / ``accelerate launch``, or (0, 1).

    Slurm arrays must be numbered consecutively (``--array=0-7`` or ``1-8``); ranks come from the
    launcher's RANK and WORLD_SIZE.
    """
    env = os.environ if env is None else env
    try:
        if "SLURM_ARRAY_TASK_ID" in env:
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
            i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
        elif "WORLD_SIZE" in env:
            i, n = int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
            source = "RANK/WORLD_SIZE"
        else:
            return 0, 1
    except (KeyError, ValueError) as err:
        raise ValueError(f"--shard auto: cannot read this process's shard from the environment ({type(err).__name__}: {err})") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard auto: {source} give shard {i}/{n}, expected 0 <= i < n (is the Slurm array numbered 0..n-1?)")
    return i, n


def merge_tables(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate shard tables; a job present twice (a rerun shard) keeps its last row."""
    table = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    keys = ["model", "dataset", "relation", "prompt_set", "method", "split", "answer_space"]
    return table.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)

