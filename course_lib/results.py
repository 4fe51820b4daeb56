"""Results tables: one row per (model, dataset, relation, prompt set, method, split), with provenance.

``probe``, ``tune`` and ``reproduce`` all write this format, so any table can be concatenated with
any other and summarised the same way.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

KEY_COLUMNS = ["model", "dataset", "relation", "prompt_set", "method", "split", "answer_space"]
NUMBER_COLUMNS = ["facts", "kept", "dropped", "truncated", "p_at_1", "p_at_10", "mrr"]


# Once per process: the code that computes the rows is the code imported at its start.
@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Library versions, machine and git state: what a results row needs to be re-run."""
    import torch
    import transformers

    from . import __version__

    commit, dirty = git_state(Path(__file__).resolve().parent)
    return {
        "course_lib": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def git_state(folder: Path) -> tuple[str, bool | None]:
    """(short commit, whether tracked files have uncommitted changes) of the checkout holding ``folder``.

    ("unknown", None) outside a git checkout (an installed package) or without git. Untracked
    files (results, caches) do not make a checkout dirty, as with ``git describe --dirty``.
    """
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip(), dirty


def make_row(lm, key: dict[str, Any], scored_counts: dict[str, Any], metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    """A results row: the key columns, counts, metrics, extras, and where it came from (model, device, code)."""
    row = {c: key.get(c, "") for c in KEY_COLUMNS}
    row["model_revision"] = lm.revision
    row["device"] = str(lm.device)
    row.update(scored_counts)
    row.update(metrics)
    row.update(extra)
    row.update(provenance())
    return row


def summarize(table: pd.DataFrame, by: Iterable[str] = ("model", "dataset", "prompt_set", "method", "split", "answer_space")) -> pd.DataFrame:
    """Micro (facts pooled) and macro (mean over relations with any kept fact) P@1, P@10, MRR."""
    by = [c for c in by if c in table.columns]
    out = []
    for key, group in table.groupby(by, sort=False, dropna=False):
        g = group[group["kept"] > 0]
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["relations"] = int(group["relation"].nunique())
        row["facts"] = int(group["facts"].sum())
        row["kept"] = int(group["kept"].sum())
        row["dropped"] = int(group["dropped"].sum())
        for m in ("p_at_1", "p_at_10", "mrr"):
            row[f"micro_{m}"] = float((g[m] * g["kept"]).sum() / g["kept"].sum()) if len(g) else math.nan
            row[f"macro_{m}"] = float(g[m].mean()) if len(g) else math.nan
        out.append(row)
    return pd.DataFrame(out)


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a CSV atomically (a killed run never leaves half a table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def format_table(table: pd.DataFrame, columns: list[str] | None = None) -> str:
    cols = columns or [c for c in ["relation", "method", "answer_space", "kept", "dropped", "p_at_1", "p_at_10", "mrr"] if c in table.columns]
    return table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}")


def counts_of(scored, facts_total: int) -> dict[str, Any]:
    return {
        "facts": facts_total,
        "kept": scored.kept,
        "dropped": facts_total - scored.kept,
        "dropped_reasons": json.dumps(dict(scored.dropped), sort_keys=True),
        "truncated": scored.truncated,
    }
