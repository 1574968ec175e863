#!/usr/bin/env bash
# fio's nbd engine through `rewind tap` (every write journalled) against the same fio straight
# to the upstream, in one run, for nbdkit's file plugin and qemu-nbd as upstreams. Prints a
# markdown table: throughput each way, tap ÷ direct (targets: ≥ 0.8 writes, ≥ 0.9 reads), and
# CPU per request (µs, from /proc/PID/stat: the upstream's, and the tap's beside it).
# Release build. Each job on a fresh volume filled with nbdcopy of random data, after `sync`.
# usage: benchmarks/tap-bench.sh [DIR] [SECONDS-PER-JOB]
# JOBS="randwrite16 seqread" runs only those; UPSTREAMS="nbdkit" only that one; SIZE=1G.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/rewind-tap-bench}
RUNTIME=${2:-10}
SIZE=${SIZE:-1G}
. benchmarks/common.sh
bench_setup "$DIR"
UP_SOCK=$DIR/up.sock TAP_SOCK=$DIR/tap.sock
UP_PID= TAP_PID=
cleanup() {
    for p in $TAP_PID $UP_PID; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

head -c $((64 << 20)) /dev/urandom > "$DIR/random64m"
fill() {  # the volume: SIZE of random data (nbdcopy, as the CPU-cost issue's fill)
    rm -f "$DIR/vol.img"; truncate -s "$SIZE" "$DIR/vol.img"
    local n=$(( $(numfmt --from=iec "$SIZE") / (64 << 20) ))
    for _ in $(seq "$n"); do cat "$DIR/random64m"; done > "$DIR/fill.img"
    nbdcopy "$DIR/fill.img" "$DIR/vol.img" 2>/dev/null || cp "$DIR/fill.img" "$DIR/vol.img"
    rm -f "$DIR/fill.img"
}
start_upstream() {
    rm -f "$UP_SOCK"
    case $1 in
        nbdkit) nbdkit -f -U "$UP_SOCK" file "$DIR/vol.img" & ;;
        qemu-nbd) qemu-nbd -f raw -k "$UP_SOCK" -t -e 16 --discard=unmap --aio=threads "$DIR/vol.img" & ;;
    esac
    UP_PID=$!
    for _ in $(seq 100); do [ -S "$UP_SOCK" ] && break; sleep 0.1; done
}
start_tap() {
    rm -rf "$DIR/vol.rewind" "$TAP_SOCK"
    "$REWIND" tap --upstream "nbd+unix:///?socket=$UP_SOCK" --mirror "$DIR/vol.rewind" --listen "unix:$TAP_SOCK" \
        --log-level warning >/dev/null 2>"$DIR/tap.log" &
    TAP_PID=$!
    for _ in $(seq 600); do [ -S "$TAP_SOCK" ] && break; sleep 0.1; done
    [ -S "$TAP_SOCK" ] || { cat "$DIR/tap.log" >&2; exit 1; }
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, clock ticks
HZ=$(getconf CLK_TCK)

run() {  # run SOCKET NAME RW BS DEPTH -> "value iops upstreamCPUµs/req tapCPUµs/req"
    local sock=$1 name=$2 rw=$3 bs=$4 depth=$5
    sync; sleep 1
    local u0 t0=0 u1 t1=0
    u0=$(ticks "$UP_PID"); [ -n "$TAP_PID" ] && t0=$(ticks "$TAP_PID")
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --size="$SIZE" --time_based --runtime="$RUNTIME" --output-format=json > "$DIR/$name.json" 2>/dev/null
    u1=$(ticks "$UP_PID"); [ -n "$TAP_PID" ] && t1=$(ticks "$TAP_PID")
    /usr/bin/python3 - "$DIR/$name.json" "$((u1 - u0))" "$((t1 - t0))" "$HZ" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
n = max(1, side["total_ios"])
up, tap, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("%.1f %.0f %.1f %.1f" % (side["bw_bytes"] / 1048576, side["iops"], up / hz * 1e6 / n, tap / hz * 1e6 / n))
PY
}

ALL_JOBS="seqwrite seqread randwrite16 randread16 randwrite1 randread1"
declare -A SPEC=([seqwrite]="write 1M 8" [seqread]="read 1M 8" [randwrite16]="randwrite 4k 16"
    [randread16]="randread 4k 16" [randwrite1]="randwrite 4k 1" [randread1]="randread 4k 1")
declare -A LABEL=([seqwrite]="sequential 1 MiB write, QD 8|MiB/s|≥ 0.8" [seqread]="sequential 1 MiB read, QD 8|MiB/s|≥ 0.9"
    [randwrite16]="random 4 KiB write, QD 16|IOPS|≥ 0.8" [randread16]="random 4 KiB read, QD 16|IOPS|≥ 0.9"
    [randwrite1]="random 4 KiB write, QD 1|IOPS|≥ 0.8" [randread1]="random 4 KiB read, QD 1|IOPS|≥ 0.9")
echo "| upstream | workload | direct | through tap | tap ÷ direct | target | upstream CPU µs/req direct / via tap | tap CPU µs/req |"
echo "|---|---|---:|---:|---:|---|---:|---:|"
for up in ${UPSTREAMS:-nbdkit qemu-nbd}; do
    for key in ${JOBS:-$ALL_JOBS}; do
        read -r rw bs depth <<< "${SPEC[$key]}"
        IFS='|' read -r label unit target <<< "${LABEL[$key]}"
        field=1; [ "$unit" = IOPS ] && field=2
        # Straight to the upstream, then through a tap (on its own fresh fill and mirror).
        fill; start_upstream "$up"
        d=$(run "$UP_SOCK" "$key-direct" "$rw" "$bs" "$depth")
        kill "$UP_PID"; wait "$UP_PID" 2>/dev/null || true
        fill; start_upstream "$up"; start_tap
        t=$(run "$TAP_SOCK" "$key-tap" "$rw" "$bs" "$depth")
        kill "$TAP_PID"; wait "$TAP_PID" 2>/dev/null || true; TAP_PID=
        kill "$UP_PID"; wait "$UP_PID" 2>/dev/null || true; UP_PID=
        dv=$(echo "$d" | cut -d' ' -f$field); tv=$(echo "$t" | cut -d' ' -f$field)
        printf "| %s | %s | %s %s | %s %s | %.2f | %s | %s / %s | %s |\n" "$up" "$label" "$dv" "$unit" "$tv" "$unit" \
            "$(awk "BEGIN {print $tv / $dv}")" "$target" "$(echo "$d" | cut -d' ' -f3)" "$(echo "$t" | cut -d' ' -f3)" "$(echo "$t" | cut -d' ' -f4)"
    done
done
