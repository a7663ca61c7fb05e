#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try launch/slurm.sbatch (signals, requeue, resume)
# without a real cluster. Root only.
#
#   launch/slurm_local.sh start    # install slurm-wlm + munge if missing, write the config, start
#                                  # munged, slurmctld and slurmd; prints the SLURM_CONF to export
#   launch/slurm_local.sh status   # daemons, sinfo, squeue
#   launch/slurm_local.sh stop     # scontrol shutdown, then munged (if this script started it)
#
# Everything lives in $INT4DDP_SLURM_DIR (default /run/int4ddp-slurm): slurm.conf, state and spool
# directories, logs, pid files. Nothing is written to /etc/slurm: the client commands find the
# cluster through SLURM_CONF, so export the line `start` prints (or prefix commands with it).
# The node is this host (NodeAddr 127.0.0.1) with $INT4DDP_SLURM_CPUS CPUs (default 2) in one
# partition, `local`. JobRequeue=1 lets a job requeue itself; KillWait=$INT4DDP_SLURM_KILLWAIT
# (default 120 s) is the time between SIGTERM and SIGKILL at the time limit or on scancel, long
# enough for every rank to finish its step and write a checkpoint.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

dir="${INT4DDP_SLURM_DIR:-/run/int4ddp-slurm}"
cpus="${INT4DDP_SLURM_CPUS:-2}"
killwait="${INT4DDP_SLURM_KILLWAIT:-120}"
conf="$dir/slurm.conf"
node="$(hostname -s)"

die() { echo "slurm_local.sh: error: $*" >&2; exit 1; }
say() { echo "slurm_local.sh: $*"; }

# pid_alive FILE: the pid in FILE names a live process.
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    mkdir -p "$dir/ctld" "$dir/slurmd"
    cat >"$conf" <<EOF
# Written by launch/slurm_local.sh: a one-node cluster on localhost.
ClusterName=int4ddp-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups here: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# A job may requeue itself (scontrol requeue from its signal trap), and is given KillWait seconds
# between SIGTERM and SIGKILL when it reaches its time limit.
JobRequeue=1
KillWait=$killwait
OverTimeLimit=0
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already running"
        return
    fi
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key &&
        chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key; }
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged
    touch "$dir/munged.started-here"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd runs jobs as their users)"
    int4ddp_setup slurm-wlm munge
    if pid_alive "$dir/slurmctld.pid" || pid_alive "$dir/slurmd.pid"; then
        die "already running (launch/slurm_local.sh stop first)"
    fi
    write_conf
    start_munge
    export SLURM_CONF="$conf"
    slurmctld -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 100); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            say "cluster up: node $node, $cpus CPUs, partition local (files in $dir)"
            say "export SLURM_CONF=$conf"
            return
        fi
        sleep 0.2
    done
    sinfo -N -l || true
    die "the node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log"
}

# stop_daemon NAME: waits for the daemon of pid file NAME.pid to exit, then kills what is left.
stop_daemon() {
    local pidfile="$dir/$1.pid" pid
    pid_alive "$pidfile" || return 0
    pid="$(cat "$pidfile")"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    say "$1 (pid $pid) still running after scontrol shutdown: SIGTERM"
    kill "$pid" 2>/dev/null || true
}

cmd_stop() {
    if [ -f "$conf" ]; then
        SLURM_CONF="$conf" scontrol shutdown 2>/dev/null || true
        stop_daemon slurmctld
        stop_daemon slurmd
    fi
    if [ -f "$dir/munged.started-here" ] && [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$dir/munged.started-here"
    fi
    say "stopped"
}

cmd_status() {
    local d
    for d in slurmctld slurmd; do
        if pid_alive "$dir/$d.pid"; then say "$d running (pid $(cat "$dir/$d.pid"))"; else say "$d not running"; fi
    done
    if pid_alive "$dir/slurmctld.pid"; then
        SLURM_CONF="$conf" sinfo -N -l
        SLURM_CONF="$conf" squeue
        say "export SLURM_CONF=$conf"
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
