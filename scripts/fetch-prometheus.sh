#!/usr/bin/env bash
# Unpacks Debian's `prometheus` package (prometheus and promtool, static binaries) into DEST,
# without installing it system-wide: DEST/bin/prometheus and DEST/bin/promtool.
set -euo pipefail
dest=${1:?usage: fetch-prometheus.sh DEST}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
    echo "apt-get download failed; refreshing package lists (needs root)" >&2
    apt-get update -qq
    apt-get download prometheus
fi
dpkg -x prometheus_*.deb pkg
cd - >/dev/null
rm -rf "$dest"
mkdir -p "$dest/bin"
cp "$work"/pkg/usr/bin/prometheus "$work"/pkg/usr/bin/promtool "$dest/bin/"
"$dest/bin/promtool" --version | head -1
