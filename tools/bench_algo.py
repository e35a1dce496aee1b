"""Benchmark megappo.algo on CPU: vectorized GAE vs the per-time-step loop, GAE plus the
masked whitening after it (what a PPO step pays; against whitening with float64 passes,
the previous implementation), and the throughput of outcome advantages + PPO policy loss
(forward and backward).

Shape legend: B = responses, T = response tokens.

    python tools/bench_algo.py            # B=512, T=4096 and 16384
    python tools/bench_algo.py --quick    # B=64, T=512 and 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import megappo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megappo.algo import (
    broadcast_to_tokens,
    compute_gae,
    masked_whiten,
    moment_sums,
    moments_from_sums,
    outcome_advantages,
    policy_loss,
)


def float64_whiten(x_BT, mask_BT):
    """Masked whitening with float64 passes over [B, T] (megappo's implementation before
    issue 15): the precision reference, and the time to beat."""
    x64, m64 = x_BT.double(), mask_BT.double()
    sums = torch.stack([m64.sum(), (x64 * m64).sum(), (x64 * x64 * m64).sum()])
    mean, var = moments_from_sums(sums)
    return ((x64 - mean) * torch.rsqrt(var + 1e-8) * m64).to(x_BT.dtype), sums


def loop_gae(rewards_BT, values_BT, mask_BT, gamma, lambd):
    """GAE as most peers write it: a Python loop over reversed(range(T)) on [B] columns."""
    values_BT = values_BT * mask_BT
    rewards_BT = rewards_BT * mask_BT
    T = rewards_BT.shape[1]
    last_B = torch.zeros_like(rewards_BT[:, 0])
    reversed_cols = []
    for t in reversed(range(T)):
        next_values_B = values_BT[:, t + 1] if t < T - 1 else 0.0
        delta_B = rewards_BT[:, t] + gamma * next_values_B - values_BT[:, t]
        last_B = delta_B + gamma * lambd * last_B
        reversed_cols.append(last_B)
    adv_BT = torch.stack(reversed_cols[::-1], dim=1) * mask_BT
    return adv_BT, adv_BT + values_BT


def timed(*fns, repeats):
    """Median seconds of each function; runs are interleaved so that a machine shared with
    other jobs slows every contender alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def make_batch(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths_B = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask_BT = (torch.arange(T)[None, :] < lengths_B[:, None]).float()
    rewards_BT = torch.zeros(B, T)
    rewards_BT[torch.arange(B), lengths_B - 1] = torch.randint(0, 2, (B,), generator=g).float()
    rewards_BT -= 0.001 * torch.rand(B, T, generator=g)  # a KL-like dense term
    values_BT = torch.randn(B, T, generator=g) * 0.1
    return rewards_BT, values_BT, mask_BT


def bench_gae(B, T, gamma, lambd, repeats):
    rewards_BT, values_BT, mask_BT = make_batch(B, T)
    t_loop, t_vec = timed(
        lambda: loop_gae(rewards_BT, values_BT, mask_BT, gamma, lambd),
        lambda: compute_gae(rewards_BT, values_BT, mask_BT, gamma, lambd),
        repeats=repeats,
    )
    ref_adv, _ = loop_gae(rewards_BT.double(), values_BT.double(), mask_BT.double(), gamma, lambd)
    vec_adv, _ = compute_gae(rewards_BT, values_BT, mask_BT, gamma, lambd)
    loop_adv, _ = loop_gae(rewards_BT, values_BT, mask_BT, gamma, lambd)
    err_vec = (vec_adv.double() - ref_adv).abs().max().item()
    err_loop = (loop_adv.double() - ref_adv).abs().max().item()
    print(
        f"GAE B={B} T={T} gamma={gamma} lambd={lambd}: loop {t_loop * 1e3:9.1f} ms | "
        f"vectorized {t_vec * 1e3:8.1f} ms | speed-up {t_loop / t_vec:6.1f}x | "
        f"max |err| vs float64 loop: vectorized {err_vec:.2e}, fp32 loop {err_loop:.2e}"
    )


def bench_gae_whiten(B, T, gamma, lambd, repeats):
    """GAE then masked whitening of the advantages (PPO's default), timed apart and together."""
    rewards_BT, values_BT, mask_BT = make_batch(B, T)
    adv_BT, _ = compute_gae(rewards_BT, values_BT, mask_BT, gamma, lambd)

    def whiten():
        return masked_whiten(adv_BT, mask_BT, sums=moment_sums(adv_BT, mask_BT))

    def both():
        a_BT, _ = compute_gae(rewards_BT, values_BT, mask_BT, gamma, lambd)
        return masked_whiten(a_BT, mask_BT, sums=moment_sums(a_BT, mask_BT))

    t_gae, t_white, t_white64, t_both = timed(
        lambda: compute_gae(rewards_BT, values_BT, mask_BT, gamma, lambd),
        whiten,
        lambda: float64_whiten(adv_BT, mask_BT),
        both,
        repeats=repeats,
    )
    ref_BT, _ = float64_whiten(adv_BT.double(), mask_BT.double())
    err = (whiten().double() - ref_BT).abs().max().item()
    print(
        f"GAE + whitening B={B} T={T}: GAE {t_gae * 1e3:8.1f} ms | whitening {t_white * 1e3:8.1f} ms "
        f"(float64 passes {t_white64 * 1e3:8.1f} ms) | together {t_both * 1e3:8.1f} ms | "
        f"whitening/GAE {t_white / t_gae:5.2f} | max |err| vs float64 {err:.2e}"
    )


def bench_outcome_and_policy(B, T, group_size, repeats):
    g = torch.Generator().manual_seed(1)
    _, _, mask_BT = make_batch(B, T)
    scores_B = torch.randint(0, 2, (B,), generator=g).float()
    group_ids_B = torch.arange(B) // group_size
    old_BT = -torch.rand(B, T, generator=g) * 2
    logprobs_BT = (old_BT + 0.05 * torch.randn(B, T, generator=g)).requires_grad_(True)
    num_tokens = mask_BT.sum()

    def step():
        adv_BT = broadcast_to_tokens(outcome_advantages(scores_B, group_ids_B, "group", "batch"), mask_BT)
        loss, _ = policy_loss(logprobs_BT, old_BT, adv_BT, mask_BT, clip_low=0.2, clip_high=0.28,
                              dual_clip_c=3.0, num_tokens=num_tokens)
        loss.backward()
        logprobs_BT.grad = None

    def forward_only():
        with torch.no_grad():
            adv_BT = broadcast_to_tokens(outcome_advantages(scores_B, group_ids_B, "group", "batch"), mask_BT)
            policy_loss(logprobs_BT, old_BT, adv_BT, mask_BT, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0,
                        num_tokens=num_tokens)

    t_fwd, t_step = timed(forward_only, step, repeats=repeats)
    n = B * T
    print(
        f"outcome advantages (LitePPO) + policy loss B={B} T={T}: forward {t_fwd * 1e3:.1f} ms "
        f"({n / t_fwd / 1e6:.1f} M tokens/s) | forward+backward {t_step * 1e3:.1f} ms "
        f"({n / t_step / 1e6:.1f} M tokens/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (B=64, T=512 and 2048)")
    parser.add_argument("--batch", type=int, default=None, help="B (default 512, or 64 with --quick)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="T values for the GAE benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lambd", type=float, default=0.95)
    args = parser.parse_args()
    B = args.batch or (64 if args.quick else 512)
    lengths = args.lengths or ([512, 2048] if args.quick else [4096, 16384])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32, load average {load}")
    for T in lengths:
        bench_gae(B, T, args.gamma, args.lambd, args.repeats)
    for T in lengths:
        bench_gae_whiten(B, T, args.gamma, args.lambd, args.repeats)
    bench_outcome_and_policy(B, lengths[0], group_size=8, repeats=args.repeats)


if __name__ == "__main__":
    main()
