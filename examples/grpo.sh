#!/usr/bin/env bash
# GRPO launcher: examples/grpo.sh CONFIG [section.key=value ...] — runs `betterai grpo` exactly as
# examples/pretrain.sh runs `betterai pretrain` (same environment variables, same two ways in; see
# examples/launch_common.sh).
set -euo pipefail
# shellcheck source=examples/launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
betterai_launch grpo "$@"
