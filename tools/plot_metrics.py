"""Plot a run's metrics (its ``metrics.jsonl``) to a PNG: reward, held-out accuracy, KL,
clip fraction, entropy, gradient norm, value loss, response length and step time, those
the run logged, one panel each. Works on a finished run or one still training.

    python tools/plot_metrics.py runs/x                      # -> runs/x/metrics.png
    python tools/plot_metrics.py runs/x --keys reward/mean actor/kl_ref --out kl.png
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

try:
    import megappo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (train.run_dir), or a metrics.jsonl file")
    ap.add_argument("--keys", nargs="+", metavar="KEY", help="metric names to plot (default: the usual ones the run logged)")
    ap.add_argument("--out", default=None, help="PNG to write (default: RUN/metrics.png)")
    args = ap.parse_args(argv)

    from megappo.metrics import METRICS_FILE, load_metrics, plot_metrics

    run = Path(args.run)
    jsonl = run / METRICS_FILE if run.is_dir() else run
    if not jsonl.is_file():
        print(f"error: {run}: no {METRICS_FILE} (pass a run directory, train.run_dir, or its {METRICS_FILE})", file=sys.stderr)
        return 2
    records = load_metrics(jsonl)
    if not records:
        print(f"error: {jsonl}: no metric records yet", file=sys.stderr)
        return 2
    if args.keys:
        logged = sorted({k for r in records for k in r if k != "step"})
        unknown = [k for k in args.keys if k not in logged]
        if unknown:
            hints = [f"{k!r} (did you mean {', '.join(map(repr, close))}?)" if (close := difflib.get_close_matches(k, logged, n=2)) else repr(k)
                     for k in unknown]
            print(f"error: {jsonl} has no metric {', '.join(hints)}; it has: {', '.join(logged)}", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else jsonl.parent / "metrics.png"
    try:
        png = plot_metrics(jsonl, out, keys=args.keys)
    except OSError as e:  # an unwritable --out
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
