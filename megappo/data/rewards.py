"""Rule-based reward functions: a registry, user functions, and the scorer the trainer calls.

Every reward function has one signature, ``fn(response, answer, prompt) -> bool | float``
(the decoded response without special tokens, the dataset's reference answer, the rendered
prompt text):

- a ``bool`` is a verdict, scored ``reward.correct_score`` or ``reward.incorrect_score``;
- a number is used as the score itself, and counts as correct when it is at least
  ``reward.correct_score`` (return a ``bool`` when accuracy matters).

``reward.format_reward`` is added when the response is well formed, i.e. states its
answer with the function's marker (``####`` then a number for ``gsm8k``, ``\\boxed{}`` for
``math_verify``, digits only for ``toy``). User functions have no marker; a non-zero
``format_reward`` is ignored for them, with a warning.

A function that raises or exceeds ``reward.timeout_s`` scores 0 (no format reward either),
is counted in ``RewardResult.num_errors`` / ``num_timeouts`` and logged. Failures are bounded:
a scoring batch in which more than ``reward.max_failed_fraction`` of the responses failed is
a failed batch, and ``reward.max_failed_batches`` failed batches in a row raise
``RewardFailureError``, which stops the run on every rank (a broken reward function would
otherwise train on zeros and exit 0). A scoring batch is one ``score`` call: a rollout
batch, a dynamic-sampling round or an evaluation batch. ``math_verify`` and
user functions run in a small pool of ``spawn`` worker processes (see ``reward_pool``) under
a per-batch deadline, ``reward.batch_timeout_s``, so hanging responses cost one deadline per
batch, not one timeout per worker round; ``gsm8k`` and ``toy`` are a few regular expressions
over the response and run in-process.

Registered (``reward.fn``):
  gsm8k        exact match of the final numbers (``answers.extract_gsm8k_*``).
  math_verify  ``math_verify.verify`` of the parsed reference and response (Hugging Face
               Math-Verify: boxed / LaTeX / plain expressions, equal up to sympy
               simplification and 6 decimal places).
  toy          exact match of an integer answer (``answers.exact_integer_reward``; the toy
               task of ``megappo.toolkit.toy`` and the CPU recipes use it).
  module:fn    a user function, imported from a module on ``sys.path`` or from a file
               (``path/to/rewards.py:fn``).

This module imports neither torch nor Megatron: spawned workers import it.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from megappo.data import answers
from megappo.data.reward_pool import Outcome, Preload, RewardWorkerPool, import_preload

logger = logging.getLogger(__name__)

Verdict = Union[bool, float]
RewardFn = Callable[[str, str, str], Verdict]


def gsm8k_reward(response: str, answer: str, prompt: str) -> bool:
    """GSM8K exact match of the final number (see ``answers``)."""
    reference = answers.extract_gsm8k_reference(answer)
    if reference is None:
        raise ValueError(f"no number in the reference answer {answer[-80:]!r}")
    return answers.extract_gsm8k_response(response) == reference


def _math_verify_gold(answer: str) -> str:
    # A bare reference ("\frac{1}{2}", "\sqrt{2}") is only found by Math-Verify's LaTeX
    # extractor inside math delimiters.
    return answer if ("\\boxed" in answer or "$" in answer) else f"${answer}$"


def math_verify_reward(response: str, answer: str, prompt: str) -> bool:
    """Math-Verify's equivalence of the reference and the response's final answer. Its own
    signal-based timeouts are off: the worker's timer bounds the whole call instead."""
    from math_verify import parse, verify

    gold = parse(_math_verify_gold(answer), parsing_timeout=None)
    if not gold:
        raise ValueError(f"math_verify cannot parse the reference answer {answer[-80:]!r}")
    predicted = parse(response, parsing_timeout=None)
    return bool(predicted) and bool(verify(gold, predicted, timeout_seconds=None))


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward function and how it is run."""

    fn: RewardFn
    """The function, ``fn(response, answer, prompt) -> bool | float``."""
    well_formed: Optional[Callable[[str], bool]] = None
    """Whether a response carries the answer marker (for ``reward.format_reward``); None: no marker."""
    in_workers: bool = True
    """Run in the worker pool under the timeout; False only for bounded regex-only functions."""
    module: Optional[Preload] = None
    """Where workers find ``fn`` (a module by name, or a file); None: ``fn.__module__``."""
    attribute: str = ""
    """``fn``'s name in ``module``; empty means ``fn.__name__``."""

    def reference(self) -> tuple[Preload, str]:
        """How a worker looks the function up: (module, attribute)."""
        return self.module or Preload(self.fn.__module__), self.attribute or self.fn.__name__
    preload: tuple[str, ...] = ()
    """Modules the workers import at start-up, outside any item's timeout."""


REWARDS: dict[str, RewardSpec] = {
    "gsm8k": RewardSpec(gsm8k_reward, answers.has_gsm8k_marker, in_workers=False),
    "math_verify": RewardSpec(math_verify_reward, answers.has_boxed, preload=("math_verify",)),
    "toy": RewardSpec(answers.exact_integer_reward, answers.is_single_integer, in_workers=False),
}


def register_reward(name: str, spec: RewardSpec) -> None:
    """Add a named reward function. One run in workers must be reachable there: a
    module-level function of an importable module (or give ``spec.module``/``attribute``)."""
    if name in REWARDS:
        raise ValueError(f"reward function {name!r} is already registered")
    if ":" in name:
        raise ValueError(f"reward names may not contain ':' (that form is a module:function path): {name!r}")
    REWARDS[name] = spec


def load_user_reward(path: str) -> RewardSpec:
    """A ``module:function`` or ``file.py:function`` reward, imported here once so that a
    typo fails at start-up; workers import the same module themselves."""
    module_part, sep, attribute = path.rpartition(":")
    if not sep or not module_part or not attribute:
        raise ValueError(f"reward.fn={path!r}: expected a registered name or 'module:function'")
    if module_part.endswith(".py"):
        file = os.path.abspath(module_part)
        if not os.path.isfile(file):
            raise ValueError(f"reward.fn={path!r}: no such file {file}")
        digest = hashlib.sha1(file.encode()).hexdigest()[:8]
        stem = os.path.splitext(os.path.basename(file))[0]
        module_ref = Preload(f"_megappo_user_reward_{stem}_{digest}", file)
    else:
        module_ref = Preload(module_part)
    try:
        module = import_preload(module_ref)
    except Exception as error:
        raise ValueError(f"reward.fn={path!r}: cannot import {module_part}: {type(error).__name__}: {error}") from error
    fn = getattr(module, attribute, None)
    if fn is None:
        names = [name for name in vars(module) if callable(getattr(module, name)) and not name.startswith("_")]
        hint = difflib.get_close_matches(attribute, names, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"reward.fn={path!r}: {module_part} has no attribute {attribute!r}{suggestion}")
    if not callable(fn):
        raise ValueError(f"reward.fn={path!r}: {attribute} is not callable")
    return RewardSpec(fn, None, in_workers=True, module=module_ref, attribute=attribute)


def resolve_reward(name: str) -> RewardSpec:
    """The spec of a registered name or a ``module:function`` path."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        return load_user_reward(name)
    hint = difflib.get_close_matches(name, REWARDS, n=1)
    suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(
        f"reward.fn={name!r} is not a registered reward function ({', '.join(sorted(REWARDS))}) "
        f"nor a 'module:function' path.{suggestion}"
    )


_WORKER_FUNCTIONS: dict[tuple[str, str], RewardFn] = {}


def call_reward(module: Preload, attribute: str, response: str, answer: str, prompt: str) -> Verdict:
    """Worker-side entry: look the function up by reference (no pickling of functions, so
    lambdas and callable objects in user modules work) and call it."""
    key = (module.name, attribute)
    fn = _WORKER_FUNCTIONS.get(key)
    if fn is None:
        fn = _WORKER_FUNCTIONS[key] = getattr(import_preload(module), attribute)
    value = fn(response, answer, prompt)
    if isinstance(value, bool):
        return value
    try:
        return float(value)  # send back a plain float, not whatever object the function made
    except (TypeError, ValueError):
        raise TypeError(f"returned {type(value).__name__}, expected bool or float") from None


class RewardFailureError(RuntimeError):
    """The reward function failed on too many responses (see the module docstring)."""


@dataclass(frozen=True)
class FailureBound:
    """When reward failures stop the run."""

    max_failed_fraction: float = 0.5
    """A batch with more than this fraction of failed responses is a failed batch; 1 disables the bound."""
    max_failed_batches: int = 2
    """Failed batches in a row that stop the run."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ValueError(f"reward.max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")
        if self.max_failed_batches < 1:
            raise ValueError(f"reward.max_failed_batches must be >= 1, got {self.max_failed_batches}")

    @property
    def enabled(self) -> bool:
        return self.max_failed_fraction < 1.0


@dataclass(frozen=True)
class RewardResult:
    """Scores of one batch, aligned with the responses."""

    scores: list[float]
    """The reward of each response."""
    correct: list[bool]
    """Whether each response was judged correct (False on error or timeout)."""
    num_errors: int
    """Responses whose reward function raised (scored 0)."""
    num_timeouts: int
    """Responses whose reward function exceeded ``reward.timeout_s`` (scored 0)."""
    well_formed: list[bool] = field(default_factory=list)
    """Whether each response carries the answer marker (all False without a marker)."""


class RewardFunction:
    """Scores responses with one reward function (see the module docstring). Each
    data-parallel rank owns one; its worker pool starts on first use and is reused."""

    def __init__(
        self,
        spec: RewardSpec,
        *,
        name: str = "",
        correct_score: float = 1.0,
        incorrect_score: float = 0.0,
        format_reward: float = 0.0,
        timeout_s: float = 10.0,
        num_workers: int = 2,
        kill_grace_s: Optional[float] = None,
        batch_timeout_s: float = 0.0,
        failure_bound: FailureBound = FailureBound(),
    ) -> None:
        self.spec = spec
        self.name = name or getattr(spec.fn, "__name__", "reward")
        self.correct_score = correct_score
        self.incorrect_score = incorrect_score
        self.format_reward = format_reward
        if format_reward and spec.well_formed is None:
            logger.warning("reward.format_reward=%g is ignored: reward %r has no answer marker", format_reward, self.name)
        self._pool: Optional[RewardWorkerPool] = None
        if spec.in_workers:
            self._pool = RewardWorkerPool(
                num_workers,
                timeout_s,
                kill_grace_s=kill_grace_s,
                preload=(*(Preload(module) for module in spec.preload), spec.reference()[0]),
                quiet_loggers=("math_verify",),
            )
        if batch_timeout_s < 0:
            raise ValueError(f"reward.batch_timeout_s must be >= 0 (0 disables), got {batch_timeout_s}")
        self.timeout_s = timeout_s
        self.batch_timeout_s = batch_timeout_s
        self.failure_bound = failure_bound
        self.failed_batches_in_a_row = 0
        self.total_errors = 0
        self.total_timeouts = 0

    @classmethod
    def from_config(cls, reward_cfg, **overrides) -> "RewardFunction":
        """Build from the ``reward`` config section (``megappo.config.schema.RewardConfig``)."""
        kwargs = dict(
            name=reward_cfg.fn,
            correct_score=reward_cfg.correct_score,
            incorrect_score=reward_cfg.incorrect_score,
            format_reward=reward_cfg.format_reward,
            timeout_s=reward_cfg.timeout_s,
            num_workers=reward_cfg.num_workers,
            batch_timeout_s=reward_cfg.batch_timeout_s,
            failure_bound=FailureBound(reward_cfg.max_failed_fraction, reward_cfg.max_failed_batches),
        )
        kwargs.update(overrides)
        return cls(resolve_reward(reward_cfg.fn), **kwargs)

    def score(self, responses: Sequence[str], answers: Sequence[str], prompts: Sequence[str]) -> RewardResult:
        if not len(responses) == len(answers) == len(prompts):
            raise ValueError(
                f"score() needs one answer and one prompt per response; got {len(responses)} responses, "
                f"{len(answers)} answers, {len(prompts)} prompts"
            )
        triples = list(zip(responses, answers, prompts))
        if self._pool is not None:
            module, attribute = self.spec.reference()
            outcomes = self._pool.run(
                call_reward, [(module, attribute, *triple) for triple in triples], deadline_s=self.batch_timeout_s or None
            )
        else:
            outcomes = [run_inline(self.spec.fn, triple) for triple in triples]
        return self._to_result(outcomes, responses)

    def _to_result(self, outcomes: list[Outcome], responses: Sequence[str]) -> RewardResult:
        scores, correct, well_formed = [], [], []
        failures: dict[str, list[str]] = {"error": [], "timeout": []}
        for outcome, response in zip(outcomes, responses):
            formed = self.spec.well_formed is not None and self.spec.well_formed(response)
            well_formed.append(formed)
            value, status, message = outcome.value, outcome.status, outcome.message
            if status == "ok":
                value, message = _as_score(value)
                status = "ok" if value is not None else "error"
            if status != "ok":
                failures[status].append(message)
                scores.append(0.0)
                correct.append(False)
                continue
            if isinstance(value, bool):
                score, is_correct = (self.correct_score if value else self.incorrect_score), value
            else:
                score, is_correct = float(value), value >= self.correct_score
            scores.append(score + (self.format_reward if formed else 0.0))
            correct.append(bool(is_correct))
        num_errors, num_timeouts = len(failures["error"]), len(failures["timeout"])
        self.total_errors += num_errors
        self.total_timeouts += num_timeouts
        for kind, messages in failures.items():
            if messages:
                logger.warning(
                    "reward %r: %d of %d responses %s and scored 0 (first: %s)",
                    self.name,
                    len(messages),
                    len(outcomes),
                    "raised" if kind == "error" else "timed out",
                    messages[0],
                )
        self._check_failures(len(outcomes), failures)
        return RewardResult(scores, correct, num_errors, num_timeouts, well_formed)

    def _check_failures(self, total: int, failures: dict[str, list[str]]) -> None:
        """Count a failed batch and raise ``RewardFailureError`` past the bound."""
        bound, failed = self.failure_bound, len(failures["error"]) + len(failures["timeout"])
        if not bound.enabled or total == 0:
            return
        if failed / total > bound.max_failed_fraction:
            self.failed_batches_in_a_row += 1
        else:
            self.failed_batches_in_a_row = 0
            return
        if self.failed_batches_in_a_row < bound.max_failed_batches:
            return
        first = "; ".join(f"first {kind}: {msgs[0]}" for kind, msgs in failures.items() if msgs)
        why = f"more than {bound.max_failed_fraction:g} of the responses failed in {self.failed_batches_in_a_row} batch(es) in a row"
        raise RewardFailureError(
            f"reward {self.name!r} failed on {failed} of {total} responses ({len(failures['error'])} raised, "
            f"{len(failures['timeout'])} timed out; {first}): {why}, so the run stops instead of training on zero "
            f"rewards. Fix the reward function, or loosen reward.max_failed_fraction / reward.max_failed_batches "
            f"(reward.timeout_s={self.timeout_s:g}, reward.batch_timeout_s={self.batch_timeout_s:g})"
        )

    def close(self) -> None:
        """Stop the worker pool (it restarts if ``score`` is called again)."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "RewardFunction":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_inline(fn: RewardFn, triple: tuple[str, str, str]) -> Outcome:
    """Run an in-process reward function, turning an exception into an ``error`` outcome."""
    try:
        return Outcome("ok", fn(*triple))
    except Exception as error:
        return Outcome("error", message=f"{type(error).__name__}: {error}")


def _as_score(value: object) -> tuple[Optional[Verdict], str]:
    """A verdict or a finite float from a function's return value, else (None, why)."""
    if isinstance(value, bool):
        return value, ""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, f"returned {type(value).__name__}, expected bool or float"
    if not math.isfinite(number):
        return None, f"returned {number}"
    return number, ""
