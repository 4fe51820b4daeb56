"""Small conveniences for the book's chapters: a results cache for tables, and the probe explorer."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .data import changed_files, recording_reads
from .experiments import results_cache_dir
from .files import write_text


def cached_frame(name: str, key: dict[str, Any], compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """``compute()``'s table, cached on disk under a hash of ``key`` (put every setting that matters in it).

    An entry is one JSON file: the table as CSV text, the sha256 of every data file ``compute``
    read, and a checksum of both. It is written to a temporary file and renamed into place
    (``files.write_text``), so an interrupted execution never leaves half a table; an entry damaged
    anyway (a disk error, a hand edit, a copy cut short) fails its checksum and is recomputed, and
    so is one whose data files have changed since. A bare CSV cut at a line end would read back as
    a shorter, plausible table.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = results_cache_dir() / "tables" / f"{name}-{digest}.json"
    if (table := _read_table_entry(path)) is not None:
        return table
    with recording_reads() as reads:
        table = compute()
    csv = table.to_csv(index=False)
    data = dict(sorted(reads.items()))
    write_text(path, json.dumps({"sha256": _sha256(csv + json.dumps(data, sort_keys=True)), "csv": csv, "data": data}))
    return table


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_table_entry(path: Path) -> pd.DataFrame | None:
    """The cached table at ``path``, or None if there is none, it is not intact, or its data changed."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        csv, data = entry["csv"], entry["data"]
        if not isinstance(csv, str) or not isinstance(data, dict):
            return None
        if entry["sha256"] != _sha256(csv + json.dumps(data, sort_keys=True)):
            return None
        if changed_files(data):
            return None
        return pd.read_csv(io.StringIO(csv))
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError):
        return None


def tolerance(lm) -> dict[str, float]:
    """``atol``/``rtol`` for a chapter's "by hand = library" check of logits or log-probabilities.

    The two sides add the same numbers in another order; in float32 that moves the fourth decimal
    at most, under bfloat16 autocast (on GPUs, see ``ClozeLM.autocast``) the second: Gemma's logits
    near zero moved by up to 0.25 between a batch of ten and ten batches of one (two bf16 steps).
    """
    if lm.autocast_dtype() is None:
        return {"atol": 2e-3, "rtol": 1e-4}
    return {"atol": 0.3, "rtol": 0.02}


def top_answers(lm, template_text: str, subject: str, k: int = 10) -> pd.DataFrame:
    """The model's k best fillers for one (template, subject), with probabilities."""
    import torch

    from .templates import Template

    template = Template(template_text)
    if not lm.covers(template):
        raise ValueError(f"{lm.name} is a causal LM and cannot see a subject placed after the blank: {template_text!r}")
    batch = lm.build_batch([lm.encode_prompt(template)], [subject])
    with torch.no_grad():
        probs = lm.blank_log_probs(batch).exp()[0]
    top = probs.topk(k)
    return pd.DataFrame({"answer": [lm.tokenizer.decode([int(i)]).strip() for i in top.indices],
                         "probability": [float(p) for p in top.values]})


def probe_explorer(lm, templates: dict[str, str], subject: str = "Dante", k: int = 10):
    """A widget: type a subject, pick a relation's template, see the model's top answers."""
    import ipywidgets as widgets
    from IPython.display import display

    subject_box = widgets.Text(value=subject, description="Subject")
    relation = widgets.Dropdown(options=list(templates), description="Relation")
    template_box = widgets.Text(value=templates[relation.value], description="Template", layout=widgets.Layout(width="60%"))
    out = widgets.Output()

    def refresh(*_):
        out.clear_output(wait=True)
        with out:
            try:
                display(top_answers(lm, template_box.value, subject_box.value, k))
            except ValueError as err:  # a template without [X]/[Y], or one a causal LM cannot answer
                print(err)

    def pick(change):
        template_box.value = templates[change["new"]]

    relation.observe(pick, names="value")
    subject_box.observe(refresh, names="value")
    template_box.observe(refresh, names="value")
    refresh()
    return widgets.VBox([widgets.HBox([subject_box, relation]), template_box, out])
