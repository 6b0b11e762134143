#!/usr/bin/env bash
# The README's main command: set up (idempotent), then run the demo on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-$HOME/.config/dicomnode-yolo}
exec .venv/bin/dicomnode demo "$@"
