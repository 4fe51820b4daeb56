"""course_lib.training: reproducible tuning, early stopping, NaN recovery, and checkpoints that resume exactly."""

from __future__ import annotations

import ast
import functools
import json
import pickle
import math
import struct
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from course_lib import training
from course_lib.cloze import ClozeLM
from course_lib.data import Fact, load_facts, load_prompts
from course_lib.evaluation import Scored, answer_form_template, score_facts
from course_lib.models import load_model
from course_lib.templates import Template
from course_lib.training import CheckpointError, TuneConfig, load_checkpoint, tune

DATASET, RELATION = "trex_original", "P103"


@functools.cache
def lm_for(name: str = "tiny-gpt2") -> ClozeLM:
    return load_model(name, device="cpu")


@functools.cache
def data() -> tuple[list[Fact], list[Fact], list[Fact]]:
    return (load_facts(DATASET, RELATION, "train")[:32], load_facts(DATASET, RELATION, "dev")[:16],
            load_facts(DATASET, RELATION, "test")[:16])


def lama() -> list[Template]:
    return load_prompts("lama", DATASET, RELATION)[:1]


def mixture() -> list[Template]:
    lm = lm_for()
    return [t for t in load_prompts("lpaqa-mine", DATASET, RELATION) if lm.covers(t)][:2]


def run(config: TuneConfig, templates: list[Template] | None = None, **kwargs) -> training.TuneResult:
    train, dev, _ = data()
    return tune(lm_for(), templates or mixture(), train, dev, config, progress=False, **kwargs)


def n_batches(templates: list[Template], batch_size: int) -> int:
    lm = lm_for()
    form = answer_form_template(lm, [lm.encode_prompt(t) for t in templates])
    n = sum(lm.answer_id(f.object, form) is not None for f in data()[0])
    return math.ceil(n / batch_size)


def strip(history: list[dict]) -> list[dict]:
    """A history without wall-clock times, the only thing two identical runs may disagree on."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def ranks_on_test(result: training.TuneResult) -> torch.Tensor:
    return score_facts(lm_for(), result.soft.templates, data()[2], log_weights=result.log_weights,
                       perturbation=result.soft.perturbation).ranks


CONFIG = TuneConfig(init="random", epochs=3, lr=0.05, batch_size=8, seed=3)


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(patience=0), dict(lr=0.0), dict(lr=math.nan),
                                 dict(lr=-1e-3), dict(init="gaussian")])
def test_config_refuses_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        TuneConfig(**bad)


def test_tune_refuses_what_it_cannot_train() -> None:
    train, dev, _ = data()
    with pytest.raises(ValueError, match="none of the templates"):
        tune(lm_for(), [Template("[Y] is spoken by [X] .")], train, dev, progress=False)
    with pytest.raises(ValueError, match="single-token"):
        tune(lm_for(), lama(), [Fact("Dante", "Kaliningrad")], dev, progress=False)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3"])
def test_default_lr_is_a_tenth_of_the_embedding_spread(name: str) -> None:
    lm = load_model(name)
    table = lm.embedding_output(torch.arange(lm.model.get_input_embeddings().num_embeddings)).double()
    spread = table.std(0, unbiased=False).median().item()
    assert training.default_lr(lm) == pytest.approx(training.LR_PER_SPREAD * spread, rel=1e-4)
    if name == "tiny-gemma3":  # scaled embeddings: the step grows with them
        raw = lm.model.get_input_embeddings().weight.double().std(0, unbiased=False).median().item()
        assert training.default_lr(lm) > 2 * training.LR_PER_SPREAD * raw


def test_an_unset_lr_is_the_models_default_and_recorded_as_a_number() -> None:
    base = dict(init="random", epochs=1, batch_size=8, seed=3)
    implicit = run(TuneConfig(**base))
    explicit = run(TuneConfig(**base, lr=training.default_lr(lm_for())))
    assert implicit.config.lr == explicit.config.lr == training.default_lr(lm_for())
    assert torch.equal(implicit.soft.offsets, explicit.soft.offsets)


# ---------------------------------------------------------------------------------------- reproducibility
def test_same_seed_gives_bit_identical_runs() -> None:
    a, b = run(CONFIG), run(CONFIG)
    assert torch.equal(a.soft.offsets, b.soft.offsets)
    assert torch.equal(a.log_weights, b.log_weights)
    assert strip(a.history) == strip(b.history)
    assert len(a.history) == 3 and a.best_epoch == b.best_epoch
    ra, rb = ranks_on_test(a), ranks_on_test(b)
    assert torch.equal(ra, rb)
    assert a.soft.offsets.abs().sum() > 0


def test_different_seed_gives_a_different_random_start() -> None:
    one = run(TuneConfig(init="random", epochs=1, lr=0.05, batch_size=8, seed=3))
    other = run(TuneConfig(init="random", epochs=1, lr=0.05, batch_size=8, seed=4))
    assert not torch.allclose(one.soft.offsets, other.soft.offsets, atol=1e-3)
    # Template init starts at zero offsets for every seed; only the data order differs.
    t1 = run(TuneConfig(epochs=1, lr=0.05, batch_size=8, seed=3), lama())
    t2 = run(TuneConfig(epochs=1, lr=0.05, batch_size=8, seed=4), lama())
    assert not torch.equal(t1.soft.offsets, t2.soft.offsets)


def test_mixture_weights_are_learned_unless_frozen() -> None:
    learned = run(TuneConfig(epochs=1, lr=0.05, batch_size=8))
    frozen = run(TuneConfig(epochs=1, lr=0.05, batch_size=8, learn_weights=False))
    torch.testing.assert_close(learned.log_weights.exp().sum(), torch.tensor(1.0))
    assert not torch.allclose(learned.log_weights, torch.full((2,), -math.log(2)), atol=1e-4)
    torch.testing.assert_close(frozen.log_weights, torch.full((2,), -math.log(2)))


# ---------------------------------------------------------------------------------------- early stopping and NaN
class Recorder:
    """Wraps training.score_facts: records the state at each epoch's end, optionally scripts dev P@1."""

    def __init__(self, script: list[float] | None = None) -> None:
        self.script = script
        self.offsets: list[torch.Tensor] = []
        self.log_weights: list[torch.Tensor] = []

    def __call__(self, lm, templates, facts, **kwargs) -> Scored:
        scored = score_facts(lm, templates, facts, **kwargs)
        self.offsets.append(kwargs["perturbation"].offsets.detach().clone())
        self.log_weights.append(kwargs["log_weights"].detach().clone())
        if self.script is None:
            return scored
        hits = round(self.script[len(self.offsets) - 1] * 10)
        ranks = torch.tensor([1] * hits + [5] * (10 - hits))
        return Scored(scored.facts, scored.gold, ranks, scored.top10, scored.index, Counter())


def test_early_stopping_stops_and_restores_the_best_dev_state(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(script=[0.2, 0.5, 0.4, 0.5, 0.9, 0.9])  # best at epoch 1; a tie is no improvement
    monkeypatch.setattr(training, "score_facts", rec)
    result = run(TuneConfig(epochs=6, patience=2, lr=0.05, batch_size=8))
    assert [h["dev_p_at_1"] for h in result.history] == [0.2, 0.5, 0.4, 0.5]
    assert (result.best_epoch, result.best_dev_p1) == (1, 0.5)
    assert torch.equal(result.soft.offsets, rec.offsets[1])
    assert torch.equal(result.log_weights, rec.log_weights[1])
    assert not torch.equal(rec.offsets[1], rec.offsets[3])  # the last state really was different


def test_a_nan_loss_rolls_the_epoch_back_and_training_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    per_epoch = n_batches(mixture(), 8)
    assert per_epoch >= 2
    real = training.gold_log_probs
    calls = []

    def flaky(*args, **kwargs):
        logp, subject_ll = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == per_epoch + 2:  # the second batch of the second epoch
            logp = logp + float("nan")
        return logp, subject_ll

    rec = Recorder()
    saved: list[dict[str, torch.Tensor]] = []
    real_save = training.save_checkpoint

    def save(path, tensors, meta):
        saved.append({k: v.detach().clone() for k, v in tensors.items()})
        real_save(path, tensors, meta)

    monkeypatch.setattr(training, "gold_log_probs", flaky)
    monkeypatch.setattr(training, "score_facts", rec)
    monkeypatch.setattr(training, "save_checkpoint", save)
    ckpt = tmp_path / "run.safetensors"
    with pytest.warns(RuntimeWarning, match="NaN"):
        result = run(TuneConfig(epochs=3, lr=0.05, batch_size=8, patience=5), checkpoint=ckpt)
    assert [h["nan"] for h in result.history] == [False, True, False]
    # The NaN epoch ends with the state it started with (offsets and mixture weights) ...
    assert torch.equal(rec.offsets[1], rec.offsets[0])
    assert torch.equal(rec.log_weights[1], rec.log_weights[0])
    # ... and the next epoch trains again, from a rolled-back optimizer as well.
    assert not torch.equal(rec.offsets[2], rec.offsets[1])
    assert all(torch.isfinite(o).all() for o in rec.offsets)
    # Adam's step count and moments are rolled back with the offsets.
    assert [int(t["adam.step"]) for t in saved] == [per_epoch, per_epoch, 2 * per_epoch]
    for key in ("adam.exp_avg", "adam.exp_avg_sq", "offsets", "log_weights"):
        assert torch.equal(saved[1][key], saved[0][key]), key
    tensors, _ = load_checkpoint(ckpt)
    assert torch.equal(tensors["adam.exp_avg"], saved[2]["adam.exp_avg"])


# ---------------------------------------------------------------------------------------- checkpoints and resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("full") / "run.safetensors"
    return run(CONFIG, checkpoint=path), path


# ---------------------------------------------------------------------------------------- out of memory
def out_of_memory_above(limit: int, sizes: list[int]):
    """``gold_log_probs`` as a device would run it with room for ``limit`` facts per forward pass."""
    real = training.gold_log_probs

    def forward(lm, soft, subjects, *args, **kwargs):
        sizes.append(len(subjects))
        if len(subjects) > limit:
            raise torch.OutOfMemoryError(f"simulated: no room for {len(subjects)} facts")
        return real(lm, soft, subjects, *args, **kwargs)

    return forward


def test_out_of_memory_splits_batches_and_changes_no_result(uninterrupted, monkeypatch: pytest.MonkeyPatch) -> None:
    full, _ = uninterrupted
    sizes: list[int] = []
    monkeypatch.setattr(training, "gold_log_probs", out_of_memory_above(2, sizes))
    with pytest.warns(RuntimeWarning, match="out of memory on cpu") as caught:
        result = run(CONFIG)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "pieces of 4" in messages[0] and "pieces of 2" in messages[1]
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2  # halved twice, then kept for the rest of the run
    # The same gradients, summed in another order: equal up to float rounding.
    assert torch.allclose(result.soft.offsets, full.soft.offsets, rtol=0, atol=1e-6)
    assert torch.allclose(result.log_weights, full.log_weights, rtol=0, atol=1e-6)
    assert [h["dev_p_at_1"] for h in result.history] == [h["dev_p_at_1"] for h in full.history]
    assert [h["train_loss"] for h in result.history] == pytest.approx([h["train_loss"] for h in full.history], rel=1e-6)
    assert torch.equal(ranks_on_test(result), ranks_on_test(full))


def test_out_of_memory_with_one_fact_per_pass_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    monkeypatch.setattr(training, "gold_log_probs", out_of_memory_above(0, sizes))
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError, match="1 training fact per forward pass.*another device") as err:
        run(CONFIG)
    assert sizes == [8, 4, 2, 1]
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError) and "simulated" in str(err.value.__cause__)


@pytest.mark.parametrize("stop", [0, 1])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(uninterrupted, tmp_path: Path, stop: int) -> None:
    full, full_path = uninterrupted
    path = tmp_path / "run.safetensors"
    first = run(CONFIG, checkpoint=path, stop_after_epoch=stop)
    assert len(first.history) == stop + 1 and first.resumed_from is None
    resumed = run(CONFIG, checkpoint=path)
    assert resumed.resumed_from == stop
    assert torch.equal(resumed.soft.offsets, full.soft.offsets)
    assert torch.equal(resumed.log_weights, full.log_weights)
    assert strip(resumed.history) == strip(full.history)
    assert (resumed.best_epoch, resumed.best_dev_p1) == (full.best_epoch, full.best_dev_p1)
    # The last state (not only the best one), Adam's moments included, agrees too.
    mine, theirs = load_checkpoint(path), load_checkpoint(full_path)
    assert mine[0].keys() == theirs[0].keys() >= {"offsets", "log_weights", "best.offsets", "adam.exp_avg", "adam.step"}
    for key in theirs[0]:
        assert torch.equal(mine[0][key], theirs[0][key]), key
    assert strip(mine[1]["history"]) == strip(theirs[1]["history"])


def test_a_finished_run_resumes_to_itself(uninterrupted) -> None:
    full, full_path = uninterrupted
    again = run(CONFIG, checkpoint=full_path)
    assert again.resumed_from == 2
    assert torch.equal(again.soft.offsets, full.soft.offsets)
    assert again.history == full.history  # nothing rerun: even the seconds are the stored ones


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "run.safetensors"
    run(TuneConfig(epochs=1, lr=0.05, batch_size=16), lama(), checkpoint=path)
    return path


def copy_of(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("what", ["templates", "config", "model", "revision"])
def test_a_checkpoint_of_another_run_is_refused(small_checkpoint: Path, tmp_path: Path, what: str) -> None:
    path = copy_of(small_checkpoint, tmp_path)
    before = path.read_bytes()
    config = TuneConfig(epochs=2, lr=0.05, batch_size=16)
    train, dev, _ = data()
    lm, templates = lm_for(), lama()
    if what == "templates":
        templates = [Template("The mother tongue of [X] is [Y] .")]
    elif what == "config":
        config = TuneConfig(epochs=2, lr=0.01, batch_size=16)
    elif what == "model":
        lm = lm_for("tiny-llama")
    else:  # the same model name with other weights (for the tiny models, another seed)
        lm = load_model("tiny-gpt2", device="cpu", seed=1)
        assert lm.name == lm_for().name and lm.revision != lm_for().revision
    with pytest.raises(CheckpointError, match=f"differs in {what}"):
        tune(lm, templates, train, dev, config, checkpoint=path, progress=False)
    assert path.read_bytes() == before  # refused, not overwritten


def corruptions(good: bytes) -> dict[str, bytes]:
    n = struct.unpack("<Q", good[:8])[0]
    flipped = bytearray(good)
    flipped[8] ^= 0xFF  # the header's opening brace
    return {
        "empty": b"",
        "4 bytes": good[:4],
        "header cut": good[: 8 + n // 2],
        "half": good[: len(good) // 2],
        "last byte cut": good[:-1],
        "header garbled": bytes(flipped),
        "garbage": b"this is not a checkpoint at all" * 10,
        "a pickle": b"\x80\x04\x95" + good[3:64],
    }


@pytest.mark.parametrize("kind", ["empty", "4 bytes", "header cut", "half", "last byte cut", "header garbled", "garbage", "a pickle"])
def test_a_corrupted_checkpoint_is_refused(small_checkpoint: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "run.safetensors"
    path.write_bytes(corruptions(small_checkpoint.read_bytes())[kind])
    train, dev, _ = data()
    with pytest.raises(CheckpointError, match="delete it"):
        tune(lm_for(), lama(), train, dev, TuneConfig(epochs=2, lr=0.05, batch_size=16), checkpoint=path, progress=False)


def test_a_safetensors_file_that_is_not_a_complete_checkpoint_is_refused(small_checkpoint: Path, tmp_path: Path) -> None:
    tensors, meta = load_checkpoint(small_checkpoint)
    train, dev, _ = data()
    config = TuneConfig(epochs=2, lr=0.05, batch_size=16)
    cases = {
        "no metadata": (tensors, None),
        "metadata not JSON": (tensors, {"meta": "{not json"}),
        "a tensor missing": ({k: v for k, v in tensors.items() if k != "best.offsets"}, {"meta": json.dumps(meta)}),
        "a field missing": (tensors, {"meta": json.dumps({k: v for k, v in meta.items() if k != "history"})}),
    }
    for name, (t, m) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(t, str(path), metadata=m)
        with pytest.raises(CheckpointError):
            tune(lm_for(), lama(), train, dev, config, checkpoint=path, progress=False)


def test_checkpoints_are_safetensors_without_pickle(small_checkpoint: Path) -> None:
    raw = small_checkpoint.read_bytes()
    assert not zipfile.is_zipfile(small_checkpoint)  # not torch.save's zip-of-pickles
    assert raw[:1] != b"\x80"  # not a bare pickle
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["meta"])
    assert meta["identity"]["model"] == "tiny-gpt2" and meta["epoch"] == 0
    assert {"offsets", "log_weights", "best.offsets", "best.log_weights"} <= header.keys()
    for entry in header.values():
        assert set(entry) == {"dtype", "shape", "data_offsets"}
    assert 8 + n + max(e["data_offsets"][1] for e in header.values()) == len(raw)
    # Published by rename: no temporary file left beside it.
    assert [p.name for p in small_checkpoint.parent.iterdir()] == [small_checkpoint.name]


# Modules whose loaders run pickle, and calls that unpickle (torch.load, whatever its weights_only).
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_READERS = {"read_pickle", "from_pickle"}


def pickle_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) wherever ``source`` imports a pickle module or calls something that unpickles.

    Read from the syntax tree, not the text, so that a comment or docstring naming pickle is no hit.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            names = {a.name for a in node.names}
            if module in PICKLE_MODULES or (module == "torch" and "load" in names) or names & PICKLE_READERS:
                found.append((node.lineno, f"from {node.module} import {', '.join(sorted(names))}"))
        elif isinstance(node, ast.Attribute):
            if node.attr in PICKLE_READERS or (node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append((node.value.lineno, "allow_pickle="))
    return found


@pytest.mark.parametrize("snippet", ["import pickle", "import cloudpickle as cp", "from torch import load", "x = torch.load(path)",
                                     "t = pd.read_pickle(p)", "a = np.load(p, allow_pickle=True)", "from pandas import read_pickle"])
def test_the_pickle_check_sees_each_way_in(snippet: str) -> None:
    assert pickle_uses(snippet)
    assert not pickle_uses(f'# {snippet}\n"""{snippet}"""')  # a comment or a docstring is not a use


def test_no_module_of_course_lib_unpickles() -> None:
    package = Path(training.__file__).parent
    sources = sorted(package.glob("*.py"))
    assert {"training.py", "models.py", "notebook.py", "experiments.py"} <= {p.name for p in sources}
    found = [f"{p.name}:{line}: {what}" for p in sources for line, what in pickle_uses(p.read_text(encoding="utf-8"))]
    assert found == []


def test_checkpoints_load_and_resume_without_any_unpickler(small_checkpoint: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # No torch.load anywhere, so its weights_only setting (and its default across torch versions)
    # never decides whether a checkpoint is safe to open.
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(target, name, refuse)
    tensors, meta = load_checkpoint(small_checkpoint)
    assert meta["epoch"] == 0 and "offsets" in tensors
    train, dev, _ = data()
    resumed = tune(lm_for(), lama(), train, dev, TuneConfig(epochs=1, lr=0.05, batch_size=16),
                   checkpoint=copy_of(small_checkpoint, tmp_path), progress=False)
    assert resumed.resumed_from == 0 and torch.equal(resumed.soft.offsets, tensors["best.offsets"])
