#!/usr/bin/env bash
# Installs what tests/test_slurm.py needs for its single-node Slurm cluster (Debian 12: Slurm 22.05):
# slurmctld, slurmd, the client commands, munge, slurmdbd and MariaDB (so that `sacct` works, the
# status command of snakemake-executor-plugin-slurm). Idempotent: a machine that already has every
# binary installs nothing. It only installs; .ci/slurm/start.sh starts the daemons, stop.sh stops them.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

# binary -> Debian package that ships it
declare -A PACKAGE_OF=(
    [slurmctld]=slurmctld
    [slurmd]=slurmd
    [sbatch]=slurm-client
    [sacct]=slurm-client
    [sacctmgr]=slurm-client
    [munged]=munge
    [slurmdbd]=slurmdbd
    [mariadbd]=mariadb-server
    [mariadb-install-db]=mariadb-server
    [mariadb]=mariadb-client
)

missing=()
for binary in "${!PACKAGE_OF[@]}"; do
    if ! command -v "$binary" >/dev/null 2>&1; then
        missing+=("${PACKAGE_OF[$binary]}")
    fi
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# munge's package creates the key; make sure it exists (a key is per cluster: ours is this machine)
ensure_munge_key() {
    if ! $SUDO test -s /etc/munge/munge.key; then
        $SUDO mungekey --create --keyfile=/etc/munge/munge.key
        $SUDO chown munge:munge /etc/munge/munge.key
        $SUDO chmod 0400 /etc/munge/munge.key
    fi
}

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-slurm: every Slurm binary is present, nothing to install"
    ensure_munge_key
    exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

# Package scripts must not start daemons (no init system in CI containers, and MariaDB's script
# would start a server on 3306): a policy-rc.d that denies every start, only while installing.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from pruneshot .ci/install-slurm.sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=1
fi
cleanup() { if [ "$own_policy" -eq 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install-slurm: installing ${packages[*]}"
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
ensure_munge_key
