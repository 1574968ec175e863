#!/usr/bin/env bash
# `rewind verify MIRROR --peer` (checksum tree, fanout 16, XXH3 per 4 KiB block, compared
# top-down over the link's mutual TLS): A serves a VOLUME of random data and replicates to
# B (`rewind receive`). FILL=seed (the default): the image is filled with random bytes
# before serve (its mirror a copy of it) and B is seeded over the link with the whole volume.
# FILL=stream: A starts from a sparse image and B from its empty seed; the volume is filled
# through NBD (random 1 MiB writes, QD 8) while B follows record by record, then both mirrors
# are compacted to their newest point, so that both bases hold the data as after a seed.
# Then: verify at A's newest seq with B identical
# (twice: the first run may build base.sums on either side), and for 0.1 %, 1 % and 10 % of
# the volume's 4 KiB blocks: that many distinct random blocks (seeded) written to A through NBD
# (the `nbd` module, QD 32, one FLUSH), B caught up, and A at the seq before the writes
# compared with B at the newest: the differing blocks must be exactly the blocks written. Per
# step: the blocks found, verify's wall time, CPU and peak RSS (/usr/bin/time), the peer's CPU
# (its `rewind receive`, /proc/PID/stat), the questions asked, the hashes received and the
# frame bytes exchanged (TLS not counted) ÷ the changed bytes.
# Release build; REWIND=PATH (or REWIND_BIN=PATH) uses that binary instead of building.
# Disk: about 3.3 × VOLUME under DIR (the image, A's base copy, B's base, the journals; 4.3 ×
# with FILL=stream, whose journals hold the fill until compacted); with no VOLUME given and
# less than 30 GiB free, 4G instead of 8G.
# usage: benchmarks/peer-verify-bench.sh [VOLUME (8G)] [DIR (/tmp/rewind-peerverify)]
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
CMDLINE="benchmarks/peer-verify-bench.sh${*:+ $*}"
[ -n "${REWIND:-}" ] && REWIND_BIN=$(realpath -m -- "$REWIND")
SIZE=${1:-8G}
DIR=$(realpath -m -- "${2:-/tmp/rewind-peerverify}")
SEED=${SEED:-42}
FILL=${FILL:-seed}
case $FILL in seed|stream) ;; *) echo "peer-verify: FILL is seed or stream" >&2; exit 1;; esac
PY=/usr/bin/python3  # the system Python, which has libnbd's `nbd` module
note() { echo "peer-verify: $*" >&2; }
fail() { note "$*"; exit 1; }
bytes() { $PY -c '
import re, sys
m = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", sys.argv[1], re.I) or sys.exit("bad size: " + sys.argv[1])
print(int(m[1]) * 1024 ** " KMGT".index((m[2] or " ").upper()))' "$1"; }

# Room: the image, A's base, B's base, ~11 % of the volume journalled on each side.
PARENT=$(dirname "$DIR"); mkdir -p "$PARENT"
[ -d "$DIR" ] && rm -rf "$DIR"
FREE=$(df -PB1 "$PARENT" | awk 'NR == 2 {print $4}')
if [ $# -eq 0 ] && [ "$FREE" -lt $((30 << 30)) ]; then
    note "$((FREE >> 30)) GiB free under $PARENT (< 30): 4G instead of 8G"; SIZE=4G
fi
VOL=$(bytes "$SIZE")
[ $((VOL % 4096)) -eq 0 ] || fail "the volume must be a multiple of 4 KiB"
NEED=$((VOL * 33 / 10 + (1 << 30))); [ "$FILL" = stream ] && NEED=$((VOL * 43 / 10 + (1 << 30)))
[ "$FREE" -ge "$NEED" ] || fail "$((FREE >> 20)) MiB free under $PARENT, $((NEED >> 20)) MiB needed for a $SIZE volume"

. benchmarks/common.sh
bench_setup "$DIR"
R=$REWIND; cd "$DIR"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; wait 2>/dev/null; cd /; rm -rf "$DIR"; }
trap cleanup EXIT
LOAD0=$(uptime)
T_START=$(date +%s)
now() { date +%s.%N; }
since() { $PY -c "print('%.1f' % ($(now) - $1))"; }
newest() { "$R" status "$1" --json 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["newestSeq"])' 2>/dev/null || echo -1; }
peer_state() { "$R" status a.img.rewind --json 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["peers"][0]["state"])' 2>/dev/null || echo "?"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
alive() { kill -0 "$1" 2>/dev/null || fail "$2 exited: $(tail -3 "$3" 2>/dev/null)"; }

# 1. The image: VOLUME of random bytes (FILL=stream: sparse, filled through NBD below).
t=$(now)
if [ "$FILL" = stream ]; then
    truncate -s "$VOL" a.img
elif command -v openssl >/dev/null; then
    { openssl enc -aes-128-ctr -pass pass:x -nosalt </dev/zero 2>/dev/null || true; } | head -c "$VOL" > a.img  # openssl ends on SIGPIPE
else
    $PY -c '
import os, sys
left = int(sys.argv[1])
with open("a.img", "wb") as f:
    while left:
        n = min(left, 8 << 20); f.write(os.urandom(n)); left -= n' "$VOL"
fi
FILL_S=$(since "$t"); if [ "$FILL" = seed ]; then note "a.img: $SIZE of random data in $FILL_S s"; fi

# 2. A serves it (creating a.img.rewind, a copy of the image) and replicates to B.
A=$("$R" id --home ha); B=$("$R" id --home hb)
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
t=$(now)
"$R" serve a.img --listen "unix:$DIR/a.sock" --replicate-to "$B@127.0.0.1:$PORT" --home ha --log-level warning 2>a.log >/dev/null & AP=$!; PIDS+=("$AP")
for _ in $(seq 6000); do [ -S a.sock ] && break; alive $AP "rewind serve" a.log; sleep 0.1; done
[ -S a.sock ] || fail "rewind serve not ready after 600 s"
SERVE_S=$(since "$t"); note "serve ready (mirror created from the image) in $SERVE_S s"
t=$(now)
"$R" receive b.rewind --listen "127.0.0.1:$PORT" --peer-id "$A" --home hb --log-level warning 2>b.log >/dev/null & BP=$!; PIDS+=("$BP")

# Wait (bounded) until B holds A's newest seq with the seed done; a line every 10 s.
wait_b() {  # wait_b WHAT LIMIT_SECONDS
    local t0 next target state nb
    t0=$(date +%s); next=$((t0 + 10))
    while :; do
        # A seed the receiver gives up on starts again from the beginning: no use waiting.
        [ "$(grep -c 'abandoned unfinished' b.log)" -lt 3 ] || fail "$1: B abandoned the seed 3 times ($(grep -m1 -o 'more than [0-9]* MiB queued' b.log || tail -1 b.log)); see b.log. FILL=stream fills the volume through the link's records instead"
        alive $AP "rewind serve" a.log; alive $BP "rewind receive" b.log
        target=$(newest a.img.rewind); state=$(peer_state); nb=$(newest b.rewind)
        [ "$state" = streaming ] && [ "$nb" -ge 0 ] && [ "$nb" -ge "$target" ] && return 0
        [ $(($(date +%s) - t0)) -ge "$2" ] && fail "$1: B not at A's seq:$target after $2 s (peer $state, B at seq:$nb)"
        if [ "$(date +%s)" -ge "$next" ]; then
            note "$1: $(($(date +%s) - t0)) s, peer $state, A seq:$target, B seq:$nb, B's folder $(du -sm b.rewind 2>/dev/null | cut -f1) MiB on disk, $(grep -c 'abandoned unfinished' b.log) seeds abandoned"
            next=$((next + 10))
        fi
        sleep 0.2
    done
}
wait_b seed 900
SEED_S=$(since "$t"); note "B seeded in $SEED_S s"
SETUP="$SIZE of random data ($((VOL / 4096)) blocks) in $FILL_S s; serve ready (mirror created) in $SERVE_S s; B seeded over the link in $SEED_S s"

if [ "$FILL" = stream ]; then
    t=$(now)
    $PY - "$DIR/a.sock" <<'PY'
import collections, os, sys, time
import nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
size, off, pending = h.get_size(), 0, collections.deque()
t0 = last = time.time()
while off < size:
    n = min(1 << 20, size - off)
    while h.aio_in_flight() >= 8:
        h.poll(-1)
    while pending and h.aio_command_completed(pending[0][0]):
        pending.popleft()
    buf = nbd.Buffer.from_bytearray(os.urandom(n))
    pending.append((h.aio_pwrite(buf, off), buf))
    off += n
    if time.time() - last >= 10:
        last = time.time()
        sys.stderr.write("peer-verify: fill: %d s, %d of %d MiB written\n" % (last - t0, off >> 20, size >> 20))
for cookie, _ in pending:
    while not h.aio_command_completed(cookie):
        h.poll(-1)
h.flush()
h.shutdown()
PY
    WRITE_S=$(since "$t"); note "fill: $SIZE through NBD in $WRITE_S s"
    wait_b fill 900
    CATCH_S=$(since "$t")
    t=$(now)
    # A's newest point can be folded only once serve has synced its source (every 10 s).
    for _ in $(seq 120); do
        "$R" compact a.img.rewind --to latest --json > compact-a.json 2>compact-a.err && break
        grep -q "try again" compact-a.err || fail "compact A: $(cat compact-a.err)"
        sleep 1
    done
    [ -s compact-a.json ] || fail "compact A: $(cat compact-a.err)"
    CA_S=$(since "$t"); t=$(now)
    "$R" compact b.rewind --to latest --json > compact-b.json
    CB_S=$(since "$t")
    note "compacted: A in $CA_S s, B in $CB_S s"
    SETUP="sparse $SIZE volume ($((VOL / 4096)) blocks), B seeded empty in $SEED_S s; filled through NBD with random 1 MiB writes (QD 8) in $WRITE_S s, B holding it all $CATCH_S s after the start; compact --to latest: A $CA_S s (waits for serve's source sync), B $CB_S s"
fi

# verify_at SEQ LABEL CHANGED_BLOCKS EXPECTED_FILE: one timed verify of A at SEQ with B; a table row.
ROWS=()
verify_at() {
    local seq=$1 label=$2 changed=$3 expect=$4 b0 b1 rc=0
    b0=$(ticks $BP)
    /usr/bin/time -f '%e %U %S %M' -o time.txt "$R" verify a.img.rewind --peer "$B@127.0.0.1:$PORT" --home ha \
        --at "seq:$seq" --json > verify.json 2>verify.err || rc=$?
    b1=$(ticks $BP)
    [ $rc -le 1 ] || fail "verify exited $rc: $(cat verify.err)"
    ROWS+=("$($PY - "$label" "$changed" "$expect" "$(tail -1 time.txt)" "$((b1 - b0))" "$seq" <<'PY'
import json, sys
label, changed, expect, tm, peer_ticks, seq = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(), int(sys.argv[5]), int(sys.argv[6])
v = json.load(open("verify.json"))
found = set()
for off, n in v["ranges"]:
    found.update(range(off // 4096, (off + n) // 4096))
want = set(map(int, open(expect).read().split())) if expect != "-" else set()
assert len(found) == v["differingBlocks"] and v["seq"] == seq, (len(found), v)
exact = "yes" if found == want else "NO: %d missing, %d extra" % (len(want - found), len(found - want))
exchanged = v["bytesSent"] + v["bytesReceived"]
ratio = "%.4f" % (exchanged / (changed * 4096)) if changed else "–"
sys.stderr.write("peer-verify: %s: %s\n" % (label, {k: v[k] for k in v if k != "ranges"}))
print("| %s | %d | %.1f | %d (%d) | %s | %.2f | %s | %s | %.0f | %.2f | %d | %d | %d | %s |" % (
    label, changed, changed * 4096 / 1048576, v["differingBlocks"], len(want), exact, float(tm[0]), tm[1], tm[2],
    int(tm[3]) / 1024, peer_ticks / 100, v["queries"], v["hashesReceived"], exchanged, ratio))
PY
)")
}

# 3. Identical copies at A's newest seq.
S0=$(newest a.img.rewind)
: > none.txt
verify_at "$S0" "identical (1st)" 0 none.txt
verify_at "$S0" "identical (2nd)" 0 none.txt

# 4. Change 0.1 %, 1 %, 10 % of the blocks; compare A before each step with B after it.
WRITER=$(cat <<'PY'
import collections, random, sys
import nbd
sock, count, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
h = nbd.NBD()
h.connect_unix(sock)
rng = random.Random(seed)
blocks = rng.sample(range(h.get_size() // 4096), count)
pending = collections.deque()
def retire(wait):
    while pending and (wait or h.aio_command_completed(pending[0][0])):
        if wait:
            while not h.aio_command_completed(pending[0][0]):
                h.poll(-1)
        pending.popleft()
for b in blocks:
    while h.aio_in_flight() >= 32:
        h.poll(-1)
    retire(False)
    buf = nbd.Buffer.from_bytearray(rng.randbytes(4096))
    pending.append((h.aio_pwrite(buf, b * 4096), buf))
retire(True)
h.flush()
h.shutdown()
open(out, "w").write("\n".join(map(str, sorted(blocks))) + "\n")
PY
)
NBLOCKS=$((VOL / 4096))
PHASES=()
i=0
for pct in 0.1 1 10; do
    i=$((i + 1))
    n=$($PY -c "print(max(1, round($NBLOCKS * $pct / 100)))")
    t=$(now)
    $PY -c "$WRITER" "$DIR/a.sock" "$n" $((SEED + i)) "w$i.txt"
    wt=$(since "$t"); t=$(now)
    wait_b "$pct %" 600
    ct=$(since "$t")
    S1=$(newest a.img.rewind)
    note "$pct %: $n blocks written in $wt s, B at seq:$S1 $ct s later"
    PHASES+=("$pct %: $n random 4 KiB writes (QD 32, one FLUSH) in $wt s; B caught up to seq:$S1 $ct s after")
    verify_at "$S0" "$pct % (seq:$S0 vs seq:$S1)" "$n" "w$i.txt"
    S0=$S1
done
cum=$(cat w1.txt w2.txt w3.txt | sort -un | wc -l)
total=$(cat w1.txt w2.txt w3.txt | wc -l)

LOAD1=$(uptime)
echo "# rewind verify --peer: ${FILL:+FILL=$FILL }$CMDLINE (REWIND=$R)"
echo "machine: $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r), $(df -PT "$DIR" | awk 'NR == 2 {print $2}') at $DIR; total run $(($(date +%s) - T_START)) s"
echo "load at start: ${LOAD0#*load average: }; at end: ${LOAD1#*load average: }"
echo "setup (FILL=$FILL): $SETUP"
for p in "${PHASES[@]}"; do echo "$p"; done
echo "blocks written over the three steps: $total, $cum distinct (each step is compared only with its own writes)"
echo
echo "| compared | blocks changed | changed MiB | differingBlocks (expected) | exactly the written blocks | verify s | user s | sys s | max RSS MiB | peer CPU s | queries | hashesReceived | bytes sent + received | ÷ changed bytes |"
echo "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for r in "${ROWS[@]}"; do echo "$r"; done
