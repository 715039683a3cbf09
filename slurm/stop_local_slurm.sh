#!/usr/bin/env bash
# Stop the daemons slurm/start_local_slurm.sh started (slurmd, slurmctld, munged); see --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: stop_local_slurm.sh [--all] [--help] [slurmd|slurmctld|munged ...]

Stops the daemons (all three, or those named) that slurm/start_local_slurm.sh started on this
machine, as recorded in /run/fedpeft-local-slurm/started: slurmd, then slurmctld, then munged
(SIGTERM, then SIGKILL after 10 s). With --all, also those it found already running (found by their pid files).
Packages, /etc/slurm/slurm.conf and the munge key are left in place.
EOF
}

ALL=0
NAMES=()
for arg in "$@"; do
    case "$arg" in
        --all) ALL=1 ;;
        -h|--help) usage; exit 0 ;;
        slurmd|slurmctld|munged) NAMES+=("$arg") ;;
        *) echo "stop_local_slurm.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "[local-slurm] ERROR: must run as root" >&2; exit 1; }

STATE=/run/fedpeft-local-slurm/started
say() { echo "[local-slurm] $*"; }

pidfile() {
    case "$1" in
        slurmd) echo /run/slurmd.pid ;;
        slurmctld) echo /run/slurmctld.pid ;;
        munged) echo /run/munge/munged.pid ;;
    esac
}

stop() {  # stop daemon $1 if its pid file names a live process of that name
    local name=$1 pid
    pid=$(cat "$(pidfile "$name")" 2>/dev/null || true)
    if [ -z "$pid" ] || [ "$(cat /proc/"$pid"/comm 2>/dev/null)" != "$name" ]; then
        say "$name: not running (no live pid in $(pidfile "$name"))"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ] || { say "$name: stopped (pid $pid)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    say "$name: killed (pid $pid did not exit on SIGTERM within 10 s)"
}

wanted() { [ "${#NAMES[@]}" -eq 0 ] || printf '%s\n' "${NAMES[@]}" | grep -qx "$1"; }
for name in slurmd slurmctld munged; do  # this order: slurmd and slurmctld still need munged
    wanted "$name" || continue
    if [ "$ALL" = 1 ] || grep -qx "$name" "$STATE" 2>/dev/null; then
        stop "$name"
        if [ -f "$STATE" ]; then sed -i "/^$name\$/d" "$STATE"; fi
    else
        say "$name: left alone (not started by start_local_slurm.sh; --all stops it)"
    fi
done
if [ -f "$STATE" ] && [ ! -s "$STATE" ]; then rm -f "$STATE"; fi
