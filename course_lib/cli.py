"""Command line: ``python -m course_lib probe|tune|reproduce|merge|models|bench|download``.

Each command calls the same function a notebook would, prints the per-relation table and a
micro/macro summary, and writes a CSV in the common results format.

What the command line promises:

* Every argument is checked when it is parsed; a bad one gets a one-line error naming it.
* Output paths are checked before any work starts.
* A finished relation (or job) is on disk before the next one starts; several commands may add
  rows to one ``--out`` at once (``results.update_table`` locks it).
* A stored result is reused only when it is exactly the result asked for (same model and weights,
  data, split, answer space, caps, method and settings, library version), and the command says so.
* No Python traceback for a user's mistake or a problem of the machine: exit code 2 for a usage
  error, 1 for an environment error (missing data, a full or read-only disk), 130 after Ctrl-C.
  ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from . import __version__
from .data import DATASETS, PROMPT_SETS, SPLITS, DataError, DataFileError, DataMissing
from .download import ChecksumMismatch, DataNotFound
from .evaluation import SCORING_BATCH, AnswerSpace
from .files import UnusablePath, check_output_dir, check_output_file, describe_os_error
from .models import DEFAULT_MODEL, DEVICE_ENV, DeviceUnavailable, ModelUnavailable, parse_device
from .probing import HardMethod
from .results import (FACT_RANKS, TableError, format_table, frame_of, holds_a_table, read_stored,
                      row_key, summarize, update_table, write_table)
from .templates import TemplateError
from .training import LR_PER_SPREAD, MAX_SEED, CheckpointError, CheckpointMismatch

# Largest count an option takes: far above any dataset, far below what overflows anything downstream.
MAX_COUNT = 2**31 - 1


class EnvironmentProblem(RuntimeError):
    """Something about this machine or its environment variables, not the command, stops the run (exit 1)."""


# ------------------------------------------------------------------------------------------ argument types
# Checked by argparse, so that a bad value is reported with the option's name, before any work.
_WHOLE = re.compile(r"[0-9]+")  # ASCII digits only: int() would also take "1_000", " 7" or "٣"


def _whole(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not _WHOLE.fullmatch(text) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, a whole number from {low} to {high}; got {text!r}")
        return int(text)

    parse.__name__ = what  # argparse shows this name if anything else goes wrong
    return parse


_count = _whole(1, MAX_COUNT, "a count")
_seed = _whole(0, MAX_SEED, "a seed")


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number such as 0.01; got {text!r}")
    return value


def _list(text: str, what: str, example: str) -> list[str]:
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"expected one or more {what}, comma-separated (e.g. {example}); "
                                         f"got {text!r}")
    if not all(parts):
        raise argparse.ArgumentTypeError(f"an empty item in {text!r} (a doubled comma, or one at an end?)")
    twice = sorted({p for p in parts if parts.count(p) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice in {text!r}; each would be counted twice")
    return parts


def _relations(text: str) -> list[str]:
    return _list(text, "relation ids", "P36,P19")


def _spaces(text: str) -> list[str]:
    parts = _list(text, "answer spaces", "full,common")
    valid = [a.value for a in AnswerSpace]
    for part in parts:
        if part not in valid:
            raise argparse.ArgumentTypeError(f"unknown answer space {part!r}; valid: {', '.join(valid)}")
    return parts


def _one_space(text: str) -> list[str]:
    spaces = _spaces(text)
    if len(spaces) > 1:
        raise argparse.ArgumentTypeError(f"this command takes one answer space; got {text!r}")
    return spaces


def _mixture(text: str) -> int | str:
    if text.lower() in ("k", "all"):
        return "K"
    if _WHOLE.fullmatch(text) and 1 <= int(text) <= MAX_COUNT:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 1, a number of templates K >= 1, or K/all; got {text!r}")


def _depth(text: str) -> int | str:
    if text == "all":
        return "all"
    if _WHOLE.fullmatch(text) and int(text) <= MAX_COUNT:
        return int(text)  # "00" is 0: the label says what was run, not how it was typed
    raise argparse.ArgumentTypeError(f"expected a layer number (0 = input embeddings only) or 'all'; got {text!r}")


def _shard(text: str) -> tuple[int, int] | str:
    if text == "auto":
        return text
    i, sep, n = text.partition("/")
    if sep and _WHOLE.fullmatch(i) and _WHOLE.fullmatch(n) and int(i) < int(n) <= MAX_COUNT:
        return int(i), int(n)
    raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, e.g. 0/4, or auto; got {text!r}")


def _device(text: str) -> str:
    try:
        return str(parse_device(text, ""))  # argparse names the option
    except DeviceUnavailable as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path; got an empty string")
    return text


# ------------------------------------------------------------------------------------------ the parser
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python 3.11's argparse drops an explicit "--" value (`--device=--`) and then skips the
        # type check, handing the command an empty list: refuse it, as later Pythons do.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            raise argparse.ArgumentError(action, "'--' is not a value")
        return super()._get_values(action, arg_strings)


class _HelpWithDefaults(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, except that flags say "off" and an option whose
    default is None explains its default in its own words (tests/test_cli_arguments.py checks that each one does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default)" in text or not action.option_strings:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


def _subparser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpWithDefaults)
    # Accepted after the command too; SUPPRESS keeps a --debug given before the command.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error (default: off)")
    return p


def _common(p: argparse.ArgumentParser, several_spaces: bool) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registered model name or hub id (`models` lists them)")
    p.add_argument("--dataset", default="trex_original", choices=DATASETS, help="which facts")
    p.add_argument("--relations", type=_relations, help="comma-separated relation ids, e.g. P36,P19 (default: every "
                                                        "relation of the dataset)")
    p.add_argument("--answer-space", default=["full"], type=_spaces if several_spaces else _one_space, metavar="SPACE",
                   help="full (the model's vocabulary), common (LAMA's common vocabulary) or relation (the relation's "
                        "objects)" + ("; several, comma-separated, are scored in one pass" if several_spaces else "")
                        + " (default: full)")
    p.add_argument("--device", type=_device, help=f"cpu, cuda, cuda:N or mps (default: ${DEVICE_ENV} if set, else the "
                                                  "best available)")
    p.add_argument("--compile", action="store_true",
                   help="run forward passes through torch.compile (ClozeLM.compile; measure first: "
                        "bench/eval_throughput.py --compile)")
    p.add_argument("--out", type=_path,
                   help="CSV file to add the rows to (default: results/COMMAND-...-MODEL-DATASET.csv)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m course_lib", formatter_class=_HelpWithDefaults,
                                     description="Probe language models for facts with hard and soft prompts.")
    parser.add_argument("--version", action="version", version=f"course_lib {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subparser(sub, "probe", "measure knowledge with hard prompts (LAMA, LPAQA, AutoPrompt)")
    _common(p, several_spaces=True)
    p.add_argument("--prompts", default="lama", choices=list(PROMPT_SETS), help="prompt set")
    p.add_argument("--method", default=HardMethod.HARD.value, choices=[m.value for m in HardMethod],
                   help="hard: the set's first template; each: every template; best-dev: best on dev; "
                        "ensemble-*: all, mixed")
    p.add_argument("--split", default="test", choices=SPLITS, help="which facts to score")
    p.add_argument("--max-facts", type=_count, help="use only the first N facts of each relation (default: all)")
    p.add_argument("--batch-size", type=_count, default=SCORING_BATCH, help="facts per forward pass")
    p.add_argument("--resume", action="store_true",
                   help="reuse the rows of --out that this exact run would compute (same model, data, split, answer "
                        "space, caps and settings) and compute only the rest")

    t = _subparser(sub, "tune", "train a soft prompt (or a mixture) and evaluate it on test")
    _common(t, several_spaces=False)
    t.add_argument("--init", default="lama", choices=["lama", "random", "lpaqa-mine", "lpaqa-paraphrase"],
                   help="start from LAMA's template, random vectors in its shape, or LPAQA's templates")
    t.add_argument("--mixture", default=1, type=_mixture,
                   help="1 (one prompt), a number K, or K/all for every template of the set")
    t.add_argument("--depth", default=0, type=_depth,
                   help="0: soft prompt at the input; all: every layer (deep perturbation); or a layer number")
    t.add_argument("--data-dependent", action="store_true", help="mixture weights that also depend on the subject")
    t.add_argument("--read", default="frozen", choices=["frozen", "tuned"],
                   help="frozen: no offset at the position the answer is read from (as at a masked LM's [MASK]); "
                        "tuned: that position is tuned too (a causal LM's shortcut, for ablations)")
    t.add_argument("--row-scaling", default=True, action=argparse.BooleanOptionalAction,
                   help="deep offsets in units of each layer's typical hidden coordinate")
    t.add_argument("--epochs", type=_count, default=10, help="most passes over the training facts")
    t.add_argument("--lr", type=_learning_rate,
                   help=f"Adam's step size (default: {LR_PER_SPREAD} x the median spread of the model's embedding "
                        "coordinates)")
    t.add_argument("--batch-size", type=_count, default=16, help="training facts per step")
    t.add_argument("--patience", type=_count, default=3, help="epochs without a better dev P@1 before stopping")
    t.add_argument("--seed", type=_seed, default=0,
                   help="seed of the random initialisation and of the order of the facts")
    t.add_argument("--max-train", type=_count,
                   help="use only the first N training facts of each relation (default: all)")
    t.add_argument("--max-dev", type=_count, help="use only the first N dev facts of each relation (default: all)")
    t.add_argument("--max-test", type=_count, help="use only the first N test facts of each relation (default: all)")
    t.add_argument("--checkpoints", type=_path, default="runs",
                   help="folder for checkpoints (a rerun of the same run resumes from them)")

    r = _subparser(sub, "reproduce", "run the paper's method ladder and write one results table")
    _common(r, several_spaces=False)
    r.add_argument("--grid", default="paper", choices=["paper"], help="which ladder of methods")
    r.add_argument("--budget", default="ci", choices=["ci", "laptop", "gpu"],
                   help="ci: minutes on CPU; laptop; gpu: everything")
    r.add_argument("--shard", default="0/1", type=_shard,
                   help="i/n: run every n-th job starting at i; auto: i/n from a Slurm array task or the rank of "
                        "torchrun / accelerate launch. Each shard writes OUT with -shard{i}of{n} before the "
                        "extension; `merge` combines them")
    r.add_argument("--checkpoints", type=_path, default="runs", help="folder for checkpoints of the tuned rungs")

    m = _subparser(sub, "merge", "merge shard tables of `reproduce` into one")
    m.add_argument("tables", nargs="+", type=_path, help="results CSVs to merge (a job in several keeps its last row)")
    m.add_argument("--out", type=_path, required=True, help="CSV file to write the merged table to (required)")

    _subparser(sub, "models", "list the registered models and whether each can load here, and why")

    b = _subparser(sub, "bench", "run the benchmarks in bench/ and write a markdown report")
    b.add_argument("--out", type=_path, default="_build/bench", help="folder for the report")
    b.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")

    from .prefetch import add_command as add_download

    add_download(sub)
    return parser


# ------------------------------------------------------------------------------------------ running
_RERUN = {
    "probe": "the relations finished so far are in {out}: rerun the same command with --resume to do the rest",
    "tune": "finished relations are in {out}, training state in {checkpoints}: rerun the same command to resume",
    "reproduce": "finished jobs are in {out} and the results cache: rerun the same command to continue",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 here, with argparse's one-line message
    debug = getattr(args, "debug", False)
    with warnings.catch_warnings(), _messages_to_stdout():
        warnings.showwarning = _show_warning
        try:
            return _run(args)
        except KeyboardInterrupt:
            hint = _RERUN.get(args.command, "rerun the command to start again")
            out = getattr(args, "resolved_out", None) or args.__dict__.get("out")
            hint = hint.format(out=out, checkpoints=getattr(args, "checkpoints", ""))
            print(f"\ninterrupted; {hint}", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - every error ends in one line (and a traceback only with --debug)
            code, message = _classify(err)
            if debug:
                traceback.print_exc()
            # One line, whatever the message quotes (a damaged file's header may hold line ends).
            print("error: " + message.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
            return code


def _classify(err: Exception) -> tuple[int, str]:
    """(exit code, message): 2 for what the command asked, 1 for what this machine lacks or holds damaged."""
    if isinstance(err, (CheckpointMismatch, UnusablePath, TableError)):
        return 2, str(err)
    if isinstance(err, (DataMissing, DataFileError, DataNotFound, ChecksumMismatch, CheckpointError,
                        EnvironmentProblem)):
        return 1, str(err)
    if isinstance(err, OSError):
        return 1, describe_os_error(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return 1, (f"out of memory ({err}); use a smaller --batch-size, fewer templates, a smaller model or another "
                   "device")
    if isinstance(err, (DataError, TemplateError, ModelUnavailable, ValueError)):
        return 2, str(err)
    return 1, f"unexpected {type(err).__name__}: {err} (a bug? rerun with --debug for the traceback)"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


class _ToStdout(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)  # the sys.stdout of the moment (tests capture it)


class _messages_to_stdout:
    """While a command runs, the library's info messages (e.g. "reused from the results cache") are printed."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("course_lib")
        self.handler, self.level = _ToStdout(), self.logger.level
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def _default_out(args: argparse.Namespace, what: str) -> Path:
    return Path(args.out or f"results/{what}-{args.model.replace('/', '_')}-{args.dataset}.csv")


def _shard_of(args: argparse.Namespace) -> tuple[int, int]:
    if args.shard != "auto":
        return args.shard
    from .experiments import shard_from_env

    try:
        return shard_from_env()
    except ValueError as err:
        raise EnvironmentProblem(str(err)) from None


def _output(args: argparse.Namespace) -> Path:
    """The CSV this command writes (checked writable before any work)."""
    if args.command == "probe":
        out = _default_out(args, f"probe-{args.prompts}-{args.method}")
    elif args.command == "tune":
        out = _default_out(args, "tune")
    elif args.command == "reproduce":
        out = _default_out(args, f"reproduce-{args.grid}-{args.budget}")
        i, n = _shard_of(args)
        if n > 1:  # every shard its own file, even when all share one --out (job arrays, launchers)
            out = out.with_name(f"{out.stem}-shard{i}of{n}{out.suffix}")
    else:
        out = Path(args.out)
    check_output_file(out, "--out")
    if args.command != "merge" and holds_a_table(out):
        read_stored(out)  # an existing --out must be a results table: never overwrite someone's other file
    return out


def _run(args: argparse.Namespace) -> int:
    if args.command == "models":
        from .models import model_listing

        print(model_listing())
        return 0
    if args.command == "download":
        from .prefetch import run as download

        return download(args)
    if args.command == "bench":
        from .bench import run_all

        print(run_all(check_output_dir(args.out, "--out"), quick=args.quick))
        return 0
    out = args.resolved_out = _output(args)
    if args.command == "merge":
        from .experiments import merge_tables

        table = merge_tables(args.tables)
        _print_result(table, write_table(table, out))
        return 0
    if getattr(args, "checkpoints", None):
        check_output_dir(args.checkpoints, "--checkpoints")
    if not args.device and os.environ.get(DEVICE_ENV):
        try:
            parse_device(os.environ[DEVICE_ENV], DEVICE_ENV)
        except DeviceUnavailable as err:
            raise EnvironmentProblem(str(err)) from None

    from .data import check_relations
    from .models import load_model

    relations = check_relations(args.dataset, args.relations)  # unknown relations refused before the model loads
    lm = load_model(args.model, device=args.device)
    if args.compile:
        lm.compile()
    if args.command == "probe":
        table = _probe(lm, args, relations, out)
    elif args.command == "tune":
        table = _tune(lm, args, relations, out)
    else:
        from .experiments import reproduce

        update_table(out, [])  # a shard with no jobs still leaves a (header-only) table for `merge`
        rows = reproduce(lm, args.dataset, args.grid, args.budget, args.relations, _shard_of(args),
                         args.answer_space[0], args.checkpoints, on_row=lambda row: _save(out, [row]))
        table = _rows_of(out, [row_key(r) for r in rows.to_dict("records")])
    _print_result(table, out)
    return 0


def _save(out: Path, rows: list[dict]) -> None:
    for note in update_table(out, rows):
        print(f"warning: {out}: {note}; dropped", file=sys.stderr)


def _print_result(table: pd.DataFrame, out: Path) -> None:
    if table.empty:
        print("(no rows: nothing to do for this command)")
    else:
        print(format_table(table))
        summary = summarize(table)
        print("\nSummary (micro = facts pooled; macro = mean over relations):")
        cols = [c for c in ["method", "prompt_set", "answer_space", "relations", "kept", "dropped", "micro_p_at_1",
                            "macro_p_at_1", "micro_p_at_10", "micro_mrr"] if c in summary.columns]
        print(summary[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\nwrote {out}")


# ------------------------------------------------------------------------------------------ probe
def _probe(lm, args: argparse.Namespace, relations: list[str], out: Path) -> pd.DataFrame:
    from .probing import probe, probe_identity

    settings = probe_identity(lm, args.dataset, args.prompts, args.split, args.method, args.batch_size, args.max_facts)
    here = dict(model=lm.name, dataset=args.dataset, prompt_set=args.prompts, method=args.method, split=args.split)
    stored = read_stored(out) if holds_a_table(out) else None
    if stored is not None:
        for note in stored.damaged:
            print(f"{out}: {note}; not used, and dropped from the file", file=sys.stderr)
        if stored.damaged:
            update_table(out, [])  # rewritten without them, whatever this run does next
        others = [r for r in stored.rows
                  if not (_matches(r, here) and r["relation"] in relations and r["answer_space"] in args.answer_space)]
        if others:
            print(f"{out}: {len(others)} row(s) of other runs (other relations, model, split, answer space or "
                  "method) are left in the file and not part of this run's table")
    done: list[tuple[str, ...]] = []
    for rel in relations:
        if args.resume and stored is not None:
            reason = _why_not_reusable(stored, here, settings, rel, args.answer_space)
            if reason is None:
                print(f"{rel}: kept from {out} (--resume: same model, data, split, answer space, caps and settings)")
                done += [row_key(r) for r in stored.rows if _matches(r, {**here, "relation": rel})
                         and r["answer_space"] in args.answer_space]
                continue
            if reason:
                print(f"{rel}: {reason}; computing it again")
        table = probe(lm, args.dataset, [rel], args.prompts, args.split, args.method, args.answer_space,
                      args.batch_size, args.max_facts, progress=False)
        # Written after every relation (under the file's lock), so an interrupted run loses at most one.
        _save(out, table.to_dict("records"))
        done += [row_key(r) for r in table.to_dict("records")]
        print(f"{rel}: done", flush=True)
    return _rows_of(out, done)


def _matches(row: dict[str, str], fields: dict[str, str]) -> bool:
    return all(row.get(k, "") == str(v) for k, v in fields.items())


def _rows_of(out: Path, keys: list[tuple[str, ...]]) -> pd.DataFrame:
    """This run's rows, as stored in ``out`` (in the order they were done)."""
    stored = read_stored(out)
    order = {k: i for i, k in enumerate(keys)}
    rows = sorted((r for r in stored.rows if row_key(r) in order), key=lambda r: order[row_key(r)])
    return frame_of(rows, stored.columns)


def _why_not_reusable(stored, here: dict[str, str], settings: dict[str, Any], rel: str,
                      spaces: Sequence[str]) -> str | None:
    """None if ``stored`` holds exactly this run's rows for ``rel``; else why not ("" if it holds none)."""
    from .data import changed_files
    from .results import describe_differences

    for space in spaces:
        found = [(r, sealed) for r, sealed in zip(stored.rows, stored.sealed)
                 if _matches(r, {**here, "relation": rel, "answer_space": space})]
        if not found:
            return ""
        for row, sealed in found:
            if not sealed or "identity" not in row:
                return f"its row in {stored.path} has no checksum or identity (written by an older course_lib)"
            if not row.get(FACT_RANKS):
                return (f"its row in {stored.path} has no per-fact ranks to compare fact by fact "
                        "(written by an older course_lib)")
            try:
                identity = json.loads(row["identity"])
            except ValueError:
                return f"its row in {stored.path} has an unreadable identity"
            expected = {**json.loads(json.dumps(settings)), "relation": rel, "answer_space": space}
            mine = {k: identity.get(k) for k in [*expected, *(k for k in identity if k not in ("data", "rows"))]}
            if mine != expected:
                diff = describe_differences(mine, expected, then="stored")
                return f"{stored.path} holds it for other settings: {diff}"
            if identity.get("rows") != len(found):
                return f"{stored.path} holds {len(found)} of its {identity.get('rows')} rows"
            changed = changed_files(identity.get("data") or {})
            if changed or not identity.get("data"):
                what = ", ".join(f"{k} ({v})" for k, v in changed.items()) or "none recorded"
                return f"the data it was computed from has changed since ({what})"
    return None


# ------------------------------------------------------------------------------------------ tune
def _method_label(lm, args: argparse.Namespace) -> tuple[str, int | str]:
    """The method's name and its depth as run: "all" when the depth given is the model's last layer."""
    depth = args.depth
    if depth != "all" and not 0 <= depth <= lm.n_layers:
        raise ValueError(f"--depth {depth}: {lm.name} has layers 0 to {lm.n_layers} (or 'all')")
    if depth == lm.n_layers:
        depth = "all"
    k = args.mixture
    label = f"soft-{args.init}" + (f"-mixture{k}" if k != 1 else "")
    label += "" if depth == 0 else "-deep" if depth == "all" else f"-deep{depth}"
    label += "-data-dependent" if args.data_dependent else ""
    label += "-read-tuned" if args.read == "tuned" else ""
    label += "-flat" if depth != 0 and not args.row_scaling else ""
    return label, depth


def _tune(lm, args: argparse.Namespace, relations: list[str], out: Path) -> pd.DataFrame:
    from .data import load_facts, load_prompts
    from .evaluation import score_facts
    from .experiments import tune_and_score
    from .probing import best_template_on_dev, take
    from .results import counts_of, make_row
    from .training import TuneConfig

    method, depth = _method_label(lm, args)
    config = TuneConfig(init="random" if args.init == "random" else "template", depth=depth, lr=args.lr,
                        epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                        data_dependent=args.data_dependent, read=args.read, row_scaling=args.row_scaling)
    prompt_set = "lama" if args.init in ("lama", "random") else args.init
    space = args.answer_space[0]
    # Every relation's templates first: a --mixture K that some relation cannot give is refused before any training.
    usable = {rel: [t for t in load_prompts(prompt_set, args.dataset, rel) if lm.covers(t)] for rel in relations}
    if isinstance(args.mixture, int):
        short = {rel: len(ts) for rel, ts in usable.items() if 0 < len(ts) < args.mixture}
        if short:
            counts = ", ".join(f"{n} for {rel}" for rel, n in short.items())
            raise ValueError(f"--mixture {args.mixture}: prompt set {prompt_set} has fewer templates {lm.name} can "
                             f"answer ({counts}); ask for at most {min(short.values())}, or use --mixture K for all "
                             "of them")
    done = []
    for rel in relations:
        templates = usable[rel]
        key = dict(model=lm.name, dataset=args.dataset, relation=rel, prompt_set=prompt_set, method=method,
                   split="test", answer_space=space)
        ckpt = (Path(args.checkpoints) / lm.name.replace("/", "_") / args.dataset / rel
                / f"{method}-seed{args.seed}.safetensors")
        if not templates:
            # Reported like probe and reproduce report it: every test fact dropped, with the reason.
            test = take(load_facts(args.dataset, rel, "test"), args.max_test)
            empty = score_facts(lm, [], test)
            row = make_row(lm, key, counts_of(empty, len(test)), empty.metrics(), seed=args.seed, templates="[]",
                           note=f"no template of {prompt_set} that {lm.name} can answer (a causal LM needs [X] "
                                "before [Y]): not tuned")
        else:
            if any(t.weight is not None for t in templates):
                templates.sort(key=lambda t: -(t.weight or 0.0))
            if args.mixture == 1 and len(templates) > 1:
                templates = [best_template_on_dev(lm, args.dataset, rel, templates, space, args.max_dev)[0]]
            elif isinstance(args.mixture, int):
                templates = templates[: args.mixture]
            row = tune_and_score(lm, args.dataset, rel, templates, config, key, max_train=args.max_train,
                                 max_dev=args.max_dev, max_test=args.max_test, checkpoint=ckpt)
        # On disk before the next relation starts: an error or a kill later loses nothing finished.
        _save(out, [row])
        done.append(row_key(row))
        if row.get("note"):
            print(f"{rel}: {row['note']}", file=sys.stderr)
        else:
            if row["resumed_from_epoch"] is not None:
                print(f"{rel}: resumed from the checkpoint of epoch {row['resumed_from_epoch'] + 1} ({ckpt}; same "
                      "model, data, caps, answer space and settings)")
            print(f"{rel}: best dev P@1 {row['best_dev_p_at_1']:.3f} at epoch {row['best_epoch'] + 1}; "
                  f"checkpoint {ckpt}")
    return _rows_of(out, done)


__all__ = ["main", "build_parser"]
