#!/usr/bin/env bash
# Installs everything dicomnode needs on a fresh Debian machine with Python 3.11:
# system tools (Orthanc, DCMTK, dicom3tools, Redis) and a virtual environment built from
# requirements.lock. The environment lives outside the clone, keyed by the lock's hash, so a
# second run (or CI on the same machine) reuses it; `.venv` in the clone points at it.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc dcmtk dicom3tools redis-server libgl1 libglib2.0-0 fonts-dejavu-core openssl chromium chromium-driver)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian package starts Orthanc as a service on 4242/8042; tests start their own.
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
key=$( (cat requirements.lock; "$PY" --version) | sha256sum | cut -c1-16)
VENV=${DICOMNODE_VENV:-$HOME/.cache/dicomnode/venv-$key}
if [ ! -f "$VENV/.complete" ]; then
  echo "[setup] creating $VENV from requirements.lock (first run downloads PyTorch, several GB)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip==25.3
  "$VENV/bin/pip" install -q --no-deps -r requirements.lock
  touch "$VENV/.complete"
fi
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || "$VENV/bin/pip" install -q --no-deps -e .
ln -sfn "$VENV" .venv

# Ultralytics fetches a font on first use; give it a local one so nothing reaches for the network.
export YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-$HOME/.config/dicomnode-yolo}
mkdir -p "$YOLO_CONFIG_DIR/Ultralytics"
[ -f "$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf" ] || cp /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf "$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf"
echo "[setup] ready: $(.venv/bin/python --version), venv $VENV"
