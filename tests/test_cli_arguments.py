"""The command line under arbitrary input (property-based): every argument value is accepted exactly
when it is valid, and refused in one line naming the option; results files of any content are
reused, merged or refused by name, never used damaged and never met with a traceback. Also: help
shows every option's default, ``--version`` works, and no command is advertised that does not exist.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import course_lib
from course_lib import cli
from course_lib.cli import MAX_COUNT, build_parser, main
from course_lib.evaluation import AnswerSpace
from course_lib.results import KEY_COLUMNS
from course_lib.training import MAX_SEED
from cli_call import call

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RUNS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
README = Path(__file__).resolve().parents[1] / "README.md"


def refused_in_one_line(err: str, option: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert f"argument {option}" in lines[0] and "error:" in lines[0] and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------- argument values
numbers = st.one_of(st.integers(-10, 10), st.integers(-2**70, 2**70), st.just(MAX_COUNT), st.just(MAX_COUNT + 1),
                    st.just(MAX_SEED), st.just(MAX_SEED + 1)).map(str)
numberish = st.one_of(
    numbers,
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1_000", " 7", "7 ", "+3", "0x10", "1e3", "²", "٣", "00", "007", "all", "ALL", "K",
                     "k", "auto", "0/1", "1/2", "2/2", "3/2", "-1/2", "1/0", "0/0", "a/b", "1/2/3", "/", "nan", "inf",
                     "-0"]),
    st.text(max_size=6),
)
valid_relations = st.lists(st.sampled_from(["P103", "P36", "P19"]), min_size=1, max_size=3, unique=True).map(",".join)
valid_spaces = st.lists(st.sampled_from(["full", "common", "relation"]), min_size=1, max_size=3,
                        unique=True).map(",".join)
relation_lists = st.one_of(
    st.lists(st.sampled_from(["P103", "P36", "P19", "", " ", "P103 "]), max_size=4).map(",".join),
    st.text(alphabet=st.sampled_from("P1036, "), max_size=10),
)
space_lists = st.one_of(st.lists(st.sampled_from(["full", "common", "relation", "", "fulll", " full"]),
                                 max_size=4).map(",".join),
                        st.text(max_size=8))
devices = st.one_of(st.sampled_from(["cpu", "CPU", "cuda", "cuda:0", "cuda:99", "cuda:-1", "cuda:x", "mps", "meta",
                                     "xla", "", " cpu", "cpu:0", "cpu:1", "banana"]), st.text(max_size=6))


def real_argv(value: str) -> bool:
    return "\0" not in value  # an operating system cannot pass a NUL inside an argument


def parse(capsys, *argv: str) -> tuple[argparse.Namespace | None, str]:
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as stop:
        assert stop.code == 2
        return None, capsys.readouterr().err
    capsys.readouterr()
    return args, ""


WHOLE = re.compile(r"[0-9]+")

COUNT_OPTIONS = [("probe", "--max-facts"), ("probe", "--batch-size"), ("tune", "--max-train"), ("tune", "--max-dev"),
                 ("tune", "--max-test"), ("tune", "--epochs"), ("tune", "--batch-size"), ("tune", "--patience")]


@SETTINGS
@given(which=st.sampled_from(COUNT_OPTIONS), value=numberish)
def test_a_count_is_a_whole_number_from_1_or_refused_naming_the_option(capsys, which, value: str) -> None:
    assume(real_argv(value))
    command, option = which
    args, err = parse(capsys, command, f"{option}={value}")
    valid = bool(WHOLE.fullmatch(value)) and 1 <= int(value) <= MAX_COUNT
    if args is None:
        assert not valid, value
        refused_in_one_line(err, option)
    else:
        assert valid, value
        assert getattr(args, option[2:].replace("-", "_")) == int(value)


@SETTINGS
@given(value=numberish)
def test_a_seed_is_a_whole_number_in_range_or_refused(capsys, value: str) -> None:
    assume(real_argv(value))
    args, err = parse(capsys, "tune", f"--seed={value}")
    valid = bool(WHOLE.fullmatch(value)) and 0 <= int(value) <= MAX_SEED
    if args is None:
        assert not valid, value
        refused_in_one_line(err, "--seed")
    else:
        assert valid and args.seed == int(value)


@SETTINGS
@given(value=numberish)
def test_a_learning_rate_is_a_positive_finite_number_or_refused(capsys, value: str) -> None:
    assume(real_argv(value))
    args, err = parse(capsys, "tune", f"--lr={value}")
    try:
        expected = float(value)
    except ValueError:
        expected = math.nan
    valid = math.isfinite(expected) and expected > 0
    if args is None:
        assert not valid, value
        refused_in_one_line(err, "--lr")
    else:
        assert valid and args.lr == expected


@SETTINGS
@given(value=numberish)
def test_a_depth_is_all_or_a_layer_number_with_one_spelling(capsys, value: str) -> None:
    assume(real_argv(value))
    args, err = parse(capsys, "tune", f"--depth={value}")
    valid = value == "all" or (bool(WHOLE.fullmatch(value)) and int(value) <= MAX_COUNT)
    if args is None:
        assert not valid, value
        refused_in_one_line(err, "--depth")
    else:
        assert valid and args.depth == (value if value == "all" else int(value))  # "00" and "0" are one depth


@SETTINGS
@given(value=numberish)
def test_a_mixture_is_a_positive_k_or_all(capsys, value: str) -> None:
    assume(real_argv(value))
    args, err = parse(capsys, "tune", f"--mixture={value}")
    every = value.lower() in ("k", "all")
    valid = every or (bool(WHOLE.fullmatch(value)) and 1 <= int(value) <= MAX_COUNT)
    if args is None:
        assert not valid, value
        refused_in_one_line(err, "--mixture")
    else:
        assert valid and args.mixture == ("K" if every else int(value))


@SETTINGS
@given(value=numberish)
def test_a_shard_is_i_of_n_or_auto(capsys, value: str) -> None:
    assume(real_argv(value))
    args, err = parse(capsys, "reproduce", f"--shard={value}")
    i, sep, n = value.partition("/")
    valid = value == "auto" or (bool(sep) and bool(WHOLE.fullmatch(i)) and bool(WHOLE.fullmatch(n))
                                and int(i) < int(n) <= MAX_COUNT)
    if args is None:
        assert not valid, value
        refused_in_one_line(err, "--shard")
    else:
        assert valid and args.shard == (value if value == "auto" else (int(i), int(n)))


@SETTINGS
@given(command=st.sampled_from(["probe", "tune", "reproduce"]), value=relation_lists)
def test_a_relation_list_has_no_empty_or_repeated_item(capsys, command: str, value: str) -> None:
    args, err = parse(capsys, command, f"--relations={value}")
    parts = [p.strip() for p in value.split(",")]
    valid = all(parts) and len(set(parts)) == len(parts)
    if args is None:
        assert not valid, value
        refused_in_one_line(err, "--relations")
    else:
        assert valid and args.relations == parts


@SETTINGS
@given(value=space_lists)
def test_answer_spaces_are_known_and_not_repeated(capsys, value: str) -> None:
    assume(real_argv(value))
    args, err = parse(capsys, "probe", f"--answer-space={value}")
    parts = [p.strip() for p in value.split(",")]
    valid = all(p in {a.value for a in AnswerSpace} for p in parts) and len(set(parts)) == len(parts)
    if args is None:
        assert not valid, value
        refused_in_one_line(err, "--answer-space")
    else:
        assert valid and args.answer_space == parts


@SETTINGS
@given(value=devices)
def test_a_device_is_one_this_machine_has(capsys, value: str) -> None:
    import torch

    assume(real_argv(value))
    args, err = parse(capsys, "probe", f"--device={value}")
    if args is None:
        refused_in_one_line(err, "--device")
        return
    device = torch.device(args.device)
    assert device.type in ("cpu", "cuda", "mps")
    if device.type == "cuda":
        assert torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()


def test_a_lone_double_dash_is_no_value() -> None:
    # Python 3.11's argparse turns `--device=--` into an empty list that skips the type check.
    for option in ("--device", "--model", "--out"):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args(["probe", f"{option}=--"])
        assert stop.value.code == 2


# ---------------------------------------------------------------------------------------- whole commands
@pytest.fixture(autouse=True)
def results_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path / "results-cache"))


@RUNS
@given(st.one_of(st.tuples(valid_relations, st.integers(1, 3).map(str), valid_spaces),  # runs
                 st.tuples(st.one_of(valid_relations, relation_lists), numberish,
                           st.one_of(valid_spaces, space_lists))))
def test_any_probe_command_runs_or_is_refused_in_one_line(capsys, tmp_path_factory,
                                                          args: tuple[str, str, str]) -> None:
    relations, cap, spaces = args
    assume(all(real_argv(v) for v in (relations, cap, spaces)))
    # Small runs only: valid caps above 3 would only make the test slow.
    assume(not (WHOLE.fullmatch(cap) and int(cap) > 3))
    out = tmp_path_factory.mktemp("probe") / "o.csv"
    code, stdout, err = call(["probe", "--model", "tiny-bert", f"--relations={relations}", f"--max-facts={cap}",
                              f"--answer-space={spaces}", "--out", out], capsys)
    event(f"probe exit {code}")
    assert "Traceback" not in err
    assert code in (0, 2), err
    if code == 2:
        assert len([line for line in err.splitlines() if line.strip()]) == 1 and "error:" in err, err
        assert not out.exists()
    else:
        table = pd.read_csv(out)
        parts = [p.strip() for p in relations.split(",")]
        assert sorted(set(table["relation"])) == sorted(parts)
        assert len(table) == len(parts) * len(spaces.split(",")) and (table["facts"] <= int(cap)).all()


# ---------------------------------------------------------------------------------------- file contents
@pytest.fixture(scope="module")
def good_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    import os

    folder = tmp_path_factory.mktemp("good")
    path = folder / "shard.csv"
    old = os.environ.get("COURSE_LIB_RESULTS_CACHE")
    os.environ["COURSE_LIB_RESULTS_CACHE"] = str(folder / "cache")
    try:
        assert main(["probe", "--model", "tiny-bert", "--relations", "P103,P36", "--max-facts", "4",
                     "--out", str(path)]) == 0
    finally:
        if old is None:
            del os.environ["COURSE_LIB_RESULTS_CACHE"]
        else:
            os.environ["COURSE_LIB_RESULTS_CACHE"] = old
    return path, path.read_bytes()


@st.composite
def damaged(draw, good: bytes) -> bytes:
    """``good`` cut (anywhere, or at a line end), with bytes changed, inserted or appended (NULs, invalid
    UTF-8, commas, quotes, line ends, digits), mostly in the rows, sometimes in the header."""
    data = bytearray(good)
    header = good.index(b"\n") + 1
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["cut", "cut at a line end", "replace", "insert", "append"]))
        if len(data) <= header or draw(st.integers(0, 4)) == 0:
            where = draw(st.integers(0, max(len(data) - 1, 0)))
        else:
            where = draw(st.integers(header, len(data) - 1))
        junk = draw(st.one_of(st.binary(min_size=1, max_size=8),
                              st.sampled_from([b"\0", b"\xff", b",", b'"', b"\n", b"\r\n", b"0", b"9", b"nan"])))
        if how == "cut":
            del data[where:]
        elif how == "cut at a line end":
            ends = [i + 1 for i, byte in enumerate(data) if byte == ord("\n") and i + 1 >= header]
            if ends:
                del data[draw(st.sampled_from(ends)):]
        elif how == "replace":
            data[where : where + len(junk)] = junk
        elif how == "insert":
            data[where:where] = junk
        else:
            data += junk
    return bytes(data)


def cells_of(raw: bytes) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"), newline="")))
    return [{k: v for k, v in r.items() if k != "row_sha256"} for r in rows]


@RUNS
@given(data=st.data())
def test_merge_keeps_only_rows_exactly_as_written_or_names_the_bad_file(capsys, tmp_path_factory, good_table,
                                                                        data) -> None:
    good_path, good = good_table
    raw = data.draw(damaged(good))
    folder = tmp_path_factory.mktemp("merge")
    bad = folder / "bad.csv"
    bad.write_bytes(raw)
    out = folder / "merged.csv"
    code, _, err = call(["merge", bad, "--out", out], capsys)
    event(f"merge exit {code}")  # --hypothesis-show-statistics: both outcomes are tried
    assert "Traceback" not in err
    assert code in (0, 2), err
    if code == 2:
        assert str(bad) in err and len([line for line in err.splitlines() if line.strip()]) == 1, err
        assert not out.exists()
        return
    originals = cells_of(good)
    # Every row merged is a row of the original, cell for cell (a cut at a line end leaves fewer rows).
    for row in cells_of(out.read_bytes()):
        assert {k: v for k, v in row.items() if v} in [{k: v for k, v in r.items() if v} for r in originals], row


@RUNS
@given(data=st.data())
def test_resume_never_keeps_a_damaged_row(capsys, tmp_path_factory, good_table, data) -> None:
    good_path, good = good_table
    raw = data.draw(damaged(good))
    folder = tmp_path_factory.mktemp("resume")
    out = folder / "o.csv"
    out.write_bytes(raw)
    code, stdout, err = call(["probe", "--model", "tiny-bert", "--relations", "P103,P36", "--max-facts", "4",
                              "--resume", "--out", out], capsys)
    event(f"resume exit {code}, {'computed again' if 'done' in stdout else 'all kept'}")
    assert "Traceback" not in err
    assert code in (0, 2), err
    if code == 2:  # the file is not a results table any more (header, encoding): refused by name, left as it is
        assert str(out) in err and out.read_bytes() == raw
        return
    columns = KEY_COLUMNS + ["facts", "kept", "dropped", "p_at_1", "p_at_10", "mrr"]
    again = pd.read_csv(out).sort_values("relation").reset_index(drop=True)[columns]
    expected = pd.read_csv(good_path).sort_values("relation").reset_index(drop=True)[columns]
    assert list(again["relation"]) == ["P103", "P36"]
    pd.testing.assert_frame_equal(again, expected)


# ---------------------------------------------------------------------------------------- help, version, commands
def all_options() -> list[tuple[str, argparse.Action]]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found = [("", a) for a in parser._actions]
    for name, p in sub.choices.items():
        found += [(name, a) for a in p._actions]
    builtin = (argparse._HelpAction, argparse._VersionAction)
    return [(n, a) for n, a in found if a.option_strings and not isinstance(a, builtin)]


@pytest.mark.parametrize("command, action", all_options(),
                         ids=lambda x: x if isinstance(x, str) else x.option_strings[-1])
def test_help_shows_the_default_of_every_option(command: str, action: argparse.Action) -> None:
    text = cli._HelpWithDefaults("prog")._get_help_string(action)
    if action.required:
        assert "required" in text
    else:
        assert "(default" in text, f"{command} {action.option_strings[-1]}: {text!r}"
        if "%(default)" in text:
            assert action.default is not None


def test_help_of_every_command_prints_defaults(capsys) -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name in sub.choices:
        code, out, _ = call([name, "--help"], capsys)
        assert code == 0 and "default" in out


def test_version(capsys) -> None:
    code, out, _ = call(["--version"], capsys)
    assert code == 0 and out.strip() == f"course_lib {course_lib.__version__}"


def commands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_no_command_is_advertised_that_does_not_exist() -> None:
    section = README.read_text(encoding="utf-8").split("## The command line")[1].split("\n## ")[0]
    readme = set(re.findall(r"python -m course_lib ([a-z][\w-]*)", section))
    docstring = set(re.findall(r"\b([a-z]+)\b", cli.__doc__.split("``python -m course_lib ")[1].split("``")[0]))
    assert readme and docstring
    assert readme <= commands(), readme - commands()
    assert docstring == commands(), docstring ^ commands()
