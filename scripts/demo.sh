#!/usr/bin/env bash
# Install the gateway into .venv and run it in front of the embedded demo PACS.
# Usage: bash scripts/demo.sh [dimse-gateway demo options...]
#   --viewer [DIR] also installs the OHIF viewer (npm) and serves it at /viewer/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q -e .
args=("$@")
for i in "${!args[@]}"; do
    if [ "${args[$i]}" = "--viewer" ]; then
        next=${args[$((i + 1))]:-}
        if [ -n "$next" ] && [ "${next#-}" = "$next" ]; then
            bash scripts/install-viewer.sh "$next"
        else
            bash scripts/install-viewer.sh
        fi
    fi
done
exec .venv/bin/dimse-gateway demo "$@"
