"""Command line: ``python -m course_lib probe|tune|reproduce|merge|models|download``.

Each command calls the same function a notebook would, prints the per-relation table and a
micro/macro summary, and writes a CSV in the common results format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .data import DATASETS, PROMPT_SETS, SPLITS, DataError
from .download import ChecksumMismatch, DataNotFound
from .evaluation import SCORING_BATCH, AnswerSpace
from .models import DEFAULT_MODEL, ModelUnavailable
from .probing import HardMethod
from .results import format_table, summarize, write_table
from .templates import TemplateError
from .training import LR_PER_SPREAD, CheckpointError


def _relations(text: str | None) -> list[str] | None:
    return [r.strip() for r in text.split(",") if r.strip()] if text else None


def _spaces(text: str) -> str:
    for part in text.split(","):
        if part.strip() not in {a.value for a in AnswerSpace}:
            raise argparse.ArgumentTypeError(f"unknown answer space {part!r}; valid: {', '.join(a.value for a in AnswerSpace)}")
    return text


# Checked by argparse, so that a malformed value is reported with the option's name, not as a
# bare int() error from deep inside the command.
def _mixture(text: str) -> str:
    if text.lower() in ("k", "all") or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected 1, a number of templates K >= 1, or K/all; got {text!r}")


def _depth(text: str) -> str:
    if text == "all" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"expected a layer number (0 = input embeddings only) or 'all'; got {text!r}")


def _shard(text: str) -> str:
    if text == "auto":
        return text
    i, sep, n = text.partition("/")
    if sep and i.isdigit() and n.isdigit() and int(i) < int(n):
        return text
    raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, e.g. 0/4, or auto; got {text!r}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model name or hub id (default {DEFAULT_MODEL}; `models` lists them)")
    p.add_argument("--dataset", default="trex_original", choices=DATASETS, help="which facts (default trex_original)")
    p.add_argument("--relations", help="comma-separated relation ids, e.g. P36,P19 (default: all of the dataset)")
    p.add_argument("--answer-space", default="full", type=_spaces,
                   help="full (the model's vocabulary), common (LAMA's common vocabulary) or relation (the relation's "
                        "objects); probe accepts several, comma-separated, scored in one pass")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--compile", action="store_true",
                   help="run forward passes through torch.compile (ClozeLM.compile; measure first: bench/eval_throughput.py --compile)")
    p.add_argument("--out", help="CSV file to write (default under results/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib", description="Probe language models for facts with hard and soft prompts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="measure knowledge with hard prompts (LAMA, LPAQA, AutoPrompt)")
    _common(p)
    p.add_argument("--prompts", default="lama", choices=list(PROMPT_SETS), help="prompt set (default lama)")
    p.add_argument("--method", default=HardMethod.HARD.value, choices=[m.value for m in HardMethod],
                   help="hard: the set's first template; each: every template; best-dev: best on dev; ensemble-*: all, mixed")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--max-facts", type=int, help="use only the first N facts of each relation")
    p.add_argument("--batch-size", type=int, default=SCORING_BATCH, help=f"facts per forward pass (default {SCORING_BATCH})")
    p.add_argument("--resume", action="store_true", help="keep the relations already in --out and probe only the rest")

    t = sub.add_parser("tune", help="train a soft prompt (or a mixture) and evaluate it on test")
    _common(t)
    t.add_argument("--init", default="lama", choices=["lama", "random", "lpaqa-mine", "lpaqa-paraphrase"],
                   help="start from LAMA's template, random vectors in its shape, or LPAQA's templates")
    t.add_argument("--mixture", default="1", type=_mixture, help="1 (one prompt), a number K, or K/all for every template of the set")
    t.add_argument("--depth", default="0", type=_depth, help="0: soft prompt at the input; all: every layer (deep perturbation); or a number")
    t.add_argument("--data-dependent", action="store_true", help="mixture weights that also depend on the subject")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, help=f"Adam's step size (default: {LR_PER_SPREAD} x the median spread of the model's embedding coordinates)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--patience", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-train", type=int)
    t.add_argument("--max-dev", type=int)
    t.add_argument("--max-test", type=int)
    t.add_argument("--checkpoints", default="runs", help="folder for checkpoints (a rerun resumes from them)")

    r = sub.add_parser("reproduce", help="run the paper's method ladder and write one results table")
    _common(r)
    r.add_argument("--grid", default="paper", choices=["paper"])
    r.add_argument("--budget", default="ci", choices=["ci", "laptop", "gpu"], help="ci: minutes on CPU; laptop; gpu: everything")
    r.add_argument("--shard", default="0/1", type=_shard, help="i/n: run every n-th job starting at i; auto: i/n from a Slurm array task or the rank of "
                        "torchrun / accelerate launch. Each shard writes OUT with -shard{i}of{n} before the extension; "
                        "`merge` combines them")
    r.add_argument("--checkpoints", default="runs")

    m = sub.add_parser("merge", help="merge shard tables of `reproduce` into one")
    m.add_argument("tables", nargs="+")
    m.add_argument("--out", required=True)

    sub.add_parser("models", help="list the registered models and whether each can load here, and why")

    b = sub.add_parser("bench", help="run the benchmarks in bench/ and write a markdown report")
    b.add_argument("--out", default="_build/bench")
    b.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")

    from .prefetch import add_command as add_download

    add_download(sub)
    return parser


def _print_result(table: pd.DataFrame, out: Path) -> None:
    print(format_table(table))
    summary = summarize(table)
    print("\nSummary (micro = facts pooled; macro = mean over relations):")
    cols = [c for c in ["method", "prompt_set", "answer_space", "relations", "kept", "dropped", "micro_p_at_1", "macro_p_at_1",
                        "micro_p_at_10", "micro_mrr"] if c in summary.columns]
    print(summary[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\nwrote {write_table(table, out)}")


def _default_out(args: argparse.Namespace, what: str) -> Path:
    return Path(args.out or f"results/{what}-{args.model.replace('/', '_')}-{args.dataset}.csv")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    # Errors whose message already says what is wrong and how to fix it: no traceback needed.
    except (DataError, TemplateError, ModelUnavailable, ValueError, CheckpointError, ChecksumMismatch, DataNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "models":
        from .models import model_listing

        print(model_listing())
        return 0
    if args.command == "merge":
        from .experiments import merge_tables

        _print_result(merge_tables(args.tables), Path(args.out))
        return 0
    if args.command == "download":
        from .prefetch import run as download

        return download(args)
    if args.command == "bench":
        from .bench import run_all

        print(run_all(Path(args.out), quick=args.quick))
        return 0

    from .models import load_model

    if args.command in ("tune", "reproduce") and "," in args.answer_space:
        raise ValueError(f"--answer-space: {args.command} takes one answer space, got {args.answer_space!r}")
    lm = load_model(args.model, device=args.device)
    if args.compile:
        lm.compile()
    relations = _relations(args.relations)
    if args.command == "probe":
        from .probing import probe

        from .data import check_relations

        spaces = [a.strip() for a in args.answer_space.split(",")]
        out = _default_out(args, f"probe-{args.prompts}-{args.method}")
        done = pd.read_csv(out) if args.resume and out.is_file() else pd.DataFrame()
        tables = [done]
        for rel in check_relations(args.dataset, relations):
            if len(done) and rel in set(done["relation"]):
                print(f"{rel}: already in {out} (--resume)")
                continue
            tables.append(probe(lm, args.dataset, [rel], args.prompts, args.split, args.method, spaces,
                                args.batch_size, args.max_facts, progress=False))
            # Written after every relation, so an interrupted run loses at most one relation.
            write_table(pd.concat(tables, ignore_index=True), out)
            print(f"{rel}: done ({len(tables) - 1} relations this run)", flush=True)
        _print_result(pd.concat(tables, ignore_index=True), out)
    elif args.command == "tune":
        table = _tune(lm, args, relations)
        _print_result(table, _default_out(args, "tune"))
    else:
        from .experiments import reproduce, shard_from_env

        i, n = shard_from_env() if args.shard == "auto" else (int(x) for x in args.shard.split("/"))
        table = reproduce(lm, args.dataset, args.grid, args.budget, relations, (i, n), args.answer_space, args.checkpoints)
        out = _default_out(args, f"reproduce-{args.grid}-{args.budget}")
        if n > 1:  # every shard its own file, even when all share one --out (job arrays, launchers)
            out = out.with_name(f"{out.stem}-shard{i}of{n}{out.suffix}")
        _print_result(table, out)
    return 0


def _tune(lm, args: argparse.Namespace, relations: list[str] | None) -> pd.DataFrame:
    from .data import check_relations, load_prompts
    from .experiments import tune_and_score
    from .probing import best_template_on_dev
    from .training import TuneConfig

    config = TuneConfig(init="random" if args.init == "random" else "template", depth=args.depth if args.depth == "all" else int(args.depth),
                        lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                        data_dependent=args.data_dependent)
    prompt_set = "lama" if args.init in ("lama", "random") else args.init
    k = None if args.mixture.lower() in ("k", "all") else int(args.mixture)
    method = f"soft-{args.init}" + (f"-mixture{k or 'K'}" if k != 1 else "") + ("-deep" if args.depth != "0" else "")
    rows = []
    for rel in check_relations(args.dataset, relations):
        templates = [t for t in load_prompts(prompt_set, args.dataset, rel) if lm.covers(t)]
        if not templates:
            print(f"{rel}: no template {lm.name} can answer (needs [X] before [Y]); skipped", file=sys.stderr)
            continue
        if any(t.weight is not None for t in templates):
            templates.sort(key=lambda t: -(t.weight or 0.0))
        if k == 1 and len(templates) > 1:
            templates = [best_template_on_dev(lm, args.dataset, rel, templates, args.answer_space, args.max_dev)[0]]
        elif k is not None:
            templates = templates[:k]
        key = dict(model=lm.name, dataset=args.dataset, relation=rel, prompt_set=prompt_set, method=method, split="test",
                   answer_space=args.answer_space)
        ckpt = Path(args.checkpoints) / lm.name.replace("/", "_") / args.dataset / rel / f"{method}-seed{args.seed}.safetensors"
        row = tune_and_score(lm, args.dataset, rel, templates, config, key, max_train=args.max_train, max_dev=args.max_dev,
                             max_test=args.max_test, checkpoint=ckpt)
        if row.get("note"):
            print(f"{rel}: {row['note']}", file=sys.stderr)
        else:
            if row["resumed_from_epoch"] is not None:
                print(f"{rel}: resumed from the checkpoint of epoch {row['resumed_from_epoch'] + 1} ({ckpt})")
            print(f"{rel}: best dev P@1 {row['best_dev_p_at_1']:.3f} at epoch {row['best_epoch'] + 1}; checkpoint {ckpt}")
        rows.append(row)
    return pd.DataFrame(rows)
