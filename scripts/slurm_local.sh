#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for testing `initstudy sweep --backend slurm`.
#   scripts/slurm_local.sh install   # Debian's slurm-wlm (needs root and apt)
#   scripts/slurm_local.sh start     # write the config, start slurmctld + slurmd, wait for the node
#   scripts/slurm_local.sh stop      # stop both daemons
# It runs as root with AuthType=auth/none (no munge), so use it on a test machine only.
set -euo pipefail
state=${SLURM_LOCAL_DIR:-/tmp/initstudy-slurm}
conf=/etc/slurm/slurm.conf

install() {
  command -v slurmctld >/dev/null && return
  apt-get install -y -q slurm-wlm >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm >/dev/null 2>&1; }
}

start() {
  mkdir -p "$state"/{spool,ctld} /etc/slurm
  node=$(slurmd -C | head -1 | sed 's/ UpTime.*//')  # this machine's real CPUs and memory
  cat >"$conf" <<CONF
ClusterName=initstudy
SlurmctldHost=$(hostname -s)
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=5
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  stop_daemons quietly
  slurmctld -c && slurmd -c   # -c: start clean, forgetting jobs of an earlier cluster
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm is up: $(sinfo -h -o '%P %D %T %c')"; return 0
    fi
    sleep 1
  done
  echo "slurm did not come up; see $state/*.log" >&2
  return 1
}

stop_daemons() {
  for daemon in slurmd slurmctld; do
    pkill -x "$daemon" 2>/dev/null || true
  done
  for _ in $(seq 20); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0
    sleep 0.5
  done
  [ "${1:-}" = quietly ] || echo "daemons still running" >&2
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_daemons ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
