#!/usr/bin/env bash
# Replication A → B on loopback (issue 18): fio's nbd engine writes to `rewind serve` on A while
# `rewind receive` on B follows over mutual TLS. For each job: A's throughput with and without
# the peer, B's largest lag while it runs (records, bytes, seconds, sampled every 0.2 s), how
# long B takes to catch up after, and bytes on the wire (TCP bytes acked, TLS included) per
# journal payload byte. Then FLUSH latency at QD 1 with --ack async and --ack sync beside
# DRBD protocol C's cost model: a loopback round trip plus the peer's fdatasync of 4 KiB.
# Release build. usage: benchmarks/replication-bench.sh [DIR] [SECONDS-PER-JOB]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/rewind-replication-bench}
RUNTIME=${2:-10}
SIZE=${SIZE:-1G}
. benchmarks/common.sh
bench_setup "$DIR"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
PY=/usr/bin/python3
A_ID=$("$REWIND" id --home "$DIR/ha"); B_ID=$("$REWIND" id --home "$DIR/hb")
SOCK=$DIR/a.sock

start_b() {
    rm -rf "$DIR/b.rewind"
    "$REWIND" receive "$DIR/b.rewind" --listen 127.0.0.1:0 --peer-id "$A_ID" --home "$DIR/hb" --json --log-level warning \
        > "$DIR/b.json" 2>>"$DIR/b.log" &
    B_PID=$!; PIDS+=("$B_PID")
    for _ in $(seq 100); do [ -s "$DIR/b.json" ] && break; sleep 0.1; done
    B_PORT=$(sed 's/.*"listen":"127.0.0.1:\([0-9]*\)".*/\1/' "$DIR/b.json")
}
start_a() {  # start_a [serve options...]: a fresh volume, filled by one sequential pass
    rm -rf "$DIR/a.img" "$DIR/a.img.rewind" "$SOCK"
    truncate -s "$SIZE" "$DIR/a.img"
    "$REWIND" serve "$DIR/a.img" --listen "unix:$SOCK" --home "$DIR/ha" --log-level warning "$@" >/dev/null 2>>"$DIR/a.log" &
    A_PID=$!; PIDS+=("$A_PID")
    for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
newest() { "$REWIND" status "$1" --json 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["newestSeq"])' 2>/dev/null || echo 0; }
payload() { "$REWIND" status "$1" --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["journalPayloadBytes"])'; }
wire() { ss -tinH state established "( dport = :$B_PORT )" 2>/dev/null | grep -o 'bytes_acked:[0-9]*' | cut -d: -f2 | awk '{s+=$1} END {print s+0}'; }

fio_run() {  # fio_run NAME RW BS DEPTH [extra] -> "MiB/s IOPS flush_lat_us"
    local name=$1 rw=$2 bs=$3 depth=$4; shift 4
    sync; sleep 1
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --size="$SIZE" --time_based --runtime="$RUNTIME" --output-format=json "$@" > "$DIR/$name.json" 2>/dev/null
    $PY - "$DIR/$name.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
w = j["write"]
sync = j.get("sync", {}).get("lat_ns", {}).get("mean", 0) / 1000
print("%.1f %.0f %.1f %.1f" % (w["bw_bytes"] / 1048576, w["iops"], sync, w["clat_ns"]["mean"] / 1000))
PY
}

lag_sampler() {  # while fio runs: largest (A newest - B newest) records, payload bytes, seconds
    local out=$1 max_r=0 max_b=0 max_s=0
    while [ ! -e "$DIR/stop-sampling" ]; do
        "$REWIND" status "$DIR/a.img.rewind" --json 2>/dev/null > "$DIR/st.json" || true
        read -r r b s < <($PY -c '
import json
try:
    p = json.load(open("'"$DIR"'/st.json"))["peers"][0]; print(p["lagRecords"], p["lagBytes"], p["lagSeconds"])
except Exception: print(0, 0, 0)') || true
        [ "${r:-0}" -gt "$max_r" ] && max_r=$r
        [ "${b:-0}" -gt "$max_b" ] && max_b=$b
        max_s=$($PY -c "print(max($max_s, ${s:-0}))")
        sleep 0.2
    done
    echo "$max_r $max_b $max_s" > "$out"
}

echo "# rewind replication, A → B on loopback ($(nproc) cores, $(uname -r)), $SIZE volume, ${RUNTIME} s per job"
echo
echo "| job | A alone | A → B | ratio | B's largest lag (records, MiB, s) | catch-up after | wire ÷ payload |"
echo "|---|---:|---:|---:|---|---:|---:|"
for job in "seqwrite write 1M 8" "randwrite randwrite 4k 16"; do
    set -- $job
    start_a
    fio_run fill write 1M 8 --time_based=0 --runtime=0 >/dev/null
    alone=$(fio_run "$1-alone" "$2" "$3" "$4")
    stop "$A_PID"
    start_b
    start_a --replicate-to "$B_ID@127.0.0.1:$B_PORT"
    # Seed B first (the fill), so the job measures streaming.
    fio_run fill write 1M 8 --time_based=0 --runtime=0 >/dev/null
    for _ in $(seq 600); do [ "$(newest "$DIR/b.rewind")" = "$(newest "$DIR/a.img.rewind")" ] && break; sleep 0.2; done
    w0=$(wire); p0=$(payload "$DIR/a.img.rewind")
    rm -f "$DIR/stop-sampling"; lag_sampler "$DIR/lag.txt" & S_PID=$!
    with=$(fio_run "$1-replicated" "$2" "$3" "$4")
    t0=$(date +%s.%N)
    target=$(newest "$DIR/a.img.rewind")
    for _ in $(seq 3000); do [ "$(newest "$DIR/b.rewind")" -ge "$target" ] && break; sleep 0.05; done
    t1=$(date +%s.%N)
    touch "$DIR/stop-sampling"; wait $S_PID
    w1=$(wire); p1=$(payload "$DIR/a.img.rewind")
    read -r lr lb ls < "$DIR/lag.txt"
    a=${alone%% *}; b=${with%% *}
    [ "$2" = randwrite ] && { a=$(echo "$alone" | cut -d' ' -f2); b=$(echo "$with" | cut -d' ' -f2); unit=IOPS; } || unit=MiB/s
    printf '| %s %s QD %s | %s %s | %s | %.2f | %s, %.1f, %.1f | %.1f s | %.4f |\n' "$2" "$3" "$4" "$a" "$unit" "$b" \
        "$($PY -c "print($b / $a)")" "$lr" "$($PY -c "print($lb / 1048576)")" "$ls" "$($PY -c "print($t1 - $t0)")" \
        "$($PY -c "print(($w1 - $w0) / max(1, $p1 - $p0))")"
    stop "$A_PID"; stop "$B_PID"
done

echo
echo "| FLUSH at QD 1 (4 KiB write + FLUSH) | write+FLUSH µs | FLUSH µs |"
echo "|---|---:|---:|"
for mode in none async sync; do
    if [ $mode = none ]; then start_a; else start_b; start_a --replicate-to "$B_ID@127.0.0.1:$B_PORT" --ack $mode; fi
    fio_run fill write 1M 8 --time_based=0 --runtime=0 >/dev/null
    [ $mode = none ] || for _ in $(seq 600); do [ "$(newest "$DIR/b.rewind")" = "$(newest "$DIR/a.img.rewind")" ] && break; sleep 0.2; done
    r=$(fio_run "flush-$mode" randwrite 4k 1 --fsync=1)
    read -r _ _ f c <<< "$r"
    printf '| %s | %.0f | %.0f |\n' "$([ $mode = none ] && echo 'no peer' || echo "--ack $mode")" "$($PY -c "print($c + $f)")" "$f"
    stop "$A_PID"; [ $mode = none ] || stop "$B_PID"
done
# DRBD protocol C's cost model: one round trip to the peer plus its fdatasync.
model=$($PY - "$DIR" <<'PY'
import os, socket, sys, threading, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def echo():
    c, _ = srv.accept()
    while (d := c.recv(64)): c.sendall(d)
threading.Thread(target=echo, daemon=True).start()
cl = socket.create_connection(srv.getsockname()); cl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(2000):
    t = time.perf_counter(); cl.sendall(b"x" * 64); cl.recv(64); rtts.append(time.perf_counter() - t)
fd = os.open(os.path.join(sys.argv[1], "fsync.probe"), os.O_WRONLY | os.O_CREAT)
syncs = []
for i in range(500):
    os.pwrite(fd, os.urandom(4096), (i % 256) * 4096); t = time.perf_counter(); os.fdatasync(fd); syncs.append(time.perf_counter() - t)
rtts.sort(); syncs.sort()
print("%.0f %.0f" % (rtts[len(rtts) // 2] * 1e6, syncs[len(syncs) // 2] * 1e6))
PY
)
read -r rtt fsy <<< "$model"
echo "| model: loopback RTT ($rtt µs) + peer fdatasync ($fsy µs) | | $((rtt + fsy)) (added to the local FLUSH) |"
