"""Toy preference pairs for the reward-model demo and tests: the toy arithmetic task
(``megappo.toolkit.toy``) with the correct answer chosen and a wrong one rejected.

Rejected answers are the mistakes a small model makes on this task (``toy``'s docstring:
carries are learned last): off by one in the ones digit, a dropped or doubled carry (off by
ten), or another value of the same length. A reward model trained on these pairs scores a
response by whether it is the sum: the exact-match reward, learned from preferences.

Rows: ``{"prompt": "23+45=", "chosen": "68", "rejected": "58", "answer": "68"}``; the eval
split holds other problems than the train split (``toy``'s split by prompt hash).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Union

from megappo.toolkit.toy import Split, toy_problems


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer to a toy problem (never the right one)."""
    value = int(answer)
    kind = rng.random()
    if kind < 0.4:
        wrong = value + rng.choice([-1, 1])
    elif kind < 0.7:
        wrong = value + rng.choice([-10, 10])
    else:
        width = len(answer.lstrip("-"))
        wrong = rng.randrange(10 ** (width - 1) if width > 1 else 0, 10**width)
    if wrong == value or wrong < 0 <= value:
        wrong = value + 1
    return str(wrong)


def make_toy_preferences(path: Union[str, Path], n: int, seed: int, kind: str = "add20", split: Split = "train") -> Path:
    """Write ``n`` preference pairs (shuffled passes over the split's problems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    problems = toy_problems(kind, split)
    rng = random.Random(f"megappo-toy-preferences/{kind}/{split}/{seed}")
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            if i % len(problems) == 0:
                rng.shuffle(problems)
            prompt, answer = problems[i % len(problems)]
            row = {"prompt": prompt, "chosen": answer, "rejected": wrong_answer(answer, rng), "answer": answer}
            out.write(json.dumps(row) + "\n")
    return path


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m megappo.toolkit.toy_preferences", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo/data", help="directory of preferences_train.jsonl and preferences_eval.jsonl")
    ap.add_argument("--kind", default="add20", help="toy task kind (megappo.toolkit.toy)")
    ap.add_argument("--n", type=int, default=4096, help="training pairs")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out pairs")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    for split, n in (("train", args.n), ("eval", args.n_eval)):
        path = make_toy_preferences(Path(args.out) / f"preferences_{split}.jsonl", n, args.seed, args.kind, split)
        print(f"{path}: {n} pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
