#!/usr/bin/env bash
# Replication's acknowledgement modes and failover, from outside (issue 18):
# - --ack sync: every write the host saw FLUSHed is in the peer's journal when the origin is
#   SIGKILLed right after the FLUSH returns; a stopped peer degrades the link to async after
#   --sync-timeout (logged) and it returns to sync once the peer caught up.
# - failover: A serves, B receives (C cascaded from B, D from A); D gets ahead of B; A is
#   killed; B is promoted and served; C follows B's new generation, D is refused as diverged,
#   the old A is refused as a former origin, and A's unit, its mirror moved aside, is seeded
#   by B and converges: restore gives the same bytes on B, C and the new A.
. "$(dirname "$0")/functions.sh"
requires "$PY"
"$PY" -c 'import nbd' 2>/dev/null || { echo "SKIP: python3-libnbd not installed" >&2; exit 77; }
cd "$T"
for u in a b c d; do eval "ID_${u^^}=\$(\"\$REWIND\" id --home h$u)"; done

# The newest seq: of a served origin, what its server has made durable (`timeline` asks it).
newest() { "$REWIND" timeline "$1" --since latest --json 2>/dev/null | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.readline())["seq"])' 2>/dev/null || echo -1; }
converged() { [ "$(newest "$1")" = "$(newest "$2")" ]; }
wait_converged() { for _ in $(seq 300); do converged "$1" "$2" && return 0; sleep 0.2; done; fail "$2 did not reach $1's seq:$(newest "$1") (at seq:$(newest "$2"))"; }
same_points() {  # same_points MIRROR... : restore sampled seqs on each, byte-identical
    local first=$1 seqs s m
    seqs=$(seq 1 "$(newest "$first")" | shuf -n 4 --random-source=<(yes); newest "$first")
    for s in $seqs; do
        "$REWIND" restore "$first" --at "seq:$s" --to "ref-$s.img" >/dev/null
        for m in "${@:2}"; do
            "$REWIND" restore "$m" --at "seq:$s" --to "cmp.img" >/dev/null
            cmp -s "ref-$s.img" cmp.img || fail "seq:$s differs between $first and $m"
            rm -f cmp.img; ok
        done
        rm -f "ref-$s.img"
    done
}
write_some() {  # write_some SOCKET COUNT FIRST-BLOCK: writes of distinct blocks, then a FLUSH
    "$PY" - "$1" "$2" "$3" <<'PY'
import nbd, os, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
for i in range(int(sys.argv[2])):
    h.pwrite(os.urandom(4096 * (1 + i % 3)), (int(sys.argv[3]) + 4 * i) * 4096)
h.flush(); h.shutdown()
PY
}

# 1. --ack sync: FLUSHed writes survive the origin's SIGKILL on the peer.
start_receiver B b.rewind --peer-id "$ID_A"
start_server a.img --size 64M --home ha --replicate-to "$ID_B@127.0.0.1:$PORT_B" --ack sync --sync-timeout 30s
A_PID=$SERVER_PID
"$PY" - "$SOCK" "$A_PID" > flushed.txt <<'PY'
import nbd, os, random, signal, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
rng = random.Random(18)
flushed = {}
for i in range(300):
    block = rng.randrange(16384)
    data = bytes([rng.randrange(1, 256)]) * 4096
    h.pwrite(data, block * 4096)
    h.flush()
    flushed[block] = data[0]
    if i == 299:
        os.kill(int(sys.argv[2]), signal.SIGKILL)  # right after the FLUSH returned
for block, byte in sorted(flushed.items()):
    print(block, byte)
PY
wait "$A_PID" 2>/dev/null || true
sleep 0.5
"$REWIND" restore b.rewind --at latest --to b-latest.img >/dev/null
"$PY" - b-latest.img flushed.txt <<'PY' || fail "a write FLUSHed in sync mode is missing on the peer"
import sys
img = open(sys.argv[1], "rb")
for line in open(sys.argv[2]):
    block, byte = map(int, line.split())
    img.seek(block * 4096)
    if img.read(4096) != bytes([byte]) * 4096:
        sys.exit("block %d does not hold the FLUSHed data" % block)
PY
ok
[ "$(wc -l < flushed.txt)" -gt 250 ] || fail "the sync workload wrote too few blocks"; ok

# Degrade and recover: B stopped (SIGSTOP) → FLUSH waits --sync-timeout, then async; B back → sync.
start_server a.img --home ha --replicate-to "$ID_B@127.0.0.1:$PORT_B" --ack sync --sync-timeout 1s
A_PID=$SERVER_PID
write_some "$SOCK" 5 100
kill -STOP "$PID_B"
start=$(date +%s%N); write_some "$SOCK" 5 200; took=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$took" -ge 900 ] || fail "a sync FLUSH with the peer stopped returned after $took ms, before --sync-timeout"; ok
grep -q "has not acknowledged for 1.0 s (.*): degrading to async" "$T/serve.log" || fail "no degrade line in the log"; ok
start=$(date +%s%N); write_some "$SOCK" 5 300; took=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$took" -lt 900 ] || fail "a FLUSH while degraded waited $took ms"; ok
degraded_in_status() { "$REWIND" status a.img.rewind --json | grep -q '"mode":"sync, degraded to async"'; }
eventually degraded_in_status || fail "status does not say the peer is degraded"; ok
kill -CONT "$PID_B"
wait_converged a.img.rewind b.rewind
write_some "$SOCK" 2 400
eventually grep -q "caught up at seq:[0-9]*: FLUSH waits for it again (sync)" "$T/serve.log" || fail "no return to sync in the log"; ok
stop_server
kill "$PID_B"; wait "$PID_B" 2>/dev/null || true
rm -rf a.img a.img.rewind b.rewind

# 2. Failover. A → B → C, A → D.
start_receiver C c.rewind --peer-id "$ID_B" --peer-id "$ID_A"
start_receiver B b.rewind --peer-id "$ID_A" --replicate-to "$ID_C@127.0.0.1:$PORT_C"
start_receiver D d.rewind --peer-id "$ID_A" --peer-id "$ID_B"
start_server a.img --size 64M --home ha --replicate-to "$ID_B@127.0.0.1:$PORT_B" --replicate-to "$ID_D@127.0.0.1:$PORT_D"
A_PID=$SERVER_PID
write_some "$SOCK" 60 0
wait_converged a.img.rewind b.rewind; wait_converged a.img.rewind c.rewind; wait_converged a.img.rewind d.rewind
same_points a.img.rewind b.rewind c.rewind d.rewind
# B stops receiving; A writes on: D gets ahead of B.
kill "$PID_B"; wait "$PID_B" 2>/dev/null || true
write_some "$SOCK" 10 1000
wait_converged a.img.rewind d.rewind
kill -9 "$A_PID"; wait "$A_PID" 2>/dev/null || true
b_seq=$(newest b.rewind); d_seq=$(newest d.rewind)
[ "$d_seq" -gt "$b_seq" ] || fail "D (seq:$d_seq) is not ahead of B (seq:$b_seq)"; ok

truncate -s 64M b.img
expect_error 1 "rewind: error: b.rewind is a replica: it receives its volume from another unit (rewind receive); make it an origin first with \`rewind promote b.rewind --to SOURCE\`" \
    "$REWIND" serve b.img --mirror b.rewind --listen unix:$T/x.sock
rm b.img
out=$("$REWIND" promote b.rewind --to b.img)
[ "$out" = "promoted b.rewind at seq:$b_seq to generation 1; b.img holds the volume (64.0 MiB)
continue with: rewind serve b.img --mirror b.rewind" ] || fail "promote said [$out]"; ok
"$REWIND" restore b.rewind --at latest --to b-check.img >/dev/null
cmp -s b.img b-check.img || fail "the promoted source is not the mirror's newest point"; ok
"$REWIND" status b.rewind --json | grep -q '"role":"origin"' || fail "B is not an origin after promote"; ok

# The old A's unit becomes a receiver of B: its mirror moved aside, it is seeded again.
mv a.img.rewind a-old.rewind
start_receiver A a.img.rewind --peer-id "$ID_B"
start_server b.img --mirror b.rewind --home hb --replicate-to "$ID_C@127.0.0.1:$PORT_C" \
    --replicate-to "$ID_D@127.0.0.1:$PORT_D" --replicate-to "$ID_A@127.0.0.1:$PORT_A"
write_some "$SOCK" 30 2000
wait_converged b.rewind c.rewind
wait_converged b.rewind a.img.rewind
same_points b.rewind c.rewind a.img.rewind
eventually grep -q "the sender's generation 1 (continuing from seq:$b_seq) replaces generation 0" recv-C.log || fail "C did not take on generation 1"; ok
eventually grep -q "refused: the sender's generation 1 continues from seq:$b_seq, and this mirror holds records after it (to seq:$d_seq) from generation 0: they have diverged; move this mirror aside and let it be seeded again" recv-D.log \
    || { cat recv-D.log >&2; fail "D was not refused as diverged"; }; ok
[ "$(newest d.rewind)" = "$d_seq" ] || fail "the diverged D was written"; ok

# The old origin comes back serving: C refuses it as a former origin, and keeps following B.
"$REWIND" serve a.img --mirror a-old.rewind --listen "unix:$T/old.sock" --home ha --replicate-to "$ID_C@127.0.0.1:$PORT_C" 2>>old-a.log >/dev/null &
OLD=$!; PIDS+=("$OLD")
eventually grep -q "refused: the sender is at generation 0, this mirror at 1: it is a former origin (a failover happened since); make it a receiver of the new origin" recv-C.log \
    || { cat recv-C.log old-a.log >&2; fail "C did not refuse the old origin"; }; ok
kill "$OLD"; wait "$OLD" 2>/dev/null || true
write_some "$SOCK" 5 3000
wait_converged b.rewind c.rewind
same_points b.rewind c.rewind
stop_server
finish
