#!/usr/bin/env bash
# The syncs `rewind serve` makes per second under random 4 KiB writes, by kind, and the IOPS
# beside them: what write-ahead costs (the source written only once its log chunk is durable).
# From the server's own counters (`rewind_syncs_total{kind=...}` on --metrics), read before
# and after each fio job, so the volume's fill is not counted:
#   flush         the log, before a FLUSH or FUA write is answered
#   before_apply  the log, before batches no FLUSH covered are written to the source
#   source        the source, every 10 s or after 4 GiB / 100,000 records (what a start after a crash replays from)
# Jobs: random 4 KiB writes at QD 16 and QD 1 (no FLUSH), and QD 1 with a FLUSH after each
# write (fio --fsync=1). A fresh, filled 2 GiB volume per job.
# usage: benchmarks/write-syncs.sh [DIR] [SECONDS] [--json]
#   REWIND_BIN=PATH serves with that binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
JSON=0 ARGS=()
for a in "$@"; do case $a in --json) JSON=1 ;; *) ARGS+=("$a") ;; esac; done
DIR=${ARGS[0]:-/tmp/rewind-write-syncs}
RUNTIME=${ARGS[1]:-10}
SIZE=2G
. benchmarks/common.sh
bench_setup "$DIR"
SOCK=$DIR/nbd.sock
SERVER_PID=
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

start() {
    rm -rf "$DIR/vol.img" "$DIR/vol.img.rewind" "$SOCK"
    truncate -s $SIZE "$DIR/vol.img"
    "$REWIND" serve "$DIR/vol.img" --listen "unix:$SOCK" --metrics 127.0.0.1:0 --json --log-level warning > "$DIR/serve.json" &
    SERVER_PID=$!
    for _ in $(seq 1 100); do [ -S "$SOCK" ] && [ -s "$DIR/serve.json" ] && break; sleep 0.1; done
    METRICS=$(sed 's/.*"metrics":"\([^"]*\)".*/\1/' "$DIR/serve.json")
}
stop() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; }
syncs() {  # syncs KIND: the counter's value now
    curl -s "http://$METRICS/metrics" | awk -v k="$1" '$1 ~ "^rewind_syncs_total" && $1 ~ "kind=\""k"\"" {print $2; f=1} END {if (!f) print 0}'
}

echo "machine: $(nproc) vCPUs, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), $(df -T "$DIR" | awk 'NR==2 {print $2}') at $DIR; $(date -u +%F)" >&2
[ $JSON = 1 ] || { echo "| job | IOPS | FLUSH log syncs/s | write-ahead log syncs/s | source syncs/s |"; echo "|---|---:|---:|---:|---:|"; }
for job in "randwrite 16" "randwrite 1" "randwrite 1 --fsync=1"; do
    read -r rw depth extra <<< "$job"
    start
    fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=write --bs=1M --iodepth=8 --size=$SIZE --output=/dev/null
    sync; sleep 1
    f0=$(syncs flush); a0=$(syncs before_apply); s0=$(syncs source)
    # shellcheck disable=SC2086
    fio --name=job --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$rw" --bs=4k --iodepth="$depth" --size=$SIZE \
        --time_based --runtime="$RUNTIME" --output-format=json $extra > "$DIR/job.json" 2>/dev/null
    f1=$(syncs flush); a1=$(syncs before_apply); s1=$(syncs source)
    stop
    iops=$(/usr/bin/python3 -c '
import json, sys
t = open(sys.argv[1]).read(); print("%.0f" % json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"])' "$DIR/job.json")
    label="random 4 KiB write, QD $depth${extra:+, FLUSH after each}"
    rate() { awk -v a="$1" -v b="$2" -v t="$RUNTIME" 'BEGIN {printf "%.0f", (b - a) / t}'; }
    if [ $JSON = 1 ]; then
        printf '{"job":"%s","iops":%s,"flushSyncsPerSecond":%s,"writeAheadSyncsPerSecond":%s,"sourceSyncsPerSecond":%s}\n' \
            "$label" "$iops" "$(rate "$f0" "$f1")" "$(rate "$a0" "$a1")" "$(rate "$s0" "$s1")"
    else
        echo "| $label | $iops | $(rate "$f0" "$f1") | $(rate "$a0" "$a1") | $(rate "$s0" "$s1") |"
    fi
done
