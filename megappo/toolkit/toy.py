"""A toy verifiable task for the CPU demo and the tests: small-integer arithmetic.

A prompt is an expression ending in ``=`` and the answer is its value in decimal, e.g.
``"23+45="`` -> ``"68"``. With the char tokenizer (``char_tokenizer``) a prompt is a
handful of tokens and the model answers with 1-3 digit tokens then ``<eos>``.

Kinds (``kind=``):
  add1   a+b, a and b in 0..9 (100 problems; learnable in seconds, a smoke test).
  add30  a+b, a and b in 0..30 (961 problems; answers of at most two digits).
  add2   a+b, a and b in 0..99 (10,000 problems).
  chain  a+b-c style chains of three digits with + and - (4,000 problems; answers -9..18).

Why ``add30``/``add2`` suit a 2-4 layer, 64-128 wide model on two CPU cores: the answer is a
deterministic function of four digit tokens that attention can copy from fixed offsets,
and the only non-local step is the carry from the ones digit into the tens. Small
transformers learn the digits that need no carry first and the carried ones later
(Lee et al. 2023, "Teaching Arithmetic to Small Transformers", arXiv 2307.03381), so a
short supervised warm-up (``toy_sft_pairs``) leaves a model that is right on part of the
problems and wrong on others: the mixed rewards within a group that GRPO/PPO need to
improve it. The exact-match reward leaves no room for reward hacking. Measured on ``add2`` (a plain
2-layer, 64-wide, 4-head pre-norm transformer; batches of 64 SFT pairs; AdamW at 3e-3;
one CPU thread; greedy exact match on 200 held-out problems): 20% after 300 steps,
60% after 600, 84% after 900, about a minute; on ``add30``: 26% after 150 steps, 54%
after 300. Such a warm-up is the "partially learned" starting point for RL.

Train and eval problems never overlap: a problem belongs to the eval split when the MD5 of
its prompt is 0 modulo 10 (about a tenth of each kind), independent of the seed.

The reward (``toy`` in ``megappo.data.rewards``, ``answers.exact_integer_reward``) is exact match of the response's text
before the first end-of-sequence marker, whitespace stripped, with the answer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path
from typing import Callable, Iterator, Literal, Union


Split = Literal["train", "eval"]
def _add(low: int, high: int) -> list[tuple[str, str]]:
    return [(f"{a}+{b}=", str(a + b)) for a in range(low, high + 1) for b in range(low, high + 1)]


def _chain() -> list[tuple[str, str]]:
    problems = []
    for a, b, c in itertools.product(range(10), repeat=3):
        for op1, op2 in itertools.product("+-", repeat=2):
            value = a + (b if op1 == "+" else -b)
            value = value + (c if op2 == "+" else -c)
            problems.append((f"{a}{op1}{b}{op2}{c}=", str(value)))
    return problems


TOY_TASKS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "add1": lambda: _add(0, 9),
    "add30": lambda: _add(0, 30),
    "add2": lambda: _add(0, 99),
    "add20": lambda: _add(0, 19),
    "chain": _chain,
}
"""Kind -> every (prompt, answer) problem of that kind, in a fixed order."""


def _in_eval_split(prompt: str) -> bool:
    return int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 10 == 0


def toy_problems(kind: str, split: Split = "train") -> list[tuple[str, str]]:
    """All problems of ``kind`` in ``split``, in a fixed order."""
    if kind not in TOY_TASKS:
        raise ValueError(f"unknown toy task kind {kind!r}; choose one of {sorted(TOY_TASKS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [p for p in TOY_TASKS[kind]() if _in_eval_split(p[0]) == (split == "eval")]


def _sample(kind: str, n: int, seed: int, split: Split) -> Iterator[tuple[str, str]]:
    # Shuffled passes over the split: no repeats until every problem has been drawn once.
    problems = toy_problems(kind, split)
    rng = random.Random(f"megappo-toy/{kind}/{split}/{seed}")
    drawn = 0
    while drawn < n:
        order = list(problems)
        rng.shuffle(order)
        for problem in order[: n - drawn]:
            yield problem
        drawn += min(len(order), n - drawn)


def make_toy_dataset(
    path: Union[str, Path], n: int, seed: int, kind: str = "add2", split: Split = "train"
) -> Path:
    """Write ``n`` problems as jsonl rows ``{"prompt": ..., "answer": ...}``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for prompt, answer in _sample(kind, n, seed, split):
            out.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    return path


def toy_sft_pairs(n: int, seed: int, kind: str = "add2", split: Split = "train") -> list[tuple[str, str]]:
    """``n`` (prompt, completion) pairs for the supervised warm-up; the trainer appends
    ``<eos>`` to the completion and trains on the completion tokens."""
    return list(_sample(kind, n, seed, split))
