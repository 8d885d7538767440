#!/usr/bin/env bash
# The main job: installs what it needs, then runs the CPU forgetting-recovery demo end to end
# (about 5 minutes on 2 cores, plus installing). Results: outputs/demo/README.md and the PNGs beside it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/install_fortunes.sh"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "demo,wandb"
cd "$ROOT"
obim-demo --config configs/demo/cpu.yaml --output "${OBIM_DEMO_DIR:-outputs/demo}" "$@"
