#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (Python packages, Mosquitto) and runs it.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
PIP="python3 -m pip install -q --disable-pip-version-check"
python3 -c "import torch, torchvision" 2>/dev/null || $PIP torch==2.14.1 torchvision==0.29.1
$PIP -e '.[all,test]'   # base = torch-free inference; all = edge training + server; test = pytest & co
exec python3 -m pytest "$@"
