#!/usr/bin/env bash
# A real single-node SLURM cluster for the tests (and for trying `voxelmill --cluster slurm`
# on one machine): Debian 12's slurmctld, slurmd, slurm-client and munge, no systemd, no
# accounting, every daemon as root, and two fake GPUs (GRES backed by /dev/null and
# /dev/zero: a count-only GRES puts the node in INVAL), so `--gres=gpu:1` jobs run.
#
#   deploy/slurm/ci-cluster.sh start    # install if needed, configure, start, wait until idle
#   deploy/slurm/ci-cluster.sh stop     # cancel every job, stop the daemons
#   deploy/slurm/ci-cluster.sh status
#
# Both are idempotent. Needs root and apt-get (Debian/Ubuntu). Partition: `debug`
# (OverSubscribe=FORCE:4, so several one-core worker jobs share the cores of a small
# machine); tests/test_slurm.py submits its worker jobs there. See deploy/slurm/README.md.
#
# It only ever replaces a slurm.conf or gres.conf it wrote itself (first line: MARKER). On a
# machine with its own SLURM configuration, start and stop refuse before touching anything
# (no install, no daemon started or stopped, no job cancelled): use that SLURM as it is.
# SLURM_CI_CONF_DIR (default /etc/slurm) names the folder, e.g. to test the refusal.
set -euo pipefail

CONF_DIR=${SLURM_CI_CONF_DIR:-/etc/slurm}
MARKER="# written by deploy/slurm/ci-cluster.sh"
# the first line of the gres.conf that versions before the marker wrote
LEGACY_GRES="# two fake GPUs: slurm needs a File per GPU"
LOG_DIR=/var/log/slurm
WAIT_S=${SLURM_CI_WAIT_S:-60}

say() { echo "ci-cluster: $*" >&2; }
fail() { say "$*"; exit 1; }

# true when this script may replace file $1: absent, or written by this script
ours() {
    [ -e "$1" ] || [ -L "$1" ] || return 0
    [ -f "$1" ] && [ ! -L "$1" ] || return 1
    local first
    first=$(head -n 1 "$1")
    [ "$first" = "$MARKER" ] || { [ "${1##*/}" = gres.conf ] && [[ "$first" == "$LEGACY_GRES"* ]]; }
}

# refuse to configure, start or stop anything on a machine with its own SLURM configuration
guard() {
    local f
    for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
        ours "$f" || fail "$f was not written by this script: this machine has its own SLURM \
configuration, which this script never replaces (nor stops its daemons or jobs). Use that \
SLURM as it is, or move $f away by hand if it is a leftover"
    done
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sinfo >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || fail "not root: cannot install slurm (apt-get)"
    command -v apt-get >/dev/null || fail "no apt-get: cannot install slurm"
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

configure() {
    local host node_line cpus mem real
    host=$(hostname -s)
    # slurmd -C reports this node's CPUs, sockets, cores, threads and RealMemory (MiB)
    node_line=$(slurmd -C | head -n 1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    real=$((mem * 9 / 10))    # leave room for the OS: a node above its memory goes INVAL
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
    node_line=$(sed -e "s/RealMemory=[0-9]*/RealMemory=$real/" -e 's/UpTime=.*//' <<<"$node_line")
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    cat >"$CONF_DIR/slurm.conf" <<CONF
$MARKER
ClusterName=voxelmill-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
$node_line Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    cat >"$CONF_DIR/gres.conf" <<CONF
$MARKER
# two fake GPUs: slurm needs a File per GPU, it never opens them for task/none
NodeName=$host Name=gpu File=/dev/null
NodeName=$host Name=gpu File=/dev/zero
CONF
    say "node $host: $cpus CPUs, RealMemory=$real MiB, 2 fake GPUs"
}

running() { pgrep -x "$1" >/dev/null; }

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

start() {
    guard
    install
    if running slurmctld && running slurmd && [ "$(node_state)" = idle ]; then
        say "already running, node idle"
        return
    fi
    configure
    # munged needs its run directory and a key; no systemd here to make either
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 0400 /etc/munge/munge.key; }
    running munged || runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
    running slurmctld || slurmctld
    running slurmd || slurmd
    local t=0 state=""
    while [ "$t" -lt "$WAIT_S" ]; do
        state=$(node_state)
        case "$state" in
            idle|mixed|allocated) say "node $state after ${t}s"; return ;;
            down*|drain*|inval*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 1; t=$((t + 1))
    done
    fail "node not idle after ${WAIT_S}s (state: ${state:-none}); see $LOG_DIR/slurmctld.log, $LOG_DIR/slurmd.log"
}

# the pid of a daemon from its pid file, if that process is still that daemon
daemon_pid() {
    local pid
    pid=$(cat "$2" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}

stop() {
    guard
    if command -v scancel >/dev/null && running slurmctld; then
        # cancel every job first, so no dask worker outlives its job
        scancel --user=root 2>/dev/null || true
        local t=0
        while [ -n "$(squeue -h 2>/dev/null)" ] && [ "$t" -lt 30 ]; do sleep 1; t=$((t + 1)); done
        [ -z "$(squeue -h 2>/dev/null)" ] || say "jobs still listed after 30 s: $(squeue -h)"
    fi
    local pids="" pid
    for spec in slurmd:/run/slurmd.pid slurmctld:/run/slurmctld.pid munged:/run/munge/munged.pid; do
        pid=$(daemon_pid "${spec%%:*}" "${spec#*:}") && pids="$pids $pid"
    done
    [ -z "$pids" ] || kill $pids
    local t=0
    while [ "$t" -lt 40 ]; do
        pid=""
        for p in $pids; do [ -e "/proc/$p" ] && pid=$p; done
        [ -z "$pid" ] && break
        sleep 0.5; t=$((t + 1))
    done
    say "stopped"
}

status() {
    for daemon in munged slurmctld slurmd; do
        running "$daemon" && echo "$daemon: running" || echo "$daemon: stopped"
    done
    command -v sinfo >/dev/null && running slurmctld && sinfo -N -l && squeue || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
