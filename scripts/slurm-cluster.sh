#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing profiles/slurm against a real
# slurmctld/slurmd (make test-cluster). Debian/Ubuntu, as root.
#
#   scripts/slurm-cluster.sh install  apt-get install slurm-wlm and munge where missing
#   scripts/slurm-cluster.sh up       configure munge and SLURM, start them (idempotent)
#   scripts/slurm-cluster.sh status   munge, controller, node and partitions
#   scripts/slurm-cluster.sh down     stop slurmd, slurmctld and munged started by `up` (idempotent)
#
# The node declares the resources of a cluster's GPU node (CPUs, memory, GPUs of the types
# profiles/slurm asks for) with SlurmdParameters=config_overrides, so that the profile's own
# requests are scheduled unchanged; nothing enforces them (TaskPlugin=task/none, no cgroups).
# The partitions are the ones profiles/slurm names (its &..._partition anchors).
#
# Settings found necessary on a single machine: ProctrackType=proctrack/pgid (with
# proctrack/linuxproc the submitting Snakemake received SIGTERM and stalled), no accounting
# storage (so Snakemake must poll with --slurm-status-command squeue), state and spool folders
# of its own.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PROFILE="${PROFILE:-$HERE/../profiles/slurm/config.yaml}"
STATE="${SLURM_TEST_STATE:-/var/lib/attnspace-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by attnspace scripts/slurm-cluster.sh"
NODE_CPUS="${NODE_CPUS:-32}"
NODE_MEM_MB="${NODE_MEM_MB:-262144}"

die() { echo "slurm-cluster: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it starts munged, slurmctld and slurmd). Fix: sudo $0 $1"
}

need_packages() {
    local missing=()
    for cmd in munged munge unmunge slurmctld slurmd sinfo sbatch squeue scontrol; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        die "missing ${missing[*]}. Fix: apt-get update && apt-get install -y slurm-wlm munge"
    fi
}

partitions() {
    # Partition names from the profile's anchors, e.g. `slurm_partition: &cpu_partition "cpu"`.
    [ -f "$PROFILE" ] || die "no profile at $PROFILE"
    local names
    names=$(grep -oE '&[A-Za-z0-9_]+_partition[[:space:]]+"?[A-Za-z0-9_.-]+' "$PROFILE" \
        | awk '{gsub(/"/, "", $2); print $2}' | sort -u)
    [ -n "$names" ] || die "no partition anchors (&name_partition) in $PROFILE"
    echo "$names"
}

gpu_models() {
    grep -oE 'gpu_model:[[:space:]]+"?[A-Za-z0-9_.-]+' "$PROFILE" | awk '{gsub(/"/, "", $2); print $2}' | sort -u
}

munge_up() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile /etc/munge/munge.key
        else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged
    for _ in $(seq 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.25
    done
    die "munged did not answer (munge -n | unmunge). See /var/log/munge/munged.log"
}

write_conf() {
    local host parts gres types default part
    host=$(hostname -s)
    parts=$(partitions)
    types=$(gpu_models)
    gres=""
    for t in $types; do gres="${gres:+$gres,}gpu:$t:2"; done
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace a real cluster's configuration"
    fi
    mkdir -p "$STATE"/{state,spool,log} /etc/slurm
    {
        echo "$MARK"
        echo "ClusterName=attnspace-test"
        echo "SlurmctldHost=$host"
        echo "SlurmUser=root"
        echo "AuthType=auth/munge"
        echo "StateSaveLocation=$STATE/state"
        echo "SlurmdSpoolDir=$STATE/spool"
        echo "SlurmctldPidFile=$STATE/slurmctld.pid"
        echo "SlurmdPidFile=$STATE/slurmd.pid"
        echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
        echo "SlurmdLogFile=$STATE/log/slurmd.log"
        echo "ProctrackType=proctrack/pgid"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core_Memory"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "MinJobAge=3600"
        echo "KillWait=5"
        echo "InactiveLimit=0"
        [ -n "$gres" ] && echo "GresTypes=gpu"
        echo "NodeName=$host CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB${gres:+ Gres=$gres} State=UNKNOWN"
        default=YES
        for part in $parts; do
            echo "PartitionName=$part Nodes=$host Default=$default MaxTime=INFINITE State=UP"
            default=NO
        done
    } > "$CONF.new"
    mv "$CONF.new" "$CONF"
    {
        echo "$MARK"
        echo "AutoDetect=off"
        for t in $types; do echo "NodeName=$host Name=gpu Type=$t File=$STATE/gpus/$t[0-1]"; done
    } > /etc/slurm/gres.conf
    # Two placeholder device files per GPU type: slurmd counts a GPU per File entry.
    mkdir -p "$STATE/gpus"
    for t in $types; do touch "$STATE/gpus/${t}0" "$STATE/gpus/${t}1"; done
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

slurm_up() {
    write_conf
    if ! running "$STATE/slurmctld.pid"; then slurmctld || die "slurmctld did not start; see $STATE/log/slurmctld.log"; fi
    if ! running "$STATE/slurmd.pid"; then slurmd || die "slurmd did not start; see $STATE/log/slurmd.log"; fi
    local host; host=$(hostname -s)
    for _ in $(seq 60); do
        state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mix|alloc) return ;;
            drain*|down*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node $host is not idle (state: ${state:-unknown}); see $STATE/log/slurmctld.log and $STATE/log/slurmd.log"
}

status() {
    local rc=0
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then echo "munge: up"; else echo "munge: down"; rc=1; fi
    if scontrol ping 2>/dev/null | grep -q UP; then echo "slurmctld: up"; else echo "slurmctld: down"; rc=1; fi
    if [ $rc -eq 0 ]; then sinfo -o "%P %a %D %t %c %m %G"; fi
    return $rc
}

stop_pid() {
    local pidfile=$1
    running "$pidfile" || return 0
    local pid; pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    die "process $pid ($pidfile) did not stop"
}

down() {
    stop_pid "$STATE/slurmd.pid"
    stop_pid "$STATE/slurmctld.pid"
    if [ -f /run/munge/munged.pid ]; then stop_pid /run/munge/munged.pid; fi
    echo "slurm-cluster: down"
}

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
    command -v apt-get >/dev/null || die "no apt-get here. Fix: install SLURM (slurmctld, slurmd, client tools) and munge with this system's package manager"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

case "${1:-}" in
    install) need_root install; install ;;
    up) need_root up; need_packages; munge_up; slurm_up; status ;;
    down) need_root down; down ;;
    status) need_packages; status ;;
    *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
