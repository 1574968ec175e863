#!/usr/bin/env bash
# Fuzz the NBD handshake and request decoders with libFuzzer for a bounded time.
# usage: scripts/fuzz.sh [SECONDS]   (default 60; CI runs it from scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
swift build --product rewind-fuzz-nbd --scratch-path .build-fuzz \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -DREWIND_FUZZ >/dev/null
corpus=$(mktemp -d /tmp/rewind-fuzz.XXXXXX)
trap 'rm -rf "$corpus"' EXIT
# Seed: a valid client conversation (flags, STRUCTURED_REPLY, GO "vol", write, read, flush).
printf '\x00\x00\x00\x03IHAVEOPT\x00\x00\x00\x08\x00\x00\x00\x00IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x09\x00\x00\x00\x03vol\x00\x00\x25\x60\x95\x13\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x04abcd\x25\x60\x95\x13\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x04' > "$corpus/seed"
.build-fuzz/debug/rewind-fuzz-nbd -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 \
    -artifact_prefix="$corpus/" "$corpus" 2>&1 | tail -n 3
if ls "$corpus"/crash-* "$corpus"/oom-* "$corpus"/timeout-* >/dev/null 2>&1; then
    echo "fuzz: found a failing input" >&2; for f in "$corpus"/crash-* "$corpus"/oom-* "$corpus"/timeout-*; do [ -e "$f" ] && base64 "$f" >&2; done; exit 1
fi
echo "fuzz: no crash in $seconds s"
