#!/usr/bin/env bash
# Pretraining launcher: examples/pretrain.sh CONFIG [section.key=value ...]
#
#   examples/pretrain.sh examples/configs/tiny_cpu.yaml train.steps=5              # this machine, all GPUs (or 1 CPU process)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 examples/pretrain.sh CONFIG ...          # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 examples/pretrain.sh CONFIG ...          # on node1
#   torchrun --nnodes 2 --nproc-per-node 8 ... --no-python examples/pretrain.sh CONFIG ...   # torchrun starts it
#
# Environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, TORCHRUN_ARGS, PYTHON) and signal
# handling are described in examples/launch_common.sh; Slurm: examples/slurm/pretrain.sbatch.
set -euo pipefail
# shellcheck source=examples/launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
betterai_launch pretrain "$@"
