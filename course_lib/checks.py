"""Self-checks for the exercises: run a student's function against the library's reference.

Each ``check_<name>(fn)`` calls ``fn`` on a few small inputs (tensors, or a tiny random model),
compares what comes back with the library's own answer, and prints one short block::

    ✓ CHECK PASSED: precision_at_k: agrees with course_lib.evaluation.metrics_from_ranks on 5 inputs

or, at the first input where it goes wrong::

    ✗ CHECK FAILED: precision_at_k
      case:     no facts at all (every fact was dropped)
      input:    ranks = tensor([], dtype=torch.int64), k = 1
      problem:  raised ZeroDivisionError: division by zero
      hint:     ...

A check never lets the student's exception escape (no traceback storm): an unfinished stub reads
"not implemented yet: <its hint>", any other error its type and message. Besides the values it
checks the type, shape and dtype of the result, and that the inputs were not changed in place.
The library holds an answer to every exercise (the chapters need them), so a function that calls
into course_lib while it runs, or is course_lib's own, fails with "uses course_lib's own answer".

The result is also returned as a ``CheckResult`` (``passed``, ``message``). For grading, pass
``strict=True`` (or set ``COURSE_LIB_CHECKS_STRICT=1``) and a failed check raises ``CheckFailed``
(an ``AssertionError``) after printing, which is what nbgrader and otter-grader count as a failed
test. ``grade(namespace, chapter)`` runs every check of a chapter quietly.

The lines ``CHECK PASSED: <name>`` and ``CHECK FAILED: <name>`` are stable markers: the tests and
the grading script find the outcome of each check in a notebook's outputs by them
(``outcomes_in_notebook``).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

PASS_MARK = "CHECK PASSED"
FAIL_MARK = "CHECK FAILED"
MARKER_RE = re.compile(r"CHECK (PASSED|FAILED): (\w+)")
STRICT_ENV = "COURSE_LIB_CHECKS_STRICT"

# The functions each chapter's exercise notebook asks for; check_<name> checks <name>.
CHAPTER_CHECKS: dict[str, tuple[str, ...]] = {
    "01_asking": ("ranks_from_scores", "precision_at_k", "mean_reciprocal_rank", "score_by_hand"),
    "02_many_ways_to_ask": ("mixture_log_probs", "ensemble_log_probs"),
    "03_soft_prompts": ("gather_prompt_offsets", "cloze_loss", "tune_soft_prompt"),
    "04_random_init": ("embedding_mean_std", "random_offsets", "random_start"),
    "05_mixtures": ("responsibilities", "em_step", "data_dependent_log_weights", "tune_mixture"),
    "06_deep_perturbations": ("add_layer_offset", "deep_delta", "tune_deep"),
    "07_reproducing_the_paper": ("micro_macro", "bootstrap_intervals"),
    "08_learning_or_recalling": ("majority_p_at_1", "shuffled_facts", "control_run"),
}
# The checks that run a student's whole procedure (a loop, a run) on tiny models: course_lib.run_checks.
RUN_CHECKS = ("score_by_hand", "ensemble_log_probs", "tune_soft_prompt", "random_start", "tune_mixture", "tune_deep",
              "control_run")


class CheckFailed(AssertionError):
    """Raised by a failed check in strict mode (grading); the message is the check's report."""


@dataclass
class CheckResult:
    """The outcome of one check: ``passed`` and the printed ``message``."""

    name: str
    passed: bool
    message: str
    _echo_pending: bool = field(default=False, repr=False, compare=False)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return self.message

    def _ipython_display_(self) -> None:
        # The check already printed its report: a cell ending in ``checks.check_x(x)`` shows it once.
        if self._echo_pending:
            self._echo_pending = False
            return
        print(self.message)


# ---------------------------------------------------------------------------------------------
# The machinery
# ---------------------------------------------------------------------------------------------
@dataclass
class _Case:
    label: str
    make: Callable[[], tuple]  # fresh positional arguments on every call
    names: tuple[str, ...]
    hint: str | None = None  # shown when this case's values are wrong
    expected: Callable[[tuple], Any] | None = None  # default: reference(*args)
    call: Callable[[Callable, tuple], Any] | None = None  # default: fn(*args)
    describe: str | None = None  # how to show the input, when the arguments do not say it well


@dataclass
class _Problem:
    kind: str  # "wrong type", "wrong shape", "wrong dtype", "wrong value", ...
    detail: str = ""
    expected: str | None = None
    got: str | None = None


def _fmt_array(t: torch.Tensor) -> str:
    a = t.detach().cpu()
    if a.dtype == torch.bool:
        body = np.array2string(a.numpy(), separator=", ")
    elif a.is_floating_point():
        body = np.array2string(a.double().numpy(), precision=4, separator=", ", suppress_small=True)
    else:
        body = np.array2string(a.numpy(), separator=", ")
    return re.sub(r"\s*\n\s*", " ", body)


def _describe(x: Any, limit: int = 160) -> str:
    if isinstance(x, torch.Tensor):
        dtype = str(x.dtype)
        if x.numel() <= 16:
            text = f"tensor({_fmt_array(x)}, dtype={dtype})"
            if len(text) <= limit:
                return text
        return f"tensor of shape {list(x.shape)}, dtype={dtype}"
    if isinstance(x, torch.Generator):
        return "a torch.Generator"
    if isinstance(x, tuple):
        return "(" + ", ".join(_describe(v, limit // 2) for v in x) + ")"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.6g}"
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)} ({x.dtype})"
    return type(x).__name__


def _snapshot(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_snapshot(v) for v in x)
    if isinstance(x, dict):
        return {k: _snapshot(v) for k, v in x.items()}
    if isinstance(x, torch.Generator) or callable(x):
        return None
    try:
        return copy.deepcopy(x)
    except Exception:  # noqa: BLE001 - whatever cannot be copied is not compared
        return None


def _same(before: Any, after: Any) -> bool:
    if before is None:
        return True
    if isinstance(before, torch.Tensor):
        if not isinstance(after, torch.Tensor) or after.shape != before.shape or after.dtype != before.dtype:
            return False
        a = after.detach()
        return bool(torch.equal(a, before) or (a.is_floating_point() and torch.equal(a.isnan(), before.isnan())
                                              and torch.equal(a.nan_to_num(), before.nan_to_num())))
    if isinstance(before, (list, tuple)):
        return isinstance(after, (list, tuple)) and len(after) == len(before) and all(_same(b, a) for b, a in zip(before, after))
    if isinstance(before, dict):
        return isinstance(after, dict) and before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before)
    try:
        return bool(before == after)
    except Exception:  # noqa: BLE001
        return True


def _compare_float(expected: float, got: Any) -> _Problem | None:
    if isinstance(got, torch.Tensor):
        if got.dim() == 0:
            return _Problem("wrong type", "expected a Python float, got a 0-dim tensor: call .item() on it",
                            _describe(expected), _describe(got))
        return _Problem("wrong shape", f"expected a single number, got a tensor of shape {list(got.shape)}",
                        _describe(expected), _describe(got))
    if isinstance(got, (bool, np.bool_)) or not isinstance(got, (float, np.floating)):
        return _Problem("wrong type", f"expected a float, got {_type_name(got)}", _describe(expected), _describe(got))
    g = float(got)
    if math.isnan(expected) and math.isnan(g):
        return None
    if math.isnan(expected) != math.isnan(g) or not math.isclose(g, expected, rel_tol=1e-5, abs_tol=1e-7):
        return _Problem("wrong value", "", _describe(expected), _describe(g))
    return None


def _compare_tensor(expected: torch.Tensor, got: Any, rtol: float, atol: float) -> _Problem | None:
    if not isinstance(got, torch.Tensor):
        extra = " (return the tensor itself, without .item() or .tolist())" if isinstance(got, (int, float, list)) else ""
        return _Problem("wrong type", f"expected a torch.Tensor, got {_type_name(got)}{extra}", _describe(expected), _describe(got))
    if tuple(got.shape) != tuple(expected.shape):
        return _Problem("wrong shape", f"expected shape {list(expected.shape)}, got {list(got.shape)}",
                        _describe(expected), _describe(got))
    if got.dtype != expected.dtype:
        return _Problem("wrong dtype", f"expected {expected.dtype}, got {got.dtype}", _describe(expected), _describe(got))
    e, g = expected.detach().cpu(), got.detach().cpu()
    if e.is_floating_point():
        bad = ~torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
    else:
        bad = g != e
    if not bool(bad.any()):
        return None
    where = tuple(int(i) for i in bad.nonzero()[0]) if e.dim() else ()
    detail = f"{int(bad.sum())} of {e.numel()} elements differ"
    if where:
        ev, gv = e[where].item(), g[where].item()
        detail += f"; first at index {list(where)}: expected {_describe(float(ev)) if e.is_floating_point() else ev}, got {_describe(float(gv)) if e.is_floating_point() else gv}"
    return _Problem("wrong value", detail, _describe(expected), _describe(got))


def _compare(expected: Any, got: Any, labels: Sequence[str] = (), rtol: float = 1e-4, atol: float = 1e-5) -> _Problem | None:
    if expected is None:
        if got is None:
            return None
        return _Problem("wrong value", f"expected None, got {_type_name(got)}", "None", _describe(got))
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            names = f" ({', '.join(labels)})" if labels else ""
            return _Problem("wrong type", f"expected a tuple of {len(expected)}{names}, got {_type_name(got)}",
                            _describe(expected), _describe(got))
        for i, (e, g) in enumerate(zip(expected, got)):
            problem = _compare(e, g, (), rtol, atol)
            if problem is not None:
                name = labels[i] if i < len(labels) else f"[{i}]"
                problem.detail = f"in {name} (element {i} of the result): {problem.detail}".rstrip(": ")
                return problem
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            keys = ", ".join(map(repr, expected))
            return _Problem("wrong type", f"expected a dict with the keys {keys}, got {_describe(got)}",
                            _describe(expected), _describe(got))
        for key, e in expected.items():
            problem = _compare(e, got[key], (), rtol, atol)
            if problem is not None:
                problem.detail = f"in [{key!r}]: {problem.detail}".rstrip(": ")
                return problem
        return None
    if isinstance(expected, torch.Tensor):
        return _compare_tensor(expected, got, rtol, atol)
    if isinstance(expected, float):
        return _compare_float(expected, got)
    if got != expected:
        return _Problem("wrong value", "", _describe(expected), _describe(got))
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return first if len(first) <= 200 else first[:197] + "..."


def _report(name: str, case: _Case | None, inputs: str | None, problem: _Problem, hint: str | None) -> str:
    lines = [f"✗ {FAIL_MARK}: {name}"]
    if case is not None:
        lines.append(f"  case:     {case.label}")
    if inputs:
        lines.append(f"  input:    {inputs}")
    lines.append(f"  problem:  {problem.kind}" + (f": {problem.detail}" if problem.detail else ""))
    if problem.expected is not None:
        lines.append(f"  expected: {problem.expected}")
    if problem.got is not None:
        lines.append(f"  got:      {problem.got}")
    if hint:
        lines.append(f"  hint:     {hint}")
    return "\n".join(lines)


_LIBRARY = os.path.dirname(os.path.abspath(__file__)) + os.sep  # course_lib's own code


def _guarded(fn: Callable, forbidden: Sequence[str] | None = None) -> tuple[Callable, list[str]]:
    """``fn`` wrapped so that any call into course_lib's own answer while it runs is recorded.

    The library holds an answer to every exercise (its reference implementations, and the
    functions the chapters use). A function that calls them, or is one of them, would pass a
    check without being the student's work: such calls are recorded here and fail the check.
    Only the thread running ``fn`` is watched, and only while ``fn`` itself runs: library code
    the check runs around it (a model whose layer hook calls ``fn``) is not the student's.

    ``forbidden`` None: any code of course_lib counts (an exercise written with torch alone).
    Otherwise it names the answer's code, as modules or functions ("course_lib.training",
    "course_lib.soft_prompts.init_random"): an exercise that builds on the library (a tuning loop
    calls ``ClozeLM.blank_logits``) may call everything else.
    """
    used: list[str] = []

    def answer(frame) -> str | None:
        if not frame.f_code.co_filename.startswith(_LIBRARY):
            return None
        where = f"{frame.f_globals.get('__name__', 'course_lib')}.{frame.f_code.co_qualname}"
        if forbidden is None or any(where == f or where.startswith(f + ".") for f in forbidden):
            return where
        return None

    def watch(frame, event, arg):
        if event == "call" and not used and (where := answer(frame)) is not None:
            used.append(where)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = sys.getprofile()
        sys.setprofile(watch)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.setprofile(previous)

    return wrapper, used


def _own_answer_tip(name: str, forbidden: Sequence[str] | None) -> str:
    """What to tell a student whose function called the answer (``_guarded``)."""
    if forbidden is None:
        return f"write {name} yourself, with torch and Python: the check compares it with course_lib's answer"
    return (f"write {name} yourself from the library's building blocks (ClozeLM, SoftPrompt, torch); "
            f"it may not call {', '.join(f for f in forbidden if '.checks' not in f and '._reference' not in f)}")


def _finish(result: CheckResult, quiet: bool, strict: bool | None) -> CheckResult:
    if not quiet:
        print(result.message)
        result._echo_pending = True
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes"}
    if strict and not result.passed:
        raise CheckFailed(result.message)
    return result


def _run(
    name: str,
    fn: Any,
    cases: Sequence[_Case],
    reference: Callable[..., Any],
    source: str,
    hint: str,
    *,
    labels: Sequence[str] = (),
    hints: Mapping[str, str] | None = None,
    diagnose: Callable[[tuple, Any, Any], str | None] | None = None,
    validate: Callable[[tuple, Any], _Problem | None] | None = None,
    also_accept: Callable[[tuple], Sequence[Any]] | None = None,
    forbidden: Sequence[str] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    quiet: bool = False,
    strict: bool | None = None,
) -> CheckResult:
    """Run ``fn`` on every case and compare with ``reference`` (see the module docstring).

    ``also_accept(args)`` lists other results that are right too (a convention the library adds,
    such as EM's weight floor); ``forbidden`` names the code that is the answer (``_guarded``).
    """
    hints = dict(hints or {})
    if not callable(fn):
        problem = _Problem("wrong type", f"check_{name} needs the function itself, got {_type_name(fn)}")
        return _finish(CheckResult(name, False, _report(name, None, None, problem, f"call it as check_{name}({name})")), quiet, strict)
    student, used = _guarded(fn, forbidden)
    for case in cases:
        expected = case.expected(case.make()) if case.expected else reference(*case.make())
        args = case.make()
        before = _snapshot(args)
        shown = case.describe or ", ".join(f"{n} = {_describe(a)}" for n, a in zip(case.names, args))
        try:
            got = case.call(student, args) if case.call else student(*args)
        except NotImplementedError as err:
            text = _first_line(err) or "replace the `raise NotImplementedError` line with your code"
            problem = _Problem("not implemented yet", text)
            return _finish(CheckResult(name, False, _report(name, None, None, problem, None)), quiet, strict)
        except Exception as err:  # noqa: BLE001 - the student's error is reported, not re-raised
            problem = _Problem(f"raised {type(err).__name__}", _first_line(err))
            return _finish(CheckResult(name, False, _report(name, case, shown, problem, case.hint or hint)), quiet, strict)
        if used:
            problem = _Problem("uses course_lib's own answer", f"it called {used[0]}")
            tip = _own_answer_tip(name, forbidden)
            return _finish(CheckResult(name, False, _report(name, case, shown, problem, tip)), quiet, strict)
        for arg_name, b, a in zip(case.names, before, args):
            if not _same(b, a):
                problem = _Problem("changed its input in place", f"`{arg_name}` was modified",
                                   f"{arg_name} left as it was: {_describe(b)}", f"{arg_name} afterwards: {_describe(a)}")
                tip = "compute a new result instead: no in-place operations (+=, add_(), x[...] = ...) on the inputs"
                return _finish(CheckResult(name, False, _report(name, case, shown, problem, tip)), quiet, strict)
        problem = _compare(expected, got, labels, rtol, atol)
        if problem is not None and problem.kind == "wrong value" and also_accept is not None:
            if any(_compare(alt, got, labels, rtol, atol) is None for alt in also_accept(case.make())):
                problem = None
        if problem is None and validate is not None:
            problem = validate(args, got)
        if problem is not None:
            if problem.kind == "wrong value":
                tip = (diagnose(case.make(), expected, got) if diagnose else None) or case.hint or hint
            else:
                tip = hints.get(problem.kind) or hint
            return _finish(CheckResult(name, False, _report(name, case, shown, problem, tip)), quiet, strict)
    n = len(cases)
    message = f"✓ {PASS_MARK}: {name}: agrees with {source} on {n} input{'s' if n != 1 else ''}"
    return _finish(CheckResult(name, True, message), quiet, strict)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Chapter 1: asking (ranks, P@k, MRR)
# ---------------------------------------------------------------------------------------------
def check_ranks_from_scores(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(scores [N, V] float, gold [N] long) -> ranks [N] long``, 1 = best; ties count against gold."""
    from .evaluation import ranks_of

    names = ("scores", "gold")
    cases = [
        _Case("two facts, no ties", lambda: (torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]]), torch.tensor([1, 2])), names),
        _Case("a tie between the gold answer and another answer",
              lambda: (torch.tensor([[0.2, 0.4, 0.4, 0.0]]), torch.tensor([1])), names,
              hint="ties count against the gold answer: the rank is the number of ids whose score is >= the gold's score, "
                   "the gold id itself included"),
        _Case("log-probabilities with -inf (answers outside the answer space)",
              lambda: (torch.log_softmax(_randn(1, 3, 6), -1).masked_fill(torch.tensor([False, True, False, False, True, False]), -math.inf),
                       torch.tensor([0, 2, 5])), names),
        _Case("float64 scores, 5 facts, 9 answers", lambda: (_randn(2, 5, 9, dtype=torch.float64), torch.tensor([0, 3, 8, 8, 1])), names),
        _Case("a model that gives every answer the same score", lambda: (torch.zeros(2, 5), torch.tensor([0, 4])), names,
              hint="with all scores equal no answer is ranked first: every id ties with the gold one, so its rank is V"),
    ]
    return _run("ranks_from_scores", fn, cases, ranks_of, "course_lib.evaluation.ranks_of",
                "rank = 1 + the number of other answers scoring at least as high as the gold one (ties count against it)",
                hints={"wrong dtype": "ranks are whole numbers: return an int64 (long) tensor, e.g. a .sum() of a bool tensor",
                       "wrong shape": "one rank per fact: sum over the vocabulary dimension (dim=1)"},
                quiet=quiet, strict=strict)


def _reference_precision_at_k(ranks: torch.Tensor, k: int) -> float:
    from .evaluation import metrics_from_ranks

    if k == 1:
        return metrics_from_ranks(ranks)["p_at_1"]
    if k == 10:
        return metrics_from_ranks(ranks)["p_at_10"]
    return math.nan if ranks.numel() == 0 else (ranks.double() <= k).double().mean().item()


def check_precision_at_k(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(ranks [N] long, k int) -> float``: the fraction of facts ranked within the top k; NaN for no facts."""
    names = ("ranks", "k")
    cases = [
        _Case("P@1 of four facts", lambda: (torch.tensor([1, 3, 12, 1]), 1), names),
        _Case("P@10 of four facts", lambda: (torch.tensor([1, 3, 12, 10]), 10), names,
              hint="rank k itself is inside the top k: count ranks <= k"),
        _Case("P@3 of six facts", lambda: (torch.tensor([4, 2, 3, 1, 100, 3]), 3), names),
        _Case("every fact wrong", lambda: (torch.tensor([2, 2, 50]), 1), names),
        _Case("no facts at all (every fact was dropped)", lambda: (torch.zeros(0, dtype=torch.long), 1), names,
              hint="with no facts P@k is undefined: return float('nan'), never a silent 0"),
    ]
    return _run("precision_at_k", fn, cases, _reference_precision_at_k, "course_lib.evaluation.metrics_from_ranks",
                "P@k = (number of facts with rank <= k) / (number of facts), as a Python float",
                hints={"wrong type": "return a Python float: call .item() on a 0-dim tensor, and divide so the result is a fraction"},
                quiet=quiet, strict=strict)


def check_mean_reciprocal_rank(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(ranks [N] long) -> float``: the mean of 1 / rank; NaN for no facts."""
    from .evaluation import metrics_from_ranks

    names = ("ranks",)
    cases = [
        _Case("four facts", lambda: (torch.tensor([1, 2, 4, 1]),), names),
        _Case("one fact far down the list", lambda: (torch.tensor([1000]),), names,
              hint="1 / rank in floating point: integer division 1 // rank gives 0 for every rank above 1"),
        _Case("ranks 1..10", lambda: (torch.arange(1, 11),), names),
        _Case("no facts at all", lambda: (torch.zeros(0, dtype=torch.long),), names,
              hint="with no facts MRR is undefined: return float('nan'), never a silent 0"),
    ]
    return _run("mean_reciprocal_rank", fn, cases, lambda r: metrics_from_ranks(r)["mrr"], "course_lib.evaluation.metrics_from_ranks",
                "MRR = mean over facts of 1 / rank (rank 1 = the model's first answer), as a Python float",
                hints={"wrong type": "return a Python float: call .item() on a 0-dim tensor"},
                quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 2: many ways to ask (ensembles of prompts)
# ---------------------------------------------------------------------------------------------
def _reference_mixture_log_probs(log_probs: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    from .mixture import mixture_log_likelihood

    # mixture_log_likelihood mixes over the last dimension: put the prompts there.
    return mixture_log_likelihood(log_weights, log_probs.transpose(1, 2))


def check_mixture_log_probs(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(log_probs [B, K, V], log_weights [K]) -> [B, V]``: log sum_k pi_k p_k(y), pi = softmax(log_weights)."""
    names = ("log_probs", "log_weights")
    cases = [
        _Case("two prompts, equal weights", lambda: (torch.log_softmax(_randn(3, 2, 2, 5), -1), torch.zeros(2)), names),
        _Case("three prompts, weights that are not normalised",
              lambda: (torch.log_softmax(_randn(4, 3, 3, 6), -1), torch.tensor([2.0, 0.0, -1.0])), names,
              hint="the weights are log-weights up to a constant: normalise them with torch.log_softmax first"),
        _Case("one prompt: the mixture is that prompt", lambda: (torch.log_softmax(_randn(5, 2, 1, 4), -1), torch.tensor([0.3])), names),
        _Case("very small probabilities (log-probs near -1000)",
              lambda: (torch.log_softmax(_randn(6, 2, 3, 4), -1) - 1000.0, torch.tensor([0.0, 1.0, -2.0])), names,
              hint="exp(-1000) is 0 in floating point: use torch.logsumexp over the prompts instead of log(sum(exp(...)))"),
    ]
    return _run("mixture_log_probs", fn, cases, _reference_mixture_log_probs, "course_lib.mixture.mixture_log_likelihood",
                "log p(y) = logsumexp over k of (log_softmax(log_weights)[k] + log_probs[:, k, y])",
                hints={"wrong shape": "mix over the prompts (dim=1): the result has one row per fact and one column per answer, [B, V]"},
                quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 3: soft prompts
# ---------------------------------------------------------------------------------------------
def _reference_gather_prompt_offsets(offsets: torch.Tensor, prompt_slot: torch.Tensor) -> torch.Tensor:
    from .cloze import ClozeBatch, Stream
    from .soft_prompts import PromptOffsets

    T, H = offsets.shape
    B, S = prompt_slot.shape
    po = PromptOffsets(1, 1, T, H)
    with torch.no_grad():
        po.offsets[0, 0] = offsets
    zeros = torch.zeros(B, S, dtype=torch.long)
    batch = ClozeBatch(zeros, zeros, torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long),
                       prompt_slot, zeros.bool(), T)
    return po.delta(0, Stream.INPUT, batch).detach()


def check_gather_prompt_offsets(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(offsets [T, H], prompt_slot [B, S] long) -> [B, S, H]``: offset p where slot = p, zeros where slot = -1."""
    names = ("offsets", "prompt_slot")
    cases = [
        _Case("one sentence: [subject] was born in [blank]",
              lambda: (_randn(7, 3, 4), torch.tensor([[-1, -1, 0, 1, 2]])), names),
        _Case("two sentences padded to one length",
              lambda: (_randn(8, 3, 2), torch.tensor([[-1, 0, 1, 2, -1, -1], [-1, -1, -1, 0, 1, 2]])), names,
              hint="positions with slot -1 (subject, blank, special tokens, padding) get a zero vector"),
        _Case("a one-token prompt", lambda: (_randn(9, 1, 5), torch.tensor([[-1, 0, -1]])), names),
        _Case("no prompt token at all in the batch", lambda: (_randn(10, 2, 3), torch.full((2, 3), -1)), names,
              hint="positions with slot -1 get a zero vector"),
    ]
    return _run("gather_prompt_offsets", fn, cases, _reference_gather_prompt_offsets,
                "course_lib.soft_prompts.PromptOffsets.delta",
                "append a zero row to the offsets, send slot -1 to it, and index: table[slot] (one gather, no Python loop needed)",
                hints={"wrong shape": "one vector per position of every sentence: [B, S, H]",
                       "wrong dtype": "keep the offsets' dtype (float32)"},
                quiet=quiet, strict=strict)


def _loss_validate(args: tuple, got: Any) -> _Problem | None:
    if isinstance(got, torch.Tensor) and args[0].requires_grad and not got.requires_grad:
        return _Problem("not differentiable", "the loss has no autograd graph, so training could not follow its gradient",
                        "a tensor with requires_grad=True", "a tensor with requires_grad=False")
    return None


def check_cloze_loss(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(blank_logits [B, V], gold [B] long) -> 0-dim tensor``: mean over facts of -log p(gold)."""
    import torch.nn.functional as F

    names = ("blank_logits", "gold")
    cases = [
        _Case("three facts, five answers", lambda: (_randn(11, 3, 5).requires_grad_(), torch.tensor([0, 4, 2])), names),
        _Case("one fact", lambda: (_randn(12, 1, 7).requires_grad_(), torch.tensor([6])), names),
        _Case("large logits (a confident model)",
              lambda: ((_randn(13, 2, 4) * 1000).requires_grad_(), torch.tensor([1, 3])), names,
              hint="exp(1000) overflows: take torch.log_softmax of the logits (or use F.cross_entropy), never log(softmax(...))"),
    ]
    return _run("cloze_loss", fn, cases, lambda logits, gold: F.cross_entropy(logits, gold).detach(),
                "torch.nn.functional.cross_entropy (the loss course_lib.training minimises)",
                "loss = mean over facts of -log_softmax(blank_logits)[fact, gold[fact]]",
                hints={"wrong shape": "the loss is one number: average the per-fact losses (.mean()), a 0-dim tensor",
                       "wrong type": "return the loss as a tensor (no .item()): training calls .backward() on it",
                       "not differentiable": "do not call .item(), .detach() or torch.no_grad() inside the loss"},
                validate=_loss_validate, quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 4: random initialisation
# ---------------------------------------------------------------------------------------------
class _TableLM:
    """Just enough of a ClozeLM for ``soft_prompts.embedding_stats``: an embedding table."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.hidden_size = table.shape[1]
        V = table.shape[0]

        class _Emb:
            num_embeddings = V

        class _Model:
            @staticmethod
            def get_input_embeddings():
                return _Emb()

        self.model = _Model()

    def embedding_output(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].float()


def _reference_embedding_mean_std(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .soft_prompts import embedding_stats

    return embedding_stats(_TableLM(table))


def _diagnose_std(args: tuple, expected: Any, got: Any) -> str | None:
    (table,) = args
    n = table.shape[0]
    try:
        got_std = got[1]
        if torch.allclose(got_std.double(), expected[1].double() * math.sqrt(n / (n - 1)), rtol=1e-4, atol=1e-6):
            return ("that is the sample standard deviation (divides by n - 1); the library uses the population one "
                    "(divides by n): torch.std(table, dim=0, correction=0)")
    except Exception:  # noqa: BLE001 - a diagnosis is a bonus, never an error
        return None
    return None


def check_embedding_mean_std(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(table [V, H]) -> (mean [H], std [H])`` float32: per-dimension mean and (population) spread."""
    names = ("table",)
    cases = [
        _Case("a random table of 50 words in 8 dimensions", lambda: (_randn(14, 50, 8),), names),
        _Case("a table far from zero (mean about 100)", lambda: (_randn(15, 40, 3) * 0.5 + 100.0,), names),
        _Case("a constant dimension (spread 0)",
              lambda: (torch.cat([_randn(16, 30, 2), torch.full((30, 1), 3.0)], dim=1),), names),
        _Case("two words", lambda: (torch.tensor([[1.0, -2.0, 0.5], [3.0, 2.0, 0.5]]),), names),
    ]
    return _run("embedding_mean_std", fn, cases, _reference_embedding_mean_std, "course_lib.soft_prompts.embedding_stats",
                "mean and standard deviation over the rows (dim=0), the standard deviation dividing by n (correction=0)",
                labels=("mean", "std"), diagnose=_diagnose_std,
                hints={"wrong shape": "one number per hidden dimension: reduce over the rows (dim=0), giving [H] each",
                       "wrong dtype": "return float32 tensors (compute in float64 if you like, then .float())",
                       "wrong type": "return a tuple (mean, std) of two tensors"},
                quiet=quiet, strict=strict)


@functools.lru_cache(maxsize=1)
def _tiny_lm():
    from .models import load_model

    return load_model("tiny-gemma3", device="cpu")


def _reference_random_offsets(word_vectors, mean, std, generator) -> torch.Tensor:
    T, H = word_vectors.shape
    draw = mean + std * torch.randn(T, H, generator=generator)
    return draw - word_vectors


def _library_random_offsets_case() -> _Case:
    from .soft_prompts import SoftPrompt, embedding_stats, init_random
    from .templates import Template

    template = Template("[X] was born in [Y] .")

    def make():
        lm = _tiny_lm()
        ids = torch.tensor(lm.encode_prompt(template).prompt_token_ids, dtype=torch.long)
        mean, std = embedding_stats(lm)
        return lm.embedding_output(ids), mean, std, _gen(20)

    def expected(_args):
        lm = _tiny_lm()
        soft = SoftPrompt(lm, [template])
        init_random(soft, lm, _gen(20))
        n = len(soft.prompts[0].prompt_token_ids)
        return soft.offsets[0, 0, :n].detach().clone()

    return _Case("a tiny model's prompt '[X] was born in [Y] .', against init_random itself", make,
                 ("word_vectors", "mean", "std", "generator"), expected=expected,
                 hint="draw once with torch.randn(T, H, generator=generator) (T rows, H columns, in that order), "
                      "scale by std, shift by mean, then subtract the word vectors")


def check_random_offsets(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(word_vectors [T, H], mean [H], std [H], generator) -> offsets [T, H]`` so that words + offsets = a fresh draw."""
    names = ("word_vectors", "mean", "std", "generator")
    cases = [
        _Case("three prompt tokens, four dimensions",
              lambda: (_randn(17, 3, 4), torch.tensor([0.0, 1.0, -1.0, 0.5]), torch.tensor([1.0, 0.5, 2.0, 0.1]), _gen(3)), names,
              hint="draw once with torch.randn(T, H, generator=generator), scale by std, shift by mean, subtract the word vectors"),
        _Case("one prompt token", lambda: (_randn(18, 1, 6), _randn(19, 6), _randn(20, 6).abs(), _gen(4)), names),
        _library_random_offsets_case(),
    ]
    return _run("random_offsets", fn, cases, _reference_random_offsets, "course_lib.soft_prompts.init_random",
                "offsets = (mean + std * torch.randn(T, H, generator=generator)) - word_vectors",
                hints={"wrong shape": "one offset per prompt token and hidden dimension: [T, H], like word_vectors",
                       "wrong dtype": "float32, like the word vectors (torch.randn's default)"},
                quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 5: mixtures (EM)
# ---------------------------------------------------------------------------------------------
def check_responsibilities(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(log_weights [K] or [B, K], gold_log_probs [B, K]) -> [B, K]``: posterior of each prompt per fact."""
    from .mixture import responsibilities

    names = ("log_weights", "gold_log_probs")
    cases = [
        _Case("three prompts, four facts, equal weights",
              lambda: (torch.full((3,), -math.log(3)), torch.log_softmax(_randn(21, 4, 3), -1)), names),
        _Case("unequal weights", lambda: (torch.log(torch.tensor([0.7, 0.2, 0.1])), -_randn(22, 2, 3).abs() * 3), names),
        _Case("one weight vector per fact ([B, K], as the data-dependent mixture has)",
              lambda: (torch.log_softmax(_randn(23, 2, 4), -1), -_randn(24, 2, 4).abs()), names,
              hint="the weights may be [B, K]: add them to gold_log_probs with broadcasting, no reshaping of your own"),
        _Case("tiny probabilities (log-probs near -1000)",
              lambda: (torch.zeros(2), torch.tensor([[-1000.0, -1001.0], [-1003.0, -1000.5]])), names,
              hint="exp(-1000) is 0: use torch.softmax(log_weights + gold_log_probs, dim=-1), which is stable"),
    ]
    return _run("responsibilities", fn, cases, responsibilities, "course_lib.mixture.responsibilities",
                "r[b, k] = pi_k p_k(y_b | x_b) / sum_j pi_j p_j(y_b | x_b): a softmax over k of log_weights + gold_log_probs",
                hints={"wrong shape": "one row per fact and one column per prompt: [B, K]"},
                quiet=quiet, strict=strict)


LIBRARY_EM_FLOOR = 1e-8  # course_lib.mixture.m_step_weights's floor on a weight


def _reference_em_step(log_weights: torch.Tensor, gold_log_probs: torch.Tensor,
                       floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook EM (``floor`` 0): r = posterior of each prompt; new pi = mean of r over the facts."""
    r = torch.softmax(torch.log_softmax(log_weights, dim=-1) + gold_log_probs, dim=-1)
    pi = r.mean(dim=0)
    if floor > 0:
        pi = pi.clamp_min(floor)
        pi = pi / pi.sum()
    return torch.log(pi), r


def check_em_step(fn, *, floor: float | None = None, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(log_weights [K], gold_log_probs [B, K]) -> (new_log_weights [K], responsibilities [B, K])``.

    Textbook EM is right: a prompt that explains no fact gets weight 0 (log-weight -inf). The
    library floors each weight at 1e-8 and renormalises (``mixture.m_step_weights``), so that no
    prompt is switched off for good; by default that answer is accepted too. ``floor=1e-8`` asks
    for the library's convention, ``floor=0`` for textbook EM only.
    """
    names = ("log_weights", "gold_log_probs")
    floor_hint = (f"floor the mean responsibility at {floor:g} and renormalise before the log, so that no prompt's "
                  "weight becomes exactly 0 (log = -inf) for good" if floor else None)
    cases = [
        _Case("three prompts, five facts", lambda: (torch.zeros(3), torch.log_softmax(_randn(25, 5, 3), -1)), names),
        _Case("weights that are not normalised", lambda: (torch.tensor([1.0, 3.0]), -_randn(26, 4, 2).abs() * 2), names,
              hint="normalise the old weights with torch.log_softmax before the E step"),
        _Case("a prompt that never explains any fact (its log-probs are -10000)",
              lambda: (torch.zeros(3), torch.tensor([[-1.0, -2.0, -1e4], [-0.5, -3.0, -1e4]])), names,
              hint=floor_hint or "its mean responsibility is 0: take torch.log of it (-inf), never a NaN"),
    ]
    if floor is None:
        reference = _reference_em_step
        also = lambda args: [_reference_em_step(*args, floor=LIBRARY_EM_FLOOR)]  # noqa: E731
        source = "textbook EM (the library's 1e-8 weight floor accepted too)"
    else:
        reference = functools.partial(_reference_em_step, floor=floor)
        also = None
        source = f"EM with every weight floored at {floor:g}" if floor else "textbook EM"
    return _run("em_step", fn, cases, reference, source,
                "E step: r = softmax(log_softmax(log_weights) + gold_log_probs); M step: new pi = mean of r over the "
                "facts; return (log new pi, r)",
                labels=("new_log_weights", "responsibilities"), also_accept=also,
                hints={"wrong type": "return a tuple: (new_log_weights, responsibilities)",
                       "wrong shape": "new_log_weights is [K] (averaged over the facts); responsibilities is [B, K]"},
                quiet=quiet, strict=strict)


def check_data_dependent_log_weights(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(log_weights [K], subject_log_likelihood [B, K]) -> [B, K]``: log pi_k(x), normalised over k."""
    from .mixture import data_dependent_log_weights

    names = ("log_weights", "subject_log_likelihood")
    cases = [
        _Case("three prompts, two subjects", lambda: (torch.log(torch.tensor([0.5, 0.3, 0.2])), -_randn(27, 2, 3).abs() * 5), names),
        _Case("weights that are not normalised", lambda: (torch.tensor([2.0, -1.0]), -_randn(28, 3, 2).abs()), names),
        _Case("long subjects (log-likelihoods in the thousands)",
              lambda: (torch.zeros(3), torch.tensor([[-2000.0, -2003.0, -1999.0]])), names,
              hint="exp(-2000) is 0: normalise with torch.log_softmax(..., dim=-1), never log(exp(x) / exp(x).sum())"),
        _Case("one prompt: its weight is 1 whatever the subject", lambda: (torch.tensor([0.4]), -_randn(29, 4, 1).abs()), names),
    ]
    return _run("data_dependent_log_weights", fn, cases, data_dependent_log_weights,
                "course_lib.mixture.data_dependent_log_weights",
                "log pi_k(x) = log_softmax over k of (log_softmax(log_weights)[k] + subject_log_likelihood[:, k])",
                hints={"wrong shape": "one weight per (subject, prompt): [B, K]"},
                quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 6: deep perturbations (a forward hook that adds an offset to a layer's output)
# ---------------------------------------------------------------------------------------------
def _reference_add_layer_offset(output, delta):
    # What ClozeLM's perturbation hook does with a layer's output (course_lib/cloze.py, _perturb_hook).
    if delta is None:
        return None
    if isinstance(output, tuple):
        return (output[0] + delta, *output[1:])
    return output + delta


def _hooked_model_case() -> _Case:
    from .cloze import Stream
    from .soft_prompts import PromptOffsets
    from .templates import Template

    template = Template("[X] was born in [Y] .")

    def setup():
        lm = _tiny_lm()
        prompt = lm.encode_prompt(template)
        batch = lm.build_batch([prompt], ["Dante", "Goethe"])
        perturbation = PromptOffsets(1, 2, prompt.n_prompt_tokens, lm.hidden_size)
        with torch.no_grad():
            perturbation.offsets[0, 1] = _randn(30, prompt.n_prompt_tokens, lm.hidden_size)  # layer 1 only
        return lm, batch, perturbation

    def expected(_args):
        lm, batch, perturbation = setup()
        with torch.no_grad():
            return lm.blank_logits(batch, perturbation)

    def call(fn, _args):
        lm, batch, perturbation = setup()
        delta = perturbation.delta(1, Stream.INPUT, batch).detach()
        layer = lm.hooked_rows[1][0][0]
        handle = layer.register_forward_hook(lambda module, inputs, output: fn(output, delta))
        try:
            with torch.no_grad():
                return lm.blank_logits(batch)
        finally:
            handle.remove()

    return _Case("hooked on layer 1 of a tiny Gemma: the blank's logits must match course_lib's deep perturbation",
                 lambda: (), (), expected=expected, call=call, describe="tiny-gemma3, '[X] was born in [Y] .', subjects Dante and Goethe",
                 hint="return output + delta (a new tensor), or for a tuple (output[0] + delta, *output[1:])")


def check_add_layer_offset(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(output, delta) -> new output or None``: the body of a forward hook that perturbs a layer's output.

    ``output`` is the layer's output: a tensor [B, S, H] or a tuple whose first element is one;
    ``delta`` is [B, S, H], or None when this layer is not perturbed (return None: keep the output).
    """
    names = ("output", "delta")
    cases = [
        _Case("a tensor output", lambda: (_randn(31, 2, 5, 4), _randn(32, 2, 5, 4)), names),
        _Case("a tuple output (hidden states, attention weights)",
              lambda: ((_randn(33, 1, 3, 2), _randn(34, 1, 2, 3, 3)), _randn(35, 1, 3, 2)), names,
              hint="some layers return a tuple: add delta to its first element and keep the others as they are"),
        _Case("no offset for this layer (delta is None)", lambda: (_randn(36, 2, 3, 4), None), names,
              hint="return None: a forward hook that returns None leaves the output unchanged"),
        _hooked_model_case(),
    ]
    return _run("add_layer_offset", fn, cases, _reference_add_layer_offset, "course_lib.cloze (ClozeLM's layer hooks)",
                "return output + delta (a new tensor, or a new tuple with the first element perturbed); None when delta is None",
                labels=("hidden states", "attention weights"),
                hints={"wrong type": "return the same kind of thing you were given: a tensor for a tensor, a tuple for a tuple",
                       "wrong shape": "the offset has the layer output's shape [B, S, H]: add, don't concatenate or stack",
                       "wrong dtype": "keep the layer's dtype"},
                quiet=quiet, strict=strict)


def _deep_model_case() -> _Case:
    from .recipes import DeepOffsets, deep_delta
    from .templates import Template

    template = Template("[X] was born in [Y] .")

    def setup():
        lm = _tiny_lm()
        batch = lm.build_batch([lm.encode_prompt(template)], ["Dante", "Goethe"])
        T = lm.encode_prompt(template).n_prompt_tokens
        offsets = _randn(72, lm.n_layers + 1, T, lm.hidden_size)
        scale = torch.linspace(1.0, 3.0, lm.n_layers + 1)
        return lm, batch, offsets, scale

    def expected(_args):
        lm, batch, offsets, scale = setup()
        with torch.no_grad():
            return lm.blank_logits(batch, DeepOffsets(offsets, scale, True))

    def call(fn, _args):
        lm, batch, offsets, scale = setup()
        with torch.no_grad():
            return lm.blank_logits(batch, DeepOffsets(offsets, scale, True, delta_fn=fn))

    return _Case("every layer of a tiny Gemma perturbed through course_lib's hooks: the blank's logits",
                 lambda: (), (), expected=expected, call=call,
                 describe="tiny-gemma3, '[X] was born in [Y] .', subjects Dante and Goethe, every row, read frozen",
                 hint="the hooks call delta(row, stream, batch) with batch.slots(stream) and batch.read_index")


def check_deep_delta(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(offsets [R, T, H], row_scale [R], row, slots [B, S], read_index [B], freeze_read) -> [B, S, H] | None``."""
    from .recipes import deep_delta

    names = ("offsets", "row_scale", "row", "slots", "read_index", "freeze_read")
    one = torch.tensor([[-1, 0, 1, 2, 3, -1]])
    two = torch.tensor([[-1, 0, 1, -1, 2, -1], [-1, -1, 0, 1, -1, 2]])
    cases = [
        _Case("row 1 of three, read position on prompt token 3 (a causal LM's last word), frozen",
              lambda: (_randn(73, 3, 4, 5), torch.tensor([1.0, 2.0, 0.5]), 1, one, torch.tensor([4]), True), names,
              hint="row i's offset for prompt token p is offsets[i, p] * row_scale[i]; with freeze_read the position "
                   "read_index[b] of sentence b gets zeros"),
        _Case("the same, read position tuned (freeze_read False)",
              lambda: (_randn(73, 3, 4, 5), torch.tensor([1.0, 2.0, 0.5]), 1, one, torch.tensor([4]), False), names),
        _Case("two padded sentences, row 0, read at a [MASK] (no prompt token there)",
              lambda: (_randn(74, 2, 3, 4), torch.tensor([1.0, 4.0]), 0, two, torch.tensor([3, 4]), True), names,
              hint="positions with slot -1 (subject, blank, special tokens, padding) get zeros"),
        _Case("row 2 of a perturbation with two rows (past the last)",
              lambda: (_randn(75, 2, 3, 4), torch.ones(2), 2, two, torch.tensor([3, 4]), True), names,
              hint="return None for a row past the last: the layer is not perturbed"),
        _deep_model_case(),
    ]
    return _run("deep_delta", fn, cases, deep_delta, "course_lib.recipes.deep_delta",
                "append a zero row to offsets[row] * row_scale[row]; index it with the slots (-1 to the zero row, and "
                "the read position too when frozen)",
                hints={"wrong shape": "one vector per position of every sentence: [B, S, H]",
                       "wrong dtype": "keep the offsets' dtype (float32)"},
                quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 7: reproducing the paper (micro and macro averages)
# ---------------------------------------------------------------------------------------------
def _reference_micro_macro(p_at_1: torch.Tensor, kept: torch.Tensor) -> tuple[float, float]:
    import pandas as pd

    from .results import summarize

    n = len(p_at_1)
    table = pd.DataFrame({"model": "m", "dataset": "d", "relation": [f"P{i}" for i in range(n)], "prompt_set": "s",
                          "method": "x", "split": "test", "answer_space": "full", "facts": kept.tolist(),
                          "kept": kept.tolist(), "dropped": 0, "p_at_1": p_at_1.double().tolist(),
                          "p_at_10": p_at_1.double().tolist(), "mrr": p_at_1.double().tolist()})
    row = summarize(table).iloc[0]
    return float(row["micro_p_at_1"]), float(row["macro_p_at_1"])


def check_micro_macro(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(p_at_1 [R] float, kept [R] long) -> (micro, macro)`` floats over relations with any kept fact."""
    names = ("p_at_1", "kept")
    cases = [
        _Case("three relations of equal size (micro = macro)",
              lambda: (torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64), torch.tensor([4, 4, 4])), names),
        _Case("a big relation and a small one",
              lambda: (torch.tensor([0.9, 0.1], dtype=torch.float64), torch.tensor([90, 10])), names,
              hint="micro pools the facts (weight each relation by its kept facts); macro averages the relations equally"),
        _Case("a relation with no kept fact (its P@1 is NaN)",
              lambda: (torch.tensor([0.5, math.nan, 0.0], dtype=torch.float64), torch.tensor([10, 0, 30])), names,
              hint="leave relations with no kept facts out of both averages (NaN * 0 is still NaN)"),
        _Case("no relation with any kept fact",
              lambda: (torch.tensor([math.nan, math.nan], dtype=torch.float64), torch.tensor([0, 0])), names,
              hint="nothing to average: return (nan, nan), never a silent 0"),
    ]
    return _run("micro_macro", fn, cases, _reference_micro_macro, "course_lib.results.summarize",
                "micro = sum(p_at_1 * kept) / sum(kept), macro = mean(p_at_1), both over the relations with kept > 0",
                labels=("micro", "macro"),
                hints={"wrong type": "return a tuple of two Python floats: (micro, macro)",
                       "wrong shape": "each average is one number: a Python float"},
                quiet=quiet, strict=strict)


def _hits(seed: int, n: int, p: float) -> torch.Tensor:
    return (torch.rand(n, generator=_gen(seed)) < p).long()


def check_bootstrap_intervals(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(hits list[[n_r] long], n_boot, generator, level) -> {"micro": (lo, hi), "macro": (lo, hi)}``."""
    from .recipes import bootstrap_intervals

    names = ("hits", "n_boot", "generator", "level")
    empty = torch.zeros(0, dtype=torch.long)
    cases = [
        _Case("three relations of 10, 4 and 25 facts",
              lambda: ([_hits(60, 10, 0.5), _hits(61, 4, 0.3), _hits(62, 25, 0.8)], 200, _gen(63), 0.95), names,
              hint="draw each relation's resample with torch.randint(n_r, (n_boot, n_r), generator=generator), "
                   "relation by relation in the order given; then torch.quantile in float64"),
        _Case("a relation with no facts (left out of both averages)",
              lambda: ([_hits(64, 6, 0.5), empty, _hits(65, 9, 0.4)], 150, _gen(66), 0.95), names,
              hint="skip relations with no facts: no draw for them, and they count in neither average"),
        _Case("every fact a hit (the interval is a single point)", lambda: ([torch.ones(5, dtype=torch.long)] * 2, 50,
                                                                            _gen(67), 0.95), names),
        _Case("a 90% interval", lambda: ([_hits(68, 12, 0.6), _hits(69, 30, 0.2)], 300, _gen(70), 0.9), names,
              hint="the interval's ends are the (1 - level) / 2 and 1 - (1 - level) / 2 quantiles of the replicates"),
        _Case("no relation with any fact", lambda: ([empty, empty], 10, _gen(71), 0.95), names,
              hint="nothing to resample: return NaN for both ends of both intervals"),
    ]
    return _run("bootstrap_intervals", fn, cases, bootstrap_intervals, "course_lib.recipes.bootstrap_intervals",
                "per replicate: every relation's P@1 on a resample of its own facts; micro = mean weighted by facts, "
                "macro = plain mean; the interval = quantiles of the replicates",
                hints={"wrong type": "return {'micro': (lo, hi), 'macro': (lo, hi)} with Python floats"},
                quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 8: learning or recalling (a majority-class baseline)
# ---------------------------------------------------------------------------------------------
def majority_reference(train_objects: Sequence[str], test_objects: Sequence[str]) -> float:
    """P@1 of always giving the majority answer of the training objects; NaN with no test facts.

    The majority answer is the most frequent object, ties broken alphabetically: the one rule every
    baseline of the book uses (``evaluation.majority_answer``), so a baseline never depends on the
    order in which the facts came.
    """
    from .evaluation import majority_answer

    if len(test_objects) == 0:
        return math.nan
    guess = majority_answer(train_objects)
    return sum(o == guess for o in test_objects) / len(test_objects)


def check_majority_p_at_1(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(train_objects list[str], test_objects list[str]) -> float``: P@1 of the majority-class guess."""
    names = ("train_objects", "test_objects")
    cases = [
        _Case("one clear majority", lambda: (["English", "English", "French", "English"], ["English", "French", "English", "German"]), names),
        _Case("a tie between two training objects",
              lambda: (["French", "English", "French", "English"], ["English", "French", "French"]), names,
              hint="on a tie take the alphabetically first of the most common objects (min of them)"),
        _Case("the majority object never appears in test", lambda: (["Paris", "Paris", "Rome"], ["Berlin", "Rome"]), names),
        _Case("no test facts", lambda: (["Paris"], []), names,
              hint="with no test facts P@1 is undefined: return float('nan')"),
    ]
    return _run("majority_p_at_1", fn, cases, majority_reference, "course_lib.checks.majority_reference",
                "guess = the most common training object (alphabetically first on a tie); "
                "P@1 = the fraction of test objects equal to the guess",
                hints={"wrong type": "return a Python float (a fraction), not a count or a tensor"},
                quiet=quiet, strict=strict)


def check_shuffled_facts(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(facts list[Fact], generator) -> list[Fact]``: each subject with the object of fact perm[b]."""
    from .data import Fact
    from .recipes import shuffled_facts

    names = ("facts", "generator")
    capitals = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
                ("England", "London")]
    languages = [("Dante", "Italian"), ("Goethe", "German"), ("Victor Hugo", "French"), ("Voltaire", "French"),
                 ("Molière", "French"), ("Petrarch", "Italian")]
    cases = [
        _Case("five capitals", lambda: ([Fact(*f) for f in capitals], _gen(50)), names,
              hint="perm = torch.randperm(len(facts), generator=generator); fact b keeps its subject and takes "
                   "the object of fact perm[b]"),
        _Case("native languages, some objects shared (an N-1 relation)",
              lambda: ([Fact(*f) for f in languages], _gen(51)), names),
        _Case("one fact", lambda: ([Fact("Dante", "Florence")], _gen(52)), names),
        _Case("no facts", lambda: ([], _gen(53)), names, hint="no facts: return an empty list"),
    ]
    return _run("shuffled_facts", fn, cases, shuffled_facts, "course_lib.recipes.shuffled_facts",
                "draw perm = torch.randperm(len(facts), generator=generator) once; return "
                "[Fact(facts[b].subject, facts[perm[b]].object) for every b]",
                hints={"wrong type": "return a list of course_lib.data.Fact, one per fact, in the order given"},
                quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Grading helpers
# ---------------------------------------------------------------------------------------------
def checks_for(chapter: str) -> dict[str, Callable[..., CheckResult]]:
    """The check functions of a chapter ("03_soft_prompts" or "03"), keyed by the function each checks."""
    key = next((c for c in CHAPTER_CHECKS if c == chapter or c.split("_")[0] == chapter), None)
    if key is None:
        raise ValueError(f"unknown chapter {chapter!r}; valid: {', '.join(CHAPTER_CHECKS)}")
    return {name: globals().get(f"check_{name}") or __getattr__(f"check_{name}") for name in CHAPTER_CHECKS[key]}


def grade(namespace: Mapping[str, Any], chapter: str) -> dict[str, bool]:
    """Run every check of ``chapter`` quietly on the functions found in ``namespace`` (e.g. a notebook's globals())."""
    out = {}
    for name, check in checks_for(chapter).items():
        fn = namespace.get(name)
        out[name] = bool(fn is not None and check(fn, quiet=True, strict=False).passed)
    return out


def outcomes_in_notebook(nb: Any) -> list[tuple[int, str, bool]]:
    """(cell index, check name, passed) for every check marker printed in an executed notebook's outputs."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code":
            continue
        for out in cell.get("outputs", []):
            text = out.get("text", "")
            if not text and "data" in out:
                text = out["data"].get("text/plain", "")
            if isinstance(text, list):
                text = "".join(text)
            for verdict, name in MARKER_RE.findall(text):
                found.append((i, name, verdict == "PASSED"))
    return found


def __getattr__(name: str) -> Any:
    # The checks of whole procedures live in course_lib.run_checks, which builds on this module:
    # imported on first use, so that either module can be imported first.
    if name.startswith("check_") and name[len("check_"):] in RUN_CHECKS:
        from . import run_checks

        return getattr(run_checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHAPTER_CHECKS", "CheckFailed", "CheckResult", "checks_for", "grade", "majority_reference", "outcomes_in_notebook",
    *[f"check_{n}" for names in CHAPTER_CHECKS.values() for n in names],
]
