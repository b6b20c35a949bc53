#!/usr/bin/env bash
# Install everything the test suite needs (Debian packages, a virtualenv) and run it.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real PACS peers and reference tools the integration tests start themselves
# (CTN's image_server keeps its index in a private MariaDB the tests start);
# Chromium runs the OHIF viewer in the browser test.
APT_PACKAGES=(orthanc orthanc-dicomweb dcmtk dcm2niix curl docker-compose ctn mariadb-server mariadb-client chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# npm fetches the viewer; Debian's only where there is no npm at all (a Node.js
# from elsewhere brings its own, and Debian's would fight it).
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
    echo "== installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# On a machine with systemd, installing orthanc starts a system instance on the
# default ports; the tests use their own ports, but a stray PACS helps nobody.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
    systemctl disable --now orthanc || true
fi

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
echo "== installing the gateway and its test tools"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'

echo "== the OHIF viewer (npm @ohif/app) for the browser test"
if ! bash scripts/install-viewer.sh; then
    # CI must run the browser test; elsewhere the test says why it skips.
    [ -z "${CI:-}" ] || exit 1
    echo "WARNING: no OHIF viewer: the browser test will be skipped" >&2
fi

echo "== lint and types"
.venv/bin/ruff check .
.venv/bin/ruff format --check app
.venv/bin/mypy app

echo "== tests"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected" is neither a pass nor a fail: say so and fail.
    echo "ERROR: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
