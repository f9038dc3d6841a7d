#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py (reference: SLURM-LOCAL.md).
#
#   .ci/slurm-setup.sh install           Debian's slurmctld slurmd slurm-client munge (apt-get), if missing
#   .ci/slurm-setup.sh start STATE_DIR   write /etc/slurm/slurm.conf + gres.conf, start munged (unless one
#                                        answers), slurmctld and slurmd; state and logs in STATE_DIR
#   .ci/slurm-setup.sh stop STATE_DIR    stop what `start` started (by the pids in its pid files) and
#                                        restore the previous /etc/slurm/*.conf
#
# Root only. The node offers every CPU and two fake GPUs (character devices made with mknod under
# STATE_DIR) so that jobs asking for --gpus are scheduled. Exit status 3: cannot run here (not root,
# SLURM missing and no apt-get); the test then skips.
set -euo pipefail

action=${1:?usage: slurm-setup.sh install | start STATE_DIR | stop STATE_DIR}
conf=/etc/slurm/slurm.conf

log() { echo "slurm-setup: $*" >&2; }
installed() { command -v slurmctld && command -v slurmd && command -v munged && command -v sbatch; } >/dev/null

if [[ $action == install ]]; then
    installed && exit 0
    if [[ $(id -u) != 0 ]]; then log "not root"; exit 3; fi
    command -v apt-get >/dev/null || { log "SLURM is not installed and there is no apt-get"; exit 3; }
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2
    exit 0
fi
state=$(realpath -m "${2:?usage: slurm-setup.sh install | start STATE_DIR | stop STATE_DIR}")

stop_pidfile() {   # kill the process named in a pid file, wait for it to end
    local file=$1 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

if [[ $action == stop ]]; then
    stop_pidfile "$state/slurmd.pid"
    stop_pidfile "$state/slurmctld.pid"
    if [[ -f $state/munged.started ]]; then
        stop_pidfile "$(cat "$state/munged.started")"
        rm -f "$state/munged.started"
    fi
    for f in slurm.conf gres.conf; do
        if [[ -f $state/$f.orig ]]; then mv "$state/$f.orig" "/etc/slurm/$f"
        elif [[ -f $state/$f.ours ]]; then rm -f "/etc/slurm/$f"; fi
        rm -f "$state/$f.ours"
    done
    log "stopped"
    exit 0
fi
[[ $action == start ]] || { log "unknown action $action"; exit 2; }

if [[ $(id -u) != 0 ]]; then log "not root"; exit 3; fi
installed || { log "SLURM is not installed: run $0 install"; exit 3; }
if scontrol ping 2>/dev/null | grep -q UP; then log "a slurmctld answers already: not starting another"; exit 3; fi

mkdir -p "$state/state" "$state/spool" "$state/dev"
host=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

# munge: a key, and the daemon unless one answers already
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged
    echo /run/munge/munged.pid > "$state/munged.started"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

# two fake GPUs: slurmd accepts character devices only
for i in 0 1; do [[ -c $state/dev/nvidia$i ]] || mknod "$state/dev/nvidia$i" c 1 3; done

mkdir -p /etc/slurm
for f in slurm.conf gres.conf; do
    if [[ -f /etc/slurm/$f && ! -f $state/$f.ours && ! -f $state/$f.orig ]]; then
        cp "/etc/slurm/$f" "$state/$f.orig"
    fi
    touch "$state/$f.ours"
done
cat > "$conf" <<EOF
# written by muke .ci/slurm-setup.sh for a test cluster; state in $state
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MinJobAge=3600
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$memory Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
cat > /etc/slurm/gres.conf <<EOF
AutoDetect=off
Name=gpu File=$state/dev/nvidia[0-1]
EOF

/usr/sbin/slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
/usr/sbin/slurmd
for _ in $(seq 150); do
    sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && break
    sleep 0.2
done
sinfo -h -o %t | grep -qE '^(idle|mix|alloc)' || { log "node not ready:"; sinfo >&2; scontrol show node >&2; exit 1; }
log "cluster up: $(sinfo -h -o '%P %D %t %G' | tr '\n' ' ')"
