#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-$HOME/.config/dicomnode-yolo}
exec .venv/bin/python -m pytest "$@"
