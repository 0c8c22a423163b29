#!/usr/bin/env bash
# Fetches Fashion-MNIST from Debian's dataset-fashion-mnist package into DEST (IDX .gz files).
set -euo pipefail
dest=${1:?usage: fetch-fashion-mnist.sh DEST}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download dataset-fashion-mnist >/dev/null 2>&1; then
    echo "apt-get download failed; refreshing package lists (needs root)" >&2
    apt-get update -qq
    apt-get download dataset-fashion-mnist
fi
dpkg -x dataset-fashion-mnist_*.deb pkg
cd - >/dev/null
mkdir -p "$dest"
cp "$work"/pkg/usr/share/datasets/fashion-mnist/*-ubyte.gz "$dest"/
ls "$dest"
