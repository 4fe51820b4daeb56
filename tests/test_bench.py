"""course_lib.bench on tiny models: the structure of what each benchmark returns, never its timings.

Timings on a shared machine say nothing in a unit test; what is checked is that every benchmark
runs, measures each variant the number of times asked, and returns finite, positive medians and
ratios, and that run_all writes the report, its plot and the raw numbers.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest

from course_lib import bench
from course_lib.cloze import ClozeLM

# The benchmarks read their facts from the shared folder.
pytestmark = pytest.mark.usefixtures("shared")


@functools.cache
def tiny(name: str) -> ClozeLM:
    return bench.load_bench_model(name, device="cpu")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_times(times, repeats: int) -> None:
    assert len(times) == repeats
    assert all(positive(t) for t in times)


# ---------------------------------------------------------------------------------------- helpers
def test_measure_interleaves_and_counts_calls() -> None:
    calls = []
    times = bench.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, taking turns
    assert set(times) == {"a", "b"}
    for ts in times.values():
        assert len(ts) == 3 and all(t >= 0 for t in ts)


def test_memory_meter_sees_a_big_allocation() -> None:
    import torch

    meter = bench.MemoryMeter("cpu")
    meter.reset()
    before = meter.peak_mib()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = meter.peak_mib()
    del x
    assert positive(before) and after >= before
    if meter.resettable:
        assert after - before > 32


def test_bench_facts_are_scorable_and_counted() -> None:
    lm = tiny("tiny-gemma3")
    template = bench.first_template(lm)
    facts, remapped = bench.bench_facts(lm, template, 20)
    assert len(facts) == 20 and 0 <= remapped <= 20
    assert all(lm.answer_id(f.object, template) is not None for f in facts)


def test_useful_flops_counts_params_tokens_and_the_head() -> None:
    lm = tiny("tiny-gemma3")
    template = bench.first_template(lm)
    facts, _ = bench.bench_facts(lm, template, 4)
    flops, tokens = bench.useful_flops(lm, template, facts)
    P = bench.non_embedding_params(lm.model)
    assert 0 < P < sum(p.numel() for p in lm.model.parameters())
    assert flops == 2 * P * tokens + 2 * lm.hidden_size * lm.vocab_size * 4


# ---------------------------------------------------------------------------------------- the five benchmarks
@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-bert"])
def test_eval_throughput(name: str, capsys) -> None:
    lm = tiny(name)
    r = bench.eval_throughput(lm, n_facts=6, batch_size=4, repeats=2, warmup=1, matmul_sizes=(64,))
    expected = {"ours", "naive loop"} | ({"fill-mask pipeline"} if name == "tiny-bert" else set())
    assert set(r["variants"]) == expected
    for v in r["variants"].values():
        check_times(v["seconds"], 2)
        assert positive(v["facts_per_s"]) and positive(v["useful_gflops_per_s"]) and positive(v["share_of_matmul_peak"])
        assert 0.0 <= v["p_at_1"] <= 1.0
    assert set(r["ratios"]) == {f"ours / {n}" for n in expected - {"ours"}}
    assert all(positive(x) for x in r["ratios"].values())
    assert positive(r["matmul_peak"]["gflops"]) and r["facts"] == 6 and r["real_tokens"] > 6
    fractions = r["breakdown"]["fractions"]
    assert {"attention", "MLP", "vocabulary projection", "outside the model (tokenization, batching, ranking)"} <= set(fractions)
    assert all(0.0 <= f <= 1.0 + 1e-6 for f in fractions.values())
    assert sum(fractions.values()) == pytest.approx(1.0, abs=0.05)
    assert all(not g["applies"] for g in r["goals"])  # the goals are set for Gemma-3-270M
    assert "facts/s" in capsys.readouterr().out


def test_train_step_against_peft() -> None:
    pytest.importorskip("peft")
    r = bench.train_step("tiny-gemma3", batch_size=4, steps=2, warmup=1, verbose=False)
    assert set(r["variants"]) == {"ours", "ours-padded", "peft"}
    for v in r["variants"].values():
        check_times(v["step_s"], 2)
        assert positive(v["steps_per_s"]) and positive(v["peak_mib"]) and positive(v["rss_after_load_mib"])
        assert v["step_peak_mib"] >= 0 and v["peak_mib"] <= v["max_rss_mib"] + 1
        assert math.isfinite(v["loss"]) and v["tokens_per_batch"] > 0 and v["threads"] >= 1
    # PEFT prepends as many virtual tokens as ours tunes template tokens: its sequences are longer
    assert r["variants"]["peft"]["tokens_per_batch"] > r["variants"]["ours"]["tokens_per_batch"]
    assert set(r["ratios"]) == {"peft / ours step time", "peft / ours peak memory of the steps", "ours-padded / ours step time"}
    assert positive(r["ratios"]["peft / ours step time"])
    assert [g["applies"] for g in r["goals"]] == [False, False]



def test_mixtures() -> None:
    r = bench.mixtures(tiny("tiny-gemma3"), ks=(1, 5, 30, 500), n_facts=2, batch_size=2, repeats=2, warmup=0, verbose=False)
    assert list(r["per_k"]) == ["1", "5", "30"] and r["ks_skipped"] == [500]
    for k, v in r["per_k"].items():
        check_times(v["seconds"], 2)
        assert v["sequences_per_epoch"] == 2 * int(k)
        assert positive(v["ratio_to_k_times_single"])
    assert r["per_k"]["1"]["ratio_to_k_times_single"] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")  # raised inside torch.compile
def test_eval_throughput_with_torch_compile() -> None:
    lm = tiny("tiny-gpt2")
    r = bench.eval_throughput(lm, n_facts=4, batch_size=2, repeats=1, warmup=1, matmul_sizes=(64,), naive=False,
                              breakdown=False, compile=True, verbose=False)
    assert set(r["variants"]) == {"ours", "ours + torch.compile"}
    assert r["variants"]["ours + torch.compile"]["p_at_1"] == r["variants"]["ours"]["p_at_1"]
    assert positive(r["compile_s"]) and positive(r["ratios"]["ours / ours + torch.compile"])
    assert lm.compiled is None  # back to eager after the benchmark


def test_depth() -> None:
    lm = tiny("tiny-gemma3")  # 2 layers: depths 6 and 12 do not exist and are skipped
    r = bench.depth(lm, depths=(0, 1, 6, 12, "all"), batch_size=2, repeats=2, warmup=0, verbose=False)
    assert list(r["per_depth"]) == ["0", "1", "all (2)"]
    assert [v["trained_rows"] for v in r["per_depth"].values()] == [1, 2, 3]
    for v in r["per_depth"].values():
        check_times(v["seconds"], 2)
        assert positive(v["ratio_to_depth_0"])


def test_scale() -> None:
    r = bench.scale(tiny("tiny-gemma3"), batch_sizes=(4, 1), min_facts=4, repeats=2, warmup=0, verbose=False)
    assert list(r["per_batch_size"]) == ["1", "4"]
    for v in r["per_batch_size"].values():
        check_times(v["seconds"], 2)
        assert v["facts"] == 4 and positive(v["facts_per_s"]) and positive(v["peak_mib"])


# ---------------------------------------------------------------------------------------- run_all
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside PEFT
def test_run_all_writes_the_report(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    small = {**bench.SETTINGS["quick"], "repeats": 1, "warmup": 0, "matmul_sizes": (64,), "eval_facts": 4, "eval_batch": 4, "train_batch": 2, "train_steps": 1,
             "mix_ks": (1, 5), "scale_sizes": (1, 2), "scale_facts": 2, "depth_batch": 2}
    monkeypatch.setitem(bench.SETTINGS, "quick", small)
    # The training subprocesses are tested above; here the same worker runs in this process (faster).
    monkeypatch.setattr(bench, "start_worker", bench.InProcessWorker)
    path = Path(bench.run_all(tmp_path / "bench", quick=True, model="tiny-gemma3", masked_model="tiny-bert"))
    assert path == tmp_path / "bench" / "report.md"
    text = path.read_text()
    assert "| variant |" in text and "|---|" in text and "fill-mask pipeline" in text
    assert "![benchmarks](report.png)" in text
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads(path.with_suffix(".json").read_text())
    assert {"eval", "eval_masked", "train_step", "mixtures", "depth", "scale", "machine"} <= set(raw)
    assert raw["quick"] is True and positive(raw["seconds"])
    for ratio in [*raw["eval"]["ratios"].values(), *raw["eval_masked"]["ratios"].values(), *raw["train_step"]["ratios"].values()]:
        assert positive(ratio)
