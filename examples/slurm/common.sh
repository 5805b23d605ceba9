# Shared body of examples/slurm/*.sbatch (sourced by the batch script, not run). One function:
#
#   betterai_slurm_run STAGE CONFIG [section.key=value ...]
#
# runs examples/STAGE.sh once per Slurm task through srun (one task per node: one torchrun per node, which
# starts NPROC_PER_NODE workers), and makes the job survive its time limit and preemption:
#
#   NNODES       = SLURM_NTASKS (torchrun agents), NODE_RANK = SLURM_PROCID of each task
#   MASTER_ADDR  = first host of the job's node list (scontrol show hostnames), unless set
#   MASTER_PORT  = 20000 + job id mod 20000 unless set, so two jobs sharing a node do not collide
#   run.dir      = RUN_DIR, default runs/$SLURM_JOB_NAME, prepended to the overrides (later overrides win).
#                  checkpoint.dir defaults to <run.dir>/checkpoints, so it is fixed per job name: a requeued
#                  job (same name) or a resubmission under the same name resumes from its newest checkpoint.
#
# Signals, end to end (see also examples/launch_common.sh):
#   * `#SBATCH --signal=B:USR1@120`: about 120 s (Slurm's resolution is 60 s) before the time limit, Slurm sends
#     SIGUSR1 to this batch shell only. The trap below records that a requeue is wanted and forwards SIGUSR1 to
#     srun, which signals every process of the job step on every node: torchrun ignores it (started with SIGUSR1
#     ignored), every trainer rank gets it, agrees at the next step boundary, saves a checkpoint and exits 0.
#     The signal is repeated every 30 s until srun returns (a trainer still starting up would miss it).
#   * When srun has returned, `scontrol requeue` puts the job back in the queue (same job id, same name,
#     SLURM_RESTART_COUNT+1); the next run finds the checkpoint and resumes. At most MAX_REQUEUES times (20).
#   * SIGTERM (scancel, preemption with PreemptMode=REQUEUE, the time limit itself) reaches every process of the
#     job directly from Slurm: torchrun forwards it to its workers too, the trainer checkpoints and exits, and the
#     batch shell just waits for srun (no requeue of its own: scancel means stop; preemption requeues by itself
#     because of --requeue). Slurm SIGKILLs everything KillWait seconds (site setting, often 30 s) after SIGTERM.
#   * --kill-on-bad-exit=1: if any node's torchrun fails, srun stops the others instead of leaving them
#     blocked in a collective until the timeout.

betterai_slurm_repo() {
  # Slurm runs a copy of the batch script from its spool directory, so $0 says nothing about the checkout:
  # use BETTERAI_REPO, else the submission directory.
  local repo=${BETTERAI_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [ ! -f "$repo/examples/launch_common.sh" ]; then
    echo "betterai sbatch: $repo is not a betterai_megatron checkout; submit from the repository root" \
      "or set BETTERAI_REPO" >&2
    return 1
  fi
  echo "$repo"
}

betterai_slurm_on_usr1() {
  echo "betterai sbatch: $(date -Is) SIGUSR1 (time limit near): checkpoint, then requeue"
  [ "$betterai_requeue_wanted" = 1 ] && return 0
  betterai_requeue_wanted=1
  [ -n "${betterai_srun_pid:-}" ] || return 0
  kill -USR1 "$betterai_srun_pid" 2>/dev/null || true
  # Repeat it every RESIGNAL_S (30) seconds while the step runs: a trainer still starting up (importing, loading
  # a checkpoint) has not installed its handler yet and ignores SIGUSR1; once stopping, repeats are harmless.
  (
    while sleep "${RESIGNAL_S:-30}" && kill -0 "$betterai_srun_pid" 2>/dev/null; do
      kill -USR1 "$betterai_srun_pid" 2>/dev/null || true
    done
  ) &
}

betterai_slurm_on_term() {
  echo "betterai sbatch: $(date -Is) SIGTERM: the trainer checkpoints and stops; waiting for it"
}

betterai_slurm_run() {
  local stage=$1
  shift
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "betterai sbatch: not inside a Slurm job; submit with sbatch (or use examples/$stage.sh)" >&2
    return 2
  fi
  if [ $# -lt 1 ]; then
    echo "usage: sbatch [options] examples/slurm/$stage.sbatch CONFIG [section.key=value ...]" >&2
    return 2
  fi
  local repo config=$1
  shift
  repo=$(betterai_slurm_repo) || return 1
  cd "$repo" || return 1

  export NNODES=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
  local hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  local run_dir=${RUN_DIR:-runs/${SLURM_JOB_NAME:-betterai}}
  local restarts=${SLURM_RESTART_COUNT:-0} max_requeues=${MAX_REQUEUES:-20}
  echo "betterai sbatch: $(date -Is) job $SLURM_JOB_ID ($SLURM_JOB_NAME) run $restarts: $NNODES torchrun" \
    "agents on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, run.dir=$run_dir"

  betterai_requeue_wanted=0
  betterai_srun_pid=
  trap betterai_slurm_on_usr1 USR1
  trap betterai_slurm_on_term TERM
  # Each task (one torchrun and its workers) gets its share of the node's CPUs: srun steps do not inherit
  # sbatch's --cpus-per-task since Slurm 22.05, and one CPU per task would pin all workers to one core.
  local tasks_per_node=${SLURM_NTASKS_PER_NODE:-1}
  local cpus_per_task=$(( ${SLURM_CPUS_ON_NODE:-1} / tasks_per_node ))
  [ "$cpus_per_task" -ge 1 ] || cpus_per_task=1
  # srun runs in the background so the traps can run while it works (bash defers traps during a foreground
  # command). Each task turns its SLURM_PROCID into NODE_RANK and execs the stage launcher.
  # shellcheck disable=SC2016  # $SLURM_PROCID and $0/$@ are expanded by each task's bash, not here
  srun --kill-on-bad-exit=1 --cpus-per-task="$cpus_per_task" \
    bash -c 'export NODE_RANK=$SLURM_PROCID; exec "$0" "$@"' "examples/$stage.sh" \
    "$config" "run.dir=$run_dir" "$@" &
  betterai_srun_pid=$!
  local rc
  while :; do
    wait "$betterai_srun_pid" && rc=0 || rc=$?
    kill -0 "$betterai_srun_pid" 2>/dev/null || break  # still running: wait was interrupted by a trap
  done
  echo "betterai sbatch: $(date -Is) srun exited with $rc"

  if [ "$betterai_requeue_wanted" = 1 ]; then
    if [ "$restarts" -ge "$max_requeues" ]; then
      echo "betterai sbatch: already requeued $restarts times (MAX_REQUEUES=$max_requeues); not requeueing" >&2
      return "$rc"
    fi
    echo "betterai sbatch: requeueing job $SLURM_JOB_ID (run $((restarts + 1)) resumes from the checkpoint)"
    # Slurm ends this run (and this shell) here and queues the job again.
    if ! scontrol requeue "$SLURM_JOB_ID"; then
      echo "betterai sbatch: scontrol requeue failed; resubmit with the same job name to resume" >&2
      return 1
    fi
    sleep 60  # requeue terminates the batch step; do not let the job end first with a misleading state
  fi
  return "$rc"
}
