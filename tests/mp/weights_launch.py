"""One process group, many phases: the multi-rank tests of megappo.weights, the training
checkpoints and the conversion tools share three launches (a Megatron import costs ~6 s
per process and a 2-rank torchrun start 11-21 s on the CI box):

  A  torchrun x2   tp2 (TP=2, every family; saves a TP=2 Megatron checkpoint), tools_tp2 (the
                   HF -> Megatron tool at TP=2), ckpt_train (TP=1 DP=2; ends by SIGKILLing
                   itself mid-save, so the launch fails by design)
  B  torchrun x2   pp2 (PP=2, every family; loads A's TP=2 checkpoint), vpp2 (PP=2 x VPP=2)
  C  python        world1 (every family), ckpt_resume (DP=1 from A's DP=2 checkpoint), tools

Between phases the same processes get new Megatron groups (re-creating the gloo world
group is not possible). Each phase writes OUT/{phase}-rank{r}.json.

Test side: ``results()`` runs the launches once per pytest session and returns a reader.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

CRITIC_KEYS = ("qwen2-tied", "llama-untied")
PHASES = {
    "world1": dict(tp=1, pp=1, critic_keys=CRITIC_KEYS),
    "tp2": dict(tp=2, pp=1, critic_keys=CRITIC_KEYS, save_mcore="qwen3-tied", compare=("qwen2-untied", False)),
    "pp2": dict(tp=1, pp=2, critic_keys=CRITIC_KEYS, load_mcore="qwen3-tied", compare=("qwen3-tied", True)),
    "vpp2": dict(tp=1, pp=2, vpp=2, keys=["llama-tied", "qwen2-untied"]),
    "ckpt_train": None,
    "ckpt_resume": None,
    "tools": None,
    "tools_tp2": None,
}
LAUNCHES = (("A", 2, ("tp2", "tools_tp2", "ckpt_train")), ("B", 2, ("pp2", "vpp2")), ("C", 1, ("world1", "ckpt_resume", "tools")))


def _regroup() -> None:
    """Drop Megatron's groups (not the process group) so the next phase picks its layout."""
    from megatron.core import parallel_state as mpu

    from megappo.parallel import state

    if state._LAYOUT is not None:
        mpu.destroy_model_parallel()
        state._LAYOUT = None


def run_phases(ctx, phases, out_dir) -> None:
    from weights_ckpt_resume import phase_resume, phase_train
    from weights_parallel import layout_phase
    from weights_tools import phase_tools, phase_tools_tp2

    import torch.distributed as dist

    special = {"ckpt_train": phase_train, "ckpt_resume": phase_resume, "tools": phase_tools, "tools_tp2": phase_tools_tp2}
    for name in phases:
        res: dict = {}

        def write(name=name, res=res):
            rank = dist.get_rank() if dist.is_initialized() else 0
            with open(os.path.join(out_dir, f"{name}-rank{rank}.json"), "w") as f:
                json.dump(res, f, default=str)

        from megappo.parallel import state

        if PHASES[name] is not None:
            kw = PHASES[name]
            if state._LAYOUT is not None and (state._LAYOUT.tp, state._LAYOUT.pp, state._LAYOUT.vpp) != (kw["tp"], kw["pp"], kw.get("vpp")):
                _regroup()
            layout_phase(ctx, res, **kw)
        else:
            if state._LAYOUT is not None and (state._LAYOUT.tp, state._LAYOUT.pp, state._LAYOUT.vpp) != (1, 1, None):
                _regroup()
            special[name](ctx, res, write)
        write()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", required=True, help="JSON {key: hf_dir}")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("phases", nargs="+", choices=list(PHASES))
    args = ap.parse_args()
    ctx = SimpleNamespace(zoo=json.loads(args.zoo), work=args.work, ckpt_dir=os.path.join(args.work, "train-ckpt"))
    run_phases(ctx, args.phases, args.out)


# ---- test side ---------------------------------------------------------------------------

_RESULTS: dict = {}


def results():
    """Run the three launches once per test session; return ``read(phase) -> [per-rank dicts]``
    and the work directory. Launch A must die of the SIGKILL its last phase sends."""
    if not _RESULTS:
        import atexit
        import shutil
        import tempfile

        from hf_fixtures import model_zoo, run_mp

        root = Path(tempfile.mkdtemp(prefix="megappo-weights-"))
        atexit.register(shutil.rmtree, root, True)
        work, out = root / "work", root / "out"
        work.mkdir()
        out.mkdir()
        zoo = json.dumps({k: str(v) for k, v in model_zoo().items()})
        launch_errors = {}
        for name, nproc, phases in LAUNCHES:
            try:
                run_mp(Path(__file__), nproc, ["--zoo", zoo, "--work", str(work), "--out", str(out), *phases], timeout=600)
                launch_errors[name] = None
            except AssertionError as e:
                launch_errors[name] = str(e)
        _RESULTS.update(work=work, out=out, launch_errors=launch_errors)
    out = _RESULTS["out"]

    def read(phase: str) -> list[dict]:
        files = sorted(out.glob(f"{phase}-rank*.json"))
        if not files:
            errors = {k: (v or "")[-3000:] for k, v in _RESULTS["launch_errors"].items() if v}
            raise AssertionError(f"phase {phase} wrote no results; launch errors: {errors}")
        return [json.loads(f.read_text()) for f in files]

    return SimpleNamespace(read=read, work=_RESULTS["work"], launch_errors=_RESULTS["launch_errors"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
