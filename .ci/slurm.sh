#!/usr/bin/env bash
# A single-node Slurm cluster on loopback for the cluster tests (tests/test_slurm_runs.py).
# Sourced by .ci/run, which calls start_slurm and, on exit, stop_slurm. Everything (munge key
# and socket, slurm.conf, state, spool, logs, pid files) lives in one temporary folder on free
# ports, so it never clashes with a system munge or Slurm. Debian's packages, installed when
# missing (as root with apt-get).
# By hand: `bash .ci/slurm.sh --foreground` prints SLURM_CONF=<path>, then keeps the cluster
# up until it gets TERM or INT (Ctrl-C):  export SLURM_CONF=<path> SAEUNIV_REQUIRE_SLURM=1
#
# AuthInfo cred_expire=5 is the smallest job-credential lifetime Slurm 22.05 accepts (below 5
# it logs "AuthInfo=cred_expire=N invalid" and falls back to 120 s). Slurm holds a requeued
# job until now + cred_expire + 1, so a requeued job runs again after ~6 s instead of ~2 min;
# sched_interval=1 makes the main scheduler notice that at once (by default it looks every 60 s,
# and the backfill scheduler does not start a requeued job).

slurm_dir=""

_slurm_ok() {  # the daemons and clients are installed
    command -v munged >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && command -v sinfo >/dev/null
}

_slurm_logs() {
    local f
    for f in "$slurm_dir"/slurmctld.log "$slurm_dir"/slurmd.log "$slurm_dir"/munge/munged.log; do
        [ -f "$f" ] && { echo "--- $f" >&2; tail -n 40 "$f" >&2; }
    done
    return 0
}

_slurm_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_slurm() {
    PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld, slurmd, runuser
    if ! _slurm_ok; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd munge slurm-client >/dev/null
        fi
        _slurm_ok || { echo "CI needs Slurm: apt-get install slurmctld slurmd munge slurm-client" >&2; return 1; }
    fi
    stop_slurm  # a cluster this shell started before
    slurm_dir=$(mktemp -d "${TMPDIR:-/tmp}/saeuniv-slurm.XXXXXX") || return 1
    chmod 755 "$slurm_dir"  # munged (its own user) and job users reach munge/ and slurm.conf

    # munge: its own key, socket, pid, log and seed files; as root it runs as the munge user.
    local user as_munge=()
    user=$(id -un)
    mkdir -m 700 "$slurm_dir/munge"
    dd if=/dev/urandom of="$slurm_dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$slurm_dir/munge/munge.key"
    if [ "$(id -u)" = 0 ] && id -u munge >/dev/null 2>&1; then
        chown -R munge: "$slurm_dir/munge"
        as_munge=(runuser -u munge --)
    fi
    chmod 711 "$slurm_dir/munge"  # clients reach the socket, not the key
    local t0=$EPOCHREALTIME
    "${as_munge[@]}" munged --socket="$slurm_dir/munge/munge.socket" \
        --key-file="$slurm_dir/munge/munge.key" --pid-file="$slurm_dir/munge/munged.pid" \
        --log-file="$slurm_dir/munge/munged.log" --seed-file="$slurm_dir/munge/munged.seed" \
        </dev/null >/dev/null 2>"$slurm_dir/munged.err" \
        || { cat "$slurm_dir/munged.err" >&2; _slurm_logs; stop_slurm; return 1; }

    # slurm.conf: one node (this host on 127.0.0.1, all CPUs, 80 % of the memory), partition ci.
    # DefMemPerCPU: a job without --mem gets its CPUs' share, not the whole node's memory (which
    # would run one job at a time).
    local host ctld_port slurmd_port cpus mem
    host=$(hostname -s)
    ctld_port=$(_slurm_free_port) || { stop_slurm; return 1; }
    slurmd_port=$(_slurm_free_port) || { stop_slurm; return 1; }
    cpus=$(nproc)
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    cat >"$slurm_dir/slurm.conf" <<EOF
ClusterName=saeuniv-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$slurm_dir/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation=$slurm_dir/state
SlurmdSpoolDir=$slurm_dir/spool
SlurmctldPidFile=$slurm_dir/slurmctld.pid
SlurmdPidFile=$slurm_dir/slurmd.pid
SlurmctldLogFile=$slurm_dir/slurmctld.log
SlurmdLogFile=$slurm_dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=5
OverTimeLimit=0
InactiveLimit=0
MaxArraySize=10001
DefMemPerCPU=$((mem / cpus))
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mkdir -m 755 "$slurm_dir/state" "$slurm_dir/spool"

    slurmctld -f "$slurm_dir/slurm.conf" -i </dev/null >/dev/null 2>"$slurm_dir/slurmctld.err" \
        || { cat "$slurm_dir/slurmctld.err" >&2; _slurm_logs; stop_slurm; return 1; }
    slurmd -f "$slurm_dir/slurm.conf" -N "$host" </dev/null >/dev/null 2>"$slurm_dir/slurmd.err" \
        || { cat "$slurm_dir/slurmd.err" >&2; _slurm_logs; stop_slurm; return 1; }
    export SLURM_CONF=$slurm_dir/slurm.conf
    local state=""
    for _ in $(seq 120); do  # 60 s
        state=$(timeout 10 sinfo -h -o %T 2>/dev/null) || state=""
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        echo "Slurm did not come up within 60 s (node state: ${state:-none})" >&2
        _slurm_logs
        stop_slurm
        return 1
    fi
    export SAEUNIV_REQUIRE_SLURM=1
    echo "Slurm $(sinfo -V | awk '{print $NF}'): partition ci, $cpus CPUs," \
        "started in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}') s"
}

stop_slurm() {
    [ -n "$slurm_dir" ] || return 0
    local f pid
    if [ -f "$slurm_dir/slurmctld.pid" ] && [ -f "$slurm_dir/slurm.conf" ]; then
        local ids
        ids=$(SLURM_CONF=$slurm_dir/slurm.conf timeout 10 squeue -h -o %A 2>/dev/null) || ids=""
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086  # one word per job id
            SLURM_CONF=$slurm_dir/slurm.conf timeout 10 scancel $ids 2>/dev/null || true
            for _ in $(seq 40); do  # up to 20 s: KillWait=5, then the steps end
                [ -z "$(SLURM_CONF=$slurm_dir/slurm.conf timeout 10 squeue -h -t R,CG -o %A 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    # slurmd, then slurmctld, then munged: the reverse of the start
    for f in "$slurm_dir/slurmd.pid" "$slurm_dir/slurmctld.pid" "$slurm_dir/munge/munged.pid"; do
        pid=$(cat "$f" 2>/dev/null) || continue
        if [ -z "$pid" ] || ! kill "$pid" 2>/dev/null; then continue; fi
        for _ in $(seq 50); do  # 10 s, then KILL
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$slurm_dir"
    [ "${SLURM_CONF:-}" != "$slurm_dir/slurm.conf" ] || unset SLURM_CONF SAEUNIV_REQUIRE_SLURM
    slurm_dir=""
    return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    if [ "${1:-}" != --foreground ]; then
        echo "usage: bash $0 --foreground   (or source it and call start_slurm / stop_slurm)" >&2
        exit 2
    fi
    start_slurm || exit 1
    echo "SLURM_CONF=$SLURM_CONF"
    trap stop_slurm EXIT
    sleep_pid=""
    trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM INT
    while :; do
        sleep 3600 &
        sleep_pid=$!
        wait "$sleep_pid" || true
    done
fi
