#!/usr/bin/env bash
# Install the gateway into .venv and run it in front of the embedded demo PACS.
# Usage: bash scripts/demo.sh [dimse-gateway demo options...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q -e . 
exec .venv/bin/dimse-gateway demo "$@"
