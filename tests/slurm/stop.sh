#!/usr/bin/env bash
# Stop the cluster tests/slurm/start.sh started in DIR: cancel its jobs, then stop its slurmd,
# slurmctld and munged (by the pid files in DIR, nothing else).
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin
DIR=${1:-${HAVEN_SLURM_DIR:-/tmp/haven-slurm}}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, then KILL after 5 s; only if the pid is still NAME
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

if [ -s "$DIR/slurmctld.pid" ] && [ -f "$DIR/slurm.conf" ]; then  # every job there is ours
  ids=$(SLURM_CONF=$DIR/slurm.conf timeout 10 squeue -h -t PENDING,RUNNING,COMPLETING -o %i 2>/dev/null)
  if [ -n "$ids" ]; then
    SLURM_CONF=$DIR/slurm.conf timeout 10 scancel $ids 2>/dev/null
    sleep 2
  fi
fi
stop_pid "$DIR/slurmd.pid" slurmd
stop_pid "$DIR/slurmctld.pid" slurmctld
stop_pid "$DIR/munge/munged.pid" munged
exit 0
