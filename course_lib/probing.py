"""Hard-prompt probing: LAMA's template, each LPAQA template, the best on dev, and ensembles."""

from __future__ import annotations

import json
from enum import Enum
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from .cloze import ClozeLM
from .data import Fact, check_dataset, check_relations, check_split, load_facts, load_prompts, recording_reads
from .evaluation import SCORING_BATCH, AnswerSpace, allowed_ids, answer_form_template, relation_objects, score_facts, score_facts_in_spaces
from .results import counts_of, identity_json, make_row
from .templates import Template


class HardMethod(str, Enum):
    HARD = "hard"  # the set's first template (for "lama", the manual one)
    EACH = "each"  # every template alone: one row per template
    BEST_DEV = "best-dev"  # LPAQA's "top-1": the template with the best P@1 on dev
    ENSEMBLE_UNIFORM = "ensemble-uniform"  # all templates, equal weights
    ENSEMBLE_WEIGHTED = "ensemble-weighted"  # all templates, LPAQA's weights


def take(facts: list[Fact], max_facts: int | None) -> list[Fact]:
    """The first ``max_facts`` facts: budgets cut deterministically, so runs stay comparable."""
    if max_facts is None:
        return facts
    # A negative cap would slice from the end ("all but the last N"): never what a cap means.
    if isinstance(max_facts, bool) or not isinstance(max_facts, int) or max_facts < 0:
        raise ValueError(f"a cap on the number of facts must be a whole number >= 0 or None, got {max_facts!r}")
    return facts[:max_facts]


def answer_mask(lm: ClozeLM, space: AnswerSpace | str, dataset: str, relation: str, templates: Sequence[Template]) -> torch.Tensor | None:
    form = answer_form_template(lm, [lm.encode_prompt(t) for t in templates if lm.covers(t)] or [lm.encode_prompt(templates[0])])
    objects = relation_objects(dataset, relation) if AnswerSpace(space) is AnswerSpace.RELATION else ()
    return allowed_ids(lm, space, form, objects)


def best_template_on_dev(
    lm: ClozeLM, dataset: str, relation: str, templates: Sequence[Template], space: AnswerSpace | str = "full",
    max_facts: int | None = None, batch_size: int = SCORING_BATCH,
) -> tuple[Template, float]:
    """LPAQA's top-1 selection: the template with the highest dev P@1 (first one on ties)."""
    dev = take(load_facts(dataset, relation, "dev"), max_facts)
    best, best_p1 = templates[0], -1.0
    for t in templates:
        if not lm.covers(t):
            continue
        scored = score_facts(lm, [t], dev, allowed=answer_mask(lm, space, dataset, relation, [t]), batch_size=batch_size)
        p1 = scored.metrics()["p_at_1"]
        if scored.kept and p1 > best_p1:
            best, best_p1 = t, p1
    return best, best_p1


def probe(
    lm: ClozeLM,
    dataset: str = "trex_original",
    relations: Sequence[str] | None = None,
    prompt_set: str = "lama",
    split: str = "test",
    method: HardMethod | str = HardMethod.HARD,
    answer_space: AnswerSpace | str | Sequence[AnswerSpace | str] = AnswerSpace.FULL,
    batch_size: int = SCORING_BATCH,
    max_facts: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Probe ``lm`` with hard prompts; one tidy row per relation and answer space (per template for ``each``).

    Several answer spaces (e.g. ``["full", "common"]``) share one forward pass per batch. Each row's
    ``identity`` (see ``probe_identity``) adds the sha256 of every data file read for its relation
    and, under ``rows``, how many rows its relation and answer space have.
    """
    check_dataset(dataset)
    check_split(split)
    method = HardMethod(method)
    spaces = [AnswerSpace(a) for a in ([answer_space] if isinstance(answer_space, str) else answer_space)]
    if len(set(spaces)) != len(spaces):
        raise ValueError(f"answer spaces given twice: {', '.join(s.value for s in spaces)}")
    rels = check_relations(dataset, list(relations) if relations else None)
    if len(set(rels)) != len(rels):
        raise ValueError(f"relations given twice: {', '.join(rels)}")
    take([], max_facts)  # a bad cap is refused before any work
    rows = []
    for rel in tqdm(rels, desc=f"probe {lm.name} {prompt_set}", disable=not progress):
        with recording_reads() as reads:
            rel_rows = _probe_relation(lm, dataset, rel, prompt_set, split, method, spaces, batch_size, max_facts)
        for row in rel_rows:
            same = sum(r["answer_space"] == row["answer_space"] for r in rel_rows)
            settings = probe_identity(lm, dataset, prompt_set, split, method, batch_size, max_facts)
            row["identity"] = identity_json({**settings, "relation": rel, "answer_space": row["answer_space"],
                                             "rows": same, "data": reads})
        rows += rel_rows
    return pd.DataFrame(rows)


def probe_identity(lm: ClozeLM, dataset: str, prompt_set: str, split: str, method: HardMethod | str, batch_size: int,
                   max_facts: int | None) -> dict[str, object]:
    """What decides a probe row besides its relation, answer space and data: the settings of the run."""
    return {"model": lm.name, "model_revision": lm.revision, "dataset": dataset, "prompt_set": prompt_set,
            "split": split, "method": HardMethod(method).value, "batch_size": batch_size, "max_facts": max_facts,
            "course_lib": __version__}


def _probe_relation(lm: ClozeLM, dataset: str, rel: str, prompt_set: str, split: str, method: HardMethod,
                    spaces: list[AnswerSpace], batch_size: int, max_facts: int | None) -> list[dict]:
    rows = []
    templates = load_prompts(prompt_set, dataset, rel)
    facts = take(load_facts(dataset, rel, split), max_facts)
    if method is HardMethod.EACH:
        runs = [([t], None, t.text) for t in templates]
    elif method is HardMethod.HARD:
        runs = [([templates[0]], None, templates[0].text)]
    elif method is HardMethod.BEST_DEV:
        best, _ = best_template_on_dev(lm, dataset, rel, templates, spaces[0], max_facts, batch_size)
        runs = [([best], None, best.text)]
    else:
        weights = None
        if method is HardMethod.ENSEMBLE_WEIGHTED:
            if any(t.weight is None for t in templates):
                raise ValueError(f"prompt set {prompt_set!r} has no weights for {rel}; use ensemble-uniform")
            weights = torch.log(torch.tensor([max(t.weight, 1e-30) for t in templates]))
        runs = [(list(templates), weights, f"{len(templates)} templates")]
    for tpls, weights, label in runs:
        masks = {s.value: answer_mask(lm, s, dataset, rel, tpls) for s in spaces}
        scored = score_facts_in_spaces(lm, tpls, facts, masks, log_weights=weights, batch_size=batch_size)
        for space in spaces:
            key = dict(model=lm.name, dataset=dataset, relation=rel, prompt_set=prompt_set, method=method.value,
                       split=split, answer_space=space.value)
            s = scored[space.value]
            # No seed: a hard probe samples nothing and trains nothing, so its result is decided
            # by the model, the data and this config alone.
            config = json.dumps({"prompt_set": prompt_set, "method": method.value, "batch_size": batch_size,
                                 "max_facts": max_facts, "answer_space": space.value}, sort_keys=True)
            rows.append(make_row(lm, key, counts_of(s, len(facts)), s.metrics(), template=label, seed=None,
                                 config=config))
    return rows
