#!/usr/bin/env bash
# Starts a single-node Slurm cluster on 127.0.0.1 for tests/test_slurm.py: munged, MariaDB, slurmdbd,
# slurmctld and slurmd, with fake GPUs as gres. Installs nothing (.ci/install-slurm.sh does) and needs
# root. No init system is used: every daemon runs in the foreground of its own session, and its PID is
# appended to $STATE_DIR/daemons.pids ("name pid" per line) the moment it is started, so that
# .ci/slurm/stop.sh (or the test's teardown) can stop exactly those processes, also after a failed start.
#
#   .ci/slurm/start.sh STATE_DIR
#
# STATE_DIR must exist and be empty; it receives every piece of state (spool, database, sockets, logs,
# fake GPU devices). Settings (environment): SLURM_PARTITION (default pruneshot), SLURM_ACCOUNT
# (pruneshot_ci), FAKE_GPUS (2), DB_PORT (3316, the private MariaDB's port on 127.0.0.1), WAIT_S (0:
# seconds to wait for another test cluster on this machine to stop, instead of failing at once).
# The Slurm configuration goes to /etc/slurm (the only path the job step's nested srun reads); a
# configuration there that this script did not write is never overwritten.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE_DIR=${1:?usage: start.sh STATE_DIR}
PARTITION=${SLURM_PARTITION:-pruneshot}
ACCOUNT=${SLURM_ACCOUNT:-pruneshot_ci}
GPUS=${FAKE_GPUS:-2}
DB_PORT=${DB_PORT:-3316}
CLUSTER=pruneshot
MARKER="written by pruneshot .ci/slurm/start.sh"
CONF_DIR=/etc/slurm
export PATH="$PATH:/usr/sbin:/sbin"

T0=$(date +%s.%N)
say() { printf '[slurm start %5.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{print a-b}')" "$*"; }
die() { echo "[slurm start] ERROR: $*" >&2; exit 1; }
# poll until a command succeeds: until_ok SECONDS WHAT COMMAND...
until_ok() {
    local limit=$1 what=$2; shift 2
    local end=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || die "$what not ready after ${limit}s (logs in $STATE_DIR/log)"
        sleep 0.2
    done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# launch NAME COMMAND...: run a daemon in the foreground of a new session, record its PID at once
# (setsid and setpriv exec the daemon, so $! is the daemon itself; tracked() checks that once it is up)
launch() {
    local name=$1; shift
    setsid "$@" </dev/null >>"$STATE_DIR/log/$name.out" 2>&1 &
    echo "$name $!" >>"$STATE_DIR/daemons.pids"
}
tracked() {
    local pid
    pid=$(awk -v n="$1" '$1 == n {print $2}' "$STATE_DIR/daemons.pids")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || die "recorded PID $pid is not $1: cannot stop it by PID"
}
fill() { # fill TEMPLATE DEST: substitute the @KEY@ placeholders
    sed -e "s|@MARKER@|$MARKER|" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" \
        -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" -e "s|@CPUS@|$CPUS|g" \
        -e "s|@MEMORY_MB@|$MEMORY_MB|g" -e "s|@GPUS@|$GPUS|g" -e "s|@LAST_GPU@|$(( GPUS - 1 ))|g" \
        -e "s|@PARTITION@|$PARTITION|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASSWORD@|$DB_PASSWORD|g" \
        "$1" >"$2"
}

# ------------------------------------------------------------------ preconditions
[ "$(id -u)" -eq 0 ] || die "run as root (the daemons run as root, MariaDB as mysql, munged as munge)"
for binary in munged munge unmunge mariadbd mariadb-install-db mariadb mariadb-admin slurmdbd slurmctld slurmd \
              sbatch srun squeue sinfo sacct sacctmgr scontrol setpriv; do
    command -v "$binary" >/dev/null 2>&1 || die "$binary is missing: run .ci/install-slurm.sh first"
done
[ -d "$STATE_DIR" ] || die "$STATE_DIR does not exist"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
[ -z "$(ls -A "$STATE_DIR")" ] || die "$STATE_DIR is not empty"
[ "$GPUS" -ge 1 ] || die "FAKE_GPUS must be at least 1"
: >"$STATE_DIR/daemons.pids"

# ------------------------------------------------------------------ claim /etc/slurm
# One test cluster per machine: slurm.conf, created exclusively (noclobber), is the claim; it names the
# state directory of the cluster that owns it. A claim whose cluster is gone is stale and is taken over.
claim_owner() { sed -n 's|^StateSaveLocation=\(.*\)/slurmctld$|\1|p' "$CONF_DIR/slurm.conf" 2>/dev/null; }
owner_active() { # the owning cluster still runs (or is still starting)
    local owner=$1 name pid
    [ -d "$owner" ] || return 1
    if [ ! -s "$owner/daemons.pids" ]; then  # starting: give it a minute to launch its first daemon
        [ $(( $(date +%s) - $(stat -c %Y "$CONF_DIR/slurm.conf" 2>/dev/null || echo 0) )) -lt 60 ]
        return
    fi
    while read -r name pid; do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && return 0
    done <"$owner/daemons.pids"
    return 1
}
mkdir -p "$CONF_DIR"
wait_end=$(( $(date +%s) + ${WAIT_S:-0} ))
until (set -o noclobber; printf '# %s\n# claimed, starting\nStateSaveLocation=%s/slurmctld\n' "$MARKER" \
        "$STATE_DIR" >"$CONF_DIR/slurm.conf") 2>/dev/null; do
    grep -q "$MARKER" "$CONF_DIR/slurm.conf" 2>/dev/null ||
        die "$CONF_DIR/slurm.conf exists and was not written by this script; not overwriting a real cluster's setup"
    owner=$(claim_owner)
    if owner_active "$owner"; then
        [ "$(date +%s)" -lt "$wait_end" ] || die "another test cluster runs on this machine (state $owner)"
        sleep 5
    else
        echo "[slurm start] taking over the stale claim of $owner"
        rm -f "$CONF_DIR/slurm.conf"
    fi
done
for conf in gres.conf cgroup.conf slurmdbd.conf; do
    if [ -e "$CONF_DIR/$conf" ] && ! grep -q "$MARKER" "$CONF_DIR/$conf"; then
        die "$CONF_DIR/$conf exists and was not written by this script; not overwriting a real cluster's setup"
    fi
done
for port in 6817 6818 6819 "$DB_PORT"; do
    ! port_open "$port" || die "127.0.0.1:$port is in use by a process that is not a pruneshot test cluster"
done

chmod 0755 "$STATE_DIR"
mkdir -p "$STATE_DIR"/{log,slurmctld,slurmd,fakegpu}
install -d -o munge -g munge -m 0755 "$STATE_DIR/munge"
install -d -o mysql -g mysql -m 0750 "$STATE_DIR/mysql"
setpriv --reuid=munge --regid=munge --init-groups test -x "$STATE_DIR/munge" ||
    die "$STATE_DIR is not reachable by the munge user (every parent directory needs o+x)"

HOST=$(hostname -s)
MUNGE_SOCKET=$STATE_DIR/munge/munge.socket
# CPUs and memory as slurmd detects them; memory at 90% so the node is never drained for having less
read -r CPUS MEMORY_MB < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
MEMORY_MB=$(( MEMORY_MB * 9 / 10 ))
DB_PASSWORD=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')

# ------------------------------------------------------------------ munged (private socket, system key)
[ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (the munge package creates it)"
launch munged setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --socket="$MUNGE_SOCKET" --pid-file="$STATE_DIR/munge/munged.pid" \
    --log-file="$STATE_DIR/munge/munged.log" --seed-file="$STATE_DIR/munge/munged.seed"
until_ok 15 munged bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"
tracked munged
say "munged up"

# ------------------------------------------------------------------ MariaDB (private data directory)
mariadb-install-db --no-defaults --user=mysql --datadir="$STATE_DIR/mysql" --skip-test-db \
    --auth-root-authentication-method=socket >"$STATE_DIR/log/mariadb-install-db.log" 2>&1 ||
    die "mariadb-install-db failed (see $STATE_DIR/log/mariadb-install-db.log)"
DB_SOCKET=$STATE_DIR/mysql/mysqld.sock
launch mariadbd mariadbd --no-defaults --user=mysql --datadir="$STATE_DIR/mysql" --socket="$DB_SOCKET" \
    --pid-file="$STATE_DIR/mysql/mariadbd.pid" --log-error="$STATE_DIR/log/mariadbd.log" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900
until_ok 60 mariadbd mariadb-admin --no-defaults --socket="$DB_SOCKET" ping
tracked mariadbd
mariadb --no-defaults --socket="$DB_SOCKET" -u root <<SQL
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
say "mariadbd up on 127.0.0.1:$DB_PORT"

# ------------------------------------------------------------------ configuration
for i in $(seq 0 $(( GPUS - 1 ))); do
    mknod -m 0666 "$STATE_DIR/fakegpu/gpu$i" c 1 3 2>/dev/null || : >"$STATE_DIR/fakegpu/gpu$i"
done
for conf in slurm.conf gres.conf cgroup.conf slurmdbd.conf; do
    fill "$HERE/$conf.in" "$CONF_DIR/$conf"
done
chmod 0600 "$CONF_DIR/slurmdbd.conf"

# ------------------------------------------------------------------ slurmdbd, then the accounts
launch slurmdbd slurmdbd -D
until_ok 30 slurmdbd port_open 6819
tracked slurmdbd
sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -i add account "$ACCOUNT" Description="pruneshot CI" Organization=pruneshot >/dev/null
sacctmgr -i add user "$(id -un)" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
say "slurmdbd up, account $ACCOUNT"

# ------------------------------------------------------------------ controller and node
launch slurmctld slurmctld -D -i
until_ok 30 slurmctld scontrol ping
tracked slurmctld
launch slurmd slurmd -D
node_idle() { [ "$(sinfo -h -N -n "$HOST" -o %t)" = idle ]; }
if ! (until_ok 30 "node $HOST" node_idle); then
    sinfo -N -o '%N %t %E' >&2 || true
    die "node $HOST did not become idle"
fi
tracked slurmd
# the controller registers with slurmdbd: sacct answers from now on
until_ok 30 sacct sacct -n -X -S now-1minutes
gres=$(sinfo -h -N -n "$HOST" -o %G)
[ "$gres" = "gpu:$GPUS" ] || die "node reports gres '$gres', expected gpu:$GPUS"
say "cluster up: node $HOST ($CPUS CPUs, ${MEMORY_MB} MB, $gres), partition $PARTITION, account $ACCOUNT"
