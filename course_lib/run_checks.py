"""Self-checks for the exercises that write a whole procedure: scoring by hand, a tuning loop, EM inside
it, a random start, a deep run, a control run.

Each check runs the student's function on tiny random models of the three families (``tiny-bert``,
``tiny-bart``, ``tiny-gpt2``: a second each) and judges what matters for the procedure before
comparing numbers with the library's answer on the same fixed input: the model's weights are
untouched and no hook is left on it, the loss falls, the offsets that nothing can train stay zero,
mixture weights sum to one. Then the result must match the reference (``course_lib.recipes`` or
the library) within a tolerance that allows floating-point noise, not a different procedure.

These functions build on the library (``ClozeLM``, ``SoftPrompt``), so they may call it; what they
may not call is the answer itself, named per check in ``forbidden`` (see ``checks._guarded``).
The report has the format of ``course_lib.checks`` (the same markers, strict mode and grading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .checks import (PASS_MARK, CheckResult, _compare, _describe, _finish, _first_line, _guarded, _own_answer_tip,
                     _Problem, _report, _type_name)
from .cloze import ClozeLM
from .data import Fact
from .templates import Template

LR = 0.02  # large for a real model, so that three epochs on six facts move a tiny random one clearly
T_CAPITAL = Template("The capital of [X] is [Y] .")
T_LONG = Template("[X] , a country whose capital city is [Y] .")
T_BLANK_FIRST = Template("[Y] is the capital of [X] .")  # a causal LM cannot answer it
CAPITALS = [Fact("France", "Paris"), Fact("Italy", "Rome"), Fact("Germany", "Berlin"), Fact("Japan", "Tokyo"),
            Fact("England", "London"), Fact("Tuscany", "Florence")]
MULTI_TOKEN = Fact("Russia", "Kaliningrad")  # several tokens for every tiny model: dropped
# The checks' own references (course_lib.checks's, and the _reference_* functions below) are answers too.
ALWAYS = ("course_lib.checks",)


@dataclass
class _RunCase:
    label: str
    model: str  # a tiny model of course_lib.testing
    make: Callable[[ClozeLM], tuple[tuple, dict]]  # fresh (args after lm, keyword arguments)
    describe: str
    hint: str | None = None


def _lm(name: str) -> ClozeLM:
    # A fresh model for every call: a student's function that leaves a hook or a changed flag on
    # its model cannot disturb the next case or the reference.
    from .models import load_model

    return load_model(name, device="cpu")


_EXPECTED: dict[tuple[str, str], Any] = {}


def _expected(name: str, case: _RunCase, reference: Callable, normalise: Callable) -> Any:
    """The reference's (normalised) result for a case, computed once per process on its own model."""
    key = (name, case.model, case.label)
    if key not in _EXPECTED:
        lm = _lm(case.model)
        args, kwargs = case.make(lm)
        _EXPECTED[key] = normalise(reference(lm, *args, **kwargs), lm)
    return _EXPECTED[key]


def _hooks(lm: ClozeLM) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def _model_problem(lm: ClozeLM, before: dict[str, torch.Tensor], hooks: int, reuse_prefix: bool) -> _Problem | None:
    """The frozen model must come back as it went in: same weights, no extra hook, same settings."""
    for key, value in lm.model.state_dict().items():
        if key in before and not torch.equal(value, before[key]):
            return _Problem("changed the model", f"its weight {key} changed: only the prompt's offsets are trained",
                            "the model's weights as they were", "changed weights")
    if _hooks(lm) != hooks:
        return _Problem("left a hook on the model", f"{_hooks(lm) - hooks} more hook(s) after your function returned",
                        None, None)
    if lm.reuse_prefix != reuse_prefix:
        return _Problem("changed the model's settings", "lm.reuse_prefix was not restored", str(reuse_prefix),
                        str(lm.reuse_prefix))
    return None


def _run_procedure(name: str, fn: Any, cases: Sequence[_RunCase], reference: Callable, normalise: Callable,
                   judge: Callable[[Any, Any], _Problem | None], source: str, hint: str, forbidden: Sequence[str],
                   hints: dict[str, str] | None = None, quiet: bool = False,
                   strict: bool | None = None) -> CheckResult:
    """Run ``fn(lm, *args, **kwargs)`` on each case; ``normalise`` turns a result into what ``judge`` compares."""
    hints = dict(hints or {})
    if not callable(fn):
        problem = _Problem("wrong type", f"check_{name} needs the function itself, got {_type_name(fn)}")
        report = _report(name, None, None, problem, f"call it as check_{name}({name})")
        return _finish(CheckResult(name, False, report), quiet, strict)
    own = [f"{__name__}.{n}" for n in globals() if n.startswith("_reference")]
    forbidden = (*forbidden, *ALWAYS, *own)
    student, used = _guarded(fn, forbidden)
    for case in cases:
        expected = _expected(name, case, reference, normalise)
        lm = _lm(case.model)
        args, kwargs = case.make(lm)
        before = {k: v.clone() for k, v in lm.model.state_dict().items()}
        hooks, reuse = _hooks(lm), lm.reuse_prefix
        shown = f"{case.model}: {case.describe}"
        try:
            got = student(lm, *args, **kwargs)
        except NotImplementedError as err:
            text = _first_line(err) or "replace the `raise NotImplementedError` line with your code"
            report = _report(name, None, None, _Problem("not implemented yet", text), None)
            return _finish(CheckResult(name, False, report), quiet, strict)
        except Exception as err:  # noqa: BLE001 - the student's error is reported, not re-raised
            problem = _Problem(f"raised {type(err).__name__}", _first_line(err))
            report = _report(name, case, shown, problem, case.hint or hint)
            return _finish(CheckResult(name, False, report), quiet, strict)
        if used:
            problem = _Problem("uses course_lib's own answer", f"it called {used[0]}")
            report = _report(name, case, shown, problem, _own_answer_tip(name, forbidden))
            return _finish(CheckResult(name, False, report), quiet, strict)
        problem = _model_problem(lm, before, hooks, reuse)
        if problem is None:
            try:
                problem = judge(normalise(got, lm), expected)
            except _Wrong as wrong:
                problem = wrong.problem
        if problem is not None:
            tip = hints.get(problem.kind) or (case.hint if problem.kind == "wrong value" else None) or hint
            return _finish(CheckResult(name, False, _report(name, case, shown, problem, tip)), quiet, strict)
    n = len(cases)
    message = f"✓ {PASS_MARK}: {name}: agrees with {source} on {n} run{'s' if n != 1 else ''} on tiny models"
    return _finish(CheckResult(name, True, message), quiet, strict)


class _Wrong(Exception):
    """Raised by a normaliser or judge with the problem to report (a result of the wrong kind)."""

    def __init__(self, problem: _Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


# ---------------------------------------------------------------------------------------------
# Shared judgements
# ---------------------------------------------------------------------------------------------
def _tensor(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise _Wrong(_Problem("wrong type", f"{what}: expected a torch.Tensor, got {_type_name(x)}"))
    return x.detach().cpu()


def _offsets_of(soft: Any, what: str = "the soft prompt") -> torch.Tensor:
    offsets = getattr(soft, "offsets", None)
    if offsets is None:
        raise _Wrong(_Problem("wrong type", f"{what}: expected a course_lib.soft_prompts.SoftPrompt (something with "
                                            f".offsets), got {_type_name(soft)}"))
    return _tensor(offsets, f"{what}'s offsets")


def _losses_of(losses: Any, epochs: int) -> list[float]:
    if not isinstance(losses, (list, tuple)) or len(losses) != epochs:
        raise _Wrong(_Problem("wrong type", f"the losses: expected a list of {epochs} floats (one per epoch), got "
                                            f"{_describe(losses)}"))
    out = []
    for x in losses:
        if isinstance(x, torch.Tensor):
            raise _Wrong(_Problem("wrong type", "the losses: expected Python floats, got a tensor: call .item() on "
                                                "each batch's loss"))
        out.append(float(x))
    return out


def _offsets_where(got: torch.Tensor, expected: torch.Tensor, what: str) -> _Problem | None:
    """Shape, finiteness, and zeros where nothing can train an offset."""
    if tuple(got.shape) != tuple(expected.shape):
        return _Problem("wrong shape", f"{what}: expected shape {list(expected.shape)}, got {list(got.shape)}")
    if not bool(torch.isfinite(got).all()):
        return _Problem("wrong value", f"{what}: NaN or infinite values (a learning rate far too large, or a log "
                                       "of 0?)")
    stray = (expected == 0) & (got != 0)
    if bool(stray.any()):
        where = [int(i) for i in stray.nonzero()[0]]
        return _Problem("moved offsets that must stay zero",
                        f"{what}: {int(stray.sum())} entries are nonzero where nothing can train them (first at "
                        f"index {where}): positions outside a prompt, rows deeper than asked, a frozen read position")
    return None


def _offsets_close(got: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 2e-2) -> _Problem | None:
    diff = float((got.double() - expected.double()).norm())
    size = float(expected.double().norm())
    if diff > rel * size + 1e-6:
        return _Problem("wrong value", f"{what}: relative difference {diff / max(size, 1e-12):.3g} from the reference "
                                       f"(allowed {rel:g})", f"norm {size:.6g}", f"norm {float(got.norm()):.6g}")
    return None


def _judge_offsets(got: torch.Tensor, expected: torch.Tensor, what: str = "offsets",
                   rel: float = 2e-2) -> _Problem | None:
    return _offsets_where(got, expected, what) or _offsets_close(got, expected, what, rel)


def _loss_falls(got: list[float], expected: list[float]) -> _Problem | None:
    if not all(math.isfinite(x) for x in got):
        return _Problem("wrong value", f"the losses are not finite: {_describe(tuple(got))}")
    if not got[-1] < got[0]:
        return _Problem("the loss did not fall", f"first epoch {got[0]:.6g}, last {got[-1]:.6g}: is the optimiser "
                                                 "stepping, and on the prompt's offsets?",
                        _describe(tuple(expected)), _describe(tuple(got)))
    return None


def _losses_close(got: list[float], expected: list[float]) -> _Problem | None:
    if not all(math.isclose(g, e, rel_tol=1e-3, abs_tol=1e-5) for g, e in zip(got, expected)):
        return _Problem("wrong value", "the losses per epoch differ from the reference's",
                        _describe(tuple(expected)), _describe(tuple(got)))
    return None


def _judge_training(offsets: torch.Tensor, losses: list[float], expected_offsets: torch.Tensor,
                    expected_losses: list[float]) -> _Problem | None:
    """What matters first (the loss falls, nothing moved that cannot train), then the numbers."""
    return (_loss_falls(losses, expected_losses) or _offsets_where(offsets, expected_offsets, "offsets")
            or _losses_close(losses, expected_losses) or _offsets_close(offsets, expected_offsets, "offsets"))


def _gold(lm: ClozeLM, template: Template, facts: Sequence[Fact]) -> tuple[list[str], torch.Tensor]:
    pairs = [(f.subject, lm.answer_id(f.object, template)) for f in facts]
    pairs = [(s, g) for s, g in pairs if g is not None]
    return [s for s, _ in pairs], torch.tensor([g for _, g in pairs], dtype=torch.long)


FAMILIES = ("tiny-bert", "tiny-bart", "tiny-gpt2")


# ---------------------------------------------------------------------------------------------
# Chapter 1: asking by hand
# ---------------------------------------------------------------------------------------------
def _reference_score_by_hand(lm: ClozeLM, template: Template, facts: Sequence[Fact], batch_size: int) -> dict:
    from .evaluation import score_facts

    scored = score_facts(lm, [template], facts, batch_size=batch_size)
    return {"kept": scored.kept, "dropped": sum(scored.dropped.values()), **scored.metrics()}


def check_score_by_hand(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(lm, template, facts, batch_size) -> {"kept", "dropped", "p_at_1", "p_at_10", "mrr"}``."""
    facts = [*CAPITALS, MULTI_TOKEN]
    cases = [_RunCase(f"'{T_CAPITAL.text}', seven facts in batches of 3", m, lambda lm: ((T_CAPITAL, facts, 3), {}),
                      "The capital of [X] is [Y] ., six capitals and Kaliningrad (several tokens)")
             for m in FAMILIES]
    cases.append(_RunCase("every object several tokens: nothing kept", "tiny-gpt2",
                          lambda lm: ((T_CAPITAL, [MULTI_TOKEN, Fact("Spain", "Valladolid")], 4), {}),
                          "two facts whose objects are several tokens",
                          hint="with no fact kept, P@1, P@10 and MRR are NaN (your functions of 1.2 say so)"))

    def judge(got, expected):
        problem = _compare(expected, got, ())
        same_keys = isinstance(got, dict) and set(got) == set(expected)
        if problem is not None and problem.kind == "wrong type" and same_keys:
            problem.detail += " (kept and dropped are ints, the metrics Python floats)"
        return problem

    return _run_procedure("score_by_hand", fn, cases, _reference_score_by_hand, lambda out, lm: out, judge,
                          "course_lib.evaluation.score_facts",
                          "spell each object with lm.answer_id(object, template) and drop the None ones; build "
                          "batches with lm.build_batch, read lm.blank_logits, rank the gold ids, then P@1, P@10 and "
                          "MRR",
                          ("course_lib.evaluation", "course_lib.probing", "course_lib.experiments"),
                          quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 2: an ensemble by hand
# ---------------------------------------------------------------------------------------------
def _reference_ensemble(lm: ClozeLM, templates: Sequence[Template], subjects: Sequence[str],
                        log_weights: torch.Tensor) -> torch.Tensor:
    from .evaluation import _mixture_log_probs

    usable = [k for k, t in enumerate(templates) if lm.covers(t)]
    prompts = [lm.encode_prompt(t) for t in templates]
    lw = torch.log_softmax(log_weights.float()[usable], dim=0)
    if len(usable) == 1:  # the library ranks a single prompt by its logits: the same ranking, not log-probs
        batch = lm.build_batch([prompts[usable[0]]], list(subjects))
        with torch.no_grad():
            return lm.blank_log_probs(batch).cpu()
    return _mixture_log_probs(lm, prompts, usable, list(subjects), lw, None, False)[0]


def check_ensemble_log_probs(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(lm, templates, subjects, log_weights [K]) -> [B, V]``: log sum_k pi_k p_k(y | x), usable prompts only."""
    three = [T_CAPITAL, T_LONG, T_BLANK_FIRST]
    subjects = ["France", "Italy", "Japan"]
    cases = [
        _RunCase("three templates, weights not normalised", "tiny-bert",
                 lambda lm: ((three, subjects, torch.tensor([0.5, -1.0, 0.2])), {}),
                 "three capital templates, log_weights [0.5, -1, 0.2], subjects France, Italy, Japan"),
        _RunCase("a template the causal LM cannot answer ([Y] before [X]) is left out", "tiny-gpt2",
                 lambda lm: ((three, subjects, torch.tensor([0.5, -1.0, 0.2])), {}),
                 "the same three templates: the third has the blank before the subject",
                 hint="keep the templates with lm.covers(t), and renormalise their weights among themselves"),
        _RunCase("two templates, equal weights", "tiny-bart",
                 lambda lm: (([T_CAPITAL, T_LONG], subjects, torch.zeros(2)), {}), "two capital templates"),
        _RunCase("one usable template: the ensemble is that prompt", "tiny-gpt2",
                 lambda lm: (([T_BLANK_FIRST, T_CAPITAL], subjects, torch.tensor([3.0, -3.0])), {}),
                 "[Y] is the capital of [X] . (not usable) and The capital of [X] is [Y] .",
                 hint="a mixture of one prompt is that prompt's log-probabilities, whatever its weight was"),
    ]

    def normalise(out, lm):
        return _tensor(out, "the result")

    def judge(got, expected):
        return _compare(expected, got, (), rtol=1e-4, atol=1e-4)

    return _run_procedure("ensemble_log_probs", fn, cases, _reference_ensemble, normalise, judge,
                          "course_lib.evaluation's mixture of prompts",
                          "one batch per template with lm.build_batch, lm.blank_log_probs, stack to [B, K, V], then "
                          "your mixture_log_probs with the usable templates' weights",
                          ("course_lib.evaluation", "course_lib.probing", "course_lib.experiments",
                           "course_lib.mixture"),
                          hints={"wrong shape": "one row per subject and one column per vocabulary id: [B, V]"},
                          quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 3: the tuning loop
# ---------------------------------------------------------------------------------------------
def _training_case(model: str, label: str = "six capitals, batches of 4, 3 epochs", epochs: int = 3) -> _RunCase:
    def make(lm):
        subjects, gold = _gold(lm, T_CAPITAL, CAPITALS)
        return (T_CAPITAL, subjects, gold), {"lr": LR, "epochs": epochs, "batch_size": 4}

    return _RunCase(label, model, make, f"'{T_CAPITAL.text}', six capitals, lr {LR}, {epochs} epochs, batch_size 4")


def _reference_tune_soft_prompt(lm, template, subjects, gold, *, lr, epochs, batch_size):
    from .recipes import tune_soft_prompt

    return tune_soft_prompt(lm, template, subjects, gold, lr=lr, epochs=epochs, batch_size=batch_size)


def check_tune_soft_prompt(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(lm, template, subjects, gold, *, lr, epochs, batch_size) -> (soft_prompt, losses per epoch)``."""
    cases = [_training_case(m) for m in ("tiny-gpt2", "tiny-bert", "tiny-bart")]

    def normalise(out, lm):
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise _Wrong(_Problem("wrong type", f"expected a tuple (soft_prompt, losses), got {_type_name(out)}"))
        return _offsets_of(out[0]), _losses_of(out[1], 3)

    def judge(got, expected):
        return _judge_training(got[0], got[1], expected[0], expected[1])

    return _run_procedure("tune_soft_prompt", fn, cases, _reference_tune_soft_prompt, normalise, judge,
                          "course_lib.recipes.tune_soft_prompt",
                          "SoftPrompt(lm, [template]); Adam on its parameters; each epoch, the facts in order, batch "
                          "by batch: blank logits with soft.perturbation, your cloze loss, backward, step",
                          ("course_lib.training", "course_lib.experiments", "course_lib.recipes"),
                          quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 4: a random start
# ---------------------------------------------------------------------------------------------
def _reference_random_start(lm, templates, generator, depth=0):
    from .soft_prompts import SoftPrompt, init_random

    soft = SoftPrompt(lm, templates, depth)
    init_random(soft, lm, generator)
    return soft


def check_random_start(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(lm, templates, generator, depth=0) -> SoftPrompt`` whose input vectors are random draws."""
    cases = [
        _RunCase("two templates of different lengths", "tiny-gpt2",
                 lambda lm: (([T_CAPITAL, T_LONG], torch.Generator().manual_seed(80)), {"depth": 0}),
                 "a mixture of two capital templates (6 and 10 tokens), seed 80",
                 hint="draw prompt by prompt, in order, torch.randn(T_k, H, generator=generator) for prompt k's T_k "
                      "tokens; the rest of the [K, rows, T, H] offsets stays zero"),
        _RunCase("one template, depth 1 (the deeper row stays zero)", "tiny-bert",
                 lambda lm: (([T_CAPITAL], torch.Generator().manual_seed(81)), {"depth": 1}),
                 "The capital of [X] is [Y] ., depth 1, seed 81"),
        _RunCase("the longer template first", "tiny-bart",
                 lambda lm: (([T_LONG, T_CAPITAL], torch.Generator().manual_seed(82)), {"depth": 0}),
                 "two templates, the 10-token one first, seed 82"),
    ]

    def judge(got, expected):
        return _judge_offsets(got, expected, "offsets", rel=1e-4)

    return _run_procedure("random_start", fn, cases, _reference_random_start, lambda out, lm: _offsets_of(out), judge,
                          "course_lib.soft_prompts.init_random",
                          "the table's mean and std as the model reads it (lm.embedding_output, in chunks), then for "
                          "each prompt your random_offsets on its word vectors, into offsets[k, 0, :T_k]",
                          ("course_lib.soft_prompts.init_random", "course_lib.soft_prompts.embedding_stats",
                           "course_lib.training", "course_lib.experiments", "course_lib.recipes"),
                          quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 5: EM inside the tuning loop
# ---------------------------------------------------------------------------------------------
def _reference_tune_mixture(lm, templates, subjects, gold, *, lr, epochs, batch_size):
    from .recipes import tune_mixture

    return tune_mixture(lm, templates, subjects, gold, lr=lr, epochs=epochs, batch_size=batch_size)


def check_tune_mixture(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(lm, templates, subjects, gold, *, lr, epochs, batch_size) -> (soft, log_weights [K], losses)``."""
    def case(model):
        def make(lm):
            subjects, gold = _gold(lm, T_CAPITAL, CAPITALS)
            return ([T_CAPITAL, T_LONG], subjects, gold), {"lr": LR, "epochs": 3, "batch_size": 4}

        return _RunCase("two templates of different lengths, six capitals", model, make,
                        f"'{T_CAPITAL.text}' and '{T_LONG.text}', lr {LR}, 3 epochs, batch_size 4")

    cases = [case(m) for m in ("tiny-gpt2", "tiny-bart", "tiny-bert")]

    def normalise(out, lm):
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise _Wrong(_Problem("wrong type", "expected a tuple (soft, log_weights, losses), got "
                                                f"{_type_name(out)}"))
        return _offsets_of(out[0]), _tensor(out[1], "log_weights"), _losses_of(out[2], 3)

    def judge(got, expected):
        offsets, log_w, losses = got
        if tuple(log_w.shape) != tuple(expected[1].shape):
            return _Problem("wrong shape", f"log_weights: expected shape {list(expected[1].shape)}, got "
                                           f"{list(log_w.shape)}")
        total = float(torch.logsumexp(log_w.double(), 0).exp())
        if not math.isclose(total, 1.0, abs_tol=1e-5):
            return _Problem("weights do not sum to one", f"sum of exp(log_weights) = {total:.6g}: return log pi "
                                                         "of the M step (normalised)", "1", f"{total:.6g}")
        if not bool(torch.allclose(log_w.exp(), expected[1].exp(), atol=1e-4)):
            return _Problem("wrong value", "the mixture weights differ from the reference's (textbook EM; a floor of "
                                           "1e-8 is fine)", _describe(expected[1].exp()), _describe(log_w.exp()))
        return _judge_training(offsets, losses, expected[0], expected[2])

    return _run_procedure("tune_mixture", fn, cases, _reference_tune_mixture, normalise, judge,
                          "course_lib.recipes.tune_mixture (EM as training.tune schedules it)",
                          "per batch: G = gold log-probs under every prompt [B, K]; r = your responsibilities with G "
                          "detached; loss = -(r * G).sum(1).mean(); step. At each epoch's end: pi = mean of r",
                          ("course_lib.training", "course_lib.experiments", "course_lib.recipes",
                           "course_lib.mixture"),
                          quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 6: a deep run, in each layer's units, the read position left alone
# ---------------------------------------------------------------------------------------------
def _reference_tune_deep(lm, template, subjects, gold, *, depth, lr, epochs, batch_size, freeze_read):
    from .recipes import tune_deep

    return tune_deep(lm, template, subjects, gold, depth=depth, lr=lr, epochs=epochs, batch_size=batch_size,
                     freeze_read=freeze_read)


def check_tune_deep(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(lm, template, subjects, gold, *, depth, lr, epochs, batch_size, freeze_read)``.

    It returns (offsets [depth + 1, T, H], row_scale [depth + 1], the losses per epoch).
    """
    def case(model, depth, freeze, label):
        def make(lm):
            subjects, gold = _gold(lm, T_CAPITAL, CAPITALS)
            d = lm.n_layers if depth == "all" else depth
            return (T_CAPITAL, subjects, gold), {"depth": d, "lr": LR, "epochs": 3, "batch_size": 4,
                                                 "freeze_read": freeze}

        return _RunCase(label, model, make, f"'{T_CAPITAL.text}', six capitals, depth {depth}, freeze_read {freeze}, "
                                            f"lr {LR}, 3 epochs, batch_size 4")

    cases = [
        case("tiny-gpt2", "all", True, "every layer of a causal LM, the read position ('is') frozen"),
        case("tiny-bart", "all", True, "every layer of BART (encoder, then decoder), read position frozen"),
        case("tiny-gpt2", 1, False, "depth 1, the read position tuned (the ablation)"),
        case("tiny-bert", 1, True, "depth 1 of a masked LM (its read position is [MASK]: nothing to freeze)"),
    ]

    def normalise(out, lm):
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise _Wrong(_Problem("wrong type", "expected a tuple (offsets, row_scale, losses), got "
                                                f"{_type_name(out)}"))
        return _tensor(out[0], "offsets"), _tensor(out[1], "row_scale"), _losses_of(out[2], 3)

    def judge(got, expected):
        offsets, scale, losses = got
        if tuple(scale.shape) != tuple(expected[1].shape):
            return _Problem("wrong shape", f"row_scale: expected shape {list(expected[1].shape)} (one per row), got "
                                           f"{list(scale.shape)}")
        if not bool(torch.allclose(scale.double(), expected[1].double(), rtol=1e-3, atol=1e-6)):
            return _Problem("wrong value", "row_scale differs from the reference's: the median |coordinate| of the "
                                           "prompt tokens' vectors after each row, over row 0's", _describe(expected[1]),
                            _describe(scale))
        return _judge_training(offsets, losses, expected[0], expected[2])

    return _run_procedure("tune_deep", fn, cases, _reference_tune_deep, normalise, judge,
                          "course_lib.recipes.tune_deep",
                          "measure row_scale with forward hooks on lm.row_modules(i) (removed afterwards), then train "
                          "offsets [depth + 1, T, H] through your deep_delta (the Offsets class) with Adam",
                          ("course_lib.training", "course_lib.experiments", "course_lib.recipes",
                           "course_lib.soft_prompts"),
                          hints={"left a hook on the model": "remove every hook you register (handle.remove(), in a "
                                                             "finally block)"},
                          quiet=quiet, strict=strict)


# ---------------------------------------------------------------------------------------------
# Chapter 8: a control run, end to end
# ---------------------------------------------------------------------------------------------
TRAIN_CAPITALS = [Fact("Tuscany", "Florence"), Fact("Lazio", "Rome"), Fact("Bavaria", "Berlin"),
                  Fact("Kanto", "Tokyo"), Fact("Ile-de-France", "Paris"), Fact("Greater London", "London"),
                  Fact("Paris region", "Paris"), MULTI_TOKEN]


def _shuffle(seed: int) -> Callable[[Sequence[Fact]], list[Fact]]:
    def control(facts):
        from .recipes import shuffled_facts

        return shuffled_facts(facts, torch.Generator().manual_seed(seed))

    return control


def _identity(facts):
    return list(facts)


def _unanswerable(facts):
    return [Fact(f.subject, "Kaliningrad") for f in facts]


DEV_CAPITALS = [Fact("Aragon", "Madrid"), Fact("Brandenburg", "Berlin"), Fact("Latium", "Rome")]


def _reference_control_run(lm, template, train, dev, test, control, *, lr, epochs, batch_size):
    from .recipes import control_run

    return control_run(lm, template, train, dev, test, control, lr=lr, epochs=epochs, batch_size=batch_size)


def check_control_run(fn, *, quiet: bool = False, strict: bool | None = None) -> CheckResult:
    """``fn(lm, template, train, dev, test, control, *, lr, epochs, batch_size)``.

    It returns {"true", "control", "majority", "kept"}: two prompts' P@1, the majority answer's, kept facts.
    """
    kwargs = {"lr": LR, "epochs": 2, "batch_size": 4}
    facts = (T_CAPITAL, TRAIN_CAPITALS, DEV_CAPITALS, CAPITALS)
    cases = [
        _RunCase("shuffled objects as the control", "tiny-gpt2",
                 lambda lm: ((*facts, _shuffle(90)), dict(kwargs)),
                 "train: eight facts about regions (one object several tokens), dev: three, test: six capitals, "
                 "control: the objects shuffled (seed 90)",
                 hint="the control replaces what the prompt learns from: apply it to the training and the dev facts"),
        _RunCase("a control that changes nothing: both prompts the same", "tiny-bert",
                 lambda lm: ((*facts, _identity), dict(kwargs)),
                 "the same facts, control = the identity: 'true' and 'control' must agree",
                 hint="tune each prompt on its own facts, from zero offsets, with the same TuneConfig"),
        _RunCase("a control with nothing to train on", "tiny-bart",
                 lambda lm: ((*facts, _unanswerable), dict(kwargs)),
                 "every control object is Kaliningrad (several tokens): nothing to tune",
                 hint="training.tune raises NothingToTune when no fact has a single-token object: that side's P@1 "
                      "is NaN"),
    ]

    def judge(got, expected):
        return _compare(expected, got, (), rtol=1e-6, atol=1e-9)

    return _run_procedure("control_run", fn, cases, _reference_control_run, lambda out, lm: out, judge,
                          "course_lib.recipes.control_run",
                          "for the true and the control side: training.tune on its training and dev facts, then "
                          "evaluation.score_facts on the test facts; the majority answer of the true training "
                          "objects on the kept test facts",
                          ("course_lib.recipes.control_run",),
                          hints={"wrong type": "return {'true': float, 'control': float, 'majority': float, 'kept': "
                                               "float}"},
                          quiet=quiet, strict=strict)


__all__ = [f"check_{n}" for n in ("score_by_hand", "ensemble_log_probs", "tune_soft_prompt", "random_start",
                                   "tune_mixture", "tune_deep", "control_run")]
