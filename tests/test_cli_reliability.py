"""Issue 14, case by case: resumed and cached results are the results of the command that was run,
no finished row is lost, and no mistake or environment problem ends in a traceback.

Each test is named after the numbered case of the issue it reproduces (``test_case_N_...``); each
failed on the code the issue was filed against (commit 3dfeeeb's library). Commands run in-process
(``course_lib.cli.main``) on the tiny random models, against a private copy of the data where a
test changes it. The output-path cases on a full or read-only file system are in
tests/test_files_on_disk.py, the property-based argument checks in tests/test_cli_arguments.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from course_lib import data, download
from course_lib.experiments import LADDER
from course_lib.results import KEY_COLUMNS
from cli_call import call

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = ["facts", "kept", "dropped", "p_at_1", "p_at_10", "mrr"]


def one_line_error(err: str, named: str) -> None:
    """A usage or environment error: one line starting with the error, naming what is wrong, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) >= 1 and "error:" in lines[-1] and named in lines[-1], err
    assert not any(line.startswith("usage:") for line in lines), err


@pytest.fixture(autouse=True)
def results_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path / "results-cache"))
    return tmp_path / "results-cache"


@pytest.fixture
def own_data(shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the data folder, which the test may change."""
    root = tmp_path / "data"
    shutil.copytree(shared_dir, root)
    monkeypatch.setenv(data.ENV_VAR, str(root))
    return root


def rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def printed_relations(stdout: str) -> list[str]:
    """The relations of the table a command printed (between its header line and the summary)."""
    lines = stdout.split("\nSummary")[0].splitlines()
    start = max(i for i, line in enumerate(lines) if line.split()[:2] == ["relation", "method"])
    return [line.split()[0] for line in lines[start + 1 :] if line.strip()]


def cut_lines(path: Path, keep: int) -> None:
    path.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]), encoding="utf-8")


# ---------------------------------------------------------------------------------------- 1. --resume checks the run
PROBE = ["probe", "--relations", "P103,P36", "--max-facts", 10]


def probe_rows(out: Path, capsys, *extra) -> pd.DataFrame:
    code, _, err = call(PROBE + ["--out", out, *extra], capsys)
    assert code == 0, err[-2000:]
    return rows(out)


@pytest.mark.parametrize("other", [["--model", "tiny-bert"], ["--split", "dev", "--answer-space", "common"]],
                         ids=["other model", "other split and answer space"])
def test_case_1_resume_keeps_only_rows_of_the_run_asked_for(other: list, own_data: Path, tmp_path: Path,
                                                            capsys) -> None:
    out = tmp_path / "o.csv"
    first = probe_rows(out, capsys, "--model", "tiny-gpt2")
    settings = ["--model", "tiny-gpt2", *other] if other[0] != "--model" else other
    fresh = probe_rows(tmp_path / "fresh.csv", capsys, *settings)

    code, stdout, err = call(PROBE + ["--out", out, *settings, "--resume"], capsys)
    assert code == 0, err[-2000:]
    # Nothing of the other run is passed off as this one's.
    assert "kept from" not in stdout and "already in" not in stdout
    table = rows(out)
    mine = table[table["identity"].isin(fresh["identity"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[KEY_COLUMNS + METRICS], fresh[KEY_COLUMNS + METRICS])
    # The first run's rows are still in the file, unchanged, and said to be another run's.
    theirs = table[table["identity"].isin(first["identity"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(theirs[KEY_COLUMNS + METRICS], first[KEY_COLUMNS + METRICS])
    assert "2 row(s) of other runs" in stdout
    assert printed_relations(stdout) == ["P103", "P36"]  # the printed table holds this run's rows only


def test_case_1_resume_recomputes_a_row_of_other_settings_and_reuses_an_exact_match(own_data: Path, tmp_path: Path,
                                                                                    capsys) -> None:
    out = tmp_path / "o.csv"
    probe_rows(out, capsys, "--model", "tiny-gpt2")
    again = ["probe", "--relations", "P103,P36", "--max-facts", 20, "--model", "tiny-gpt2", "--out", out, "--resume"]
    code, stdout, _ = call(again, capsys)
    assert code == 0
    assert "P103: " in stdout and "max_facts (10 stored, 20 now); computing it again" in stdout
    assert (rows(out)["facts"] == 20).all() and len(rows(out)) == 2
    code, stdout, _ = call(again, capsys)
    assert code == 0 and stdout.count("kept from") == 2 and "computing" not in stdout


# -------------------------------------------------------------------------------------- 2. damaged rows are not "done"
def damage(text: str, how: str) -> bytes:
    lines = text.splitlines(keepends=True)
    last = lines[-1]
    if how == "cut inside a row":
        return "".join(lines[:-1]).encode() + last[: len(last) // 2].encode()
    if how == "NUL bytes appended":
        return text.encode() + b"\0" * 64
    if how == "a short row":
        return "".join(lines[:-1]).encode() + ",".join(last.split(",")[:9]).encode() + b"\n"
    if how == "a metric edited":
        cells = last.split(",")
        i = text.splitlines()[0].split(",").index("mrr")
        cells[i] = "0.999"
        return "".join(lines[:-1]).encode() + ",".join(cells).encode()
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["cut inside a row", "NUL bytes appended", "a short row", "a metric edited"])
def test_case_2_resume_recomputes_a_damaged_row(how: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.csv"
    good = probe_rows(out, capsys, "--model", "tiny-bert")
    out.write_bytes(damage(out.read_text(), how))
    code, stdout, err = call(PROBE + ["--out", out, "--model", "tiny-bert", "--resume"], capsys)
    assert code == 0, err[-2000:]
    assert "P103: kept from" in stdout  # the intact row is reused ...
    if how == "NUL bytes appended":
        assert "line 4:" in err and "P36: kept from" in stdout  # ... the NULs are a junk line of their own, named
    else:
        assert "line 3:" in err and "P36: done" in stdout  # ... the damaged last row (P36) is named and computed again
    again = rows(out)
    assert list(again["relation"]) == ["P103", "P36"]
    pd.testing.assert_frame_equal(again[KEY_COLUMNS + METRICS], good[KEY_COLUMNS + METRICS])
    assert b"\0" not in out.read_bytes()


# ----------------------------------------------------------------------------------- 3. a checkpoint of other settings
TUNE = ["tune", "--model", "tiny-gpt2", "--relations", "P103", "--init", "random", "--epochs", 1,
        "--max-train", 16, "--max-dev", 8, "--max-test", 8]


@pytest.mark.parametrize("option, value, named", [("--max-train", 24, "max_train (16 in the checkpoint, 24 now)"),
                                                  ("--max-dev", 4, "max_dev (8 in the checkpoint, 4 now)"),
                                                  ("--answer-space", "common", "answer_space")])
def test_case_3_tune_does_not_resume_a_checkpoint_of_other_data_or_answer_space(option: str, value, named: str,
                                                                                tmp_path: Path, capsys) -> None:
    ckpts, out = tmp_path / "ckpts", tmp_path / "tune.csv"
    code, _, err = call(TUNE + ["--checkpoints", ckpts, "--out", out], capsys)
    assert code == 0, err[-2000:]
    (ckpt,) = ckpts.rglob("*.safetensors")
    before = ckpt.read_bytes()
    argv = [a for a in TUNE]
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    code, stdout, err = call(argv + ["--checkpoints", ckpts, "--out", out], capsys)
    assert code == 2
    one_line_error(err, named)
    assert "resumed" not in stdout
    assert ckpt.read_bytes() == before  # refused, not overwritten
    assert len(rows(out)) == 1  # no row of the refused run


# -------------------------------------------------------------------------------- 4. the results cache checks the data
@pytest.mark.parametrize("rung_name", ["lama-hard", "soft-lama"])
def test_case_4_run_rung_recomputes_when_the_data_changed(rung_name: str, own_data: Path, tmp_path: Path) -> None:
    from course_lib.experiments import run_rung
    from course_lib.models import load_model

    lm = load_model("tiny-bert")

    def rung(**kw) -> dict:
        return run_rung(lm, "trex_original", "P103", rung_name, "ci", progress=False, checkpoint_dir=tmp_path / "runs",
                        **kw)

    first = rung()
    assert first["facts"] == 80
    folder = own_data / "soft_prompts" / "db" / "trex_original" / "P103"
    cut_lines(folder / "test.jsonl", 30)
    cut_lines(folder / "train.jsonl", 40)
    with pytest.warns(RuntimeWarning) as caught:
        again = rung()
    assert any("P103/test.jsonl (changed)" in str(w.message) for w in caught)
    assert again["facts"] == 30
    fresh = run_rung(lm, "trex_original", "P103", rung_name, "ci", progress=False, use_cache=False)
    assert {k: again[k] for k in METRICS} == {k: fresh[k] for k in METRICS}
    # The recomputed row is cached, now with the new data's checksums: read back without a warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {k: rung()[k] for k in METRICS} == {k: fresh[k] for k in METRICS}


def test_case_4_reproduce_recomputes_when_the_data_changed(own_data: Path, tmp_path: Path, capsys) -> None:
    argv = ["reproduce", "--model", "tiny-bert", "--relations", "P103", "--checkpoints", tmp_path / "runs",
            "--out", tmp_path / "r.csv"]
    code, _, err = call(argv, capsys)
    assert code == 0, err[-2000:]
    assert (rows(tmp_path / "r.csv")["facts"] == 80).all()
    cut_lines(own_data / "soft_prompts" / "db" / "trex_original" / "P103" / "test.jsonl", 30)
    code, _, err = call(argv, capsys)
    assert code == 0, err[-2000:]
    assert "has changed since" in err
    assert (rows(tmp_path / "r.csv")["facts"] == 30).all()


# ------------------------------------------------------------------------------------- 5. files read back are verified
@pytest.fixture
def download_mode(shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No local data folder: files are downloaded (from a file:// mirror of the shared data) into an empty cache."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.delenv("COURSE_LIB_CACHE", raising=False)  # it would outrank XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(download.URL_BASE_ENV, shared_dir.as_uri())
    return tmp_path / "cache" / "course_lib" / "data"


def test_case_5_an_edited_file_in_the_download_cache_is_downloaded_again(download_mode: Path, tmp_path: Path,
                                                                         capsys, monkeypatch) -> None:
    argv = ["probe", "--model", "tiny-bert", "--relations", "P103", "--max-facts", 10, "--out", tmp_path / "o.csv"]
    code, _, err = call(argv, capsys)
    assert code == 0, err[-2000:]
    first = rows(tmp_path / "o.csv")
    cached = download_mode / "soft_prompts" / "db" / "trex_original" / "P103" / "test.jsonl"
    good = cached.read_bytes()
    # Every fact's object replaced: the metrics would change if the edited copy were used.
    cached.write_bytes(good.replace(b'"obj_label": "', b'"obj_label": "x').replace(b'"obj": "', b'"obj": "x'))
    assert cached.read_bytes() != good
    code, _, err = call(argv, capsys)
    assert code == 0, err[-2000:]
    assert "does not match its sha256" in err and "downloading it again" in err
    assert cached.read_bytes() == good
    pd.testing.assert_frame_equal(rows(tmp_path / "o.csv")[KEY_COLUMNS + METRICS], first[KEY_COLUMNS + METRICS])

    # With no good copy to be had, the edited file is refused (and removed), by name.
    cached.write_bytes(b'{"sub": "Dante", "obj": "Italian"}\n')
    monkeypatch.setenv(download.URL_BASE_ENV, (tmp_path / "empty-mirror").as_uri())
    code, _, err = call(argv, capsys)
    assert code == 1
    one_line_error(err, "P103/test.jsonl")
    assert not cached.exists()


def flip_a_bit(path: Path, tensor: str) -> None:
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start, _ = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    raw[8 + n + start] ^= 0x01
    path.write_bytes(bytes(raw))


def test_case_5_a_flipped_bit_in_a_checkpoint_tensor_is_refused_by_name(tmp_path: Path, capsys) -> None:
    ckpts, out = tmp_path / "ckpts", tmp_path / "tune.csv"
    code, _, err = call(TUNE + ["--checkpoints", ckpts, "--out", out], capsys)
    assert code == 0, err[-2000:]
    (ckpt,) = ckpts.rglob("*.safetensors")
    flip_a_bit(ckpt, "best.offsets")
    code, stdout, err = call(TUNE + ["--checkpoints", ckpts, "--out", out], capsys)
    assert code == 1
    one_line_error(err, "tensor 'best.offsets' does not match the checksum")
    assert "resumed" not in stdout


# --------------------------------------------------------------------------------------- 6. values checked when parsed
@pytest.mark.parametrize("argv, named", [
    (["probe", "--max-facts", "-1"], "--max-facts"),
    (["probe", "--max-facts", "0"], "--max-facts"),
    (["tune", "--max-test", "-3"], "--max-test"),
    (["tune", "--max-train", "-1"], "--max-train"),
    (["tune", "--max-dev", "-2"], "--max-dev"),
    (["probe", "--relations", ""], "--relations"),
    (["probe", "--relations", ","], "--relations"),
    (["probe", "--relations", "P103,,P36"], "--relations"),
    (["probe", "--relations", "P103,P103"], "--relations"),
    (["reproduce", "--relations", "P36,P103,P36"], "--relations"),
    (["probe", "--answer-space", "full,full"], "--answer-space"),
    (["probe", "--answer-space", "full,"], "--answer-space"),
    (["tune", "--answer-space", "full,common"], "--answer-space"),
    (["reproduce", "--answer-space", "common,full"], "--answer-space"),
    (["tune", "--depth", "-1"], "--depth"),
    (["tune", "--lr", "-0.1"], "--lr"),
    (["tune", "--lr", "nan"], "--lr"),
    (["tune", "--epochs", "0"], "--epochs"),
    (["tune", "--batch-size", "0"], "--batch-size"),
    (["probe", "--batch-size", "-8"], "--batch-size"),
    (["tune", "--patience", "0"], "--patience"),
    (["tune", "--seed", "-1"], "--seed"),
    (["reproduce", "--shard", "1/0"], "--shard"),
    (["reproduce", "--shard", "-1/2"], "--shard"),
])
def test_case_6_bad_values_are_refused_when_parsed(argv: list, named: str, capsys, monkeypatch) -> None:
    from course_lib import models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a command with a bad argument")

    monkeypatch.setattr(models, "load_model", never)
    code, _, err = call(argv, capsys)
    assert code == 2
    one_line_error(err, f"argument {named}")


@pytest.mark.parametrize("depth, method", [("00", "soft-lama"), ("0", "soft-lama"), ("01", "soft-lama-deep1"),
                                           ("2", "soft-lama-deep"), ("all", "soft-lama-deep")])
def test_case_6_the_depth_label_says_what_was_run(depth: str, method: str, tmp_path: Path, capsys) -> None:
    # tiny-gpt2 has 2 layers: depth 2 is every layer, the same run as "all", and labelled so.
    argv = ["tune", "--model", "tiny-gpt2", "--relations", "P103", "--epochs", 1, "--max-train", 8, "--max-dev", 4,
            "--max-test", 4, "--depth", depth, "--checkpoints", tmp_path / "c", "--out", tmp_path / "t.csv"]
    code, _, err = call(argv, capsys)
    assert code == 0, err[-2000:]
    assert list(rows(tmp_path / "t.csv")["method"]) == [method]


@pytest.mark.parametrize("argv, named", [
    (["--mixture", "10000", "--init", "lpaqa-mine"], "--mixture 10000: prompt set lpaqa-mine has fewer templates"),
    (["--mixture", "2", "--init", "lama"], "--mixture 2: prompt set lama has fewer templates"),
])
def test_case_6_a_mixture_larger_than_the_templates_is_refused(argv: list, named: str, tmp_path: Path, capsys) -> None:
    code, _, err = call(["tune", "--model", "tiny-gpt2", "--relations", "P103", *argv, "--out", tmp_path / "t.csv",
                         "--checkpoints", tmp_path / "c"], capsys)
    assert code == 2
    one_line_error(err, named)
    assert not (tmp_path / "t.csv").exists()


def test_case_6_a_negative_template_weight_is_refused_by_file_and_line(own_data: Path, tmp_path: Path, capsys) -> None:
    path = own_data / "soft_prompts" / "prompts" / "trex_mine" / "P103.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    lines[1] = json.dumps({**record, "weight": -0.5})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = call(["probe", "--model", "tiny-bert", "--relations", "P103", "--prompts", "lpaqa-mine",
                         "--method", "ensemble-weighted", "--max-facts", 4, "--out", tmp_path / "o.csv"], capsys)
    assert code == 1  # the data is wrong, not the command
    one_line_error(err, "P103.jsonl:2: 'weight' must not be negative")


def test_case_6_merge_refuses_an_unrelated_csv_and_keeps_counts_whole(tmp_path: Path, capsys) -> None:
    unrelated = tmp_path / "grades.csv"
    unrelated.write_text("student,grade\nada,1.0\n")
    shard = tmp_path / "shard.csv"
    code, _, _ = call(["probe", "--model", "tiny-bert", "--relations", "P103,P36", "--max-facts", 4, "--out", shard],
                      capsys)
    assert code == 0
    code, _, err = call(["merge", shard, unrelated, "--out", tmp_path / "m.csv"], capsys)
    assert code == 2
    one_line_error(err, f"{unrelated}: not a course_lib results table")
    # Counts stay whole numbers, even next to a table with other columns (gaps in a column).
    other = tmp_path / "other.csv"
    code, _, _ = call(["tune", "--model", "tiny-gpt2", "--relations", "P103", "--epochs", 1, "--max-train", 8,
                       "--max-dev", 4, "--max-test", 4, "--checkpoints", tmp_path / "c", "--out", other], capsys)
    assert code == 0
    code, _, err = call(["merge", shard, other, "--out", tmp_path / "m.csv"], capsys)
    assert code == 0, err
    import csv

    with open(tmp_path / "m.csv", newline="") as fh:
        records = list(csv.DictReader(fh))
    for record in records:
        for column in ("facts", "kept", "dropped", "truncated"):
            assert record[column].isdigit(), (column, record[column])
    merged = pd.read_csv(tmp_path / "m.csv")
    assert merged["kept"].dtype.kind == "i" and len(merged) == 3


def test_case_6_a_results_cache_entry_that_is_not_one_is_recomputed(tmp_path: Path, results_cache: Path) -> None:
    from course_lib.experiments import run_rung
    from course_lib.models import load_model

    lm = load_model("tiny-bert")
    first = run_rung(lm, "trex_original", "P103", "lama-hard", "ci", progress=False)
    (entry,) = results_cache.glob("*.json")
    bare_row = json.dumps({**first, "p_at_1": 0.5}, default=float)  # the format before checksums
    for text in ("{}", json.dumps({"row": {**first, "p_at_1": 0.5}}), bare_row):
        entry.write_text(text)
        again = run_rung(lm, "trex_original", "P103", "lama-hard", "ci", progress=False)
        assert again["p_at_1"] == first["p_at_1"] and again["facts"] == first["facts"] == 80, text[:30]


# ---------------------------------------------------------------------------------------- 7. concurrent writers
# Each child does its imports and loads the model first, then waits for the other: their probing
# overlaps for sure, as two runs started together on a cluster would.
CHILD = """
import pathlib, sys, time
from course_lib.cli import main
from course_lib.experiments import LADDER
from course_lib.models import load_model
load_model("tiny-bert")
barrier = pathlib.Path(sys.argv[1])
(barrier / sys.argv[2]).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.01)
sys.exit(main(sys.argv[3:]))
"""


def test_case_7_two_processes_resuming_into_one_file_lose_no_row(tmp_path: Path) -> None:
    relations = ["P103", "P36", "P19", "P20", "P27", "P30", "P31", "P37", "P39", "P101"]
    out, barrier = tmp_path / "o.csv", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COURSE_LIB_RESULTS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(data.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(barrier), str(i), "probe", "--model", "tiny-bert",
                               "--max-facts", "40", "--relations", ",".join(part), "--resume", "--out", str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, part in enumerate((relations[:5], relations[5:]))]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
    table = rows(out)
    assert sorted(table["relation"]) == sorted(relations)
    assert not table.duplicated(subset=KEY_COLUMNS).any()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------------- 8. every finished relation on disk
def test_case_8_an_error_on_a_later_relation_keeps_the_finished_rows(tmp_path: Path, capsys) -> None:
    ckpts, out = tmp_path / "ckpts", tmp_path / "tune.csv"
    bad = ckpts / "tiny-gpt2" / "trex_original" / "P27" / "soft-random-seed0.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    argv = [a if a != "P103" else "P103,P27" for a in TUNE] + ["--checkpoints", ckpts, "--out", out]
    code, _, err = call(argv, capsys)
    assert code == 1
    one_line_error(err, "P27")
    table = rows(out)
    assert list(table["relation"]) == ["P103"] and table["kept"].iloc[0] > 0


def test_case_8_reproduce_saves_each_job_before_the_next(tmp_path: Path, capsys, monkeypatch) -> None:
    from course_lib import experiments

    real, calls = experiments.run_rung, []

    def failing_third(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(tmp_path / "runs"))
        return real(*args, **kwargs)

    monkeypatch.setattr(experiments, "run_rung", failing_third)
    out = tmp_path / "r.csv"
    code, _, err = call(["reproduce", "--model", "tiny-bert", "--relations", "P103", "--checkpoints",
                         tmp_path / "runs", "--out", out], capsys)
    assert code == 1
    one_line_error(err, "No space left on device")
    assert list(rows(out)["method"]) == calls[:2]


# --------------------------------------------------------------------------------------- 9. output paths checked first
@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if a command loads a model: its output path must be refused before any work."""
    from course_lib import models

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded although the output path is unusable")

    monkeypatch.setattr(models, "load_model", never)


@pytest.mark.parametrize("command, case", [(c, k) for k in ("--out is a folder", "--out under a file",
                                                             "--checkpoints is a file")
                                           for c in ("probe", "tune", "reproduce")
                                           if not (c == "probe" and k == "--checkpoints is a file")])  # none
def test_case_9_an_unusable_output_path_is_refused_before_any_work(command: str, case: str, tmp_path: Path, capsys,
                                                                    no_model) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = [command, "--model", "tiny-gpt2", "--relations", "P103"]
    if case == "--out is a folder":
        argv += ["--out", tmp_path]
        named = f"--out {tmp_path}: is a folder"
    elif case == "--out under a file":
        argv += ["--out", a_file / "o.csv"]
        named = f"--out {a_file / 'o.csv'}: {a_file} is a file, not a folder"
    else:
        argv += ["--out", tmp_path / "o.csv", "--checkpoints", a_file]
        named = f"--checkpoints {a_file}: {a_file} is a file, not a folder"
    code, _, err = call(argv, capsys)
    assert code == 2
    one_line_error(err, named)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # nothing written


def test_case_9_an_existing_file_that_is_not_a_results_table_is_not_overwritten(tmp_path: Path, capsys,
                                                                                no_model) -> None:
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\nnotes,here\n")
    code, _, err = call(["probe", "--model", "tiny-bert", "--relations", "P103", "--out", notes], capsys)
    assert code == 2
    one_line_error(err, f"{notes}: not a course_lib results table")
    assert notes.read_text() == "my,own\nnotes,here\n"


def test_case_9_an_empty_out_file_is_a_fresh_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.csv"
    out.touch()  # e.g. made by `touch` or a job script before the run
    code, _, err = call(["probe", "--model", "tiny-bert", "--relations", "P103", "--max-facts", 2, "--out", out,
                         "--resume"], capsys)
    assert code == 0, err
    assert list(rows(out)["relation"]) == ["P103"]


# ---------------------------------------------------------------------------------------- 10. devices
def missing_cuda() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("device, named", [("banana", "'banana' is not a device"), ("cuda:x", "is not a device"),
                                           ("MISSING", "CUDA"), ("mps", "MPS"), ("meta", "not meta")])
def test_case_10_a_bad_or_missing_device_is_refused(device: str, named: str, tmp_path: Path, capsys, monkeypatch,
                                                    no_model) -> None:
    if device == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has Apple MPS")
    device = missing_cuda() if device == "MISSING" else device
    code, _, err = call(["probe", "--model", "tiny-bert", "--device", device], capsys)
    assert code == 2
    one_line_error(err, "argument --device")
    assert named in err
    monkeypatch.setenv("COURSE_LIB_DEVICE", device)
    code, _, err = call(["probe", "--model", "tiny-bert", "--relations", "P103", "--out", tmp_path / "o.csv"], capsys)
    assert code == 1  # the environment, not the command
    one_line_error(err, f"COURSE_LIB_DEVICE={device!r}")


# ---------------------------------------------------------------------------------------- 11. merge names bad files
@pytest.fixture
def a_shard(tmp_path: Path, capsys) -> Path:
    path = tmp_path / "shard0.csv"
    code, _, err = call(["probe", "--model", "tiny-bert", "--relations", "P103,P36", "--max-facts", 4, "--out", path],
                        capsys)
    assert code == 0, err
    return path


@pytest.mark.parametrize("case, named", [
    ("missing", "no such file"), ("a folder", "is a folder"), ("no relation column", "no column relation"),
    ("empty", "empty file"), ("binary", "binary data"), ("half-written", "damaged row"), ("not UTF-8", "not UTF-8"),
    ("header only, no key columns", "not a course_lib results table"),
])
def test_case_11_merge_refuses_a_bad_file_by_name(case: str, named: str, a_shard: Path, tmp_path: Path,
                                                  capsys) -> None:
    bad = tmp_path / "bad.csv"
    good = a_shard.read_bytes()
    if case == "a folder":
        bad.mkdir()
    elif case == "no relation column":
        bad.write_text(a_shard.read_text().replace("relation,", "relation_id,", 1))
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "binary":
        bad.write_bytes(bytes(range(256)) * 4)
    elif case == "half-written":
        bad.write_bytes(good[: len(good) * 3 // 4])
    elif case == "not UTF-8":
        bad.write_bytes(good.replace(b"P36", b"P\xff6"))
    elif case == "header only, no key columns":
        bad.write_text("a,b,c\n")
    out = tmp_path / "merged.csv"
    code, _, err = call(["merge", a_shard, bad, "--out", out], capsys)
    assert code == 2
    one_line_error(err, str(bad))
    assert named in err
    assert not out.exists()


def test_case_11_a_shard_without_jobs_writes_a_table_merge_accepts(a_shard: Path, tmp_path: Path, capsys) -> None:
    # tiny-bert on one relation: one job per rung, none of them in the last shard of one more shard than that.
    n = len(LADDER) + 1
    code, stdout, err = call(["reproduce", "--model", "tiny-bert", "--relations", "P103", "--shard", f"{n - 1}/{n}",
                              "--checkpoints", tmp_path / "runs", "--out", tmp_path / "ladder.csv"], capsys)
    assert code == 0, err
    empty = tmp_path / f"ladder-shard{n - 1}of{n}.csv"
    assert set(KEY_COLUMNS) <= set(empty.read_text().splitlines()[0].split(","))
    assert len(empty.read_text().splitlines()) == 1 and len(pd.read_csv(empty)) == 0
    code, _, err = call(["merge", empty, "--out", tmp_path / "m0.csv"], capsys)
    assert code == 0, err
    code, _, err = call(["merge", a_shard, empty, "--out", tmp_path / "m.csv"], capsys)
    assert code == 0, err
    columns = KEY_COLUMNS + METRICS
    pd.testing.assert_frame_equal(rows(tmp_path / "m.csv")[columns], rows(a_shard)[columns])


# ---------------------------------------------------------------------------------------- 12. stray files; no template
def test_case_12_stray_files_in_a_dataset_folder_are_not_relations(own_data: Path, tmp_path: Path, capsys) -> None:
    folder = own_data / "soft_prompts" / "db" / "google_re"
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "README.txt").write_text("notes\n")
    (folder / "empty-folder").mkdir()
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "test.jsonl").write_text('{"sub": "a", "obj": "b"}\n')
    assert data.relations("google_re") == ["date_of_birth", "place_of_birth", "place_of_death"]
    code, stdout, err = call(["probe", "--model", "tiny-bert", "--dataset", "google_re", "--max-facts", 2,
                              "--out", tmp_path / "o.csv"], capsys)
    assert code == 0, err
    assert sorted(rows(tmp_path / "o.csv")["relation"]) == ["date_of_birth", "place_of_birth", "place_of_death"]


def test_case_12_tune_reports_a_relation_with_no_usable_template(own_data: Path, tmp_path: Path, capsys) -> None:
    # A causal LM cannot answer a template whose blank comes before the subject.
    lama = own_data / "soft_prompts" / "prompts" / "trex" / "P103.jsonl"
    lama.write_text('{"template": "[Y] is spoken by [X] ."}\n')
    code, stdout, err = call(["tune", "--model", "tiny-gpt2", "--relations", "P103,P27", "--epochs", 1,
                              "--max-train", 16, "--max-dev", 4, "--max-test", 6, "--checkpoints", tmp_path / "c",
                              "--out", tmp_path / "t.csv"], capsys)
    assert code == 0, err
    table = rows(tmp_path / "t.csv").set_index("relation")
    assert list(table.index) == ["P103", "P27"]
    assert (table.loc["P103", "facts"], table.loc["P103", "kept"], table.loc["P103", "dropped"]) == (6, 0, 6)
    assert json.loads(table.loc["P103", "dropped_reasons"]) == {"no usable template for this model": 6}
    assert table.loc["P27", "kept"] > 0 and table.loc["P27", "best_epoch"] == 0
    assert "P103: no template of lama that tiny-gpt2 can answer" in err


# ---------------------------------------------------------------------------------------- 13. no tracebacks
def test_case_13_ctrl_c_during_tune_says_how_to_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    from course_lib import training

    real, batches = training.gold_log_probs, []

    def interrupted(*args, **kwargs):
        batches.append(1)
        if len(batches) == 1:  # the first training batch
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C sends; Python turns it into KeyboardInterrupt here
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "gold_log_probs", interrupted)
    try:
        code, _, err = call(TUNE + ["--checkpoints", tmp_path / "c", "--out", tmp_path / "t.csv"], capsys)
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("the KeyboardInterrupt escaped the command (a traceback for the user)")
    assert code == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted; " in err and "rerun the same command to resume" in err


@pytest.mark.parametrize("argv, named", [
    (["tune", "--seed", str(2**64)], "argument --seed"),
    (["tune", "--seed", "99999999999999999999999"], "argument --seed"),
    (["tune", "--depth", "\u00b2"], "argument --depth"),
    (["tune", "--depth", "\u0663"], "argument --depth"),
    (["probe", "--max-facts", "1_000"], "argument --max-facts"),
])
def test_case_13_overflowing_or_exotic_numbers_are_named(argv: list, named: str, capsys, no_model) -> None:
    code, _, err = call(argv, capsys)
    assert code == 2
    one_line_error(err, named)
    assert "invalid literal" not in err and "Overflow" not in err


def test_case_13_a_bad_world_size_is_named(tmp_path: Path, capsys, monkeypatch, no_model) -> None:
    monkeypatch.setenv("WORLD_SIZE", "abc")
    code, _, err = call(["reproduce", "--model", "tiny-bert", "--shard", "auto", "--out", tmp_path / "o.csv"], capsys)
    assert code == 1
    one_line_error(err, "WORLD_SIZE='abc' is not a whole number")


def test_case_13_a_common_vocabulary_that_is_not_utf8_is_named(own_data: Path, tmp_path: Path, capsys) -> None:
    path = own_data / "common_vocab" / "common_vocab_cased.txt"
    path.write_bytes(path.read_bytes() + b"caf\xe9\n")
    code, _, err = call(["probe", "--model", "tiny-bert", "--relations", "P103", "--answer-space", "common",
                         "--max-facts", 4, "--out", tmp_path / "o.csv"], capsys)
    assert code == 1
    one_line_error(err, "common_vocab_cased.txt: not UTF-8 text")


def test_debug_shows_the_traceback(capsys, tmp_path: Path) -> None:
    code, _, err = call(["--debug", "merge", tmp_path / "missing.csv", "--out", tmp_path / "m.csv"], capsys)
    assert code == 2 and "Traceback" in err and "no such file" in err.strip().splitlines()[-1]
    code, _, err = call(["merge", tmp_path / "missing.csv", "--out", tmp_path / "m.csv", "--debug"], capsys)
    assert code == 2 and "Traceback" in err
