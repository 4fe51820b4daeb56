"""Files on a real disk: atomic writes with private temporary names, a lock for concurrent writers,
a full disk, a read-only file system, and single flipped bits in what is read back.

The full and read-only file systems are small tmpfs mounts made for each test; mounting needs root
(and a kernel that lets this container mount), so those tests are skipped, saying why, elsewhere.
The read-only case also runs without root, on a folder without write permission.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from course_lib import files, results, training
from course_lib.training import CheckpointError, load_checkpoint, save_checkpoint
from cli_call import call

pytestmark = pytest.mark.usefixtures("one_thread")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(autouse=True)
def results_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COURSE_LIB_RESULTS_CACHE", str(tmp_path / "results-cache"))


# ---------------------------------------------------------------------------------------- atomic writes
def test_an_atomic_write_uses_a_private_temporary_name_in_the_same_folder(tmp_path: Path, monkeypatch) -> None:
    renamed, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((Path(a), Path(b))), real(a, b))[1])
    target = tmp_path / "t.csv"
    files.write_text(target, "a\n")
    files.write_text(target, "b\n")
    (first, _), (second, _) = renamed
    assert first.parent == second.parent == tmp_path and first != second
    assert re.fullmatch(rf"\.t\.csv\.[\w-]+\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", first.name)
    assert target.read_text() == "b\n" and leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "t.csv"
    files.write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="boom"), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_but_a_live_ones_is_not(tmp_path: Path) -> None:
    target = tmp_path / "t.csv"
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f".t.csv.{files._HOST}.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".t.csv.{files._HOST}.{os.getppid()}.0123abcd.tmp"  # the process that started pytest
    other_host = tmp_path / f".t.csv.some-other-host.{dead.pid}.0123abcd.tmp"
    for p in (orphan, live, other_host):
        p.write_text("x")
    files.write_text(target, "new\n")
    assert not orphan.exists() and live.exists() and other_host.exists()


# ---------------------------------------------------------------------------------------- concurrent writers
def _add_rows(path: str, writer: int, n: int) -> None:
    for i in range(n):
        row = {"model": "m", "dataset": "d", "relation": f"R{writer}-{i}", "prompt_set": "lama", "method": "hard",
               "split": "test", "answer_space": "full", "facts": i, "kept": i, "dropped": 0, "p_at_1": 0.5}
        results.update_table(path, [row])


def test_processes_adding_rows_to_one_table_at_once_lose_none(tmp_path: Path) -> None:
    path = tmp_path / "shared.csv"
    writers, each = 4, 15
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_rows, args=(str(path), w, each)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    stored = results.read_stored(path, strict=True)
    expected = sorted(f"R{w}-{i}" for w in range(writers) for i in range(each))
    assert sorted(r["relation"] for r in stored.rows) == expected
    assert leftovers(tmp_path) == []


def test_without_the_lock_the_same_writers_lose_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The check above can fail: with the lock taken away, concurrent read-modify-write loses rows.
    # (In-process threads stand in for processes, so that the lock can be patched out.)
    import contextlib
    import threading

    monkeypatch.setattr(results, "locked", lambda path: contextlib.nullcontext())
    real_read = results.read_stored

    def slow_read(*args, **kwargs):
        table = real_read(*args, **kwargs)
        threading.Event().wait(0.01)  # widen the window between reading and writing back
        return table

    monkeypatch.setattr(results, "read_stored", slow_read)
    path = tmp_path / "shared.csv"
    threads = [threading.Thread(target=_add_rows, args=(str(path), w, 5)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(real_read(path).rows) < 20


# ---------------------------------------------------------------------------------------- a full disk, a read-only one
def mount_tmpfs(where: Path, size: str = "512k") -> Path:
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root; this test runs as uid {os.getuid() if os.name == 'posix' else '?'}")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine does not let the tests mount a tmpfs: {done.stderr.strip()}")
    return where


@pytest.fixture
def small_disk(tmp_path: Path):
    mnt = mount_tmpfs(tmp_path / "disk")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte."""
    with open(disk / "filler", "ab", buffering=0) as fh:  # unbuffered: no failed write left to flush at close
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC


@pytest.fixture
def read_only(tmp_path: Path):
    """A folder nothing can be written in: a read-only tmpfs as root, a folder without write permission otherwise."""
    if os.name == "posix" and os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder, "Permission denied"
        folder.chmod(0o755)
        return
    mnt = mount_tmpfs(tmp_path / "ro")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    yield mnt, "Read-only file system"
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from course_lib import models

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded although the output cannot be written")

    monkeypatch.setattr(models, "load_model", never)


def test_an_atomic_write_on_a_full_disk_raises_and_leaves_the_old_file(small_disk: Path) -> None:
    target = small_disk / "t.csv"
    files.write_text(target, "old\n")
    fill(small_disk)
    with pytest.raises(OSError) as err:
        files.write_text(target, "new\n" * 100_000)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert target.read_text() == "old\n" and leftovers(small_disk) == []


def test_a_checkpoint_on_a_full_disk_is_an_os_error_naming_it(small_disk: Path) -> None:
    path = small_disk / "run.safetensors"
    save_checkpoint(path, {"offsets": torch.zeros(4)}, {"epoch": 0})
    before = path.read_bytes()
    fill(small_disk)
    with pytest.raises(OSError) as err:  # not safetensors' own error type
        save_checkpoint(path, {"offsets": torch.ones(50_000)}, {"epoch": 1})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_bytes() == before and leftovers(small_disk) == []


@pytest.mark.parametrize("command", ["probe", "tune", "reproduce"])
def test_an_output_on_a_full_disk_is_refused_before_any_work(command: str, small_disk: Path, capsys, no_model) -> None:
    fill(small_disk)
    code, _, err = call([command, "--model", "tiny-gpt2", "--relations", "P103", "--out", small_disk / "o.csv"],
                        capsys)
    assert code == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"--out {small_disk}: cannot write there: No space left on device" in err
    assert leftovers(small_disk) == [] and not (small_disk / "o.csv").exists()


def test_a_disk_that_fills_during_tune_ends_it_with_one_line(small_disk: Path, tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    from course_lib import experiments

    real = experiments.tune_and_score

    def fill_then_tune(*args, **kwargs):
        fill(small_disk)  # after the checks at the start, before the first checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(experiments, "tune_and_score", fill_then_tune)
    code, _, err = call(["tune", "--model", "tiny-gpt2", "--relations", "P103", "--epochs", 1, "--max-train", 8,
                         "--max-dev", 4, "--max-test", 4, "--checkpoints", small_disk / "runs",
                         "--out", tmp_path / "t.csv"], capsys)
    assert code == 1
    assert "Traceback" not in err and "SafetensorError" not in err
    assert f"error: {small_disk / 'runs'}" in err and "No space left on device" in err, err
    assert leftovers(small_disk) == []


@pytest.mark.parametrize("command, option", [("probe", "--out"), ("tune", "--out"), ("tune", "--checkpoints"),
                                             ("reproduce", "--checkpoints"), ("merge", "--out")])
def test_an_output_on_a_read_only_file_system_is_refused_before_any_work(command: str, option: str, read_only,
                                                                        tmp_path: Path, capsys, no_model) -> None:
    folder, reason = read_only
    argv = [command] if command == "merge" else [command, "--model", "tiny-gpt2", "--relations", "P103"]
    if command == "merge":
        shard = tmp_path / "s.csv"
        results.write_table([], shard)
        argv += [shard]
    target = folder / ("o.csv" if option == "--out" else "runs")
    argv += [option, target] + (["--out", tmp_path / "o.csv"] if option != "--out" else [])
    code, _, err = call(argv, capsys)
    assert code == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{option} {target if option == '--checkpoints' else folder}: cannot write there: {reason}" in err, err


# ---------------------------------------------------------------------------------------- flipped bits
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from course_lib.data import load_facts, load_prompts
    from course_lib.models import load_model
    from course_lib.training import TuneConfig, tune

    lm = load_model("tiny-gpt2")
    path = tmp_path_factory.mktemp("ckpt") / "run.safetensors"
    train = load_facts("trex_original", "P103", "train")[:16]
    dev = load_facts("trex_original", "P103", "dev")[:8]
    tune(lm, load_prompts("lama", "trex_original", "P103"), train, dev, TuneConfig(epochs=1, lr=0.05), checkpoint=path,
         progress=False)
    return path


def header_of(raw: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("tensor", ["offsets", "log_weights", "best.offsets", "best.log_weights", "adam.exp_avg",
                                    "adam.exp_avg_sq", "adam.step"])
@pytest.mark.parametrize("bit", [0, 7])
def test_one_flipped_bit_in_any_checkpoint_tensor_is_refused_by_name(checkpoint: Path, tmp_path: Path, tensor: str,
                                                                     bit: int) -> None:
    raw = bytearray(checkpoint.read_bytes())
    n, header = header_of(bytes(raw))
    start, end = header[tensor]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 1 << bit
    path = tmp_path / "run.safetensors"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(tensor)}' does not match the checksum"):
        load_checkpoint(path)


def test_a_changed_digit_in_the_checkpoint_metadata_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    raw = checkpoint.read_bytes()
    n, header = header_of(raw)
    meta = header["__metadata__"]["meta"]
    edited = meta.replace('"epoch": 0', '"epoch": 9')
    assert edited != meta and len(edited) == len(meta)
    text = raw[8 : 8 + n].decode()
    path = tmp_path / "run.safetensors"
    path.write_bytes(raw[:8] + text.replace(json.dumps(meta)[1:-1], json.dumps(edited)[1:-1]).encode() + raw[8 + n :])
    with pytest.raises(CheckpointError, match="metadata does not match the checksum"):
        load_checkpoint(path)


def test_a_checkpoint_from_before_checksums_is_not_resumed(checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from course_lib.data import load_facts, load_prompts
    from course_lib.models import load_model
    from course_lib.training import TuneConfig, tune

    tensors, meta = load_checkpoint(checkpoint)
    old = {k: v for k, v in meta.items() if k not in ("format", "tensor_sha256")}
    path = tmp_path / "run.safetensors"
    save_file(tensors, str(path), metadata={"meta": json.dumps(old)})
    train = load_facts("trex_original", "P103", "train")[:16]
    dev = load_facts("trex_original", "P103", "dev")[:8]
    with pytest.warns(RuntimeWarning, match="older course_lib.*cannot be verified; training starts over"):
        result = tune(load_model("tiny-gpt2"), load_prompts("lama", "trex_original", "P103"), train, dev,
                      TuneConfig(epochs=1, lr=0.05), checkpoint=path, progress=False)
    assert result.resumed_from is None
    assert load_checkpoint(path)[1]["format"] == training.CHECKPOINT_FORMAT  # replaced by a verifiable one


def test_one_changed_character_in_a_results_row_marks_that_row_damaged(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    row = {"model": "m", "dataset": "d", "relation": "P1", "prompt_set": "lama", "method": "hard", "split": "test",
           "answer_space": "full", "facts": 10, "kept": 9, "dropped": 1, "p_at_1": 0.25}
    results.write_table([row, {**row, "relation": "P2"}], path)
    text = path.read_text()
    path.write_text(text.replace("P2,lama,hard,test,full,10,9", "P2,lama,hard,test,full,10,8"))
    stored = results.read_stored(path)
    assert [r["relation"] for r in stored.rows] == ["P1"] and stored.damaged == [
        "line 3: does not match its checksum (damaged, cut short or edited)"]
    with pytest.raises(results.TableError, match=f"{path}: 1 damaged row"):
        results.read_stored(path, strict=True)
