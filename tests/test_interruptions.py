"""Killed runs: a tuning run SIGKILLed anywhere resumes to exactly the uninterrupted result, and
neither checkpoints nor the experiments' results cache ever expose a half-written file.

The runs to kill are real subprocesses (this file, loaded by path, provides their ``child_main``),
started together so that their imports overlap; each is killed at a different point.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from course_lib import training
from course_lib.data import load_facts, load_prompts
from course_lib.evaluation import score_facts
from course_lib.models import load_model
from course_lib.training import TuneConfig, load_checkpoint, tune

DATASET, RELATION = "trex_original", "P103"
CONFIG = TuneConfig(init="random", epochs=8, lr=0.05, batch_size=8, seed=5, patience=8)
SLOW_BATCH = 0.04  # seconds a child sleeps per batch, so that kills land inside epochs, not after the run


@functools.cache
def lm():
    return load_model("tiny-gpt2", device="cpu")


@functools.cache
def setup():
    model = lm()
    templates = [t for t in load_prompts("lpaqa-mine", DATASET, RELATION) if model.covers(t)][:2]
    train = load_facts(DATASET, RELATION, "train")[:48]
    dev = load_facts(DATASET, RELATION, "dev")[:16]
    test = load_facts(DATASET, RELATION, "test")[:16]
    return templates, train, dev, test


def run(checkpoint: Path | None) -> training.TuneResult:
    templates, train, dev, _ = setup()
    return tune(lm(), templates, train, dev, CONFIG, checkpoint=checkpoint, progress=False)


def child_main(checkpoint: str, scenario: str, threads: str) -> None:
    """What a child process runs: the same tuning run, slowed down; one scenario kills itself mid-write."""
    torch.set_num_threads(int(threads))
    real_gold = training.gold_log_probs

    def slow_gold(*args, **kwargs):
        time.sleep(SLOW_BATCH)
        return real_gold(*args, **kwargs)

    training.gold_log_probs = slow_gold
    if scenario == "kill-during-write":
        real_save = training.save_file
        calls = []

        def half_then_die(tensors, filename, metadata=None):
            calls.append(filename)
            real_save(tensors, filename, metadata=metadata)
            if len(calls) == 2:  # the second checkpoint: leave half of it, as a kill mid-write would
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

        training.save_file = half_then_die
    print("started", flush=True)
    run(Path(checkpoint))
    print("finished", flush=True)


CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("interruptions_child", {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.child_main(*sys.argv[1:])
"""

# How each child is stopped: (scenario, seconds to wait after the first checkpoint appears, or None).
SCENARIOS = {
    "kill-at-first-checkpoint": 0.0,
    "kill-after-random-delay": round(random.Random(2021).uniform(0.2, 0.6), 3),
    "kill-during-write": None,  # the child SIGKILLs itself halfway through writing its second checkpoint
}


def _control(proc: subprocess.Popen, checkpoint: Path, delay: float | None, out: dict) -> None:
    deadline = time.monotonic() + 240
    if delay is not None:
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    out.update(returncode=proc.returncode, stdout=stdout, stderr=stderr)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("killed")
    script = root / "child.py"
    script.write_text(CHILD.format(path=str(Path(__file__).resolve())))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(training.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    runs, threads = {}, []
    for name, delay in SCENARIOS.items():
        ckpt = root / name / "run.safetensors"
        ckpt.parent.mkdir()
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt), name, str(torch.get_num_threads())],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        out: dict = {}
        thread = threading.Thread(target=_control, args=(proc, ckpt, delay, out))
        thread.start()
        runs[name] = (ckpt, out)
        threads.append(thread)
    for thread in threads:
        thread.join()
    return runs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("full") / "run.safetensors"
    return run(path), path


def strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_killed_run_resumes_to_the_uninterrupted_result(killed_runs, uninterrupted, scenario: str) -> None:
    ckpt, out = killed_runs[scenario]
    assert out["returncode"] == -signal.SIGKILL, out.get("stderr", "")[-2000:]
    assert "started" in out["stdout"] and "finished" not in out["stdout"]
    tensors, meta = load_checkpoint(ckpt)  # whatever the kill hit, the published checkpoint is whole
    killed_at = meta["epoch"]
    print(f"{scenario}: killed after the checkpoint of epoch {killed_at}")
    assert killed_at < CONFIG.epochs - 1  # the kill came before the end: there is something to resume
    leftovers = [p.name for p in ckpt.parent.iterdir() if p != ckpt]
    if scenario == "kill-during-write":
        # The half-written second one, under a name no other writer uses (files.atomic_path).
        private = rf"\.{re.escape(ckpt.name)}\.[\w-]+\.\d+\.[0-9a-f]{{8}}\.tmp"
        assert killed_at == 0 and len(leftovers) == 1 and re.fullmatch(private, leftovers[0]), leftovers
    full, full_path = uninterrupted
    resumed = run(ckpt)
    assert resumed.resumed_from == killed_at
    assert torch.equal(resumed.soft.offsets, full.soft.offsets)
    assert torch.equal(resumed.log_weights, full.log_weights)
    assert strip(resumed.history) == strip(full.history)
    assert len(resumed.history) == CONFIG.epochs
    mine, theirs = load_checkpoint(ckpt)[0], load_checkpoint(full_path)[0]
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    templates, _, _, test = setup()
    a = score_facts(lm(), templates, test, log_weights=resumed.log_weights, perturbation=resumed.soft.perturbation)
    b = score_facts(lm(), templates, test, log_weights=full.log_weights, perturbation=full.soft.perturbation)
    assert torch.equal(a.ranks, b.ranks) and a.metrics() == b.metrics()
    # The next save removed the leftover of the killed writer (its process is gone).
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]


def test_checkpoints_are_published_only_by_rename(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "run.safetensors"
    written, renamed = [], []
    real_save, real_replace = training.save_file, os.replace

    def save(tensors, filename, metadata=None):
        written.append(Path(filename))
        assert not path.exists() or load_checkpoint(path)  # the published one stays readable meanwhile
        return real_save(tensors, filename, metadata=metadata)

    def replace(src, dst):
        renamed.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(training, "save_file", save)
    monkeypatch.setattr(os, "replace", replace)
    templates, train, dev, _ = setup()
    tune(lm(), templates, train[:16], dev[:8], TuneConfig(epochs=2, lr=0.05, batch_size=8), checkpoint=path, progress=False)
    assert len(written) == 2 and path not in written
    assert all(w.parent == path.parent for w in written)  # same folder: the rename is atomic
    assert renamed == [(w, path) for w in written]


# ---------------------------------------------------------------------------------------- results cache
@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path / "results"))
    return tmp_path / "results"


def test_the_results_cache_never_reads_a_half_written_entry(cache: Path) -> None:
    from course_lib.experiments import _write_cached, run_rung

    def rung():
        return run_rung(lm(), DATASET, RELATION, "lama-hard", "ci", progress=False)

    def same(a: dict, b: dict) -> bool:
        return {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}

    first = rung()
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".json"
    entry = entries[0]
    good = entry.read_text()
    stored = json.loads(good)
    assert same(stored["row"], first)

    # A complete entry with a valid checksum is used as it is (so the checks below can tell a read
    # from a recomputation).
    _write_cached(entry, stored["identity"], stored["data"], {**first, "p_at_1": 0.123})
    assert rung()["p_at_1"] == 0.123

    # An entry edited without its checksum, an empty one, a bare row (the old format), a cut one:
    # none is read; each is recomputed and rewritten whole.
    edited = json.dumps({**stored, "row": {**stored["row"], "p_at_1": 0.123}})
    bare_row = json.dumps(first, default=float)
    for partial in ("", good[: len(good) // 2], good[:-1], "\x00" * 40, "{}", bare_row, edited):
        entry.write_text(partial)
        again = rung()
        assert same(again, first), repr(partial[:20])
        assert same(json.loads(entry.read_text())["row"], first)  # rewritten whole

    # A write that was killed before its rename leaves only a temporary file: never read.
    entry.unlink()
    (cache / f".{entry.name}.4242.tmp").write_text(json.dumps({**stored, "row": {**first, "p_at_1": 0.5}}))
    (cache / f".{entry.name}.4343.tmp").write_text(good[:30])
    again = rung()
    assert same(again, first)
    assert entry.exists() and same(json.loads(entry.read_text())["row"], first)
    assert sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp")) == [f".{entry.name}.4242.tmp", f".{entry.name}.4343.tmp"]


def test_a_cached_table_is_published_by_rename_and_a_damaged_one_is_recomputed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from course_lib.notebook import cached_frame

    table = pd.DataFrame({"relation": ["P103", "P36", "P19"], "kept": [20, 18, 7], "p_at_1": [0.5, 0.25, 0.125]})
    computed = []

    def compute() -> pd.DataFrame:
        computed.append(1)
        return table.copy()

    def cached() -> pd.DataFrame:
        return cached_frame("probe", {"model": "tiny-gpt2", "max_facts": 20}, compute)

    renamed, real_replace = [], os.replace

    def replace(src, dst):
        renamed.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    pd.testing.assert_frame_equal(cached(), table)
    (entry,) = (cache / "tables").iterdir()
    assert len(renamed) == 1 and renamed[0][1] == entry
    assert renamed[0][0].parent == entry.parent and renamed[0][0].name.startswith(".")  # same folder: an atomic rename
    good = entry.read_text()
    pd.testing.assert_frame_equal(cached(), table)
    assert len(computed) == 1  # an intact entry is read back, not recomputed

    stored = json.loads(good)
    rows = stored["csv"].split("\n")
    damaged = {
        "empty": "",
        "cut in half": good[: len(good) // 2],
        "last byte cut": good[:-1],
        "zeros": "\x00" * 40,
        # Cut at a line end, a bare CSV would read back as a plausible two-row table.
        "last row lost": json.dumps({**stored, "csv": "\n".join(rows[:-2]) + "\n"}),
        "a digit changed": good.replace("0.25", "0.35"),
        "no checksum": json.dumps({"csv": stored["csv"]}),
    }
    for name, text in damaged.items():
        entry.write_text(text)
        before = len(computed)
        pd.testing.assert_frame_equal(cached(), table, obj=name)
        assert len(computed) == before + 1, name
        assert entry.read_text() == good, name  # rewritten whole

    # A write killed before its rename leaves only a temporary file: never read.
    entry.unlink()
    (entry.parent / f".{entry.name}.4242.tmp").write_text(json.dumps({**stored, "csv": "relation\nP999\n"}))
    pd.testing.assert_frame_equal(cached(), table)
    assert entry.read_text() == good
