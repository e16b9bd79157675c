#!/usr/bin/env bash
# Installs the Debian packages the test suite needs beyond the venv (`make test` runs it first):
#   chromium  headless Chromium for tests/test_report_browser.py;
#   slurm     a single-node Slurm cluster for tests/test_slurm.py (Debian 12: Slurm 22.05): slurmctld,
#             slurmd, the client commands, munge, slurmdbd and MariaDB (so that `sacct` works, the
#             status command of snakemake-executor-plugin-slurm), and munge's key.
# Usage: install-test-deps.sh [chromium] [slurm]   (no argument: both).
# Idempotent: what is present is left alone; when everything is, nothing runs (no apt-get at all).
# Otherwise one `apt-get update` and one `apt-get install` of the missing packages, through sudo
# when not root. It only installs; .ci/slurm/start.sh starts the Slurm daemons, stop.sh stops them.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

groups=("$@")
[ "${#groups[@]}" -gt 0 ] || groups=(chromium slurm)

# binary -> Debian package that ships it
declare -A SLURM_PACKAGE_OF=(
    [slurmctld]=slurmctld
    [slurmd]=slurmd
    [sbatch]=slurm-client
    [srun]=slurm-client
    [squeue]=slurm-client
    [scontrol]=slurm-client
    [sacct]=slurm-client
    [sacctmgr]=slurm-client
    [munged]=munge
    [mungekey]=munge
    [slurmdbd]=slurmdbd
    [mariadbd]=mariadb-server
    [mariadb-install-db]=mariadb-server
    [mariadb]=mariadb-client
)

have() { command -v "$1" >/dev/null 2>&1; }

missing=()
want_slurm=0
for group in "${groups[@]}"; do
    case "$group" in
        chromium)  # the names tests/test_report_browser.py looks for
            have chromium || have chromium-browser || have google-chrome || missing+=(chromium)
            ;;
        slurm)
            want_slurm=1
            for binary in "${!SLURM_PACKAGE_OF[@]}"; do
                have "$binary" || missing+=("${SLURM_PACKAGE_OF[$binary]}")
            done
            ;;
        *)
            echo "install-test-deps: unknown group '$group' (known: chromium, slurm)" >&2
            exit 2
            ;;
    esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# munge's package creates the key; make sure it exists (a key is per cluster: ours is this machine)
ensure_munge_key() {
    if ! $SUDO test -s /etc/munge/munge.key; then
        echo "install-test-deps: creating /etc/munge/munge.key"
        $SUDO mungekey --create --keyfile=/etc/munge/munge.key
        $SUDO chown munge:munge /etc/munge/munge.key
        $SUDO chmod 0400 /etc/munge/munge.key
    fi
}

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-test-deps: ${groups[*]}: everything is present, nothing to install"
    if [ "$want_slurm" -eq 1 ]; then
        ensure_munge_key
    fi
    exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

if ! have apt-get; then
    echo "install-test-deps: missing ${packages[*]} (Debian package names) and there is no apt-get:" \
         "install them by hand" >&2
    exit 1
fi
if [ -n "$SUDO" ] && ! have sudo; then
    echo "install-test-deps: missing ${packages[*]}; not root and no sudo: install them as root" >&2
    exit 1
fi

# Package scripts must not start daemons (no init system in CI containers, and MariaDB's script
# would start a server on 3306): a policy-rc.d that denies every start, only while installing.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from pruneshot .ci/install-test-deps.sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=1
fi
cleanup() {
    if [ "$own_policy" -eq 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT

echo "install-test-deps: installing ${packages[*]}"
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
if [ "$want_slurm" -eq 1 ]; then
    ensure_munge_key
fi
