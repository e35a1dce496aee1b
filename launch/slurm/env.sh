# shellcheck shell=bash
# Cluster and communication environment for megappo's Slurm jobs; sourced by
# launch/slurm/train.sbatch and launch/slurm/sglang_servers.sbatch on the batch node, and
# inherited by every srun step (srun exports the environment). Edit it for your cluster, or
# point MEGAPPO_SLURM_ENV at your own copy. Every default here yields to a value that is
# already set, so `NCCL_DEBUG=INFO sbatch ...` overrides it for one job.
#
# Values are the usual safe choices; "unset" means NCCL / gloo pick for themselves.

# --- Software environment -----------------------------------------------------------------
# The job inherits the environment sbatch was called from (sbatch --export=ALL, the default),
# so activating the virtual environment before `sbatch` is enough. Otherwise, name it here:
#   source /path/to/megappo/.venv/bin/activate
#   module load cuda/12.8
if [[ -n ${MEGAPPO_VENV:-} ]]; then
    # shellcheck disable=SC1091
    source "$MEGAPPO_VENV/bin/activate"
fi

# --- CPU threads ------------------------------------------------------------------------------
# Threads per training process for OpenMP / MKL (data loading, CPU-side math). torchrun sets 1
# when it is unset; with several processes per node, cores / processes is the useful maximum.
if [[ -z ${OMP_NUM_THREADS:-} && -n ${SLURM_CPUS_ON_NODE:-} && -n ${NPROC_PER_NODE:-} ]]; then
    OMP_NUM_THREADS=$(( SLURM_CPUS_ON_NODE / NPROC_PER_NODE > 0 ? SLURM_CPUS_ON_NODE / NPROC_PER_NODE : 1 ))
    export OMP_NUM_THREADS
fi

# --- Network interfaces ---------------------------------------------------------------------
# The interface for bootstrap / socket traffic. Unset: NCCL and gloo choose (NCCL skips lo and
# docker*). Set it when nodes have several NICs and the default route is not the fast one,
# e.g. "ib0", "bond0", or a prefix list "eth,en" (NCCL only; gloo takes one interface name).
#   export NCCL_SOCKET_IFNAME=ib0
#   export GLOO_SOCKET_IFNAME=ib0

# --- NCCL -----------------------------------------------------------------------------------
# WARN prints problems only; INFO prints the chosen transports and rings (set it for one job
# when debugging: `NCCL_DEBUG=INFO sbatch ...`).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Fail a hung collective instead of waiting forever, so the job ends and can be requeued.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# InfiniBand / RoCE: NCCL detects the HCAs; restrict them if some ports are down or belong to
# the storage network, and set the RoCE GID index if your fabric needs it:
#   export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3
#   export NCCL_IB_GID_INDEX=3
# No InfiniBand (Ethernet-only cluster): export NCCL_IB_DISABLE=1
# AWS EFA: export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1

# --- Python ---------------------------------------------------------------------------------
# Stack traces of all threads on a fatal signal or a hang dump; unbuffered logs per node.
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
