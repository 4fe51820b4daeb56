"""The command line, called in-process (``course_lib.cli.main``) with tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from course_lib.experiments import LADDER
from course_lib.results import KEY_COLUMNS
from cli_call import call

METRICS = ["facts", "kept", "dropped", "p_at_1", "p_at_10", "mrr"]


@pytest.fixture(autouse=True)
def results_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test gets its own results cache, so no row comes from an earlier run."""
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path / "results-cache"))
    return tmp_path / "results-cache"


def test_probe_prints_a_table_and_a_summary_and_writes_the_csv(tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe.csv"
    code, stdout, _ = call(["probe", "--model", "tiny-bert", "--relations", "P103,P36", "--max-facts", 8,
                            "--answer-space", "full,common", "--out", out], capsys)
    assert code == 0
    assert "P103" in stdout and "P36" in stdout and "p_at_1" in stdout
    assert "Summary" in stdout and "micro_p_at_1" in stdout and f"wrote {out}" in stdout
    table = pd.read_csv(out)
    assert set(KEY_COLUMNS + METRICS) <= set(table.columns)
    assert len(table) == 4 and not table.duplicated(subset=KEY_COLUMNS).any()
    assert set(table["relation"]) == {"P103", "P36"} and set(table["answer_space"]) == {"full", "common"}
    assert (table["model"] == "tiny-bert").all() and (table["method"] == "hard").all() and (table["facts"] == 8).all()
    assert (table["kept"] + table["dropped"] == table["facts"]).all()


def test_compile_flag_compiles_the_model_before_probing(tmp_path: Path, capsys, monkeypatch) -> None:
    from course_lib.cloze import ClozeLM

    compiled: list[str] = []
    # Recorded, not run: compiling costs seconds, and tests/test_cloze.py checks compiled scores.
    monkeypatch.setattr(ClozeLM, "compile", lambda self, **options: compiled.append(self.name))
    code, _, _ = call(["probe", "--model", "tiny-bert", "--relations", "P36", "--max-facts", 2, "--compile",
                       "--out", tmp_path / "p.csv"], capsys)
    assert code == 0 and compiled == ["tiny-bert"]


TUNE = ["tune", "--model", "tiny-gpt2", "--relations", "P103", "--init", "random", "--mixture", "1", "--depth", "0",
        "--epochs", "1", "--max-train", "16", "--max-dev", "8", "--max-test", "8"]


def test_tune_writes_a_checkpoint_and_a_row_and_a_rerun_resumes(tmp_path: Path, capsys) -> None:
    ckpts, out = tmp_path / "ckpts", tmp_path / "tune.csv"
    code, stdout, _ = call(TUNE + ["--checkpoints", ckpts, "--out", out], capsys)
    assert code == 0, stdout
    ckpt = ckpts / "tiny-gpt2" / "trex_original" / "P103" / "soft-random-seed0.safetensors"
    assert ckpt.is_file() and "resumed" not in stdout
    first = pd.read_csv(out)
    assert set(KEY_COLUMNS + METRICS + ["best_epoch", "best_dev_p_at_1", "checkpoint"]) <= set(first.columns)
    assert len(first) == 1
    row = first.iloc[0]
    assert (row["model"], row["relation"], row["method"], row["facts"]) == ("tiny-gpt2", "P103", "soft-random", 8)
    assert Path(row["checkpoint"]) == ckpt

    code, stdout, _ = call(TUNE + ["--checkpoints", ckpts, "--out", out], capsys)
    assert code == 0
    assert "resumed from the checkpoint of epoch 1" in stdout
    again = pd.read_csv(out)
    pd.testing.assert_frame_equal(again[KEY_COLUMNS + METRICS + ["best_dev_p_at_1"]], first[KEY_COLUMNS + METRICS + ["best_dev_p_at_1"]])


def test_tune_reports_a_relation_with_nothing_to_train_on_and_goes_on(tmp_path: Path, capsys) -> None:
    # Google-RE's birth dates are several tokens for every model here: that relation is reported,
    # the next one is still tuned, and both rows reach the table.
    argv = ["tune", "--model", "tiny-gpt2", "--dataset", "google_re", "--relations", "date_of_birth,place_of_birth",
            "--epochs", "1", "--max-train", "16", "--max-dev", "8", "--max-test", "8",
            "--checkpoints", tmp_path / "ckpts", "--out", tmp_path / "tune.csv"]
    code, stdout, err = call(argv, capsys)
    assert code == 0, err[-2000:]
    assert "date_of_birth: no training fact has a single-token object" in err
    table = pd.read_csv(tmp_path / "tune.csv").set_index("relation")
    assert list(table.index) == ["date_of_birth", "place_of_birth"]
    assert pd.isna(table.loc["date_of_birth", "p_at_1"]) and not pd.isna(table.loc["place_of_birth", "p_at_1"])
    assert table.loc["place_of_birth", "kept"] > 0


def reproduce(argv: list[str], tmp: Path, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp / "cache"))
    code, stdout, err = call(["reproduce", "--model", "tiny-bert", "--budget", "ci", "--relations", "P103",
                              "--checkpoints", tmp / "ckpts", *argv], capsys)
    assert code == 0, err[-2000:]
    return code, stdout


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    return table[KEY_COLUMNS + METRICS].sort_values("method").reset_index(drop=True)


def test_reproduce_runs_the_ladder_and_shards_merge_to_the_same_table(tmp_path: Path, capsys, monkeypatch) -> None:
    whole = tmp_path / "whole.csv"
    _, stdout = reproduce(["--out", whole], tmp_path / "unsharded", capsys, monkeypatch)
    table = pd.read_csv(whole)
    assert list(table["method"]) == [r.name for r in LADDER]
    assert "Summary" in stdout and all(r.name in stdout for r in LADDER)
    assert (table["relation"] == "P103").all() and (table["kept"] > 0).all()

    # Each shard starts from an empty cache and checkpoint folder, so its rows are recomputed.
    # One --out for both, as a job array gives it: each shard writes its own file beside it.
    shards = []
    for i in range(2):
        reproduce(["--shard", f"{i}/2", "--out", tmp_path / "ladder.csv"], tmp_path / f"shard{i}", capsys, monkeypatch)
        shard = tmp_path / f"ladder-shard{i}of2.csv"
        shards.append(shard)
        assert list(pd.read_csv(shard)["method"]) == [r.name for r in LADDER][i::2]
    assert not (tmp_path / "ladder.csv").exists()
    merged = tmp_path / "merged.csv"
    code, stdout, _ = call(["merge", *shards, shards[0], "--out", merged], capsys)  # a shard given twice
    assert code == 0 and "Summary" in stdout
    pd.testing.assert_frame_equal(comparable(pd.read_csv(merged)), comparable(table))


def corrupt_checkpoint(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Garbage where `tune` (with CORRUPT_TUNE's arguments) looks for its checkpoint."""
    ckpt = tmp / "ckpts" / "tiny-gpt2" / "trex_original" / "P103" / "soft-random-seed0.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")


def download_from(mirror_files: dict[str, bytes]):
    """No local data: every file is downloaded into an empty cache from a mirror holding only ``mirror_files``."""
    def setup(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from course_lib import data, download

        for rel, content in mirror_files.items():
            (tmp / "mirror" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "mirror" / rel).write_bytes(content)
        monkeypatch.delenv(data.ENV_VAR, raising=False)
        monkeypatch.delenv("COURSE_LIB_CACHE", raising=False)  # it would outrank XDG_CACHE_HOME
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
        monkeypatch.setenv(download.URL_BASE_ENV, (tmp / "mirror").as_uri())

    return setup


CORRUPT_TUNE = TUNE + ["--checkpoints", "{tmp}/ckpts"]
LAMA_P103 = "soft_prompts/prompts/trex/P103.jsonl"


# Exit code 1: the machine holds damaged files or lacks data (the environment); 2: the command asked
# for something that cannot be (usage).
@pytest.mark.parametrize(
    "argv, named, setup, code",
    [
        (CORRUPT_TUNE, "not a readable course_lib checkpoint", corrupt_checkpoint, 1),
        (["probe", "--model", "tiny-bert", "--relations", "P103"], f"checksum mismatch for {LAMA_P103}",
         download_from({LAMA_P103: b'{"template": "[X] speaks [Y] ."}\n'}), 1),
        (["probe", "--model", "tiny-bert", "--relations", "P103"], f"could not download {LAMA_P103}",
         download_from({}), 1),
    ] + [(argv, named, None, 2) for argv, named in [
        (["probe", "--model", "no-such-model"], "no-such-model"),
        (["tune", "--model", "no-such-model"], "no-such-model"),
        (["probe", "--model", "tiny-bert", "--relations", "P103,P999"], "P999"),
        (["tune", "--model", "tiny-gpt2", "--relations", "P999"], "P999"),
        (["reproduce", "--model", "tiny-bert", "--relations", "P999"], "P999"),
        (["tune", "--model", "tiny-gpt2", "--relations", "P103", "--mixture", "0"], "--mixture"),
        (["tune", "--model", "tiny-gpt2", "--relations", "P103", "--mixture", "three"], "--mixture"),
        (["tune", "--model", "tiny-gpt2", "--relations", "P103", "--mixture", "-2"], "--mixture"),
        (["tune", "--model", "tiny-gpt2", "--relations", "P103", "--depth", "deep"], "--depth"),
        (["tune", "--model", "tiny-gpt2", "--relations", "P103", "--depth", "99"], "depth"),
        (["probe", "--model", "tiny-bert", "--answer-space", "everything"], "--answer-space"),
        (["reproduce", "--model", "tiny-bert", "--relations", "P103", "--shard", "2/2"], "shard"),
        (["reproduce", "--model", "tiny-bert", "--relations", "P103", "--shard", "half"], "--shard"),
    ]],
)
def test_bad_arguments_exit_2_with_a_message_naming_them(argv: list[str], named: str, setup, code: int, tmp_path: Path,
                                                         capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    if setup is not None:
        setup(tmp_path, monkeypatch)
    out = tmp_path / "out.csv"
    exit_code, stdout, err = call([str(a).replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", out], capsys)
    assert exit_code == code
    assert named in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_shard_auto_under_a_real_launcher_splits_the_ladder(tmp_path: Path) -> None:
    # torchrun (what `accelerate launch --multi_gpu` runs underneath) sets RANK and WORLD_SIZE for
    # each of its processes; on CPU the two processes share the machine.
    env = {**os.environ, "COURSE_LIB_RESULTS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "course_lib",
           "reproduce", "--model", "tiny-gpt2", "--relations", "P103", "--shard", "auto",
           "--checkpoints", str(tmp_path / "runs"), "--out", str(tmp_path / "ladder.csv")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [pd.read_csv(tmp_path / f"ladder-shard{i}of2.csv") for i in range(2)]
    for i, shard in enumerate(shards):
        assert list(shard["method"]) == [r.name for r in LADDER][i::2]
    assert not (tmp_path / "ladder.csv").exists()


def test_tune_read_and_row_scaling_options_reach_the_run_and_its_label(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.csv"
    code, _, err = call(["tune", "--model", "tiny-gpt2", "--relations", "P103", "--depth", "all", "--read", "tuned",
                         "--no-row-scaling", "--epochs", "1", "--max-train", "8", "--max-dev", "4", "--max-test", "4",
                         "--checkpoints", tmp_path / "runs", "--out", out], capsys)
    assert code == 0, err
    row = pd.read_csv(out).iloc[0]
    config = json.loads(row["config"])
    assert config["read"] == "tuned" and config["row_scaling"] is False
    assert row["method"] == "soft-lama-deep-read-tuned-flat"
    code, _, err = call(["tune", "--model", "tiny-gpt2", "--relations", "P103", "--epochs", "1", "--max-train", "8",
                         "--max-dev", "4", "--max-test", "4", "--checkpoints", tmp_path / "runs",
                         "--out", tmp_path / "d.csv"], capsys)
    assert code == 0, err
    default = json.loads(pd.read_csv(tmp_path / "d.csv").iloc[0]["config"])
    assert default["read"] == "frozen" and default["row_scaling"] is True
