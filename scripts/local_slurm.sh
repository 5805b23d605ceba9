#!/usr/bin/env bash
# A real single-node Slurm cluster (Debian slurm-wlm + munge) living in one directory, for the launcher tests
# and for trying examples/slurm/*.sbatch on a workstation.
#
#   scripts/local_slurm.sh start DIR   # write DIR/slurm.conf, start munged, slurmctld, slurmd; wait until idle
#   scripts/local_slurm.sh env DIR     # print `export SLURM_CONF=...` for the client commands (sbatch, squeue, ...)
#   scripts/local_slurm.sh status DIR  # exit 0 when all three daemons of DIR run
#   scripts/local_slurm.sh stop DIR    # cancel DIR's jobs, stop the daemons (SIGTERM, then SIGKILL), delete DIR
#
# With LOCAL_SLURM_OWNER_PID=PID in start's environment, the cluster also stops by itself once PID has exited.
#
# Everything (config, munge key and socket, state, spool, logs, pid files) stays under DIR, so it never touches
# /etc/slurm, /etc/munge or a site's cluster, and two clusters in two directories do not meet (free ports are
# picked). Both verbs are idempotent: start on a running DIR does nothing, stop on a stopped or missing DIR
# does nothing. Only the processes named by DIR's pid files are ever signalled.
#
# Settings that make Slurm work in a container (DESIGN.md section 2, verified): proctrack/linuxproc and task/none
# (no cgroup or systemd needed), select/cons_tres with CR_Core, MinJobAge=4 (finished jobs leave the controller
# within seconds, so `sbatch --wait` returns promptly), and munged running as user munge. Needs root: munged
# must switch to the munge user and slurmd must run job steps.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld, slurmd, runuser live there; some CI PATHs lack it

usage() { echo "usage: $0 {start|stop|status|env} DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
verb=$1
dir=$(realpath -m -- "$2")  # absolute: the watchdog and the config outlive the caller's cwd

log() { echo "local_slurm: $*" >&2; }

# Pid of a daemon of DIR if it is alive, else empty.
alive_pid() {
  local pidfile=$dir/run/$1.pid pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

all_running() {
  [ -n "$(alive_pid munged)" ] && [ -n "$(alive_pid slurmctld)" ] && [ -n "$(alive_pid slurmd)" ]
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() {
  local node cpus ctld_port slurmd_port
  node=$(hostname -s)
  cpus=$(nproc)
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  cat >"$dir/etc/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster for tests. Do not use for anything real.
ClusterName=betterai-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
PlugStackConfig=$dir/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule within a second or two of a submission, a requeue or a freed node (defaults: 60 s and 30 s).
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=4
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$dir/etc/plugstack.conf"
}

start_munged() {
  [ -n "$(alive_pid munged)" ] && return 0
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$dir/munge"
  chmod 0711 "$dir/munge"  # munged wants its socket's directory searchable by everyone
  chmod 0400 "$dir/munge/munge.key"
  # munged refuses a pid file in a directory it cannot write; it writes its own under DIR/munge and we copy it.
  runuser -u munge -- /usr/sbin/munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  for _ in $(seq 100); do
    [ -s "$dir/munge/munged.pid" ] && [ -S "$dir/munge/munge.socket" ] && break
    sleep 0.1
  done
  if [ ! -S "$dir/munge/munge.socket" ]; then
    log "munged did not open its socket within 10 s; see $dir/munge/munged.log"; exit 1
  fi
  cp "$dir/munge/munged.pid" "$dir/run/munged.pid"
}

wait_idle() {
  local state
  for _ in $(seq 150); do
    state=$(SLURM_CONF=$dir/etc/slurm.conf sinfo -h -o %T 2>/dev/null | head -n1 || true)
    case $state in
      idle|mixed|allocated) return 0 ;;
    esac
    sleep 0.2
  done
  log "the node did not become idle within 30 s (state: '${state:-none}'); logs in $dir/log"
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  return 1
}

start() {
  if [ "$(id -u)" -ne 0 ]; then
    log "needs root (munged runs as user munge, slurmd runs job steps)"; exit 1
  fi
  local missing=()
  for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "not installed: ${missing[*]} (apt-get install slurm-wlm munge, or scripts/setup_system.sh)"; exit 1
  fi
  if all_running; then log "already running in $dir"; return 0; fi
  mkdir -p "$dir"/{etc,munge,state,spool,run,log}
  chmod 0755 "$dir"  # mktemp -d makes it 0700; munged (user munge) must reach its files inside
  [ -s "$dir/etc/slurm.conf" ] || write_config
  start_munged
  export SLURM_CONF=$dir/etc/slurm.conf
  [ -n "$(alive_pid slurmctld)" ] || /usr/sbin/slurmctld -i -f "$SLURM_CONF"
  [ -n "$(alive_pid slurmd)" ] || /usr/sbin/slurmd -f "$SLURM_CONF" -N "$(hostname -s)"
  wait_idle
  start_watchdog
  log "running in $dir (export SLURM_CONF=$SLURM_CONF)"
}

stop_one() {
  local name=$1 pid
  pid=$(alive_pid "$name")
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

cancel_jobs() {
  [ -n "$(alive_pid slurmctld)" ] || return 0
  local ids
  ids=$(SLURM_CONF=$dir/etc/slurm.conf squeue -h -o %i 2>/dev/null) || return 0
  [ -n "$ids" ] || return 0
  log "cancelling jobs: ${ids//$'\n'/ }"
  # shellcheck disable=SC2086
  SLURM_CONF=$dir/etc/slurm.conf scancel $ids 2>/dev/null || true
  for _ in $(seq 120); do  # KillWait (10 s) plus slack for the jobs' own shutdown
    [ -z "$(SLURM_CONF=$dir/etc/slurm.conf squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.5
  done
  log "jobs still listed after 60 s; stopping the daemons anyway"
}

stop() {
  [ -d "$dir" ] || return 0
  local watchdog
  watchdog=$(alive_pid watchdog)
  if [ -n "$watchdog" ] && [ "$watchdog" != "$$" ]; then kill -TERM "$watchdog" 2>/dev/null || true; fi
  # Jobs first: a job step (slurmstepd) outlives slurmd, so the daemons must not go before the jobs do.
  cancel_jobs
  # slurmd before the controller, so it does not retry registering.
  stop_one slurmd
  stop_one slurmctld
  stop_one munged
  rm -rf -- "$dir"
}

# LOCAL_SLURM_OWNER_PID=PID: stop the cluster when that process ends, even if it never calls stop (a test run
# that is killed). A detached shell polls every 2 s and runs `stop` itself; it also ends when DIR goes away.
start_watchdog() {
  local owner=${LOCAL_SLURM_OWNER_PID:-}
  [ -n "$owner" ] || return 0
  [ -n "$(alive_pid watchdog)" ] && return 0
  # shellcheck disable=SC2016  # the watchdog's own positional parameters
  setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -d "$2" ]; do sleep 2; done
                  [ -d "$2" ] && exec bash "$3" stop "$2"' local_slurm_watchdog "$owner" "$dir" "$(readlink -f "$0")" \
    </dev/null >>"$dir/log/watchdog.log" 2>&1 &
  echo $! >"$dir/run/watchdog.pid"
}

case $verb in
  start) start ;;
  stop) stop ;;
  status) all_running ;;
  env) echo "export SLURM_CONF=$dir/etc/slurm.conf" ;;
  *) usage ;;
esac
