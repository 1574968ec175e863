#!/usr/bin/env bash
# Random 4 KiB reads at queue depth 1 against `rewind serve` and `nbdkit file`, with the
# server and fio pinned to the same vCPU, to different ones, and not pinned: IOPS and the
# server's CPU time per request (from /proc/PID/stat). At queue depth 1 every request is two
# cross-thread wake-ups; on a VM a wake-up across vCPUs can cost more than the request's work,
# and this separates the two. Release build.
# usage: benchmarks/qd1-reads.sh [DIR] [REQUESTS] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
JSON=0
ARGS=()
for a in "$@"; do if [ "$a" = --json ]; then JSON=1; else ARGS+=("$a"); fi; done
DIR=${ARGS[0]:-/tmp/rewind-qd1}
REQUESTS=${ARGS[1]:-150000}
[ "$(nproc)" -ge 2 ] || { echo "qd1-reads: needs two CPUs" >&2; exit 2; }
. benchmarks/common.sh
bench_setup "$DIR"
SOCK=$DIR/nbd.sock
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

run() {  # run SERVER SERVER-CPUS CLIENT-CPUS -> "IOPS CPU-µs-per-request"
    local server=$1 scpu=$2 ccpu=$3 t0 t1 out
    rm -rf "$DIR/vol.img" "$DIR/vol.img.rewind" "$SOCK"
    truncate -s 2G "$DIR/vol.img"
    case $server in
        rewind) taskset -c "$scpu" "$REWIND" serve "$DIR/vol.img" --listen "unix:$SOCK" --log-level warning >/dev/null & ;;
        nbdkit) taskset -c "$scpu" nbdkit -f -U "$SOCK" file "$DIR/vol.img" & ;;
    esac
    PID=$!
    for _ in $(seq 1 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
    fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=write --bs=1M --iodepth=8 --size=2G --output=/dev/null
    sync; sleep 1
    t0=$(awk '{print $14 + $15}' "/proc/$PID/stat")
    out=$(taskset -c "$ccpu" fio --name=r --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=randread --bs=4k \
        --iodepth=1 --size=2G --number_ios="$REQUESTS" --output-format=terse 2>/dev/null | tail -1)
    t1=$(awk '{print $14 + $15}' "/proc/$PID/stat")
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    # terse field 8: read IOPS; CPU ticks are 10 ms
    echo "$(echo "$out" | cut -d';' -f8) $(( (t1 - t0) * 10000000 / REQUESTS / 1000 ))"
}

[ $JSON = 1 ] || { echo "| placement | rewind IOPS | nbdkit IOPS | rewind ÷ nbdkit | rewind CPU µs/request | nbdkit CPU µs/request |"; echo "|---|---:|---:|---:|---:|---:|"; }
for placement in "same vCPU:0:0" "different vCPUs:0:1" "not pinned:0-$(( $(nproc) - 1 )):0-$(( $(nproc) - 1 ))"; do
    IFS=: read -r label scpu ccpu <<< "$placement"
    read -r ri rc <<< "$(run rewind "$scpu" "$ccpu")"
    read -r ni nc <<< "$(run nbdkit "$scpu" "$ccpu")"
    ratio=$(awk "BEGIN {printf \"%.2f\", $ri / $ni}")
    if [ $JSON = 1 ]; then
        printf '{"placement":"%s","rewindIOPS":%s,"nbdkitIOPS":%s,"ratio":%s,"rewindCPUMicrosPerRequest":%s,"nbdkitCPUMicrosPerRequest":%s}\n' \
            "$label" "$ri" "$ni" "$ratio" "$rc" "$nc"
    else
        echo "| $label | $ri | $ni | $ratio | $rc | $nc |"
    fi
done
