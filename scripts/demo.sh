#!/usr/bin/env bash
# Build rewind (release) and serve a demo volume with its mirror on defaults:
# demo/volume.img (1 GiB, sparse) on 127.0.0.1:10809, mirror demo/volume.img.rewind.
# Installs the build dependencies where missing. Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh build
swift build -c release --product rewind
mkdir -p demo
echo "try: nbdinfo nbd://127.0.0.1:10809   (apt-get install libnbd-bin)"
exec .build/release/rewind serve demo/volume.img --size 1G
