#!/usr/bin/env bash
# fio's nbd engine against `rewind serve` (journal on), `nbdkit file` and `qemu-nbd`, on the
# same file system, in one run; plus FLUSH latency against a plain fdatasync and rewind's peak
# RSS. Prints a markdown table of ratios (rewind ÷ peer). Release build. Job by job, each server
# on a fresh filled volume; each job starts after `sync` (the previous writeback finished).
# usage: benchmarks/serve-bench.sh [DIR] [SECONDS-PER-JOB]
# For A/B runs: JOBS="seqwrite randread1" runs only those jobs (keys: ALL_JOBS below),
# REPEAT=N runs each N times, and
# REWIND_BIN=PATH serves with that binary instead of building one; only the rows are printed;
# SIZE=8G (default 2G) sizes the volume.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/rewind-serve-bench}
RUNTIME=${2:-10}
SIZE=${SIZE:-2G}  # the volume; SIZE=8G puts the source past the page cache's dirty limits
. benchmarks/common.sh
bench_setup "$DIR"
SOCK=$DIR/nbd.sock
SERVER_PID=
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

start() {  # start SERVER: a fresh, fully written 2 GiB volume behind $SOCK
    rm -rf "$DIR/vol.img" "$DIR/vol.img.rewind" "$SOCK"
    truncate -s $SIZE "$DIR/vol.img"
    case $1 in
        rewind) "$REWIND" serve "$DIR/vol.img" --listen "unix:$SOCK" --log-level warning >/dev/null & ;;
        nbdkit) nbdkit -f -U "$SOCK" file "$DIR/vol.img" & ;;
        qemu-nbd) qemu-nbd -f raw -k "$SOCK" -t -e 16 --discard=unmap "$DIR/vol.img" & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 1 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
}
stop() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; }

fio_json() {  # fio_json NAME RW BS DEPTH [extra...] -> prints "MiB/s IOPS sync_lat_us"
    local name=$1 rw=$2 bs=$3 depth=$4; shift 4
    # Every job starts on a quiet disk, for every server alike: the page cache's writeback
    # of the previous job (the source's dirty pages, rewind's journal) would otherwise land
    # on whichever job runs next.
    sync; sleep 1
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --size=$SIZE --time_based --runtime="$RUNTIME" --output-format=json "$@" > "$DIR/$name.json" 2>/dev/null
    /usr/bin/python3 - "$DIR/$name.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine prints a line before the JSON
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
sync = j.get("sync", {}).get("lat_ns", {}).get("mean", 0) / 1000
print("%.1f %.0f %.1f" % (side["bw_bytes"] / 1048576, side["iops"], sync))
PY
}

declare -A R
sample_rss() {  # record the largest anonymous (private) resident size of $1 until it exits
    local pid=$1 max=0 v
    while kill -0 "$pid" 2>/dev/null; do
        v=$(awk '/RssAnon/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
        [ "${v:-0}" -gt "$max" ] && max=$v && echo "$max" > "$DIR/anon.max"
        sleep 0.2
    done
}
# Job by job, each server in turn on a fresh, filled volume: this machine's speed swings from
# one minute to the next, so the three figures of a row are taken minutes apart at most, and
# every server starts each job from the same state.
R[rewind,rss]=0; R[rewind,anon]=0; R[rewind,records]=0
run_job() {  # run_job KEY RW BS DEPTH [extra...]
    local key=$1; shift
    for server in rewind nbdkit qemu-nbd; do
        start $server
        local sampler=
        if [ $server = rewind ]; then rm -f "$DIR/anon.max"; sample_rss "$SERVER_PID" & sampler=$!; fi
        # fill the volume first so reads read data, not holes
        fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=write --bs=1M --iodepth=8 --size=$SIZE \
            --output=/dev/null
        R[$server,$key]=$(fio_json $key-$server "$@")
        if [ $server = rewind ]; then
            local hwm anon records
            hwm=$(awk '/VmHWM/ {print $2}' /proc/$SERVER_PID/status)
            records=$("$REWIND" status "$DIR/vol.img.rewind" --json | sed 's/.*"newestSeq":\([0-9]*\).*/\1/')
            stop; wait "$sampler" 2>/dev/null || true
            anon=$(cat "$DIR/anon.max" 2>/dev/null || echo 0)
            if [ "$hwm" -gt "${R[rewind,rss]}" ]; then R[rewind,rss]=$hwm; fi
            if [ "$anon" -gt "${R[rewind,anon]}" ]; then R[rewind,anon]=$anon; fi
            if [ "$records" -gt "${R[rewind,records]}" ]; then R[rewind,records]=$records; fi
        else
            stop
        fi
    done
}
ALL_JOBS="seqwrite seqread randwrite16 randread16 randwrite1 randread1 flush"
declare -A SPEC=([seqwrite]="write 1M 8" [seqread]="read 1M 8" [randwrite16]="randwrite 4k 16"
    [randread16]="randread 4k 16" [randwrite1]="randwrite 4k 1" [randread1]="randread 4k 1"
    [flush]="randwrite 4k 1 --fsync=1")
declare -A LABEL=([seqwrite]="sequential 1 MiB write, QD 8|1|MiB/s|≥ 0.7" [seqread]="sequential 1 MiB read, QD 8|1|MiB/s|≥ 0.95"
    [randwrite16]="random 4 KiB write, QD 16|2|IOPS|≥ 0.7" [randread16]="random 4 KiB read, QD 16|2|IOPS|≥ 0.95"
    [randwrite1]="random 4 KiB write, QD 1|2|IOPS|≥ 0.7" [randread1]="random 4 KiB read, QD 1|2|IOPS|≥ 0.95"
    [flush]="write + FLUSH, QD 1: flush latency (µs)|3|µs|")
row() {  # row KEY: one table row from R
    local label field unit target a b c
    IFS='|' read -r label field unit target <<< "${LABEL[$1]}"
    a=$(echo ${R[rewind,$1]} | cut -d' ' -f$field); b=$(echo ${R[nbdkit,$1]} | cut -d' ' -f$field); c=$(echo ${R[qemu-nbd,$1]} | cut -d' ' -f$field)
    printf "| %s | %s %s | %s | %s | %.2f | %.2f | %s |\n" "$label" "$a" "$unit" "$b" "$c" "$(echo "$a / $b" | awk '{print $1/$3}')" "$(echo "$a / $c" | awk '{print $1/$3}')" "$target"
}
header() {
    echo "| workload | rewind | nbdkit | qemu-nbd | rewind ÷ nbdkit | rewind ÷ qemu-nbd | target |"
    echo "|---|---:|---:|---:|---:|---:|---|"
}
if [ -n "${JOBS:-}" ]; then
    for key in $JOBS; do [ -n "${SPEC[$key]:-}" ] || { echo "serve-bench: unknown job '$key'" >&2; exit 2; }; done
    header
    for _ in $(seq 1 "${REPEAT:-1}"); do
        for key in $JOBS; do
            # shellcheck disable=SC2086
            run_job "$key" ${SPEC[$key]}
            row "$key"
        done
    done
    exit 0
fi
for key in $ALL_JOBS; do
    # shellcheck disable=SC2086
    run_job "$key" ${SPEC[$key]}
done
# the device's own sequential write bandwidth (4 GiB of 4 MiB O_DIRECT writes, past the page cache)
dd_bw() {  # dd_bw [dd options...] -> MiB/s of writing 4 GiB with them
    local t0; t0=$(date +%s%N)
    dd if=/dev/zero of="$DIR/disk.img" bs=4M count=1024 oflag=direct status=none "$@"
    echo $(( 4096 * 1000000000 / ($(date +%s%N) - t0) ))
    rm -f "$DIR/disk.img"; sync; sleep 1
}
disk_bw=$(dd_bw)
# ... and until it is durable: the same, ended by fdatasync. A journal must reach this; a
# virtual disk's host cache takes bursts far faster (the number above), but not for long.
durable_bw=$(dd_bw conv=fdatasync)
# Sequential 1 MiB buffered writes appended to a fresh file, never synced, for the same time:
# what one thread appending through the page cache gets here (nbdkit overwrites one 2 GiB file
# in the page cache; a journal's bytes are new pages, bounded by the page cache's fresh-page
# cost and then by writeback to the disk). On a slow disk this bounds any journal that keeps
# every write; on a fast one the server's own journal, written back as it goes, beats it.
rm -f "$DIR/append.img"; sync; sleep 1
fio --name=append --ioengine=psync --filename="$DIR/append.img" --rw=write --bs=1M --size=64G --fallocate=none \
    --time_based --runtime="$RUNTIME" --output-format=json > "$DIR/append.json" 2>/dev/null
append_bw=$(/usr/bin/python3 -c "import json; t=open('$DIR/append.json').read(); j=json.loads(t[t.index('{'):])['jobs'][0]; print('%.1f' % (j['write']['bw_bytes']/1048576))")
rm -f "$DIR/append.img"; sync; sleep 1
# plain fdatasync after each 4 KiB write on the same file system
fio --name=plain --ioengine=psync --filename="$DIR/plain.img" --rw=randwrite --bs=4k --size=256M --fdatasync=1 \
    --time_based --runtime="$RUNTIME" --output-format=json > "$DIR/plain.json" 2>/dev/null
plain_sync=$(/usr/bin/python3 -c "import json; t=open('$DIR/plain.json').read(); j=json.loads(t[t.index('{'):])['jobs'][0]; print('%.1f' % (j['sync']['lat_ns']['mean']/1000))")

header
for key in $ALL_JOBS; do row "$key"; done
echo
nk=$(echo ${R[nbdkit,seqwrite]} | cut -d' ' -f1)
echo "Device sequential write bandwidth (dd bs=4M oflag=direct, 4 GiB): ${disk_bw} MiB/s = $(awk "BEGIN {printf \"%.2f\", $disk_bw / $nk}")× nbdkit's sequential write"
rw=$(echo ${R[rewind,seqwrite]} | cut -d' ' -f1)
echo "Device durable write bandwidth (the same, ended by fdatasync): ${durable_bw} MiB/s; rewind's sequential write = $(awk "BEGIN {printf \"%.2f\", $rw / $durable_bw}")× it"
echo "Buffered appends (1 MiB to a fresh file, one thread, no sync, ${RUNTIME} s): ${append_bw} MiB/s = $(awk "BEGIN {printf \"%.2f\", $append_bw / $nk}")× nbdkit's sequential write; rewind's = $(awk "BEGIN {printf \"%.2f\", $rw / $append_bw}")× it"
rf=$(echo ${R[rewind,flush]} | cut -d' ' -f3)
echo "FLUSH latency: rewind ${rf} µs vs plain fdatasync ${plain_sync} µs = $(awk "BEGIN {printf \"%.2f\", $rf / $plain_sync}")× (target ≤ 2×)"
echo "rewind serve peak RSS: $(( ${R[rewind,rss]} / 1024 )) MiB in all, of which at most $(( ${R[rewind,anon]} / 1024 )) MiB anonymous (the rest: journal pages mapped by LMDB, clean page cache), the largest over its seven runs (up to ${R[rewind,records]} journal records) (target ≤ 256 MiB)"
