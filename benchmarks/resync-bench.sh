#!/usr/bin/env bash
# Resync after a peer fell behind (issue 19): `rewind resync MIRROR --peer` against
# `rsync --inplace --no-whole-file` (to an rsync daemon) and a full `nbdcopy` (to qemu-nbd),
# all over loopback between the same two states of a VOLUME of random data, in one run.
# FILL=seed (the default): A is `rewind init a.rewind --from a.img` (random data) and B, a
# `rewind receive b.rewind`, is seeded by a first resync (its final check by tree builds both
# sides' base.sums, so its time includes hashing the volume on each side; its bytesSent does
# not count the seed's data: see lo Δ). The sender sends no keep-alives while seeding, so a
# seed longer than the link's 30 s of silence fails ("nothing heard for 30 s"): on a slow or
# loaded machine use FILL=stream. FILL=stream: A starts sparse, B is seeded with the holes,
# then the volume is filled with random data through serve (1 MiB writes, QD 8), sent to B as
# records by a resync (keep-alives flow there: B acks records), and both mirrors are
# compacted to their newest point, so both bases hold the data as after a seed. A warm-up
# `rewind verify --peer` (timed, reported apart) would build any base.sums still missing: the
# steps below measure a steady state, where compaction keeps A's up to date. Then for 0.1 %,
# 1 % and 10 % of the volume's 4 KiB blocks:
#   - that many distinct random blocks (seeded) are written to A (`rewind serve a.img --mirror
#     a.rewind`, the `nbd` module, QD 32, one FLUSH; serve stopped), and A compacted to its
#     newest point, so B is behind A's oldest point and no dirty set reaches it (a peer resync
#     did not know is forgotten after the session): the checksum-tree path;
#   - rewind: `rewind resync a.rewind --peer B` (seeded no more; catch-up by checksum tree,
#     then the final check by tree, both in the time); wire bytes = bytesSent +
#     checksumBytesReceived (frame bytes: TLS adds ~22 bytes per 16 KiB record, not counted);
#   - rsync: stale.img (B's copy before the step) copied to the daemon's module (mtime set to
#     2000-01-01, else the quick check may skip a file of the same size and second), then
#     `rsync --inplace --no-whole-file --stats a.img rsync://…/target.img`; wire bytes = total
#     bytes sent + received (--stats);
#   - nbdcopy: a fresh copy of stale.img served by `qemu-nbd`, `nbdcopy a.img nbd://…`; wire
#     bytes = VOLUME (every byte is sent; NBD request/reply headers not counted);
#   - B's newest point restored to stale.img (the next step's stale side) and compared with
#     a.img, as are the rsync and nbdcopy targets (none of it timed).
# a.img, the source `rewind serve` wrote through, is A's newest point, so it is the new side
# for rsync and nbdcopy (no separate restore). Each tool's time is /usr/bin/time's elapsed,
# its client's CPU (user + sys) and peak RSS; the server's CPU (rewind receive, the rsync
# daemon with its reaped children, qemu-nbd) from /proc/PID/stat; "lo Δ" is the loopback
# interface's received bytes during the run (whole machine: TCP/IP + TLS included, and anyone
# else's loopback traffic too). Copies are synced before each timed run.
# Release build; REWIND=PATH (or REWIND_BIN=PATH) uses that binary instead of building.
# Disk: about 5.3 × VOLUME under DIR (a.img, A's base, B's base, stale.img, one target copy,
# journals; FILL=stream holds the fill in both journals until compacted: about as much at its
# peak); with no VOLUME given and less than that free, 4G instead of 8G.
# KEEP=1 leaves DIR in place at the end (for a look at the logs).
# usage: benchmarks/resync-bench.sh [VOLUME (8G)] [DIR (/tmp/rewind-resync)]
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
CMDLINE="${FILL:+FILL=$FILL }benchmarks/resync-bench.sh${*:+ $*}"
[ -n "${REWIND:-}" ] && REWIND_BIN=$(realpath -m -- "$REWIND")
SIZE=${1:-8G}
DIR=$(realpath -m -- "${2:-/tmp/rewind-resync}")
SEED=${SEED:-42}
FILL=${FILL:-seed}
case $FILL in seed|stream) ;; *) echo "resync-bench: FILL is seed or stream" >&2; exit 1;; esac
PY=/usr/bin/python3  # the system Python, which has libnbd's `nbd` module
note() { echo "resync-bench: $*" >&2; }
fail() { note "$*"; exit 1; }
bytes() { $PY -c '
import re, sys
m = re.fullmatch(r"(\d+)([KMGT]?)(i?B)?", sys.argv[1], re.I) or sys.exit("bad size: " + sys.argv[1])
print(int(m[1]) * 1024 ** " KMGT".index((m[2] or " ").upper()))' "$1"; }
for t in rsync nbdcopy qemu-nbd openssl cmp; do command -v $t >/dev/null || fail "$t is needed"; done

PARENT=$(dirname "$DIR"); mkdir -p "$PARENT"
[ -d "$DIR" ] && rm -rf "$DIR"
FREE=$(df -PB1 "$PARENT" | awk 'NR == 2 {print $4}')
need() { echo $(($1 * 53 / 10 + (1 << 30))); }
VOL=$(bytes "$SIZE")
if [ $# -eq 0 ] && [ "$FREE" -lt "$(need "$VOL")" ]; then
    note "$((FREE >> 30)) GiB free under $PARENT (< $(($(need "$VOL") >> 30))): 4G instead of 8G"; SIZE=4G; VOL=$(bytes 4G)
fi
[ $((VOL % 4096)) -eq 0 ] || fail "the volume must be a multiple of 4 KiB"
[ "$FREE" -ge "$(need "$VOL")" ] || fail "$((FREE >> 20)) MiB free under $PARENT, $(($(need "$VOL") >> 20)) MiB needed for a $SIZE volume"

. benchmarks/common.sh
bench_setup "$DIR"
R=$REWIND; cd "$DIR"
PIDS=()
# (`|| true`: under set -e a failed kill of a process already gone would end the trap early.)
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; cd /; [ -n "${KEEP:-}" ] || rm -rf "$DIR"; }
trap cleanup EXIT
LOAD0=$(uptime)
T_START=$(date +%s)
HZ=$(getconf CLK_TCK)
now() { date +%s.%N; }
since() { $PY -c "print('%.1f' % ($(now) - $1))"; }
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {  # wait_port PORT PID LOG: until something accepts on 127.0.0.1:PORT
    for _ in $(seq 300); do
        [ -n "$(ss -Hltn "sport = :$1")" ] && return 0  # no probe connection: receive would log it as refused
        alive "$2" "$3"; sleep 0.1
    done
    fail "nothing listening on port $1 after 30 s"
}
# CPU ticks of a process, its threads and its reaped children (utime stime cutime cstime).
ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }
lo_bytes() { awk -F'[: ]+' '$2 == "lo" {print $3}' /proc/net/dev; }
alive() { kill -0 "$1" 2>/dev/null || fail "process $1 exited: $(tail -3 "$2" 2>/dev/null)"; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
newest() { "$R" status "$1" --json 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["newestSeq"])' 2>/dev/null || echo -1; }
same() { cmp -s "$1" "$2" || fail "$3: $1 differs from $2"; }

# A's serve (a.img through a.rewind) on a unix socket; its compaction to the newest point.
start_serve() {
    rm -f a.sock
    "$R" serve a.img --mirror a.rewind --listen "unix:$DIR/a.sock" --log-level warning 2>a.log >/dev/null & AP=$!; PIDS+=("$AP")
    for _ in $(seq 600); do [ -S a.sock ] && break; alive $AP a.log; sleep 0.1; done
    [ -S a.sock ] || fail "rewind serve not ready after 60 s"
}
compact_latest() {  # compact_latest MIRROR: fold every record (retried while a sync is due)
    : > compact.json
    for _ in $(seq 120); do
        "$R" compact "$1" --to latest --json > compact.json 2>compact.err && return 0
        grep -q "try again" compact.err || fail "compact $1: $(cat compact.err)"
        sleep 1
    done
    fail "compact $1: $(cat compact.err)"
}
# timed_resync JSON: one `rewind resync` to B; /usr/bin/time's line in time.txt; sets RC,
# B_TICKS (the receiver's CPU ticks) and LO (loopback bytes) for it.
timed_resync() {
    local b0 l0
    b0=$(ticks $BP); l0=$(lo_bytes); RC=0
    /usr/bin/time -f '%e %U %S %M' -o time.txt "$R" resync a.rewind --peer "$PEER" --home ha --json > "$1" 2>"${1%.json}.err" || RC=$?
    B_TICKS=$(($(ticks $BP) - b0)); LO=$(($(lo_bytes) - l0))
}
resync_line() {  # resync_line WHAT JSON
    local e u sy m
    read -r e u sy m < <(grep -v 'exited with' time.txt | tail -1)
    echo "$1: $e s ($u user + $sy sys, $((m / 1024)) MiB RSS; receiver $($PY -c "print('%.2f' % ($B_TICKS / $HZ))") s CPU), $(cat "$2"), lo Δ $LO"
}

A=$("$R" id --home ha); B=$("$R" id --home hb)
PORT=$(port)
PEER="$B@127.0.0.1:$PORT"
start_receive() {
    "$R" receive b.rewind --listen "127.0.0.1:$PORT" --peer-id "$A" --home hb --log-level warning 2>>b.log >/dev/null & BP=$!; PIDS+=("$BP")
    wait_port "$PORT" "$BP" b.log
}
SETUP=()
if [ "$FILL" = seed ]; then
    # 1. a.img: VOLUME of random bytes; A's mirror a copy of it.
    t=$(now)
    { openssl enc -aes-128-ctr -pass pass:x -nosalt </dev/zero 2>/dev/null || true; } | head -c "$VOL" > a.img  # openssl ends on SIGPIPE
    FILL_S=$(since "$t"); note "a.img: $SIZE of random data in $FILL_S s"
    t=$(now)
    "$R" init a.rewind --from a.img >/dev/null
    INIT_S=$(since "$t"); note "rewind init --from a.img in $INIT_S s"
    # Gigabytes of dirty pages would otherwise be written back during the seed.
    t=$(now); sync; SYNC_S=$(since "$t")
    SETUP+=("setup (FILL=seed): $SIZE of random data ($((VOL / 4096)) blocks) in $FILL_S s; rewind init --from in $INIT_S s; sync $SYNC_S s")
    # 2. B: a `rewind receive`, seeded by a first resync (the whole volume over the link).
    start_receive
    timed_resync seed.json
    [ $RC -eq 0 ] || fail "seed: $(cat seed.err) after $(grep -v 'exited with' time.txt | awk '{print $1}') s; B logged: $(tail -2 b.log | tr '\n' ' ') (FILL=stream fills B through records instead)"
    SETUP+=("$(resync_line "seed of B by resync (its check builds both base.sums)" seed.json)")
else
    # 1-2. A sparse volume; B seeded with it (nothing but holes), then the volume filled with
    # random data through serve (1 MiB writes, QD 8) and sent to B as records by a resync; both
    # mirrors compacted to their newest point, so both bases hold the data as after a seed.
    truncate -s "$VOL" a.img
    "$R" init a.rewind --size "$VOL" >/dev/null
    start_receive
    timed_resync seed.json
    [ $RC -eq 0 ] || fail "seed: $(cat seed.err)"
    SETUP+=("$(resync_line "setup (FILL=stream): sparse $SIZE volume ($((VOL / 4096)) blocks); seed of B by resync" seed.json)")
    t=$(now)
    start_serve
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
    if time.time() - last >= 30:
        last = time.time()
        sys.stderr.write("resync-bench: fill: %d s, %d of %d MiB written\n" % (last - t0, off >> 20, size >> 20))
for cookie, _ in pending:
    while not h.aio_command_completed(cookie):
        h.poll(-1)
h.flush()
h.shutdown()
PY
    stop $AP
    sync
    WRITE_S=$(since "$t"); note "fill: $SIZE through serve in $WRITE_S s"
    timed_resync fill.json
    [ $RC -eq 0 ] || fail "resync of the fill: $(cat fill.err)"
    SETUP+=("fill: $SIZE of random 1 MiB writes through serve (QD 8, one FLUSH) in $WRITE_S s, then synced")
    SETUP+=("$(resync_line "fill sent to B as records by resync" fill.json)")
    note "${SETUP[-1]}"
    t=$(now); compact_latest a.rewind; CA_S=$(since "$t")
    t=$(now); compact_latest b.rewind; sync; CB_S=$(since "$t")
    SETUP+=("compact --to latest: A $CA_S s, B $CB_S s (then synced)")
    note "${SETUP[-1]}"
fi
# Warm-up: the first comparison by tree builds base.sums on each side (a full read of base.img).
t=$(now)
"$R" verify a.rewind --peer "$PEER" --home ha --json > warm.json 2>warm.err || fail "warm-up verify: $(cat warm.err)"
WARM_S=$(since "$t"); note "warm-up verify --peer in $WARM_S s"
t=$(now)
"$R" restore b.rewind --at latest --to stale.img >/dev/null
same stale.img a.img "seed"
sync
STALE_S=$(since "$t")

# rsync daemon: one module (rs/) holding the target copy.
mkdir rs nb
RPORT=$(port)
cat > rsyncd.conf <<EOF
pid file = $DIR/rsyncd.pid
log file = $DIR/rsyncd.log
address = 127.0.0.1
port = $RPORT
use chroot = no
uid = $(id -u)
gid = $(id -g)
[mod]
    path = $DIR/rs
    read only = no
EOF
rsync --daemon --no-detach --config="$DIR/rsyncd.conf" 2>rsyncd.err & RP=$!; PIDS+=("$RP")
wait_port "$RPORT" "$RP" rsyncd.err
RSYNC_BLOCK=$($PY - "$VOL" <<'PY'
import sys
# rsync's sum_sizes_sqroot (generator.c), protocol >= 30: ~sqrt(size) in multiples of 8, 700..128 KiB
n = int(sys.argv[1]); BLOCK, MAX = 700, 1 << 17
if n <= BLOCK * BLOCK: print(BLOCK); sys.exit()
c, l = 1, n
while l >> 2:
    l >>= 2; c <<= 1
if c >= MAX: print(MAX); sys.exit()
b = 0
while c >= 8:
    b |= c
    if n < b * b: b &= ~c
    c >>= 1
print(max(b, BLOCK))
PY
)

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

# row RATIO BLOCKS TOOL WIRE CLIENT_TIME_FILE SERVER_TICKS LO_DELTA NOTES
ROWS=()
WINS=()
row() {
    ROWS+=("$($PY - "$@" "$HZ" <<'PY'
import sys
ratio, n, tool, wire, tf, sticks, lo, notes, hz = sys.argv[1:10]
e, u, s, m = open(tf).read().strip().split("\n")[-1].split()
changed = int(n) * 4096
print("| %s | %s | %.1f | %s | %.2f | %s | %.2f | %.2f | %.2f | %.0f | %s | %s |" % (
    ratio, n, changed / 1048576, tool, float(e), format(int(wire), ","), int(wire) / changed,
    float(u) + float(s), int(sticks) / int(hz), int(m) / 1024, format(int(lo), ","), notes))
PY
)")
}

NBLOCKS=$((VOL / 4096))
PHASES=()
i=0
for pct in 0.1 1 10; do
    i=$((i + 1))
    n=$($PY -c "print(max(1, round($NBLOCKS * $pct / 100)))")
    # b. Change A through serve, then fold everything so B is behind A's oldest point.
    t=$(now)
    start_serve
    $PY -c "$WRITER" "$DIR/a.sock" "$n" $((SEED + i)) "w$i.txt"
    stop $AP
    wt=$(since "$t"); t=$(now)
    compact_latest a.rewind
    sync
    ct=$(since "$t")
    SA=$(newest a.rewind)

    # c. rewind resync (checksum tree), timed; B is checked in f.
    timed_resync resync$i.json
    [ $RC -eq 0 ] || fail "resync exited $RC: $(cat resync$i.err)"
    read -r RW_WIRE RW_NOTE < <($PY - resync$i.json "$SA" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
assert v["ok"] and v["seq"] == int(sys.argv[2]) and v["differingBlocks"] == 0, v
print(v["bytesSent"] + v["checksumBytesReceived"],
      "sent %d + checksums %d; B seq:%s → seq:%d" % (v["bytesSent"], v["checksumBytesReceived"], v["before"], v["seq"]))
PY
)
    row "$pct %" "$n" rewind "$RW_WIRE" time.txt $B_TICKS $LO "$RW_NOTE; ok by tree"
    RW_T=$(awk '{print $1}' time.txt)

    # d. rsync to the daemon, into a fresh copy of the stale side.
    # An old mtime: with the same size and mtime (to the second), rsync's quick check would skip the file.
    t=$(now); cp stale.img rs/target.img; touch -d 2000-01-01 rs/target.img; sync; cp1=$(since "$t")
    sleep 0.5; r0=$(ticks $RP); l0=$(lo_bytes)
    /usr/bin/time -f '%e %U %S %M' -o time.txt rsync --inplace --no-whole-file --stats a.img "rsync://127.0.0.1:$RPORT/mod/target.img" > rsync$i.txt 2>rsync$i.err \
        || fail "rsync: $(cat rsync$i.err)"
    l1=$(lo_bytes); sleep 0.5; r1=$(ticks $RP)
    same rs/target.img a.img "rsync $pct %"
    rm -f rs/target.img
    read -r RS_WIRE RS_NOTE < <($PY - rsync$i.txt <<'PY'
import re, sys
t = open(sys.argv[1]).read()
g = lambda k: int(re.search(k + r":\s*([\d,]+)", t)[1].replace(",", ""))
print(g("Total bytes sent") + g("Total bytes received"),
      "sent %d + received %d; literal %d, matched %d" % (g("Total bytes sent"), g("Total bytes received"), g("Literal data"), g("Matched data")))
PY
)
    row "$pct %" "$n" rsync "$RS_WIRE" time.txt $((r1 - r0)) $((l1 - l0)) "$RS_NOTE; block $RSYNC_BLOCK B"
    RS_T=$(awk '{print $1}' time.txt)

    # e. nbdcopy of the whole volume to qemu-nbd serving a fresh copy of the stale side.
    t=$(now); cp stale.img nb/target.img; sync; cp2=$(since "$t")
    NPORT=$(port)
    qemu-nbd --format=raw --persistent --shared=8 --bind 127.0.0.1 --port "$NPORT" nb/target.img 2>qemu-nbd.err & QP=$!; PIDS+=("$QP")
    wait_port "$NPORT" "$QP" qemu-nbd.err
    q0=$(ticks $QP); l0=$(lo_bytes)
    /usr/bin/time -f '%e %U %S %M' -o time.txt nbdcopy a.img "nbd://127.0.0.1:$NPORT" 2>nbdcopy$i.err || fail "nbdcopy: $(cat nbdcopy$i.err)"
    l1=$(lo_bytes); q1=$(ticks $QP)
    stop $QP
    same nb/target.img a.img "nbdcopy $pct %"
    rm -f nb/target.img
    row "$pct %" "$n" nbdcopy "$VOL" time.txt $((q1 - q0)) $((l1 - l0)) "the whole volume (no zeroes to skip)"

    # f. B's newest point: the next step's stale side, and the check of the resync.
    t=$(now)
    "$R" restore b.rewind --at latest --to stale.img --force >/dev/null
    same stale.img a.img "rewind resync $pct %"
    sync
    rt=$(since "$t")
    WINS+=("$pct %: bytes $([ "$RW_WIRE" -lt "$RS_WIRE" ] && echo yes || echo NO) ($($PY -c "print('%.3f' % ($RW_WIRE / $RS_WIRE))") × rsync's), time $($PY -c "print('yes' if $RW_T < $RS_T else 'NO')") ($RW_T s vs $RS_T s)")
    PHASES+=("$pct %: $n random 4 KiB writes through serve (QD 32, one FLUSH) in $wt s; compact --to latest in $ct s; copies of stale.img $cp1 s + $cp2 s; B restored and compared in $rt s")
    note "$pct %: rewind $RW_T s ($RW_WIRE B), rsync $RS_T s ($RS_WIRE B), nbdcopy $(awk '{print $1}' time.txt) s"
done

LOAD1=$(uptime)
echo "# rewind resync vs rsync vs nbdcopy: $CMDLINE (REWIND=$R)"
echo "machine: $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r), $(df -PT "$DIR" | awk 'NR == 2 {print $2}') at $DIR; total run $(($(date +%s) - T_START)) s"
echo "load at start: ${LOAD0#*load average: }; at end: ${LOAD1#*load average: }"
echo "tools: $(rsync --version | head -1 | sed 's/  */ /g'); $(nbdcopy --version | head -1); $(qemu-nbd --version | head -1)"
for l in "${SETUP[@]}"; do echo "$l"; done
echo "first B restore + compare with a.img: $STALE_S s"
echo "warm-up verify --peer (builds base.sums on a side where the seed's check left none): $WARM_S s"
for p in "${PHASES[@]}"; do echo "$p"; done
echo "rsync block size for $VOL bytes: $RSYNC_BLOCK (sum_sizes_sqroot)"
echo
echo "| ratio | blocks changed | changed MiB | tool | time s | wire bytes | ÷ changed | client CPU s | server CPU s | client max RSS MiB | lo Δ bytes | notes |"
echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
for r in "${ROWS[@]}"; do echo "$r"; done
echo
echo "rewind fewer bytes / less time than rsync:"
for w in "${WINS[@]}"; do echo "- $w"; done
