"""Shared argparse options for the scripts in bench/ (each runs one benchmark of course_lib.bench)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing: python bench/eval_throughput.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from course_lib.bench import DEFAULT_RELATION, SETTINGS  # noqa: E402
from course_lib.models import DEFAULT_MODEL  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model name, or bert-base-random (default {DEFAULT_MODEL})")
    p.add_argument("--relation", default=DEFAULT_RELATION, help=f"T-REx relation whose facts are used (default {DEFAULT_RELATION})")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (a smoke run)")
    p.add_argument("--repeats", type=int, help="timed repeats (default: 3, or 2 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: unchanged)")
    p.add_argument("--json", help="also write the raw numbers to this JSON file")
    return p


def settings(args: argparse.Namespace) -> dict:
    """The run's sizes (full or --quick), with --repeats applied; --threads applied too."""
    if args.threads:
        torch.set_num_threads(args.threads)
    s = dict(SETTINGS["quick" if args.quick else "full"])
    if args.repeats:
        s["repeats"] = args.repeats
    return s


def finish(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
