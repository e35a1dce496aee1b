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
# Python: PYTHON, else the activated venv, else the checkout's .venv (`make install`), else
# python3 on PATH; torchrun is run as `$PYTHON -m torch.distributed.run`.
# SIGUSR1 or SIGTERM to this script (or to its process group) makes the trainer checkpoint at
# the end of its current step and exit; the script then exits 124 (every rank stopped cleanly
# after its preemption save; torchrun itself reports 1) and running the same command again
# resumes from there.
set -euo pipefail

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
PREEMPTED_EXIT=124  # megappo.trainer.PREEMPT_EXIT_CODE

# The interpreter, found the way the README installs it (no activated venv needed).
if [[ -z ${PYTHON:-} ]]; then
    for candidate in ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/python"} "$ROOT/.venv/bin/python"; do
        if [[ -x $candidate ]]; then PYTHON=$candidate; break; fi
    done
fi
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=$(command -v python3 || command -v python || true)
    [[ -n $PYTHON ]] || die "no Python found: run 'make install' in $ROOT (creates .venv), activate a venv, or set PYTHON"
fi

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
"$PYTHON" -c 'import torch.distributed.run' 2>/dev/null \
    || die "$PYTHON cannot import torch.distributed.run: run 'make install' in $ROOT, or set PYTHON to the venv's python"

# torchrun passes SIGUSR1 on to its workers (not by default) and waits this long for their save.
# PET_SIGNALS_TO_HANDLE is torchrun's --signals-to-handle (pytorch#160690, 2025 releases on; the
# launcher API reads TORCHELASTIC_SIGNALS_TO_HANDLE). Without it SIGUSR1 kills torchrun outright.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}

# Each worker runs under a small bash that records its exit status: after a preemption torchrun
# exits 1 whatever its workers did, so this script reads the statuses to report 124. The bash
# traps the signals only to outlive its trainer (a trap waits for the foreground command).
MEGAPPO_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/megappo-status.XXXXXX")
export MEGAPPO_STATUS_DIR
trap 'rm -rf "$MEGAPPO_STATUS_DIR"' EXIT
# shellcheck disable=SC2016  # expanded by the worker's bash
worker='trap : USR1 TERM INT HUP QUIT; "$@"; rc=$?; echo "$rc" >"$MEGAPPO_STATUS_DIR/rank$RANK"; exit "$rc"'
# shellcheck disable=SC2206  # TORCHRUN_ARGS: options, split on spaces
cmd=("$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" ${TORCHRUN_ARGS:-}
    --no-python bash -c "$worker" megappo-worker "$PYTHON" -m megappo.train --config "$recipe" "${overrides[@]}")
echo "+ torchrun --standalone --nnodes=1 --nproc-per-node=$NPROC ... -m megappo.train --config $recipe ${overrides[*]}" >&2

# torchrun runs in its own process group (job control), so a signal sent to this script's group
# reaches it once, forwarded from here, not twice (a second signal would cut its shutdown short).
set -m
"${cmd[@]}" &
TORCHRUN_PID=$!
set +m
forward() { kill -s "$1" "$TORCHRUN_PID" 2>/dev/null || true; }
for sig in USR1 TERM INT HUP QUIT; do
    # shellcheck disable=SC2064  # the signal name is fixed now
    trap "forward $sig" "$sig"
done
while :; do  # `wait` returns early (status > 128) when a trapped signal arrives
    rc=0
    wait "$TORCHRUN_PID" || rc=$?
    if ((rc > 128)) && kill -0 "$TORCHRUN_PID" 2>/dev/null; then continue; fi
    if ((rc > 128)); then
        again=0
        wait "$TORCHRUN_PID" 2>/dev/null || again=$?
        ((again == 127)) || rc=$again
    fi
    break
done
shopt -s nullglob
status_files=("$MEGAPPO_STATUS_DIR"/rank*)
statuses=$( ((${#status_files[@]})) && sort -u "${status_files[@]}" | tr '\n' ' ' || true)
if ((rc != 0 && ${#status_files[@]} == NPROC)) && [[ $statuses == "$PREEMPTED_EXIT " ]]; then
    echo "torchrun.sh: every rank checkpointed after the preemption signal and stopped: exit $PREEMPTED_EXIT (run the same command to resume)" >&2
    exit "$PREEMPTED_EXIT"
fi
exit "$rc"
