#!/usr/bin/env bash
# Installs what the tests need (pinned CPU torch first, then the project with its test extras)
# and the fortunes text packages, and runs the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "dev,test,deepspeed,wandb,peft,demo,eval"
bash "$ROOT/scripts/install_fortunes.sh" || echo "tests that read the fortunes packages will be skipped" >&2
cd "$ROOT"
ruff check obim_trainer tests benchmarks examples
python -m pytest -q "$@"
