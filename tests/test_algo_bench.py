"""Smoke test of tools/bench_algo.py at tiny sizes: it runs, and prints the side-by-side
GAE ratio lines, the GAE + whitening lines (whitening within 1e-5 of float64) and the
outcome-advantage + policy-loss throughput line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_algo_prints_ratio_lines_at_tiny_sizes() -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "bench_algo.py"), "--batch", "8", "--lengths", "16", "40",
           "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    gae = re.findall(r"^GAE B=8 T=(\d+) .*speed-up +([\d.]+)x .*vectorized ([\d.e+-]+), fp32 loop", out, re.M)
    assert [t for t, _, _ in gae] == ["16", "40"], out
    for _, ratio, err in gae:
        assert float(ratio) > 0 and float(err) < 1e-4, out  # the vectorized GAE agrees with the float64 loop
    white = re.findall(r"^GAE \+ whitening B=8 T=(\d+): GAE +[\d.]+ ms \| whitening +[\d.]+ ms \(float64 passes +[\d.]+ ms\) "
                       r"\| together +[\d.]+ ms \| whitening/GAE +[\d.]+ \| max \|err\| vs float64 ([\d.e+-]+)$", out, re.M)
    assert [t for t, _ in white] == ["16", "40"], out
    assert all(float(err) < 1e-5 for _, err in white), out
    assert re.search(r"^outcome advantages \(LitePPO\) \+ policy loss B=8 T=16: .*M tokens/s\)$", out, re.M), out
