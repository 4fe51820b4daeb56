"""Results tables: one row per (model, dataset, relation, prompt set, method, split), with provenance.

``probe``, ``tune`` and ``reproduce`` all write this format, so any table can be concatenated with
any other and summarised the same way.

A row carries its *identity* (the ``identity`` column, JSON): everything that decided it (model and
revision, dataset, relation, split, answer space, caps, method and its parameters, seed, library
version) and the sha256 of every data file it read. A stored row is reused only when its identity
is the one asked for and those files are unchanged.

A scored row also carries its outcome on each fact (``fact_ranks``: each kept fact's line in its
split file and the gold object's rank; ``majority_hits``: the facts the majority answer gets), so
that rows scored on the same facts can be compared fact by fact (``statistics``).

On disk a table is a CSV whose every row ends with ``row_sha256``, a checksum of the row's cells:
a row cut short, padded with NUL bytes or edited is recognised as damaged when read back
(``read_stored``). Files several processes add rows to are updated under a lock
(``update_table``), each write renamed into place whole (``files.atomic_path``).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from .files import locked, write_text

KEY_COLUMNS = ["model", "dataset", "relation", "prompt_set", "method", "split", "answer_space"]
NUMBER_COLUMNS = ["facts", "kept", "dropped", "truncated", "p_at_1", "p_at_10", "mrr"]
# What tells two rows apart: the key, and the template for probe's "each" (one row per template).
ROW_KEY = KEY_COLUMNS + ["template"]
ROW_CHECKSUM = "row_sha256"
# Counts stay whole numbers through a CSV, even in a column where some rows have none (pandas would
# otherwise turn the whole column into floats).
INTEGER_COLUMNS = ("facts", "kept", "dropped", "truncated", "seed", "best_epoch", "epochs_run", "resumed_from_epoch")
# Per-fact outcomes, so that two rows scored on the same facts can be compared fact by fact
# (``statistics``): the gold answer's rank for each kept fact, the facts the majority answer gets.
FACT_RANKS = "fact_ranks"
MAJORITY_HITS = "majority_hits"
# Text even when it looks like a number (a git commit "0123456", a relation "100").
TEXT_COLUMNS = ("model", "dataset", "relation", "prompt_set", "method", "split", "answer_space", "template",
                "model_revision", "device", "dropped_reasons", "config", "identity", "templates", "history", "weights",
                "note", "checkpoint", "budget", "course_lib", "torch", "transformers", "python",
                "git_commit", FACT_RANKS, MAJORITY_HITS)
METRIC_COLUMNS = ("p_at_1", "p_at_10", "mrr")
# The columns of a table with no rows (a shard that got no jobs): still a table `merge` accepts.
EMPTY_TABLE_COLUMNS = [*KEY_COLUMNS, "model_revision", "device", "facts", "kept", "dropped", "dropped_reasons",
                       "truncated", *METRIC_COLUMNS, "identity"]


class TableError(ValueError):
    """A file that cannot be read as a results table; the message names the file and what is wrong."""


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
        g = group[group["kept"].fillna(0) > 0]
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["relations"] = int(group["relation"].nunique())
        row["facts"] = int(group["facts"].sum())
        row["kept"] = int(group["kept"].sum())
        row["dropped"] = int(group["dropped"].sum())
        # The baselines every row carries (majority answer, untuned prompt) are averaged the same way,
        # over the same kept facts, so a table can show them beside the method's own scores.
        for m in ("p_at_1", "p_at_10", "mrr", "majority_p_at_1", "hard_p_at_1"):
            if m not in g.columns:
                continue
            row[f"micro_{m}"] = float((g[m] * g["kept"]).sum() / g["kept"].sum()) if len(g) else math.nan
            row[f"macro_{m}"] = float(g[m].mean()) if len(g) else math.nan
        out.append(row)
    return pd.DataFrame(out)


def write_table(table: pd.DataFrame | Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write a results CSV atomically (a killed run never leaves half a table), each row with its checksum.

    A table without rows is written with the standard columns, so it is still a table.
    """
    return write_text(path, _csv_text([_cells(r) for r in _records(table)]))


def update_table(path: str | os.PathLike, rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> list[str]:
    """Add ``rows`` to the table at ``path`` (created if missing), replacing stored rows with the same key.

    Done under ``files.locked``: processes adding rows to one file at once each see the others'
    rows, and none is lost. Returns the notes of ``read_stored`` on the rows found damaged (and
    dropped) in the stored file.
    """
    path = Path(path)
    new = [_cells(r) for r in _records(rows)]
    with locked(path):
        stored = read_stored(path) if holds_a_table(path) else StoredTable(path, [], [], [])
        keys = {_key(r) for r in new}
        write_text(path, _csv_text([r for r in stored.rows if _key(r) not in keys] + new))
    return stored.damaged


# ------------------------------------------------------------------------------------------ identity
def identity_json(fields: Mapping[str, Any]) -> str:
    """The ``identity`` column: ``fields`` as canonical JSON."""
    return json.dumps(dict(fields), sort_keys=True, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {value!r}")


def describe_differences(old: Mapping[str, Any], new: Mapping[str, Any], then: str = "stored",
                         now: str = "now") -> str:
    """"max_facts (10 stored, 20 now), data": the fields in which ``old`` and ``new`` differ, short values shown."""
    parts = []
    for k in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        shown = [json.dumps(v, default=str, ensure_ascii=False) for v in (a, b)]
        if max(len(x) for x in shown) <= 40:
            parts.append(f"{k} ({shown[0]} {then}, {shown[1]} {now})")
        else:
            parts.append(k)
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------ cells and checksums
def _records(table: pd.DataFrame | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(table, pd.DataFrame):
        return table.to_dict("records")
    return [dict(r) for r in table]


def _cell(column: str, value: Any) -> str:
    """A value as CSV text: missing values empty, whole counts without ".0", floats exactly (repr)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if column in INTEGER_COLUMNS and value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return str(value)


def _cells(row: Mapping[str, Any]) -> dict[str, str]:
    return {c: _cell(c, v) for c, v in row.items() if c != ROW_CHECKSUM}  # the checksum is made when written


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan|infinity)", re.IGNORECASE)


def _canonical(cell: str) -> str:
    # "8" and "8.0", "0.5" and "5e-01" are the same number: a table written again by pandas (which
    # turns counts into floats where a column has gaps) still matches its checksums.
    return repr(float(cell)) if _NUMBER.fullmatch(cell) else cell


def row_checksum(cells: Mapping[str, str]) -> str:
    """sha256 (16 hex digits) of a row's non-empty cells, column names included."""
    canon = {c: _canonical(v) for c, v in cells.items() if v != "" and c != ROW_CHECKSUM}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _key(cells: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(cells.get(c, "") for c in ROW_KEY)


def row_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``ROW_KEY`` cells of a row (in memory or read back) as they are written: what tells rows apart."""
    return _key(_cells(row))


def _csv_text(rows: list[dict[str, str]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns and c != ROW_CHECKSUM]
    if not rows:
        columns = list(EMPTY_TABLE_COLUMNS)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*columns, ROW_CHECKSUM])
    for r in rows:
        cells = {c: r.get(c, "") for c in columns}
        writer.writerow([*cells.values(), row_checksum(cells)])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ reading back
@dataclass
class StoredTable:
    """The sound rows of a results CSV (cells as text, checksums checked) and what was wrong with the others."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    sealed: list[bool]  # whether each row carried a checksum (and it matched); older files have none
    damaged: list[str] = field(default_factory=list)  # "line N: why", one per row left out

    def frame(self) -> pd.DataFrame:
        return frame_of(self.rows, self.columns)


def holds_a_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` has anything to read back: a missing or empty (e.g. just created) output is a fresh one."""
    path = Path(path)
    return path.exists() and not (path.is_file() and path.stat().st_size == 0)


def read_stored(path: str | os.PathLike, strict: bool = False) -> StoredTable:
    """Read a results CSV back, checking every row; damaged rows are left out and described.

    With ``strict``, any damage raises ``TableError`` (for ``merge``, which must not drop rows
    quietly). A file that is not a results table at all (missing, a folder, empty, binary, not
    UTF-8, no key columns) always raises ``TableError`` naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise TableError(f"{path}: is a folder, not a results CSV")
    if not path.exists():
        raise TableError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise TableError(f"{path}: empty file (not even a header line); not a results table")
    nul = raw.find(b"\0")
    if strict and nul >= 0:
        raise TableError(f"{path}: binary data (a NUL byte at offset {nul}); not a results CSV, or a damaged one")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if strict or raw[: err.start].count(b"\n") == 0:
            raise TableError(f"{path}: not UTF-8 text (byte {err.start}); not a results CSV") from None
        text = raw.decode("utf-8-sig", errors="replace")
    text = text.replace("\0", "\ufffd")  # older csv modules stop at a NUL; here it only marks its row damaged
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise TableError(f"{path}: not a readable CSV ({err})") from None
    header = lines[0] if lines else []
    missing = [c for c in KEY_COLUMNS if c not in header]
    if missing:
        found = ", ".join(_shown(c) for c in header[:8]) or "none"
        raise TableError(f"{path}: not a course_lib results table (no column {', '.join(missing)}; found "
                         f"{found}{', ...' if len(header) > 8 else ''})")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise TableError(f"{path}: column {', '.join(_shown(c) for c in dup)} appears twice in the header")
    if ROW_CHECKSUM not in header:
        # A checksum column under a damaged name would turn a checked file into an unchecked one.
        near = [c for c in header if difflib.SequenceMatcher(None, c, ROW_CHECKSUM).ratio() >= 0.75]
        if near:
            raise TableError(f"{path}: the header is damaged (column {_shown(near[0])} where {ROW_CHECKSUM} belongs)")
    table = StoredTable(path, [c for c in header if c != ROW_CHECKSUM], [], [])
    # Line numbers as an editor shows them (a quoted cell may span lines; this CSV writer never does that).
    cut = not text.endswith("\n")
    body = [(n, r) for n, r in enumerate(lines[1:], start=2) if r]
    for i, (n, cells) in enumerate(body):
        why = _damage(header, cells, last_and_cut=cut and i == len(body) - 1)
        if why:
            table.damaged.append(f"line {n}: {why}")
            continue
        row = dict(zip(header, cells))
        table.sealed.append(bool(row.pop(ROW_CHECKSUM, "")))
        table.rows.append(row)
    if strict and table.damaged:
        raise TableError(f"{path}: {len(table.damaged)} damaged row(s), e.g. {table.damaged[0]}; the file is cut "
                         "short, damaged or was edited by hand (remove its row_sha256 column to accept edits)")
    return table


def _shown(name: str, limit: int = 40) -> str:
    """A column name as an error message can show it: on one line, not too long (a damaged header holds anything)."""
    text = name if name.isprintable() else repr(name)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def _damage(header: list[str], cells: list[str], last_and_cut: bool) -> str | None:
    """Why a row cannot be trusted, or None."""
    if len(cells) != len(header):
        return f"{len(cells)} fields where the header has {len(header)} (a row cut short or run together)"
    row = dict(zip(header, cells))
    if any("\ufffd" in v for v in cells):
        return "bytes that are not text (NUL or not UTF-8)"
    if ROW_CHECKSUM in row:
        if row[ROW_CHECKSUM] != row_checksum(row):
            return "does not match its checksum (damaged, cut short or edited)"
        return None
    # A row from a file without checksums (an older course_lib, or written by pandas): checked for sense.
    if last_and_cut:
        return "the file ends inside this row (no line end): it was cut short"
    empty = [c for c in KEY_COLUMNS if not row[c].strip()]
    if empty:
        return f"no {', '.join(empty)}"
    for c in INTEGER_COLUMNS:
        v = row.get(c, "")
        if v and not (_NUMBER.fullmatch(v) and math.isfinite(float(v)) and float(v).is_integer()):
            return f"{c} {v!r} is not a whole number"
    for c in ("facts", "kept", "dropped"):
        if row.get(c) and float(row[c]) < 0:
            return f"{c} {row[c]!r} is negative"
    for c in METRIC_COLUMNS:
        v = row.get(c, "")
        if v and not (_NUMBER.fullmatch(v) and 0.0 <= float(v) <= 1.0):
            return f"{c} {v!r} is not a number between 0 and 1"
    return None


def frame_of(rows: list[dict[str, str]], columns: list[str]) -> pd.DataFrame:
    """A DataFrame of text rows with the types a results table has: whole counts, float metrics, text keys."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_whole(c, r.get(c, "")) for c in columns])
    buf.seek(0)
    dtype = {c: "Int64" for c in columns if c in INTEGER_COLUMNS}
    dtype.update({c: str for c in columns if c in TEXT_COLUMNS})
    table = pd.read_csv(buf, dtype=dtype, keep_default_na=False, na_values=[""])
    for c in columns:
        if c in INTEGER_COLUMNS and not table[c].isna().any():
            table[c] = table[c].astype("int64")  # as a table built in memory has them
    return table


def _whole(column: str, cell: str) -> str:
    if column in INTEGER_COLUMNS and cell and _NUMBER.fullmatch(cell) and float(cell).is_integer():
        return str(int(float(cell)))
    return cell


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A results CSV as a DataFrame, every row checked (``read_stored`` with ``strict``)."""
    return read_stored(path, strict=True).frame()


def format_table(table: pd.DataFrame, columns: list[str] | None = None) -> str:
    cols = columns or [c for c in ["relation", "method", "answer_space", "kept", "dropped", "p_at_1", "p_at_10", "mrr"] if c in table.columns]
    return table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}")


def counts_of(scored, facts_total: int, *, per_fact: bool = True) -> dict[str, Any]:
    """The count columns of a row scored as ``scored``, and (``per_fact``) its ``fact_ranks``.

    Pass ``per_fact=False`` where the row's metrics are not ``scored``'s (a relation left untuned):
    per-fact outcomes must always be those of the row's own P@1.
    """
    counts = {
        "facts": facts_total,
        "kept": scored.kept,
        "dropped": facts_total - scored.kept,
        "dropped_reasons": json.dumps(dict(scored.dropped), sort_keys=True),
        "truncated": scored.truncated,
    }
    if per_fact:
        counts[FACT_RANKS] = fact_ranks_json(scored.index.tolist(), scored.ranks.tolist())
    return counts


# ------------------------------------------------------------------------------ per-fact outcomes
def fact_ranks_json(index: Sequence[int], ranks: Sequence[int]) -> str:
    """The ``fact_ranks`` cell: ``{"index": [...], "rank": [...]}``, aligned, without spaces.

    ``index`` is each kept fact's 0-based line in its split file (``evaluation.Scored.index``),
    ``rank`` the gold object's 1-based rank for it. Subject and object cannot serve as the id: a
    split file can list the same fact twice (T-REx P176's test split repeats 9 of its lines).
    """
    cell = {"index": [int(i) for i in index], "rank": [int(r) for r in ranks]}
    return json.dumps(cell, separators=(",", ":"))


def row_name(row: Mapping[str, Any]) -> str:
    """A row as an error message names it: its key cells (and template, if any) joined by "/"."""
    return "/".join(c for c in row_key(row) if c)


def _cell_text(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def fact_ranks(row: Mapping[str, Any]) -> dict[int, int]:
    """{fact index in the split file: the gold object's 1-based rank} for every fact the row kept.

    Raises ``TableError`` naming the row when it has no ``fact_ranks`` (a table written by an older
    course_lib, or a row with no metric of its own) or when the cell does not agree with ``kept``.
    """
    cell = _cell_text(row, FACT_RANKS)
    if not cell:
        raise TableError(f"row {row_name(row)}: no {FACT_RANKS} (written by an older course_lib, or "
                         "a row with no score of its own): its facts cannot be compared one by one; "
                         "compute the row again")
    try:
        parsed = json.loads(cell)
        index, ranks = parsed["index"], parsed["rank"]
        out = dict(zip((int(i) for i in index), (int(r) for r in ranks), strict=True))
    except (ValueError, TypeError, KeyError) as err:
        raise TableError(f"row {row_name(row)}: unreadable {FACT_RANKS} ({err})") from None
    kept = _cell_text(row, "kept")
    if len(out) != len(index) or (kept and len(out) != int(float(kept))):
        raise TableError(f"row {row_name(row)}: {FACT_RANKS} lists {len(index)} facts ({len(out)} "
                         f"distinct) where the row kept {kept or 'an unknown number'}")
    if any(i < 0 for i in out) or any(r < 1 for r in out.values()):
        raise TableError(f"row {row_name(row)}: {FACT_RANKS} has a negative index or a rank "
                         "below 1")
    return out


def majority_hits(row: Mapping[str, Any]) -> dict[int, bool]:
    """{fact index: whether the row's majority answer is the gold object} on the facts the row kept.

    The majority baseline as a method of its own, on exactly the facts the row's P@1 is over.
    """
    kept = fact_ranks(row)
    cell = _cell_text(row, MAJORITY_HITS)
    if not cell:
        raise TableError(f"row {row_name(row)}: no {MAJORITY_HITS} (a row without a majority "
                         "baseline, or written by an older course_lib)")
    try:
        hits = {int(i) for i in json.loads(cell)}
    except (ValueError, TypeError) as err:
        raise TableError(f"row {row_name(row)}: unreadable {MAJORITY_HITS} ({err})") from None
    if not hits <= kept.keys():
        raise TableError(f"row {row_name(row)}: {MAJORITY_HITS} names facts the row did not keep")
    return {i: i in hits for i in kept}
