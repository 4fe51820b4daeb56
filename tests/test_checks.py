"""course_lib.checks: every check passes on its worked solution and fails, specifically, on wrong answers.

For each check: the solution in solutions/ (the worked notebook's own function) passes; an unfinished
stub fails as "not implemented yet"; a function that is, or calls, course_lib's own answer fails (the
library holds an answer to every exercise), while that answer computed in a thread the check does not
watch passes (only the student's thread is watched, and the checks agree with the library). For the checks of small tensor functions, a wrong value,
a wrong shape, a wrong dtype (or type) and an answer that modifies its input in place each fail with
a message that names the problem; the wrong answers are built from the solution itself, so every
check is shown able to fail in each of these ways. The checks of whole procedures (a tuning loop, a
run on tiny models) have their own wrong answers in tests/test_run_checks.py.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from course_lib import checks, evaluation, exercises, mixture, recipes
from course_lib.soft_prompts import SoftPrompt, init_random

ALL = [name for names in checks.CHAPTER_CHECKS.values() for name in names]
CHAPTER_OF = {name: chapter for chapter, names in checks.CHAPTER_CHECKS.items() for name in names}
_WORKED = {chapter: exercises.solution_functions(chapter) for chapter in checks.CHAPTER_CHECKS}
SOLUTIONS = {name: _WORKED[CHAPTER_OF[name]][name] for name in ALL}
# The checks of small functions, whose results are tensors, floats or tuples of them.
GENERIC = [n for n in ALL if n not in checks.RUN_CHECKS and n not in ("bootstrap_intervals", "shuffled_facts")]
SCALAR = {"precision_at_k", "mean_reciprocal_rank", "micro_macro", "majority_p_at_1"}  # results that are Python floats
HINT = "compare each row with its gold answer"


def _score_facts_answer(lm, template, facts, batch_size=32):
    scored = evaluation.score_facts(lm, [template], facts, batch_size=batch_size)
    return {"kept": scored.kept, "dropped": sum(scored.dropped.values()), **scored.metrics()}


def _ensemble_answer(lm, templates, subjects, log_weights):
    usable = [k for k, t in enumerate(templates) if lm.covers(t)]
    prompts = [lm.encode_prompt(t) for t in templates]
    lw = torch.log_softmax(log_weights[usable], 0)
    if len(usable) == 1:  # the library ranks one prompt by its logits; the exercise asks for its log-probs
        with torch.no_grad():
            return lm.blank_log_probs(lm.build_batch([prompts[usable[0]]], list(subjects))).cpu()
    return evaluation._mixture_log_probs(lm, prompts, usable, list(subjects), lw, None, False)[0]


def _init_random_answer(lm, templates, generator, depth=0):
    soft = SoftPrompt(lm, templates, depth)
    init_random(soft, lm, generator)
    return soft


def outside(fn):
    """The library's answer as if a student had written it: computed where the check does not look.

    A check fails a function that calls into course_lib while it runs (checks._guarded watches the
    thread running it), so ``outside(fn)`` runs ``fn`` in a worker thread: the check only sees the
    call from the student's thread, and must then judge the answer on its values alone.
    """
    pool = ThreadPoolExecutor(1)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return pool.submit(fn, *args, **kwargs).result()

    return wrapper


# course_lib's own answer to each exercise: handing it in (or a wrapper of it) must fail.
LIBRARY = {
    "ranks_from_scores": evaluation.ranks_of,
    "precision_at_k": checks._reference_precision_at_k,
    "mean_reciprocal_rank": lambda ranks: evaluation.metrics_from_ranks(ranks)["mrr"],
    "score_by_hand": _score_facts_answer,
    "mixture_log_probs": checks._reference_mixture_log_probs,
    "ensemble_log_probs": _ensemble_answer,
    "gather_prompt_offsets": checks._reference_gather_prompt_offsets,
    "cloze_loss": lambda logits, gold: F.cross_entropy(logits, gold),  # torch's own: no library code to catch
    "tune_soft_prompt": recipes.tune_soft_prompt,
    "embedding_mean_std": checks._reference_embedding_mean_std,
    "random_offsets": checks._reference_random_offsets,
    "random_start": _init_random_answer,
    "responsibilities": mixture.responsibilities,
    "em_step": mixture.em_step,
    "data_dependent_log_weights": mixture.data_dependent_log_weights,
    "tune_mixture": recipes.tune_mixture,
    "add_layer_offset": checks._reference_add_layer_offset,
    "deep_delta": recipes.deep_delta,
    "tune_deep": recipes.tune_deep,
    "micro_macro": checks._reference_micro_macro,
    "bootstrap_intervals": recipes.bootstrap_intervals,
    "majority_p_at_1": checks.majority_reference,
    "shuffled_facts": recipes.shuffled_facts,
    "control_run": recipes.control_run,
}


def run(name, fn, **kwargs):
    return getattr(checks, f"check_{name}")(fn, quiet=True, strict=False, **kwargs)


# ------------------------------------------------------------------ wrong answers built from the reference
def _first(x, change):
    if isinstance(x, tuple):
        return (change(x[0]), *x[1:])
    return change(x)


def _value(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x + (0.5 if x.is_floating_point() else 1)
    return x + 0.25


def _shape(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    return torch.tensor([x, x])


def _dtype(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return {torch.float32: x.double(), torch.float64: x.float(), torch.int64: x.int()}[x.dtype]
    return torch.tensor(x)  # a Python float returned as a 0-dim tensor


def _mutate(args):
    for a in args:
        if isinstance(a, tuple) and a and isinstance(a[0], torch.Tensor):
            a = a[0]
        if isinstance(a, torch.Tensor) and a.numel():
            with torch.no_grad():
                a.add_(1)
            return
        if isinstance(a, list) and a:
            a.append(a[0])
            return


def stub(*args, **kwargs):
    raise NotImplementedError(HINT)


def wrong_value(ref):
    return lambda *args: _first(ref(*args), _value)


def wrong_shape(ref):
    return lambda *args: _first(ref(*args), _shape)


def wrong_dtype(ref):
    return lambda *args: _first(ref(*args), _dtype)


def mutating(ref):
    def fn(*args):
        out = ref(*args)
        _mutate(args)
        return out

    return fn


# ------------------------------------------------------------------ the tests
def test_every_check_has_a_solution_a_function_and_a_library_answer():
    assert len(ALL) >= 8 and len(set(ALL)) == len(ALL)
    assert set(LIBRARY) == set(ALL) and set(checks.RUN_CHECKS) <= set(ALL)
    for name in ALL:
        assert callable(getattr(checks, f"check_{name}")) and callable(SOLUTIONS[name])
        assert not SOLUTIONS[name].__module__.startswith("course_lib")
    assert set(checks.CHAPTER_CHECKS) == {f"{i:02d}_{n}" for i, n in enumerate(
        ["asking", "many_ways_to_ask", "soft_prompts", "random_init", "mixtures", "deep_perturbations",
         "reproducing_the_paper", "learning_or_recalling"], start=1)}
    assert all(len(names) >= 2 for names in checks.CHAPTER_CHECKS.values())  # a small exercise and a larger one


@pytest.mark.parametrize("name", ALL)
def test_solution_passes(name, capsys):
    result = getattr(checks, f"check_{name}")(SOLUTIONS[name], strict=False)
    out = capsys.readouterr().out
    assert result.passed, result.message
    assert f"CHECK PASSED: {name}" in out and out.count("\n") == 1, out
    assert "✓" in out


@pytest.mark.parametrize("name", ALL)
def test_stub_fails_as_not_implemented(name, capsys):
    result = getattr(checks, f"check_{name}")(stub, strict=False)
    out = capsys.readouterr().out
    assert not result.passed
    assert f"CHECK FAILED: {name}" in out and f"not implemented yet: {HINT}" in out
    assert "Traceback" not in out and len(out.splitlines()) <= 3, out


@pytest.mark.parametrize("name", GENERIC)
def test_wrong_value_fails(name):
    result = run(name, wrong_value(SOLUTIONS[name]))
    assert not result.passed
    assert f"CHECK FAILED: {name}" in result.message
    assert "problem:  wrong value" in result.message
    assert "expected:" in result.message and "got:" in result.message and "input:" in result.message
    assert "hint:" in result.message


@pytest.mark.parametrize("name", GENERIC)
def test_wrong_shape_fails(name):
    result = run(name, wrong_shape(SOLUTIONS[name]))
    assert not result.passed
    assert "problem:  wrong shape" in result.message, result.message


@pytest.mark.parametrize("name", GENERIC)
def test_wrong_dtype_fails(name):
    result = run(name, wrong_dtype(SOLUTIONS[name]))
    assert not result.passed
    kind = "wrong type" if name in SCALAR else "wrong dtype"
    assert f"problem:  {kind}" in result.message, result.message


@pytest.mark.parametrize("name", [*GENERIC, "bootstrap_intervals", "shuffled_facts"])
def test_in_place_mutation_fails(name):
    result = run(name, mutating(SOLUTIONS[name]))
    assert not result.passed
    assert "problem:  changed its input in place" in result.message, result.message


@pytest.mark.parametrize("name", ALL)
def test_other_exceptions_are_reported_in_one_line(name, capsys):
    def broken(*args, **kwargs):
        return [][1]

    result = getattr(checks, f"check_{name}")(broken, strict=False)
    out = capsys.readouterr().out
    assert not result.passed and "problem:  raised IndexError: list index out of range" in out
    assert "Traceback" not in out


def test_not_a_function():
    result = run("precision_at_k", 0.5)
    assert not result.passed and "needs the function itself" in result.message


# ------------------------------------------------------------------ specific diagnoses
def test_ties_counted_for_the_gold_answer_get_the_tie_hint():
    result = run("ranks_from_scores", lambda s, g: (s > s.gather(1, g[:, None])).sum(1) + 1)
    assert "a tie between the gold answer" in result.message and "ties count against the gold answer" in result.message
    assert "expected: tensor([2]" in result.message and "got:      tensor([1]" in result.message


def test_empty_ranks_must_give_nan():
    result = run("precision_at_k", lambda r, k: (r <= k).sum().item() / len(r))
    assert "raised ZeroDivisionError" in result.message and "float('nan')" in result.message
    result = run("mean_reciprocal_rank", lambda r: (1.0 / r.double()).mean().item() if r.numel() else 0.0)
    assert "no facts at all" in result.message and "expected: nan" in result.message


def test_returning_a_tensor_instead_of_a_float():
    result = run("precision_at_k", lambda r, k: (r <= k).double().mean())
    assert "call .item()" in result.message


def test_sample_std_is_diagnosed():
    result = run("embedding_mean_std", lambda t: (t.mean(0), t.std(0)))
    assert "in std" in result.message and "correction=0" in result.message


def test_textbook_em_passes_and_the_floor_is_an_option():
    def textbook(w, g):
        r = torch.softmax(torch.log_softmax(w, -1) + g, -1)
        return torch.log(r.mean(0)), r

    def floored(w, g):
        new, r = textbook(w, g)
        pi = new.exp().clamp_min(1e-8)
        return torch.log(pi / pi.sum()), r

    assert run("em_step", textbook).passed and run("em_step", floored).passed  # either, by default
    assert run("em_step", textbook, floor=0).passed and not run("em_step", floored, floor=0).passed
    result = run("em_step", textbook, floor=1e-8)
    assert not result.passed and "never explains any fact" in result.message and "1e-08" in result.message
    assert "in new_log_weights" in result.message and "-inf" in result.message
    assert run("em_step", floored, floor=1e-8).passed


def test_unstable_softmax_is_caught():
    result = run("responsibilities", lambda w, g: (w + g).exp() / (w + g).exp().sum(-1, keepdim=True))
    assert "near -1000" in result.message and "torch.softmax" in result.message


def test_loss_must_stay_differentiable():
    result = run("cloze_loss", lambda logits, gold: F.cross_entropy(logits, gold).detach())
    assert "not differentiable" in result.message


def test_hook_returning_a_tensor_for_a_tuple():
    result = run("add_layer_offset", lambda out, d: None if d is None else (out[0] if isinstance(out, tuple) else out) + d)
    assert "a tuple output" in result.message and "wrong type" in result.message


def test_hook_checked_inside_a_real_model():
    # Right on plain tensors and tuples, wrong inside the model (adds twice): only the hooked case catches it.
    calls = {"n": 0}

    def sneaky(out, d):
        calls["n"] += 1
        if d is None:
            return None
        if isinstance(out, tuple):
            return (out[0] + d, *out[1:])
        return out + d * (2 if calls["n"] > 3 else 1)

    result = run("add_layer_offset", sneaky)
    assert not result.passed and "tiny Gemma" in result.message


def test_micro_macro_nan_relations():
    result = run("micro_macro", lambda p, k: ((p * k).sum().item() / k.sum().item(), p.mean().item()))
    assert "no kept fact" in result.message and "in micro" in result.message


def test_majority_tie_hint():
    from collections import Counter

    def first_seen(train, test):
        if not test:
            return math.nan
        guess = Counter(train).most_common(1)[0][0]
        return sum(o == guess for o in test) / len(test)

    result = run("majority_p_at_1", first_seen)
    assert "a tie" in result.message and "alphabetically first" in result.message


# ------------------------------------------------------------------ result object, strict mode, grading
def test_result_is_printed_once_in_a_notebook(capsys):
    result = checks.check_responsibilities(SOLUTIONS["responsibilities"])
    printed = capsys.readouterr().out
    result._ipython_display_()  # the cell's own echo of its last expression: suppressed
    assert capsys.readouterr().out == ""
    result._ipython_display_()  # shown again later on request
    assert capsys.readouterr().out.strip() == printed.strip()
    assert bool(result) and str(result) == result.message


def test_strict_mode_raises_after_printing(monkeypatch, capsys):
    with pytest.raises(checks.CheckFailed, match="CHECK FAILED: em_step"):
        checks.check_em_step(stub, strict=True)
    assert "CHECK FAILED: em_step" in capsys.readouterr().out
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    with pytest.raises(AssertionError):
        checks.check_em_step(stub, quiet=True)
    assert checks.check_em_step(SOLUTIONS["em_step"], quiet=True).passed  # a pass never raises


def test_grade_a_namespace():
    namespace = {"responsibilities": SOLUTIONS["responsibilities"], "em_step": stub}
    assert checks.grade(namespace, "05_mixtures") == {
        "responsibilities": True, "em_step": False, "data_dependent_log_weights": False, "tune_mixture": False}
    assert set(checks.checks_for("05")) == {"responsibilities", "em_step", "data_dependent_log_weights",
                                             "tune_mixture"}
    with pytest.raises(ValueError, match="unknown chapter"):
        checks.checks_for("99")


def test_outcomes_in_notebook():
    nb = {"cells": [
        {"cell_type": "markdown", "source": "CHECK PASSED: not_code"},
        {"cell_type": "code", "outputs": [{"output_type": "stream", "name": "stdout",
                                           "text": ["✓ CHECK PASSED: em_step: agrees with ...\n"]}]},
        {"cell_type": "code", "outputs": [{"output_type": "stream", "name": "stdout",
                                           "text": "✗ CHECK FAILED: micro_macro\n  problem:  ...\n"}]},
    ]}
    assert checks.outcomes_in_notebook(nb) == [(1, "em_step", True), (2, "micro_macro", False)]


# ------------------------------------------------------------------ the library's own answers do not pass
@pytest.mark.parametrize("name", [n for n in ALL if n != "cloze_loss"])  # cloze_loss's answer is torch's own
def test_the_library_own_answer_fails(name, capsys):
    """Handing in course_lib's own function, or one that calls it, is not the student's work."""
    for fn in (LIBRARY[name], lambda *args, **kwargs: LIBRARY[name](*args, **kwargs)):
        result = run(name, fn)
        assert not result.passed and "uses course_lib's own answer" in result.message, result.message
        assert f"write {name} yourself" in result.message


def test_an_imported_alias_of_the_library_answer_fails():
    namespace: dict = {}
    exec("from course_lib.mixture import responsibilities as answer\n"  # noqa: S102 - a student's cell
         "def responsibilities(w, g):\n    return answer(w, g)\n", namespace)
    result = run("responsibilities", namespace["responsibilities"])
    assert not result.passed and "it called course_lib.mixture.responsibilities" in result.message
    assert checks.grade(namespace, "05_mixtures")["responsibilities"] is False


@pytest.mark.parametrize("name", ALL)
def test_the_library_answer_computed_outside_the_watched_thread_passes(name):
    """Only the thread running the student's function is watched, and the checks agree with the
    library's own answers: course_lib's answer, run in a worker thread, passes every small check."""
    result = run(name, outside(LIBRARY[name]))
    assert result.passed, result.message


def test_library_code_around_the_student_function_is_not_counted():
    # add_layer_offset's last case runs the student's hook inside course_lib's model code: still a pass.
    def hook(output, delta):
        if delta is None:
            return None
        return (output[0] + delta, *output[1:]) if isinstance(output, tuple) else output + delta

    assert run("add_layer_offset", hook).passed
