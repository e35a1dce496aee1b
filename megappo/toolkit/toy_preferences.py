"""Toy preference pairs for the reward-model demo and tests: the toy arithmetic task
(``megappo.toolkit.toy``) with the correct answer chosen and a wrong one rejected.

Rejected answers are the mistakes a small model makes on this task (``toy``'s docstring:
carries are learned last): off by one in the ones digit, a dropped or doubled carry (off by
ten), or another value of the same length. A reward model trained on these pairs scores a
response by whether it is the sum: the exact-match reward, learned from preferences.

Pair accuracy is not ranking accuracy: PPO drives the policy to the reward model's argmax.
Reward models trained on one hand-made mistake per problem reached 80-97% held-out pair
accuracy yet put the sum first among the candidate answers 0..38 on only 20-26% of problems,
and PPO with them as the only reward lowered held-out exact match (35% -> 9-15%).
``ranking_preferences`` pairs the sum with every wrong candidate of each training problem
(plus near misses and the policy's own mistakes), and ``ranking_accuracy`` measures the top-1
ranking that matters; ``megappo.demo_rlhf`` uses both (its reward model: 98% top-1 on the
training problems, 96% held out, measured on the 2-core machine).

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


def policy_samples(
    model_dir: Union[str, Path], problems: list[tuple[str, str]], *, samples: int, seed: int, max_new_tokens: int = 4,
) -> dict[str, list[str]]:
    """``samples`` responses per problem sampled (temperature 1) from the causal LM in
    ``model_dir``, as text without special tokens, keyed by prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out = {}
    for prompt, _ in problems:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                 num_return_sequences=samples, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out[prompt] = [t.strip() for t in tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)]
    return out


def sampled_preferences(
    model_dir: Union[str, Path], path: Union[str, Path], *, samples: int, seed: int, kind: str = "add20", split: Split = "train",
    max_new_tokens: int = 4,
) -> Path:
    """Pairs whose rejected side is the policy's own wrong answer: ``samples`` responses per
    problem sampled (temperature 1) from the causal LM in ``model_dir``; each wrong one is
    paired with the sum. A reward model trained only on hand-made mistakes is easy for the
    policy to exploit with answers it never saw; the policy's own mistakes are what RL
    explores (the usual RLHF practice of labelling the SFT model's samples)."""
    problems = toy_problems(kind, split)
    sampled = policy_samples(model_dir, problems, samples=samples, seed=seed, max_new_tokens=max_new_tokens)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for prompt, answer in problems:
            for text in sampled[prompt]:
                if text and text != answer:
                    out.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": text, "answer": answer}) + "\n")
    return path


def hard_negatives(answer: str) -> set[str]:
    """Wrong answers next to the right one: off by one or ten, digits swapped, a digit
    dropped or doubled."""
    value, out = int(answer), set()
    out |= {str(value + d) for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0}
    out |= {answer[::-1], answer[:-1], answer[1:], answer + answer[-1], answer[0] + answer}
    return {w.lstrip("0") or "0" for w in out if w} - {answer}


def ranking_preferences(
    path: Union[str, Path], problems: list[tuple[str, str]], *, seed: int, max_value: int = 38,
    extra: dict[str, list[str]] | None = None,
) -> Path:
    """Pairs that teach a reward model to put the sum first among every answer a policy
    may give: for each problem the sum against every other value 0..``max_value``, the hard
    negatives above and the ``extra`` wrong responses of that prompt (the policy's own
    samples), shuffled. Ranking, not only pair separation, is what PPO needs of a reward
    model: the policy moves to the reward model's argmax."""
    rows = []
    for prompt, answer in problems:
        wrong = {str(v) for v in range(max_value + 1)} | hard_negatives(answer) | set((extra or {}).get(prompt, ()))
        rows += [{"prompt": prompt, "chosen": answer, "rejected": w, "answer": answer} for w in sorted(wrong) if w and w != answer]
    random.Random(f"megappo-toy-ranking/{seed}").shuffle(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ranking_accuracy(rm_dir: Union[str, Path], candidates: dict[str, tuple[str, list[str]]], *, batch: int = 512) -> float:
    """Fraction of prompts whose right answer the HF reward model in ``rm_dir`` scores above
    every other candidate (``candidates``: prompt -> (answer, responses)); each response is
    scored as the RL loop presents it: prompt with the tokenizer's special tokens, response,
    EOS."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    rows = [(p, r) for p, (a, rs) in candidates.items() for r in dict.fromkeys([a, *rs])]
    seqs = [tok(p)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p, r in rows]
    scores = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    best: dict[str, tuple[float, str]] = {}
    for (p, r), s in zip(rows, scores):
        if p not in best or s > best[p][0]:
            best[p] = (s, r)
    return sum(best[p][1] == a for p, (a, _) in candidates.items()) / max(len(candidates), 1)


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
