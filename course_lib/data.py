"""Facts, relations and prompt sets, read from the folder layout of ``shared/data``.

Where the data lives is decided in one place, ``data_root``: the folder named by the environment
variable ``COURSE_LIB_DATA`` if set, else a per-user cache that ``course_lib.download`` fills from
the public releases on first use (checksums verified, and verified again before each use).

Every file is opened through ``data_path``, which also tells ``recording_reads`` which files a
computation read and their sha256: results carry these checksums, so a stored result is reused
only while the data it came from is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from .templates import Template, TemplateError

DATASETS = ("trex_original", "trex_extend", "trex_distinct", "google_re", "conceptnet")
SPLITS = ("train", "dev", "test")
ENV_VAR = "COURSE_LIB_DATA"


class DataError(ValueError):
    """Bad data or a bad request for data; the message names the file and line, or the argument."""


class DataMissing(DataError):
    """The data folder or one of its files is not there: a problem of this machine, not of the request."""


class DataFileError(DataError):
    """A data file whose contents are wrong (malformed, not UTF-8, empty): the data's problem, not the request's."""


@dataclass(frozen=True)
class Fact:
    subject: str
    object: str


@dataclass(frozen=True)
class Relation:
    id: str
    label: str
    type: str | None  # LAMA's cardinality: "1-1", "N-1" or "N-M"; None where LAMA gives none
    template: str  # LAMA's manual template


def _family(dataset: str) -> str:
    return "trex" if dataset.startswith("trex") else dataset


# The prompt sets: name -> (how to find the files for a dataset family, what the set is).
PROMPT_SETS: dict[str, str] = {
    "lama": "LAMA's manual template (several for ConceptNet)",
    "lpaqa-mine": "LPAQA's templates mined from Wikipedia, with weights",
    "lpaqa-paraphrase": "LPAQA's templates made by back-translation, with weights",
    "lpaqa-manual": "LPAQA's hand-written paraphrases of the LAMA template (T-REx only)",
    "autoprompt-bert": "AutoPrompt's trigger tokens found for BERT (T-REx only)",
    "autoprompt-roberta": "AutoPrompt's trigger tokens found for RoBERTa (T-REx only)",
}


def cache_dir() -> Path:
    """Per-user cache for data, converted models and results.

    ``COURSE_LIB_CACHE`` names it outright (on Colab, a Google Drive folder that outlives the VM:
    ``course_lib.install.use_drive``); else ``$XDG_CACHE_HOME/course_lib`` or ``~/.cache/course_lib``.
    """
    if os.environ.get("COURSE_LIB_CACHE"):
        return Path(os.environ["COURSE_LIB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "course_lib"


def data_root() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataMissing(f"{ENV_VAR}={env!r} is not a folder; point it at a copy of shared/data or unset it")
        return root
    return cache_dir() / "data"


# ------------------------------------------------------------------------------------------ checksums of what was read
_READS: contextvars.ContextVar[tuple[dict[str, str], ...]] = contextvars.ContextVar("course_lib_data_reads",
                                                                                   default=())
# sha256 per file, remembered while the file's size, modification time and inode stay the same:
# the facts files are opened again and again within one run, and hashing each time would add up.
_SHA256: dict[str, tuple[tuple[int, int, int, int], str]] = {}
# Downloaded files already checked against the registry in this process, with the stat they had then.
_VERIFIED: dict[str, tuple[int, int, int, int]] = {}


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def file_sha256(path: Path) -> str:
    """The file's sha256 (remembered until the file changes on disk)."""
    key = _stat_key(path)
    known = _SHA256.get(str(path))
    if known is not None and known[0] == key:
        return known[1]
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    _SHA256[str(path)] = (key, h)
    return h


@contextlib.contextmanager
def recording_reads() -> Iterator[dict[str, str]]:
    """Collect {relative path: sha256} of every data file opened inside the block (nested blocks each get all)."""
    reads: dict[str, str] = {}
    token = _READS.set(_READS.get() + (reads,))
    try:
        yield reads
    finally:
        _READS.reset(token)


def changed_files(recorded: dict[str, str]) -> dict[str, str]:
    """Which of ``recorded``'s files are not what they were: {relative path: "changed" or "missing"}.

    Reading them again records them in any ``recording_reads`` block around the call, as a
    computation that reads them would.
    """
    out = {}
    for rel, sha in sorted(recorded.items()):
        try:
            if file_sha256(data_path(rel)) != sha:
                out[rel] = "changed"
        except (DataError, OSError, ValueError):
            out[rel] = "missing"
    return out


def facts_sha256(facts: Iterable[Fact]) -> str:
    """A checksum of a list of facts (order included): the identity of the training data of a run."""
    return hashlib.sha256(json.dumps([[f.subject, f.object] for f in facts], ensure_ascii=False).encode()).hexdigest()


def data_path(relpath: str) -> Path:
    """The local path of one data file; in the download cache, fetched if needed and verified before use."""
    root = data_root()
    path = root / relpath
    if os.environ.get(ENV_VAR):
        if not path.is_file():
            raise DataMissing(f"{path} does not exist ({ENV_VAR}={os.environ[ENV_VAR]!r}); is that folder a full copy "
                              "of shared/data?")
        sha = file_sha256(path) if _READS.get() else ""
    else:
        path, sha = _verified_download(relpath, root)
    for reads in _READS.get():
        reads[relpath] = sha
    return path


def _verified_download(relpath: str, root: Path) -> tuple[Path, str]:
    """The cached copy of a registry file, checked against its sha256 once per process and whenever it changes."""
    from .download import fetch_file

    path = root / relpath
    try:
        if path.is_file() and _VERIFIED.get(str(path)) == _stat_key(path):
            return path, _registry_sha(relpath)
    except OSError:
        pass
    # fetch_file re-hashes a file already in the cache and downloads it again (saying so) if it is
    # not the registry's: an edited or damaged copy is never used.
    path = fetch_file(relpath, root)
    _VERIFIED[str(path)] = _stat_key(path)
    return path, _registry_sha(relpath)


def _registry_sha(relpath: str) -> str:
    from .download import _packaged_registry  # not load_registry: that copies all ~750 entries per call

    return str(_packaged_registry()[relpath]["sha256"]).lower()


def _is_relation_folder(folder: Path) -> bool:
    # A relation is a folder holding its splits; anything else in a dataset folder (.DS_Store,
    # README.txt, an editor's backup, an empty folder) is not one.
    if not folder.is_dir() or folder.name.startswith("."):
        return False
    return any((folder / f"{s}.jsonl").is_file() for s in SPLITS)


def _listing(relprefix: str) -> list[str]:
    """Relation folders directly under a data folder, from disk or (for the cache) from the download registry."""
    if os.environ.get(ENV_VAR):
        folder = data_root() / relprefix
        return sorted(p.name for p in folder.iterdir() if _is_relation_folder(p)) if folder.is_dir() else []
    from .download import load_registry

    prefix = relprefix.rstrip("/") + "/"
    # Only entries with a file below the relation's folder: a file directly in the dataset folder is no relation.
    return sorted({k[len(prefix):].split("/")[0] for k in load_registry()
                   if k.startswith(prefix) and k.count("/") > prefix.count("/")})


def _unknown(kind: str, value: str, valid: list[str] | tuple[str, ...], where: str = "") -> DataError:
    close = difflib.get_close_matches(value, list(valid), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return DataError(f"unknown {kind} {value!r}{where}.{hint} Valid: {', '.join(valid)}")


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise _unknown("dataset", dataset, DATASETS)
    return dataset


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise _unknown("split", split, SPLITS)
    return split


def relations(dataset: str) -> list[str]:
    """Relation ids of a dataset, sorted by name."""
    check_dataset(dataset)
    ids = _listing(f"soft_prompts/db/{dataset}")
    if not ids:
        raise DataMissing(f"no relations found for dataset {dataset!r} under {data_root()}")
    return ids


def check_relations(dataset: str, wanted: list[str] | None) -> list[str]:
    valid = relations(dataset)
    if not wanted:
        return valid
    for rel in wanted:
        if rel not in valid:
            raise _unknown("relation", rel, valid, f" for dataset {dataset!r}")
    return list(wanted)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line; a bad line raises DataError naming file and line.

    Reads with utf-8-sig so that a BOM is ignored; CRLF line ends are accepted.
    """
    text = _read_text(path)
    # Lines end at "\n" (an optional "\r" before it is dropped): str.splitlines would also split
    # at characters such as \x1e or \u2028 inside a value and number the lines wrongly.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}): "
                                f"{line[:80]!r}") from None
        if not isinstance(record, dict):
            raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _read_text(path: Path) -> str:
    """The file's text (a BOM ignored); bytes that are not UTF-8 raise DataError naming file, line and byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}, line {line})") from None


def _string_field(record: dict[str, Any], key: str, path: Path, lineno: int) -> str:
    if key not in record:
        raise DataFileError(f"{path}:{lineno}: missing key {key!r} (keys: {', '.join(map(str, record)) or 'none'})")
    value = record[key]
    if not isinstance(value, str):
        raise DataFileError(f"{path}:{lineno}: {key!r} must be a string, got {type(value).__name__}: {value!r}")
    return value


def read_facts(path: Path) -> list[Fact]:
    facts = [
        Fact(_string_field(r, "sub", path, n), _string_field(r, "obj", path, n)) for n, r in read_jsonl(path)
    ]
    if not facts:
        raise DataFileError(f"{path}: no facts in this split (the file is empty)")
    return facts


def load_facts(dataset: str, relation: str, split: str) -> list[Fact]:
    check_split(split)
    check_relations(dataset, [relation])
    return read_facts(data_path(f"soft_prompts/db/{dataset}/{relation}/{split}.jsonl"))


def _lama_relations() -> dict[str, Relation]:
    path = data_path("lama/relations.jsonl")
    return _read_lama_relations(path, file_sha256(path))


# Cached per file and content, not once per process: COURSE_LIB_DATA may be pointed elsewhere
# mid-session, or the file edited.
@lru_cache(maxsize=None)
def _read_lama_relations(path: Path, sha256: str) -> dict[str, Relation]:
    out = {}
    for n, r in read_jsonl(path):
        rid = _string_field(r, "relation", path, n)
        out[rid] = Relation(rid, r.get("label", rid), r.get("type"), _string_field(r, "template", path, n))
    return out


def relation_info(dataset: str, relation: str) -> Relation:
    """Label, LAMA type and manual template of a relation."""
    check_relations(dataset, [relation])
    if _family(dataset) == "trex":
        return _lama_relations()[relation]
    template = load_prompts("lama", dataset, relation)[0].text
    return Relation(relation, relation.replace("_", " "), None, template)


def read_templates(path: Path) -> list[Template]:
    """Templates from a jsonl file ({"template": ..., "weight"?: ...}) or a plain text file, one a line."""
    out: list[Template] = []
    if path.suffix == ".txt":
        lines = _read_text(path).split("\n")  # numbered as read_jsonl numbers them
        records = [(n, {"template": line.strip()}) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        records = list(read_jsonl(path))
    for n, r in records:
        text = _string_field(r, "template", path, n)
        weight = r.get("weight")
        # bool is an int to Python, and JSON parsers accept NaN and Infinity: none is a weight. A
        # weight is a probability (LPAQA's ensembles take its log): a negative one is an error in
        # the file, not something to clamp.
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)):
            raise DataFileError(f"{path}:{n}: 'weight' must be a finite number, got {weight!r}")
        if weight is not None and weight < 0:
            raise DataFileError(f"{path}:{n}: 'weight' must not be negative (it is a probability), got {weight!r}")
        try:
            out.append(Template(text, None if weight is None else float(weight), f"{path}:{n}"))
        except TemplateError as err:
            raise DataFileError(str(err)) from None
    if not out:
        raise DataFileError(f"{path}: no templates in this file (it is empty)")
    return out


def load_prompts(prompt_set: str, dataset: str, relation: str) -> list[Template]:
    """The templates of one prompt set for one relation (LPAQA's weights kept where given)."""
    if prompt_set not in PROMPT_SETS:
        raise _unknown("prompt set", prompt_set, list(PROMPT_SETS))
    fam = _family(check_dataset(dataset))
    # Checked first so that a typo gets the list of valid relations, not a missing-file error.
    check_relations(dataset, [relation])
    folder = {"lama": "", "lpaqa-mine": "_mine", "lpaqa-paraphrase": "_paraphrase"}
    if prompt_set in folder:
        if fam == "conceptnet" and prompt_set != "lama":
            raise DataError(f"prompt set {prompt_set!r} has no ConceptNet templates; use 'lama' (several per relation)")
        path = data_path(f"soft_prompts/prompts/{fam}{folder[prompt_set]}/{relation}.jsonl")
        return read_templates(path)
    if fam != "trex":
        raise DataError(f"prompt set {prompt_set!r} exists for T-REx relations only, not {dataset!r}")
    if prompt_set == "lpaqa-manual":
        return read_templates(data_path(f"lpaqa/prompt/manual_paraphrase/{relation}.txt"))
    model = prompt_set.split("-")[1]
    path = data_path(f"autoprompt/prompts/fact_retrieval_{model}_prompts.jsonl")
    found = [
        Template(_string_field(r, "template", path, n), None, f"{path}:{n}")
        for n, r in read_jsonl(path)
        if r.get("relation") == relation
    ]
    if not found:
        raise DataError(f"{path}: no AutoPrompt trigger for relation {relation!r}")
    return found


def common_vocab(name: str = "common_vocab_cased.txt") -> tuple[str, ...]:
    """LAMA's common vocabulary: the words every model LAMA compared has as one token."""
    path = data_path(f"common_vocab/{name}")
    return _read_vocab(path, file_sha256(path))


@lru_cache(maxsize=None)
def _read_vocab(path: Path, sha256: str) -> tuple[str, ...]:
    # _read_text names the file (and line) when it is not UTF-8.
    return tuple(w for w in _read_text(path).splitlines() if w.strip())
