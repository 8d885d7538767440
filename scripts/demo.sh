#!/usr/bin/env bash
# The main job: installs what it needs, then runs the CPU demo end to end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "dev"
cd "$ROOT"
python examples/offline_merge.py --workdir "${OBIM_DEMO_DIR:-outputs/offline_merge}"
