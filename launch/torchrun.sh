#!/usr/bin/env bash
# megappo on one node: validate the recipe for this node's process count, then torchrun it.
#
#   launch/torchrun.sh RECIPE.yaml [section.key=value ...]            # one process per GPU
#   launch/torchrun.sh RECIPE.yaml --nproc 2 train.steps=3            # CPU: say how many
#   NPROC=8 launch/torchrun.sh RECIPE.yaml --dry-run                  # validate only, no torch
#
# Processes: --nproc N, else NPROC, else the GPU count (`nvidia-smi -L`). The resolved config is
# checked first (python -m megappo.train --dry-run --world-size N, seconds, no GPU needed);
# --dry-run stops there and prints it. Training uses torchrun's standalone c10d rendezvous.
# Extra torchrun options: TORCHRUN_ARGS (e.g. "--local-ranks-filter 0 --tee 3").
# SIGUSR1 or SIGTERM to this script (it becomes torchrun) makes the trainer checkpoint at the
# end of its current step and exit; running the same command again resumes from there.
set -euo pipefail

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python}

recipe=
dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --nproc) [[ $# -ge 2 ]] || die "--nproc needs a number"; NPROC=$2; shift ;;
        --nproc=*) NPROC=${1#--nproc=} ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (overrides look like section.key=value)" ;;
        *) if [[ -z $recipe ]]; then recipe=$1; else overrides+=("$1"); fi ;;
    esac
    shift
done
[[ -n $recipe ]] || { usage >&2; die "no recipe given"; }

if [[ -z ${NPROC:-} ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ ${NPROC:-0} -gt 0 ]] || die "no GPU found (nvidia-smi -L): pass --nproc N or set NPROC=N for CPU processes"
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "number of processes '$NPROC' is not a positive integer"

check=("$PYTHON" -m megappo.train --config "$recipe" --dry-run --world-size "$NPROC" "${overrides[@]}")
echo "+ ${check[*]}" >&2
if ((dry_run)); then
    exec "${check[@]}"
fi
"${check[@]}" >/dev/null

# torchrun passes SIGUSR1 on to its workers (not by default) and waits this long for their save.
# PET_SIGNALS_TO_HANDLE is torchrun's --signals-to-handle (pytorch#160690, 2025 releases on; the
# launcher API reads TORCHELASTIC_SIGNALS_TO_HANDLE). Without it SIGUSR1 kills torchrun outright.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
# shellcheck disable=SC2206  # TORCHRUN_ARGS: options, split on spaces
cmd=(torchrun --standalone --nnodes=1 --nproc-per-node="$NPROC" ${TORCHRUN_ARGS:-}
    -m megappo.train --config "$recipe" "${overrides[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
