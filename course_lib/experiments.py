"""The paper's method ladder as runnable experiments, with budgets and a results cache.

A *rung* names one way of asking (LAMA's hard template ... a deep mixture of soft prompts); a
*budget* says how much of the data and training a run may use (``ci``: minutes on 2 CPU cores;
``laptop``; ``gpu``: the full grid). The CLI and the book call the same ``run_rung``; its rows are
cached on disk keyed by everything that decides them, so re-executing a chapter is cheap.

A cache entry holds the row, the row's identity (model and revision, rung, budget, training
settings, answer space, split, library version), the sha256 of every data file the row was
computed from, and a checksum of all that. It is used only if the checksum holds, the identity is
the one asked for and the data files are unchanged; otherwise the row is computed again. A reuse
is logged (the command line prints it); a changed data file is warned about, never passed over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from .cloze import ClozeLM
from .data import DataError, cache_dir, changed_files, check_relations, load_facts, load_prompts, recording_reads
from .evaluation import Scored, answer_form_template, majority_answer, majority_p_at_1, score_facts
from .files import write_text
from .mixture import effective_prompts
from .probing import answer_mask, best_template_on_dev, take
from .results import (MAJORITY_HITS, ROW_KEY, counts_of, frame_of, identity_json, make_row,
                      read_stored)
from .templates import Template
from .training import CheckpointMismatch, NothingToTune, TuneConfig, resolved, tune

log = logging.getLogger(__name__)


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
    """One way of asking: which prompt set, which of its templates, and how (and whether) they are tuned.

    The templates: the set's first (LAMA's manual one; AutoPrompt's one trigger prompt); with
    ``best_on_dev``, the best on dev among the top ones by LPAQA's weight (LPAQA's top-1, chosen on
    dev rather than on training facts as LPAQA did); with ``mixture``, the top ones together.
    """

    name: str
    prompt_set: str  # where the templates come from
    tuned: bool
    init: str = "template"
    mixture: bool = False
    depth: int | str = 0
    data_dependent: bool = False
    best_on_dev: bool = False


LADDER: tuple[Rung, ...] = (
    Rung("lama-hard", "lama", tuned=False),
    # AutoPrompt's triggers were searched for BERT; other models read them as transplanted tokens.
    Rung("autoprompt-hard", "autoprompt-bert", tuned=False),
    Rung("lpaqa-best-hard", "lpaqa-mine", tuned=False, best_on_dev=True),
    Rung("soft-lama", "lama", tuned=True),
    # One random prompt shaped like LAMA's template. The authors' code (randomize_prompt, off in their
    # released config.yaml) randomises every pattern of the prompt bank it loads: mixture-soft-random below.
    Rung("soft-random", "lama", tuned=True, init="random"),
    Rung("mixture-soft", "lpaqa-mine", tuned=True, mixture=True),
    Rung("mixture-soft-paraphrase", "lpaqa-paraphrase", tuned=True, mixture=True),
    Rung("mixture-soft-random", "lpaqa-mine", tuned=True, mixture=True, init="random"),
    Rung("mixture-soft-data-dependent", "lpaqa-mine", tuned=True, mixture=True, data_dependent=True),
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
    if not (r.mixture or r.best_on_dev):
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


# 4: rows carry per-fact outcomes (fact_ranks, majority_hits); 3: rows carry the majority and
# untuned baselines; 2: entries hold identity, data checksums and their own checksum; 1: the bare row
CACHE_FORMAT = 4


def _rung_identity(lm: ClozeLM, dataset: str, relation: str, r: Rung, b: Budget, config: TuneConfig, answer_space: str,
                   split: str) -> dict[str, Any]:
    """Everything but the data that decides a rung's row."""
    return {"model": lm.name, "model_revision": lm.revision, "dataset": dataset, "relation": relation,
            "rung": asdict(r), "budget": asdict(b), "config": asdict(config), "answer_space": answer_space,
            "split": split, "course_lib": __version__, "format": CACHE_FORMAT}


def _cache_key(lm: ClozeLM, dataset: str, relation: str, r: Rung, b: Budget, config: TuneConfig, answer_space: str,
               split: str = "test") -> str:
    blob = json.dumps(_rung_identity(lm, dataset, relation, r, b, config, answer_space, split), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def results_cache_dir() -> Path:
    return Path(os.environ.get("COURSE_LIB_RESULTS_CACHE", cache_dir() / "results"))


def _entry_checksum(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=float).encode()).hexdigest()


def _read_cached(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The cached row at ``path`` if it is intact, of this identity, and its data files are unchanged; else None.

    Entries are renamed into place complete, so a half-written one never exists; one that still
    fails its checksum (a disk error, a hand edit, an entry of an older format) is recomputed.
    """
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(entry, dict) and entry.get("sha256") == _entry_checksum(entry)):
        return None
    if not (isinstance(entry.get("row"), dict) and isinstance(entry.get("data"), dict)
            and entry.get("identity") == json.loads(json.dumps(identity))):
        return None
    changed = changed_files(entry["data"])
    if changed:
        what = ", ".join(f"{rel} ({why})" for rel, why in changed.items())
        warnings.warn(f"{identity['relation']} {identity['rung']['name']}: the cached result was computed from data "
                      f"that has changed since ({what}); computing it again", RuntimeWarning, stacklevel=3)
        return None
    log.info("%s %s: reused from the results cache (same model, data and settings)", identity["relation"],
             identity["rung"]["name"])
    return entry["row"]


def _write_cached(path: Path, identity: dict[str, Any], data: dict[str, str], row: dict[str, Any]) -> None:
    entry = json.loads(json.dumps({"identity": identity, "data": data, "row": row}, default=float))
    entry["sha256"] = _entry_checksum(entry)
    write_text(path, json.dumps(entry))


def baselines(lm: ClozeLM, templates: Sequence[Template], train: Sequence, scored: Scored,
              allowed: torch.Tensor | None) -> dict[str, Any]:
    """The majority answer of the training facts and its P@1 on the facts ``scored`` kept.

    A prompt that learned to always give the relation's most frequent object scores this much
    without recalling anything: every tuned row carries it beside its own P@1. Only training
    objects this model can give (one token, inside the answer space) count. ``majority_hits`` lists
    the kept facts (their ``Scored.index``) whose gold object it is, so that the baseline can be
    one side of a paired comparison (``statistics``).
    """
    form = answer_form_template(lm, [lm.encode_prompt(t) for t in templates if lm.covers(t)] or
                                [lm.encode_prompt(templates[0])]) if templates else None
    answerable = []
    for f in train:
        tid = lm.answer_id(f.object, form) if form is not None else None
        if tid is not None and (allowed is None or bool(allowed[tid])):
            answerable.append(f.object)
    answer = majority_answer(answerable)
    hits = [int(i) for f, i in zip(scored.facts, scored.index.tolist()) if f.object == answer]
    return {"majority_answer": answer, "majority_p_at_1": majority_p_at_1(answer, scored.facts),
            MAJORITY_HITS: json.dumps(hits, separators=(",", ":"))}


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
    caps = {"max_train": max_train, "max_dev": max_dev, "max_test": max_test}
    with recording_reads() as reads:
        row = _tune_and_score(lm, dataset, relation, templates, config, row_key, caps, checkpoint, progress, extra)
    row["identity"] = identity_json({**row_key, "model_revision": lm.revision, **caps, "config": asdict(config),
                                     "templates": [t.text for t in templates], "course_lib": __version__,
                                     "data": reads})
    return row


def _tune_and_score(lm: ClozeLM, dataset: str, relation: str, templates: Sequence[Template], config: TuneConfig,
                    row_key: dict[str, str], caps: dict[str, int | None], checkpoint: str | os.PathLike | None,
                    progress: bool, extra: dict[str, Any]) -> dict[str, Any]:
    split, answer_space = row_key["split"], row_key["answer_space"]
    test = take(load_facts(dataset, relation, split), caps["max_test"])
    allowed = answer_mask(lm, answer_space, dataset, relation, templates)
    train = take(load_facts(dataset, relation, "train"), caps["max_train"])
    dev = take(load_facts(dataset, relation, "dev"), caps["max_dev"])
    extra.update(seed=config.seed, config=json.dumps(asdict(config)), templates=json.dumps([t.text for t in templates]))
    # Named as the caller knows them, so that a checkpoint of other settings is refused in those terms.
    identity = {"dataset": dataset, "relation": relation, "answer_space": answer_space,
                "max_train": caps["max_train"], "max_dev": caps["max_dev"]}
    try:
        result = tune(lm, templates, train, dev, config, allowed=allowed, checkpoint=checkpoint, progress=progress,
                      identity=identity)
    except NothingToTune:
        # E.g. Google-RE dates are several tokens for Gemma. The counts say why test facts drop;
        # no metric is given, since nothing was tuned.
        untuned = score_facts(lm, templates, test, allowed=allowed)
        extra.update(hard_p_at_1=untuned.metrics()["p_at_1"], **baselines(lm, templates, train, untuned, allowed))
        # No score of its own, so no fact_ranks (the untuned prompt's would pass for the method's),
        # and without them majority_hits' indices would point into a list the row does not hold.
        del extra[MAJORITY_HITS]
        extra["note"] = "no training fact has a single-token object for this model: not tuned"
        return make_row(lm, row_key, counts_of(untuned, len(test), per_fact=False),
                        {m: math.nan for m in untuned.metrics()}, **extra)
    scored = score_facts(lm, templates, test, log_weights=result.log_weights, perturbation=result.soft.perturbation,
                         allowed=allowed, data_dependent=config.data_dependent, batch_size=config.batch_size * 2)
    # Beside the tuned score: the same prompts untuned (for a random start: the templates it replaced)
    # on the same test facts, and the majority answer.
    untuned = score_facts(lm, templates, test, allowed=allowed, batch_size=config.batch_size * 2)
    extra.update(hard_p_at_1=untuned.metrics()["p_at_1"], **baselines(lm, templates, train, scored, allowed))
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
    read: str = "frozen",
    answer_space: str = "full",
    split: str = "test",
    checkpoint_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """One results row: a rung of the ladder on one relation, trained (if tuned) and evaluated.

    The budget decides the data and the training length; ``lr`` (default: ``training.default_lr``
    of the model), ``seed`` and ``read`` (``soft_prompts.Read``: the ablation of chapters 3, 6 and 8)
    are the only training settings a caller changes.
    """
    r, b = rung(rung_name), budget(budget_name)
    config = TuneConfig(init=r.init, depth=r.depth, data_dependent=r.data_dependent, lr=lr, seed=seed, read=read,
                        epochs=b.epochs, batch_size=b.batch_size, patience=b.patience)
    if r.tuned:
        config = resolved(config, lm)  # the concrete step size is part of the key
    identity = _rung_identity(lm, dataset, relation, r, b, config, answer_space, split)
    key = _cache_key(lm, dataset, relation, r, b, config, answer_space, split) + f"-{split}"
    cache_path = results_cache_dir() / f"{relation}-{rung_name}-{key}.json"
    if use_cache and (cached := _read_cached(cache_path, identity)) is not None:
        return cached
    t0 = time.perf_counter()
    with recording_reads() as reads:
        row = _compute_rung(lm, dataset, relation, r, b, budget_name, config, seed, answer_space, split, key,
                            checkpoint_dir, progress)
    row["identity"] = identity_json({**identity, "data": reads})
    if row.get("note"):
        return row  # not tuned: nothing worth caching
    row["seconds"] = time.perf_counter() - t0
    if use_cache:
        _write_cached(cache_path, identity, reads, row)
    return row


def _compute_rung(lm: ClozeLM, dataset: str, relation: str, r: Rung, b: Budget, budget_name: str, config: TuneConfig,
                  seed: int, answer_space: str, split: str, key: str, checkpoint_dir: str | os.PathLike | None,
                  progress: bool) -> dict[str, Any]:
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
            ckpt = Path(checkpoint_dir) / lm.name / dataset / relation / f"{r.name}-{key}.safetensors"
        def tuned() -> dict[str, Any]:
            return tune_and_score(lm, dataset, relation, templates, config, row_key, max_train=b.max_train,
                                  max_dev=b.max_dev, max_test=b.max_test, checkpoint=ckpt, progress=progress,
                                  budget=budget_name)

        try:
            return tuned()
        except CheckpointMismatch as err:
            # The file name holds every setting (the cache key), so only the data can differ: the
            # checkpoint is of a run on data that has changed since, and is of no use.
            warnings.warn(f"{err}; its settings are those of this run, so its data has changed since: training starts "
                          "over", RuntimeWarning, stacklevel=2)
            assert ckpt is not None
            ckpt.unlink(missing_ok=True)
            return tuned()
    test = take(load_facts(dataset, relation, split), b.max_test)
    allowed = answer_mask(lm, answer_space, dataset, relation, templates)
    scored = score_facts(lm, templates, test, allowed=allowed, batch_size=b.batch_size * 2)
    train = take(load_facts(dataset, relation, "train"), b.max_train)
    extra.update(hard_p_at_1=scored.metrics()["p_at_1"], **baselines(lm, templates, train, scored, allowed))
    return make_row(lm, row_key, counts_of(scored, len(test)), scored.metrics(), **extra)


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
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """The method ladder over the budget's relations; ``shard=(i, n)`` runs every n-th job from i.

    ``on_row`` is called with each row as soon as it is done (the CLI saves it before the next job).
    """
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
        if on_row is not None:
            on_row(rows[-1])
    return pd.DataFrame(rows)


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's (i, n): a Slurm array task, a rank of torchrun / ``accelerate launch``, or (0, 1).

    Slurm arrays must be numbered consecutively (``--array=0-7`` or ``1-8``); ranks come from the
    launcher's RANK and WORLD_SIZE.
    """
    env = os.environ if env is None else env

    def number(name: str, default: str | None = None) -> int:
        if name not in env and default is None:
            raise ValueError(f"--shard auto: {name} is not set (SLURM_ARRAY_TASK_ID is; is this a Slurm job array?)")
        text = env.get(name, default)
        try:
            return int(text.strip(), 10)
        except ValueError as err:
            raise ValueError(f"--shard auto: {name}={text!r} is not a whole number ({err})") from None

    if "SLURM_ARRAY_TASK_ID" in env:
        n = number("SLURM_ARRAY_TASK_COUNT")
        i = number("SLURM_ARRAY_TASK_ID") - number("SLURM_ARRAY_TASK_MIN", "0")
        source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    elif "WORLD_SIZE" in env:
        i, n = number("RANK", "0"), number("WORLD_SIZE")
        source = "RANK/WORLD_SIZE"
    else:
        return 0, 1
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard auto: {source} give shard {i}/{n}, expected 0 <= i < n (is the Slurm array numbered 0..n-1?)")
    return i, n


def merge_tables(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate shard tables; a job present twice (a rerun shard) keeps its last row.

    Every file is checked first (``results.read_stored``, strict): a missing file, a folder, a file
    that is not a results table, an empty, binary, cut or edited one raises ``TableError`` naming
    it. Counts stay whole numbers; a shard with no rows (a header only) adds nothing.
    """
    if not paths:
        raise ValueError("merge: no tables given")
    stored = [read_stored(p, strict=True) for p in paths]
    rows, columns = [], []
    for t in stored:
        rows += t.rows
        columns += [c for c in t.columns if c not in columns]
    last = {tuple(r.get(c, "") for c in ROW_KEY): i for i, r in enumerate(rows)}
    return frame_of([r for i, r in enumerate(rows) if last[tuple(r.get(c, "") for c in ROW_KEY)] == i], columns)
