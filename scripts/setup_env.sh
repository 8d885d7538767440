#!/usr/bin/env bash
# Creates .venv (if needed) and installs the project with the pinned CPU build of torch first,
# so that no dependency pulls the multi-GB CUDA wheels. Usage: source scripts/setup_env.sh [extras]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-dev}"
TORCH_SPEC="${OBIM_TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  python3 -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
python -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]"
