#!/usr/bin/env bash
# Stops the test cluster that .ci/slurm/start.sh started in STATE_DIR: cancels its jobs, then stops
# exactly the PIDs listed in STATE_DIR/daemons.pids (newest first; SIGTERM, SIGKILL after a grace
# period), and removes the /etc/slurm files start.sh wrote for it. A PID whose process is gone, or whose
# command is no longer the recorded daemon (a reused PID), is left alone. Never kills by name.
#
#   .ci/slurm/stop.sh STATE_DIR
set -uo pipefail

STATE_DIR=${1:?usage: stop.sh STATE_DIR}
STATE_DIR=$(cd "$STATE_DIR" 2>/dev/null && pwd || echo "$STATE_DIR")
PIDS=$STATE_DIR/daemons.pids
MARKER="written by pruneshot .ci/slurm/start.sh"
GRACE_S=${STOP_GRACE_S:-20}
export PATH="$PATH:/usr/sbin:/sbin"

# the /etc/slurm configuration belongs to this cluster (start.sh's claim names its state directory)
owns_conf() {
    grep -q "$MARKER" /etc/slurm/slurm.conf 2>/dev/null &&
        grep -qx "StateSaveLocation=$STATE_DIR/slurmctld" /etc/slurm/slurm.conf
}
alive() { [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
# the process is still the daemon that was recorded (launched through setsid/setpriv, which exec it)
is_daemon() { [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]; }

if [ -s "$PIDS" ]; then
    # jobs of this cluster: their slurmstepd processes would outlive slurmd
    if owns_conf && grep -q '^slurmctld ' "$PIDS" && timeout 10 scontrol ping >/dev/null 2>&1; then
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            echo "[slurm stop] cancelling jobs $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs || true
            for _ in $(seq 50); do
                [ -z "$(timeout 10 squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    tac "$PIDS" | while read -r name pid; do
        [ -n "${pid:-}" ] || continue
        if ! alive "$pid"; then echo "[slurm stop] $name ($pid) already gone"; continue; fi
        if ! is_daemon "$pid" "$name"; then echo "[slurm stop] $pid is no longer $name, left alone"; continue; fi
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq $(( GRACE_S * 5 ))); do alive "$pid" || break; sleep 0.2; done
        if alive "$pid"; then
            echo "[slurm stop] $name ($pid) ignored SIGTERM for ${GRACE_S}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        echo "[slurm stop] stopped $name ($pid)"
    done
fi

if owns_conf; then
    for conf in gres.conf cgroup.conf slurmdbd.conf slurm.conf; do  # slurm.conf (the claim) last
        if [ -f "/etc/slurm/$conf" ] && grep -q "$MARKER" "/etc/slurm/$conf"; then rm -f "/etc/slurm/$conf"; fi
    done
fi
exit 0
