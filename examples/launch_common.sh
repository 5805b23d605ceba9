# Shared launcher logic of examples/{pretrain,sft,grpo}.sh (sourced, not run). One function:
#
#   betterai_launch STAGE CONFIG [section.key=value ...]
#
# Two ways in, one code path out (`python -m betterai_megatron STAGE --config CONFIG overrides...`):
#
# 1. Run directly (a shell, srun, a cluster's job runner): start torchrun here, Megatron-LM style, from
#      NNODES          number of nodes (torchrun agents)                      default 1
#      NODE_RANK       this node's rank, 0..NNODES-1                          default 0
#      MASTER_ADDR     host of node 0 (the rendezvous store)                  default 127.0.0.1; required if NNODES>1
#      MASTER_PORT     port on MASTER_ADDR                                    default: a free port if NNODES=1, else 29500
#      NPROC_PER_NODE  processes per node                                     default: GPUs visible here, 1 without GPUs
#      TORCHRUN_ARGS   extra torchrun flags, word-split (e.g. "--max-restarts 0")
#      BETTERAI_DRY_RUN=1  print the launch line and exit 0 without running it
# 2. Started by torchrun (`torchrun ... --no-python examples/pretrain.sh CONFIG ...`): torchrun's environment
#    (TORCHELASTIC_RUN_ID, or RANK + LOCAL_RANK + WORLD_SIZE) is already there, so exec the Python entry directly.
#
# Python: $PYTHON if set, else the repository's .venv, else python3 on PATH. The resolved command is printed
# (on local rank 0 only in case 2) before it runs.
#
# Signals. torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers, but (torch 2.13, default
# --signals-to-handle) not SIGUSR1, whose default action would kill torchrun itself and orphan the workers.
# Slurm delivers a job-step signal to every process of the step (proctrack/cgroup or linuxproc), workers
# included, so torchrun is started with SIGUSR1 ignored (the disposition survives exec): it keeps supervising
# while the trainer, which installs its own SIGUSR1 handler, checkpoints and exits 0 — and then torchrun exits 0.
# (torchrun --signals-to-handle ...,SIGUSR1 would also work, but treats it as a death signal: forward, wait,
# SIGKILL after the shutdown timeout, exit 1 — every planned stop would look like a failure.)
# Outside Slurm send SIGUSR1 to the workers, or SIGTERM to torchrun. If you start torchrun yourself under Slurm
# (case 2), ignore SIGUSR1 there too: srun bash -c "trap '' USR1; exec torchrun ... --no-python ...".
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT (how long torchrun waits after forwarding SIGTERM before SIGKILL; torch's
# default 30 s) is raised to 120 s so a checkpoint started by SIGTERM can finish.

betterai_repo_dir() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

betterai_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -x "$(betterai_repo_dir)/.venv/bin/python" ]; then
    echo "$(betterai_repo_dir)/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1; then
    command -v python3
  else
    echo "betterai launcher: no python found (set PYTHON, create .venv, or put python3 on PATH)" >&2
    return 1
  fi
}

# Number of GPUs this process may use: CUDA_VISIBLE_DEVICES (which Slurm's --gpus sets) wins, then nvidia-smi.
betterai_gpu_count() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    if [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = "-1" ]; then echo 0; return; fi
    local IFS=,
    # shellcheck disable=SC2086  # split on the commas
    set -- $CUDA_VISIBLE_DEVICES
    echo $#
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

betterai_free_port() {
  "$1" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

betterai_under_torchrun() {
  [ -n "${TORCHELASTIC_RUN_ID:-}" ] || { [ -n "${RANK:-}" ] && [ -n "${LOCAL_RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ]; }
}

betterai_is_uint() {
  case $1 in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac
}

# The words of a command, quoted so that the printed line can be pasted back into a shell.
betterai_quote() {
  local out
  printf -v out '%q ' "$@"
  echo "${out% }"
}

betterai_bad_env() {
  echo "$(basename "$0"): $1='$2' must be a whole number (at least 1 for NNODES and NPROC_PER_NODE)" >&2
}

betterai_launch() {
  local stage=$1
  shift
  if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    echo "usage: $(basename "$0") CONFIG [section.key=value ...]   (env: NNODES NODE_RANK MASTER_ADDR" \
      "MASTER_PORT NPROC_PER_NODE TORCHRUN_ARGS PYTHON)" >&2
    return 2
  fi
  local config=$1
  shift
  if [ ! -f "$config" ]; then
    echo "$(basename "$0"): config file '$config' not found (cwd: $PWD)" >&2
    return 2
  fi
  local python
  python=$(betterai_python) || return 1
  local entry=("$python" -m betterai_megatron "$stage" --config "$config" "$@")

  if betterai_under_torchrun; then
    if [ "${LOCAL_RANK:-0}" = "0" ]; then echo "launch (under torchrun, rank ${RANK:-?} of ${WORLD_SIZE:-?}): $(betterai_quote "${entry[@]}")"; fi
    [ "${BETTERAI_DRY_RUN:-0}" = 1 ] && return 0
    exec "${entry[@]}"
  fi

  local nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0} nproc=${NPROC_PER_NODE:-}
  if [ -z "$nproc" ]; then
    nproc=$(betterai_gpu_count)
    [ "$nproc" -gt 0 ] || nproc=1
  fi
  if ! betterai_is_uint "$nnodes" || [ "$nnodes" -eq 0 ]; then betterai_bad_env NNODES "$nnodes"; return 2; fi
  if ! betterai_is_uint "$node_rank"; then betterai_bad_env NODE_RANK "$node_rank"; return 2; fi
  if ! betterai_is_uint "$nproc" || [ "$nproc" -eq 0 ]; then betterai_bad_env NPROC_PER_NODE "$nproc"; return 2; fi
  if [ "$node_rank" -ge "$nnodes" ]; then
    echo "$(basename "$0"): NODE_RANK=$node_rank must be below NNODES=$nnodes" >&2
    return 2
  fi
  local master_addr=${MASTER_ADDR:-} master_port=${MASTER_PORT:-}
  if [ -z "$master_addr" ]; then
    if [ "$nnodes" -gt 1 ]; then
      echo "$(basename "$0"): NNODES=$nnodes needs MASTER_ADDR (the host of node rank 0)" >&2
      return 2
    fi
    master_addr=127.0.0.1
  fi
  if [ -z "$master_port" ]; then
    if [ "$nnodes" -eq 1 ]; then master_port=$(betterai_free_port "$python"); else master_port=29500; fi
  fi
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron's TP/SP overlap needs it
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
  # shellcheck disable=SC2206  # TORCHRUN_ARGS is meant to be word-split
  local extra=(${TORCHRUN_ARGS:-})
  local launch=("$python" -m torch.distributed.run --nnodes "$nnodes" --node-rank "$node_rank"
    --nproc-per-node "$nproc" --master-addr "$master_addr" --master-port "$master_port" "${extra[@]}"
    -m betterai_megatron "$stage" --config "$config" "$@")
  echo "launch (node $node_rank of $nnodes): $(betterai_quote "${launch[@]}")"
  [ "${BETTERAI_DRY_RUN:-0}" = 1 ] && return 0
  trap '' USR1  # see "Signals" above: torchrun must survive SIGUSR1; the trainer handles it
  exec "${launch[@]}"
}
