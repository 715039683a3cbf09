#!/usr/bin/env bash
# Make a single-node SLURM (munged + slurmctld + slurmd, all on 127.0.0.1) ready on this machine.
# Used by tests/test_slurm.py and CI; see --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: start_local_slurm.sh [--install | --install-only] [--help]

As root on Debian, make a one-node SLURM ready for `srun`/`sbatch` (partition `debug`):
  1. if slurmctld/slurmd/srun/sbatch/sinfo/scontrol/munged are missing and --install is given
     (or SLURM_INSTALL=1): apt-get install slurmctld slurmd slurm-client munge;
     --install-only does this step alone (for CI's install phase) and exits;
  2. create the munge key if missing and start munged as the munge user;
  3. unless a local slurmctld already answers `sinfo`: write /etc/slurm/slurm.conf for this host
     only (NodeName=`hostname -s`, NodeAddr=127.0.0.1, CPUs=`nproc`); a foreign slurm.conf is
     first copied to /etc/slurm/slurm.conf.before-local-slurm;
  4. start slurmctld (clearing the jobs of an earlier run) and slurmd if they are not running;
  5. wait (SLURM_WAIT_S seconds, default 30) until `sinfo -h -o %t` says idle, mix or alloc;
     else print the daemons' log tails and exit 1.
Idempotent: a second call finds everything up and changes nothing. Daemons this script starts
are recorded in /run/fedpeft-local-slurm/started; slurm/stop_local_slurm.sh stops them.
Nothing listens or connects anywhere but 127.0.0.1 (and the apt mirrors with --install).
Logs: /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log, /var/log/munge/munged.log.
EOF
}

INSTALL="${SLURM_INSTALL:-0}"
ONLY_INSTALL=0
for arg in "$@"; do
    case "$arg" in
        --install) INSTALL=1 ;;
        --install-only) INSTALL=1; ONLY_INSTALL=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "start_local_slurm.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"
WAIT_S="${SLURM_WAIT_S:-30}"
CONF=/etc/slurm/slurm.conf
MARK="# Written by fedpeft_hpc slurm/start_local_slurm.sh"
STATE_DIR=/run/fedpeft-local-slurm
SPOOL=/var/spool/fedpeft-local-slurm  # own state: no clash with another cluster's
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
t0=$(date +%s.%N)

say() { echo "[local-slurm] $*"; }
die() { echo "[local-slurm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"

# -- 1. packages ---------------------------------------------------------------------------
NEEDED=(slurmctld slurmd srun sbatch sinfo squeue scontrol munged munge unmunge)
missing() { local m=() b; for b in "${NEEDED[@]}"; do command -v "$b" >/dev/null 2>&1 || m+=("$b"); done; echo "${m[*]}"; }
miss=$(missing)
if [ -n "$miss" ]; then
    [ "$INSTALL" = 1 ] || die "missing: $miss; rerun with --install (or SLURM_INSTALL=1) to apt-get them"
    command -v apt-get >/dev/null || die "missing: $miss, and no apt-get to install them"
    say "installing slurmctld slurmd slurm-client munge (missing: $miss)"
    ti=$(date +%s.%N)
    # Package scripts must not try to start the daemons (no init system here; no config yet).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null; } || rc=$?
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || die "apt-get failed (exit $rc)"
    miss=$(missing)
    [ -z "$miss" ] || die "still missing after apt-get: $miss"
    say "installed in $(awk -v a="$ti" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
fi
if [ "$ONLY_INSTALL" = 1 ]; then
    [ -n "$miss" ] || say "SLURM and munge binaries present: $(slurmctld -V 2>/dev/null || echo '?')"
    exit 0
fi

# A process named $2 whose pid is in file $1 is alive.
alive() { local pid; pid=$(cat "$1" 2>/dev/null) || return 1; [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ]; }
running() { alive "$1" "$2" || pgrep -x "$2" >/dev/null 2>&1; }
mkdir -p "$STATE_DIR"
record() { grep -qx "$1" "$STATE_DIR/started" 2>/dev/null || echo "$1" >>"$STATE_DIR/started"; }

# -- 2. munge ------------------------------------------------------------------------------
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! [ -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 700 /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    say "created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if munge_ok; then
    say "munged: already running"
else
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged || die "munged did not start; see /var/log/munge/munged.log: $(tail -n 5 /var/log/munge/munged.log 2>/dev/null)"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged started but munge -n | unmunge fails"
    record munged
    say "munged: started as user munge (pid $(cat "$MUNGE_PID" 2>/dev/null || echo '?'))"
fi

# -- 3. slurm.conf -------------------------------------------------------------------------
answering() { running "$CTLD_PID" slurmctld && timeout 5 sinfo -h -o %t >/dev/null 2>&1; }
NODE=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
if answering; then
    say "slurmctld already answers sinfo: keeping $CONF"
else
    # CPUs usable here (affinity), not nproc as tuned by OMP_NUM_THREADS, which GNU nproc obeys
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    new=$(mktemp)
    cat >"$new" <<EOF
$MARK: a single-node SLURM on 127.0.0.1.
ClusterName=local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p /etc/slurm
    if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then
        say "$CONF: up to date (node $NODE, $cpus CPUs, ${mem_mb} MB)"
    else
        if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK" && [ ! -e "$CONF.before-local-slurm" ]; then
            cp -p "$CONF" "$CONF.before-local-slurm"
            say "saved the existing $CONF as $CONF.before-local-slurm"
        fi
        install -m 644 "$new" "$CONF"
        say "wrote $CONF (node $NODE at 127.0.0.1, $cpus CPUs, ${mem_mb} MB, partition debug)"
    fi
    rm -f "$new"
fi
# srun's peers and the rendezvous (MASTER_ADDR = first node of the step) look the node name up.
if ! getent hosts "$NODE" >/dev/null; then
    if echo "127.0.0.1 $NODE" >>/etc/hosts; then
        say "added '127.0.0.1 $NODE' to /etc/hosts (the name did not resolve)"
    else
        say "WARNING: $NODE does not resolve and /etc/hosts is not writable; srun may fail"
    fi
fi

# -- 4. daemons ----------------------------------------------------------------------------
mkdir -p "$SPOOL/slurmctld" "$SPOOL/slurmd" "$LOG_DIR"
if running "$CTLD_PID" slurmctld; then
    say "slurmctld: already running"
else
    # -c: forget jobs and node states of an earlier run (this is a throwaway test cluster)
    slurmctld -c -i || die "slurmctld did not start: $(tail -n 20 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
    record slurmctld
    say "slurmctld: started (pid $(cat "$CTLD_PID" 2>/dev/null || echo '?'))"
fi
if running "$SLURMD_PID" slurmd; then
    say "slurmd: already running"
else
    slurmd || die "slurmd did not start: $(tail -n 20 "$LOG_DIR/slurmd.log" 2>/dev/null)"
    record slurmd
    say "slurmd: started (pid $(cat "$SLURMD_PID" 2>/dev/null || echo '?'))"
fi

# -- 5. wait for the node ------------------------------------------------------------------
deadline=$(( $(date +%s) + WAIT_S ))
resumed=0
state=""
while :; do
    state=$(timeout 5 sinfo -h -o %t 2>/dev/null | tr '\n' ' ' || true)
    # exactly idle/mix/alloc: "idle*" (not responding), "idle~" (powered off) etc. are not ready
    if tr ' ' '\n' <<<"$state" | grep -qxE 'idle|mix|alloc'; then
        say "ready: node $NODE is ${state% } (partition debug) after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
        exit 0
    fi
    # A node left down/drained by an earlier run comes back on request.
    if [ "$resumed" = 0 ] && echo "$state" | grep -qE 'down|drain|drng|fail'; then
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        resumed=1
        say "node was '${state% }': asked slurmctld to resume it"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || break
    sleep 0.5
done
echo "[local-slurm] ERROR: node not ready after ${WAIT_S} s (sinfo state: '${state% }')" >&2
timeout 5 scontrol show node "$NODE" >&2 2>/dev/null || true
for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
    echo "---- tail $f" >&2
    tail -n 30 "$f" >&2 2>/dev/null || echo "(no log)" >&2
done
exit 1
