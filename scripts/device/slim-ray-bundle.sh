#!/usr/bin/env bash
# Shrinks the Ray Serve bundle of ../shared/device/make-ray-bundle.sh so that it
# travels to the GPU machine together with the bundled models (64 MiB per call):
# strips symbol tables from Ray's binaries and drops what Serve never loads
# (the dashboard's web client, ray.llm).
#   scripts/device/slim-ray-bundle.sh [.raybundle]
set -euo pipefail
DIR="${1:-.raybundle}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar -xJf "$DIR/ray-serve-py312.tar.xz" -C "$WORK"
rm -rf "$WORK/ray/dashboard/client/build" "$WORK/ray/llm"
for f in ray/_raylet.so ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server; do
  strip --strip-unneeded "$WORK/$f"
done
XZ_OPT=-9T2 tar -cJf "$DIR/ray-serve-py312.tar.xz" -C "$WORK" .
ls -la "$DIR"
