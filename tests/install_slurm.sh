#!/usr/bin/env bash
# SLURM and munge for tests/distributed/test_slurm.py (a private cluster on this machine, tests/slurm_cluster.py).
# Idempotent: installs only what is missing, and only as root with apt; otherwise says so and exits 0 (the test
# then skips). slurm-wlm is a metapackage over exactly these; --no-install-recommends keeps it to 8 small packages.
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(slurmctld slurmd sbatch munged)

missing=()
for bin in "${BINARIES[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_slurm: already installed ($(PATH=$PATH:/usr/sbin slurmctld -V 2>/dev/null))"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: missing ${missing[*]}; not root or no apt-get, not installing (the SLURM test skips)"
    exit 0
fi

# The packages' postinst scripts would start the system munged/slurmctld/slurmd; the tests run their own.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; }
start=$SECONDS
if ! install >/dev/null 2>&1; then  # stale or absent package lists: refresh them once
    echo "install_slurm: apt-get update"
    apt-get update -q >/dev/null
    install >/dev/null
fi
echo "install_slurm: installed ${PACKAGES[*]} in $((SECONDS - start)) s ($(/usr/sbin/slurmctld -V))"
