#!/usr/bin/env bash
# Install the built OHIF viewer (npm package @ohif/app, its dist/ folder) for
# `dimse-gateway demo --viewer` and the browser test.  Nothing of it is committed.
# Usage: bash scripts/install-viewer.sh [DEST]
#   DEST defaults to ${XDG_CACHE_HOME:-~/.cache}/dimse-gateway/ohif (the gateway's
#   default viewer_dir); afterwards DEST/dist/index.html is the viewer.
set -euo pipefail

OHIF_VERSION=3.13.2
# The registry's own checksum of that tarball: a changed package is refused.
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="

DEST=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/dimse-gateway/ohif}

installed_version() {
    [ -f "$DEST/package.json" ] && [ -f "$DEST/dist/index.html" ] || return 0
    sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$DEST/package.json" | head -n 1
}

if [ "$(installed_version)" = "$OHIF_VERSION" ]; then
    echo "== OHIF viewer $OHIF_VERSION already in $DEST"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "ERROR: npm is needed to install the OHIF viewer (Debian: apt-get install npm)" >&2
    exit 1
fi

echo "== installing OHIF viewer $OHIF_VERSION into $DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# `npm pack` fetches just the package's tarball: its dist/ is self-contained, and
# `npm install` would also pull the ~1500 packages it was built from.
(cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
tarball="$tmp/ohif-app-$OHIF_VERSION.tgz"
actual=$(python3 -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")
if [ "$actual" != "$OHIF_INTEGRITY" ]; then
    echo "ERROR: @ohif/app@$OHIF_VERSION tarball checksum $actual, expected $OHIF_INTEGRITY" >&2
    exit 1
fi
mkdir -p "$tmp/unpacked"
tar -xzf "$tarball" -C "$tmp/unpacked"
[ -f "$tmp/unpacked/package/dist/index.html" ] || {
    echo "ERROR: @ohif/app@$OHIF_VERSION has no dist/index.html" >&2
    exit 1
}
# Swap in whole, so a gateway never serves half an install.
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.old"
[ -e "$DEST" ] && mv "$DEST" "$DEST.old"
mv "$tmp/unpacked/package" "$DEST"
rm -rf "$DEST.old"
echo "== OHIF viewer $OHIF_VERSION installed: $DEST/dist"
