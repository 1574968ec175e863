#!/usr/bin/env bash
# Instant recovery (`rewind export`), side by side with its peer in one run:
#  - time to first byte: from launching `rewind export MIRROR --at POINT` to the first 4 KiB read
#    through NBD, at each volume size in SIZES with RECORDS records of history, for several
#    points; beside it the time `rewind restore` takes to copy the same point (what an export
#    saves) and nbdkit's own time to first byte on the restored copy;
#  - random 4 KiB reads at queue depth 16 and sequential 1 MiB reads (fio's nbd engine,
#    RUNTIME s each) of an export of the newest point against `nbdkit file` serving a restored
#    copy of that point, with the server's CPU per request (/proc/PID/stat);
#  - the export's peak RSS (VmHWM) after those runs.
# Usage: benchmarks/export-bench.sh [RECORDS]   (default 1000000)
# Environment: SIZES ("1G 64G"), RUNTIME (10), BENCH_DIR (/tmp), REWIND_BIN/TORTURE_BIN (else a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/common.sh
RECORDS=${1:-1000000}
SIZES=${SIZES:-"1G 64G"}
RUNTIME=${RUNTIME:-10}
DIR=${BENCH_DIR:-/tmp}/rewind-export-bench
bench_setup "$DIR"
if [ -n "${TORTURE_BIN:-}" ]; then TORTURE=$TORTURE_BIN; else
    swift build -c release --product rewind-torture >/dev/null
    TORTURE=$PWD/.build/release/rewind-torture
fi
SOCK=$DIR/nbd.sock
SERVER_PID=
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

ttfb() {  # ttfb CMD...: seconds from launching CMD (an NBD server on $SOCK) to the first 4 KiB read
    rm -f "$SOCK"
    /usr/bin/python3 - "$SOCK" "$@" <<'PY'
import nbd, subprocess, sys, time
sock, cmd = sys.argv[1], sys.argv[2:]
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
try:
    while True:
        try:
            h = nbd.NBD()
            h.connect_uri("nbd+unix:///?socket=" + sock)
            break
        except nbd.Error:
            if time.monotonic() - t0 > 120 or p.poll() is not None:
                sys.exit("no answer from: " + " ".join(cmd))
            time.sleep(0.001)
    h.pread(4096, 0)
    print("%.3f" % (time.monotonic() - t0))
    h.shutdown()
finally:
    p.terminate()
    p.wait()
PY
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, in clock ticks
HZ=$(getconf CLK_TCK)

fio_job() {  # fio_job NAME RW BS DEPTH -> "MiB/s IOPS cpu_us_per_request" against $SERVER_PID on $SOCK
    local name=$1 rw=$2 bs=$3 depth=$4 before after
    before=$(cpu_ticks "$SERVER_PID")
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --size=$SIZE_BYTES --time_based --runtime="$RUNTIME" --output-format=json > "$DIR/$name.json" 2>/dev/null
    after=$(cpu_ticks "$SERVER_PID")
    /usr/bin/python3 - "$DIR/$name.json" "$((after - before))" "$HZ" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
r = j["read"]
requests = r["total_ios"] or 1
print("%.1f %.0f %.1f" % (r["bw_bytes"] / 1048576, r["iops"], int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / requests))
PY
}

start_server() {  # start_server CMD...: run an NBD server on $SOCK in the background
    rm -f "$SOCK"
    "$@" >/dev/null &
    SERVER_PID=$!
    for _ in $(seq 1 600); do [ -S "$SOCK" ] && break; sleep 0.1; done
    [ -S "$SOCK" ] || { echo "server did not start: $*" >&2; exit 1; }
}
stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; }
sample_anon() {  # the largest anonymous (private) resident size of $1, KiB, into $DIR/anon.max until it exits
    local pid=$1 max=0 v
    while kill -0 "$pid" 2>/dev/null; do
        v=$(awk '/RssAnon/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
        [ "${v:-0}" -gt "$max" ] && max=$v && echo "$max" > "$DIR/anon.max"
        sleep 0.2
    done
}

echo "# rewind export benchmark: $(date -u +%FT%TZ), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), records $RECORDS"
for SIZE in $SIZES; do
    M=$DIR/vol-$SIZE.rewind
    rm -rf "$M"
    "$REWIND" init "$M" --size "$SIZE" >/dev/null
    SIZE_BYTES=$("$REWIND" status "$M" --json | sed 's/.*"volumeSize":\([0-9]*\).*/\1/')
    started=$EPOCHREALTIME
    "$TORTURE" append "$M" 7 "$RECORDS" 20000 --writes >/dev/null
    echo "## $SIZE volume: $RECORDS records appended in $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", b - a}') s; mirror $(du -sh "$M" | cut -f1)"
    MID=$((RECORDS / 2))
    MIDTIME=$("$REWIND" timeline "$M" --since seq:$MID --until seq:$MID --json | sed 's/.*"time":"\([^"]*\)".*/\1/')
    "$REWIND" bookmark "$M" mid --at seq:$MID >/dev/null
    echo "| point | rewind export: first byte (s) | rewind restore of the point (s) | nbdkit file on the restored copy: first byte (s) |"
    echo "|---|---|---|---|"
    for point in latest seq:$MID "time:$MIDTIME" bookmark:mid oldest; do
        sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
        cold=$(ttfb "$REWIND" export "$M" --at "$point" --listen "unix:$SOCK" --log-level warning)
        warm=$(ttfb "$REWIND" export "$M" --at "$point" --listen "unix:$SOCK" --log-level warning)
        started=$EPOCHREALTIME
        "$REWIND" restore "$M" --at "$point" --to "$DIR/copy.img" >/dev/null 2>&1
        restore=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.3f", b - a}')
        nk=$(ttfb nbdkit -f -U "$SOCK" file "$DIR/copy.img")
        echo "| $point | $cold (cold cache), $warm (warm) | $restore | $nk |"
        rm -f "$DIR/copy.img"
    done
    if [ "$SIZE" = "$(echo $SIZES | cut -d' ' -f1)" ]; then
        # Throughput against nbdkit serving a restored copy of the same point, page cache warm for both.
        "$REWIND" restore "$M" --at latest --to "$DIR/copy.img" >/dev/null 2>&1
        cat "$DIR/copy.img" "$M"/base.img "$M"/log/* "$M"/journal/data.mdb > /dev/null
        declare -A R
        for job in "randread16 randread 4k 16" "seqread read 1M 8"; do
            set -- $job
            start_server "$REWIND" export "$M" --at latest --listen "unix:$SOCK" --log-level warning
            rm -f "$DIR/anon.max"; sample_anon "$SERVER_PID" & sampler=$!
            R[rewind,$1]=$(fio_job "$1-rewind" "$2" "$3" "$4")
            hwm=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER_PID/status")
            stop_server
            wait "$sampler" 2>/dev/null || true
            R[anon,$1]=$(cat "$DIR/anon.max" 2>/dev/null || echo 0)
            start_server nbdkit -f -U "$SOCK" file "$DIR/copy.img"
            R[nbdkit,$1]=$(fio_job "$1-nbdkit" "$2" "$3" "$4")
            stop_server
            R[rss,$1]=$hwm
        done
        echo
        echo "| $SIZE, newest point, $RUNTIME s each | rewind export | nbdkit file (restored copy) | rewind ÷ nbdkit | CPU µs/request rewind / nbdkit | target |"
        echo "|---|---|---|---|---|---|"
        for key in randread16 seqread; do
            read -r rbw riops rcpu <<< "${R[rewind,$key]}"
            read -r nbw niops ncpu <<< "${R[nbdkit,$key]}"
            if [ $key = randread16 ]; then
                echo "| random 4 KiB read, QD 16 (IOPS) | $riops | $niops | $(awk "BEGIN {printf \"%.2f\", $riops / $niops}") | $rcpu / $ncpu | ≥ 0.7 |"
            else
                echo "| sequential 1 MiB read, QD 8 (MiB/s) | $rbw | $nbw | $(awk "BEGIN {printf \"%.2f\", $rbw / $nbw}") | $rcpu / $ncpu | ≥ 0.9 |"
            fi
        done
        echo
        echo "Peak RSS of the export (VmHWM): $(( (R[rss,randread16] > R[rss,seqread] ? R[rss,randread16] : R[rss,seqread]) / 1024 )) MiB, of which anonymous (RssAnon, sampled every 0.2 s) at most $(( (R[anon,randread16] > R[anon,seqread] ? R[anon,randread16] : R[anon,seqread]) / 1024 )) MiB; the rest is the index's pages of data.mdb ($(du -m "$M/journal/data.mdb" | cut -f1) MiB) mapped by LMDB (target ≤ 128 MiB)"
        rm -f "$DIR/copy.img"
    fi
    rm -rf "$M"
done
