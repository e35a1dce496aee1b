#!/usr/bin/env bash
# Install the Slurm and munge packages that the launcher tests (tests/test_launch*.py) start
# as a one-node cluster on localhost. Idempotent: returns at once when they are installed.
# It only installs; the tests start and stop the daemons themselves (tests/slurm_cluster.py),
# with their state under a temporary directory. Debian/Ubuntu, as root (or passwordless sudo).
set -euo pipefail

need=(munged slurmctld slurmd sbatch scontrol sinfo srun scancel)
missing=()
for bin in "${need[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || missing+=("$bin")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "setup_slurm: slurm and munge already installed ($(/usr/sbin/slurmd -V 2>/dev/null || echo "version unknown"))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_slurm: missing ${missing[*]} and no apt-get here; install Slurm (slurmctld, slurmd," \
        "client tools) and munge with your package manager" >&2
    exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "setup_slurm: missing ${missing[*]}; installing needs root (or passwordless sudo)" >&2
        exit 1
    fi
fi

echo "setup_slurm: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
# The munge package creates its key in postinst; make sure one exists (the daemons share it).
if [[ ! -s /etc/munge/munge.key ]]; then
    "${sudo[@]}" sh -c 'dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none \
        && chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key'
fi
echo "setup_slurm: installed $(/usr/sbin/slurmd -V)"
