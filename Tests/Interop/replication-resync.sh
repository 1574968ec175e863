#!/usr/bin/env bash
# `rewind resync MIRROR --peer` and `rewind receive --rejoin`, from outside (issue 19):
# 1. A peer with no mirror is seeded by resync (the exact ok line, identical by `verify
#    --peer`, no peers entry left behind on A); A then writes 1 % of its blocks (some with the
#    bytes they already held) and folds all of it into its base: resync finds by checksum tree
#    exactly the blocks whose bytes changed (as comparing the restored images finds), sends
#    them as one catch-up point — the bytes sent are the checksum questions and those blocks,
#    to the byte — and a second resync with nothing new sends nothing and changes nothing.
# 2. resync is refused, with its exact message, while a running server streams to that peer.
# 3. Failback: A → B; B stops receiving, A writes on (never replicated) and is SIGKILLed; B is
#    promoted and served, streaming to A. A's mirror is refused by `receive` without --rejoin;
#    with it, the records after the failover point are cut (the exact line), A follows B's
#    generation receiving only the records after it, and both restore the same bytes. The same
#    former mirror (a copy) rejoining after B compacted past the failover point converges by
#    a catch-up with exactly the blocks that differ.
. "$(dirname "$0")/functions.sh"
requires "$PY"
"$PY" -c 'import nbd' 2>/dev/null || { echo "SKIP: python3-libnbd not installed" >&2; exit 77; }
cd "$T"
for u in a b; do eval "ID_${u^^}=\$(\"\$REWIND\" id --home h$u)"; done
BS=4096 BLOCKS=16384   # 64 MiB volumes

stop_receiver() { local pid; eval "pid=\$PID_$1"; kill "$pid"; wait "$pid" 2>/dev/null || true; }
# The newest seq: of a served origin, what its server has made durable (`timeline` asks it);
# of a mirror compacted up to its newest record (no record left to list), its oldest point.
newest() {
    "$REWIND" timeline "$1" --since latest --json 2>/dev/null | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.readline())["seq"])' 2>/dev/null \
        || "$REWIND" status "$1" --json 2>/dev/null | "$PY" -c 'import json,sys; m = json.load(sys.stdin); assert m["records"] == 0; print(m["newestSeq"])' 2>/dev/null \
        || echo -1
}
converged() { [ "$(newest "$1")" = "$(newest "$2")" ]; }
wait_converged() { for _ in $(seq 300); do converged "$1" "$2" && return 0; sleep 0.2; done; fail "$2 did not reach $1's seq:$(newest "$1") (at seq:$(newest "$2"))"; }
same_at() {  # same_at SEQ MIRROR...: the restores of SEQ on each are byte-identical
    local s=$1 m; shift
    "$REWIND" restore "$1" --at "seq:$s" --to "ref-$s.img" >/dev/null
    for m in "${@:2}"; do
        "$REWIND" restore "$m" --at "seq:$s" --to cmp.img >/dev/null
        cmp -s "ref-$s.img" cmp.img || fail "seq:$s differs between $1 and $m"
        rm -f cmp.img; ok
    done
    rm -f "ref-$s.img"
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
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
since_mark() { tail -n +"$(( $2 + 1 ))" "$1"; }   # since_mark LOG LINES: what LOG got after its first LINES lines

# diff.py OLD.img NEW.img: the blocks whose bytes differ, and what comparing the checksum trees
# (fanout 16, questions in batches of 4,096) exchanges for them, as peer-verify.sh computes it:
# "blocks runs questions client-bytes-sent bytes-received".
cat > diff.py <<'PY'
import sys
BS, FANOUT, BATCH, FRAME = 4096, 16, 4096, 16
a, b = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
assert len(a) == len(b) == 64 << 20
n = len(a) // BS
diff = [i for i in range(n) if a[i * BS:(i + 1) * BS] != b[i * BS:(i + 1) * BS]]
runs = sum(1 for j, d in enumerate(diff) if j == 0 or diff[j - 1] + 1 != d)
counts = [n]
while counts[-1] > 1: counts.append(-(-counts[-1] // FANOUT))
queries, sent, received = 0, FRAME + 28, FRAME + 16   # inspect, inspectReady
if diff:
    for level in range(len(counts) - 1, 0, -1):
        parents = sorted({d // FANOUT ** level for d in diff})
        for i in range(0, len(parents), BATCH):
            batch = parents[i:i + BATCH]
            answered = sum(min((p + 1) * FANOUT, counts[level - 1]) - p * FANOUT for p in batch)
            queries += 1
            sent += FRAME + 1 + 4 + 8 * len(batch); received += FRAME + 8 * answered
print(len(diff), runs, queries, sent, received)
PY
# stream_bytes.py: the frame bytes a sender counts for streaming the records of a timeline
# (--json on stdin): frames of up to 2,048 records, closed once they hold 4 MiB of payload;
# each frame 16 bytes of framing and a 4-byte count, each record a 48-byte header and its
# payload (a write's blocks; nothing for a zero, a trim or a FLUSH).
cat > stream_bytes.py <<'PY'
import json, sys
total, frame_records, frame_bytes, frames = 0, 0, 0, 0
for line in sys.stdin:
    r = json.loads(line)
    n = r["length"] if r["kind"] == "write" else 0
    if frame_records == 0 or frame_records == 2048 or frame_bytes >= 4 << 20:
        frames += 1; total += 16 + 4; frame_records, frame_bytes = 0, 0
    frame_records += 1; frame_bytes += n; total += 48 + n
print(total, frames)
PY

A=a.img.rewind
SHORT_A="${ID_A:0:16}…" SHORT_B="${ID_B:0:16}…"

# 1. Seed by resync. A serves alone: a seeded random workload of writes and zeroes, a FLUSH.
start_server a.img --size 64M --home ha
"$PY" - "$SOCK" <<'PY'
import nbd, random, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
rng = random.Random(19)
for i in range(400):
    n = rng.randrange(1, 4); block = rng.randrange(16384 - n)
    if rng.random() < 0.1: h.zero(n * 4096, block * 4096)
    else: h.pwrite(rng.randbytes(n * 4096), block * 4096)
h.flush(); h.shutdown()
PY
stop_server
D=$(newest $A)
[ "$D" = 401 ] || fail "A is at seq:$D after 400 requests and a FLUSH, expected seq:401"; ok
start_receiver B b.rewind --peer-id "$ID_A"
PEER_B="$ID_B@127.0.0.1:$PORT_B" SHOWN_B="$SHORT_B@127.0.0.1:$PORT_B"
# Seeded (A's base is all zeros: nothing of it is sent), then streamed every record.
read -r WANT FRAMES <<<"$("$REWIND" timeline $A --json | "$PY" stream_bytes.py)"
expect_output "ok: $SHOWN_B holds seq:$D (it held no mirror); $WANT bytes sent; identical by checksum tree" \
    "$REWIND" resync $A --peer "$PEER_B" --home ha 2>resync.err
grep -qF "link to $SHOWN_B: the peer has no mirror; seeding it with the volume as of seq:0" resync.err || { cat resync.err >&2; fail "resync did not log seeding B"; }; ok
echo "seed: $WANT bytes sent for $D records in $FRAMES frames"
[ "$(newest b.rewind)" = "$D" ] || fail "B is at seq:$(newest b.rewind) after the resync, not seq:$D"; ok
expect_output "ok: seq:$D is identical on $SHOWN_B (0 questions, 0 hashes received; 44 bytes sent, 32 received)" \
    "$REWIND" verify $A --peer "$PEER_B" --home ha
[ ! -e "$A/peers/$ID_B.peer" ] || fail "A keeps a peers entry for B, which it did not stream to before the resync"; ok
eventually grep -q "link from $SHORT_A (127.0.0.1:[0-9]*): seeded b.rewind (0 bytes of data) as of seq:0" recv-B.log \
    || { cat recv-B.log >&2; fail "B did not log its seed"; }; ok
"$REWIND" timeline b.rewind --json > b-seeded.txt
"$REWIND" timeline $A --json | cmp -s - b-seeded.txt || fail "B's timeline is not A's after the seed"; ok

# A writes 1 % of the volume's blocks, each once: about a fifth of them with the bytes they
# already held (no change), the rest with new bytes. B holds none of it.
start_server a.img --home ha
WRITTEN=$("$PY" - "$SOCK" <<'PY'
import nbd, random, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
rng = random.Random(1919)
blocks = rng.sample(range(16384), 16384 // 100)
changed = 0
for b in blocks:
    old = h.pread(4096, b * 4096)
    new = old if rng.random() < 0.2 else rng.randbytes(4096)
    changed += new != old
    h.pwrite(new, b * 4096)
h.flush(); h.shutdown()
print(len(blocks), changed)
PY
)
read -r NW CHANGED <<<"$WRITTEN"
stop_server
H=$(newest $A)
[ "$H" = $((D + NW + 1)) ] || fail "A is at seq:$H, expected seq:$((D + NW + 1)) ($NW writes and a FLUSH)"; ok
# What differs: A's two points restored and compared block by block (before the fold).
"$REWIND" restore $A --at "seq:$D" --to a-d.img >/dev/null
"$REWIND" restore $A --at "seq:$H" --to a-h.img >/dev/null
read -r K RUNS Q QSENT QRECV <<<"$("$PY" diff.py a-d.img a-h.img)"
[ "$K" = "$CHANGED" ] || fail "the images differ in $K blocks; the workload changed the bytes of $CHANGED"; ok
[ "$K" -lt "$NW" ] && [ "$K" -gt 100 ] || fail "$K of $NW written blocks changed: no write of unchanged bytes, or too few"; ok
"$REWIND" compact $A --to latest >/dev/null
"$REWIND" status $A --json | grep -q "\"oldestSeq\":$H,.*\"records\":0," || fail "A's oldest point is not seq:$H after compact --to latest"; ok
# B is behind A's oldest point, and A kept no record of what changed for it: checksum trees.
# B's mirror as of seq:D is copied aside (its receiver stopped meanwhile) for the text form.
stop_receiver B
cp -a b.rewind b-at-d.rewind
RECV_PORT=$PORT_B start_receiver B b.rewind --peer-id "$ID_A"
STATUS=0
OUT=$("$REWIND" resync $A --peer "$PEER_B" --home ha --json 2>resync.err) || STATUS=$?
[ "$STATUS" = 0 ] || { cat resync.err >&2; fail "resync --json exited $STATUS"; }; ok
[ ! -s resync.err ] || fail "resync --json wrote to stderr: $(cat resync.err)"; ok
# The bytes sent: the questions of the comparison, then the K blocks, one catch-up data frame
# per run of them (none holds 4 MiB; 16 bytes of framing each). Received: the peer's answers.
WANT=$((QSENT + K * BS + 16 * RUNS))
[ "$OUT" = "{\"before\":$D,\"bytesSent\":$WANT,\"checksumBytesReceived\":$QRECV,\"differingBlocks\":0,\"ok\":true,\"peer\":\"$PEER_B\",\"seq\":$H}" ] \
    || fail "resync --json said [$OUT], expected bytesSent $WANT, checksumBytesReceived $QRECV"; ok
[ $((WANT * 100)) -le $((102 * K * BS + 100 * 65536)) ] || fail "$WANT bytes sent for $K blocks: more than 1.02 × theirs + 64 KiB"; ok
echo "catch-up by checksum tree: $K of $NW written blocks changed ($RUNS runs); $WANT bytes sent," \
     "$(awk "BEGIN { printf \"%.4f\", $WANT / ($K * $BS) }") × the changed bytes ($Q questions; $QRECV bytes of checksums received," \
     "$(awk "BEGIN { printf \"%.4f\", ($WANT + $QRECV) / ($K * $BS) }") × both ways)"
# B holds one catch-up record, at A's newest, from B's old point.
check_caught_up() {  # check_caught_up MIRROR: after seq:D, one catch-up at seq:H from seq:D setting K blocks
    "$REWIND" timeline "$1" --since "seq:$D" --json > tl.txt
    "$PY" - tl.txt "$D" "$H" "$K" <<'PY' || fail "$1's timeline after seq:$D is not one catch-up at seq:$H from seq:$D: $(cat tl.txt)"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
d, h, k = map(int, sys.argv[2:])
assert [r["seq"] for r in recs] == [d, h], recs
assert (recs[1]["kind"], recs[1]["from"], recs[1]["blocks"]) == ("catch-up", d, k), recs[1]
PY
    ok
    "$REWIND" timeline "$1" | tail -n 1 | grep -qE "^$H +[^ ]+ +catch-up +from seq:$D +$K blocks$" || fail "$1's timeline text does not show the catch-up"; ok
    "$REWIND" restore "$1" --at latest --to b-h.img >/dev/null
    cmp -s a-h.img b-h.img || fail "$1's newest is not A's seq:$H"; ok
    rm -f b-h.img
}
check_caught_up b.rewind
[ ! -e "$A/peers/$ID_B.peer" ] && [ ! -e "$A/peers/$ID_B.dirty" ] || fail "A keeps an entry for B after the resync"; ok
# The text form, from the copy at seq:D (B's receiver on it, same port): the same bytes, and
# the sender's log on stderr says how it found them.
stop_receiver B
RECV_PORT=$PORT_B start_receiver B b-at-d.rewind --peer-id "$ID_A"
expect_output "ok: $SHOWN_B holds seq:$H (it held seq:$D); $WANT bytes sent, $QRECV bytes of checksums received; identical by checksum tree" \
    "$REWIND" resync $A --peer "$PEER_B" --home ha 2>resync.err
LINK_B="link to $SHOWN_B:"
for line in "the peer holds seq:$D, before this mirror's oldest point seq:$H, with no record of the blocks changed since; comparing checksum trees" \
            "$K blocks differ ($Q questions, $((QSENT + QRECV)) bytes of checksums exchanged)" \
            "the peer holds seq:$D, folded here since; catching it up to seq:$H as one point: $K blocks changed, $((K * BS)) bytes of data" \
            "caught up to seq:$H ($((K * BS)) bytes of data sent)"; do
    grep -qF -- "$LINK_B $line" resync.err || { cat resync.err >&2; fail "resync's log lacks [$LINK_B $line]"; }; ok
done
check_caught_up b-at-d.rewind
stop_receiver B
rm -rf b-at-d.rewind
RECV_PORT=$PORT_B start_receiver B b.rewind --peer-id "$ID_A"
# Nothing new: nothing is sent, nothing changes.
"$REWIND" timeline b.rewind --json > b-before.txt
expect_output "ok: $SHOWN_B holds seq:$H (it held seq:$H); 0 bytes sent; identical by checksum tree" \
    "$REWIND" resync $A --peer "$PEER_B" --home ha 2>resync.err
echo "resync with nothing new: 0 bytes sent"
"$REWIND" timeline b.rewind --json | cmp -s - b-before.txt || fail "B's timeline changed with a resync that had nothing to send"; ok
rm -f a-d.img a-h.img b-h.img

# 2. Refused while a running server streams to B.
start_server a.img --home ha --replicate-to "$PEER_B"
A_PID=$SERVER_PID
eventually test -e "$A/peers/$ID_B.peer" || fail "A's server did not record B in its peers table"; ok
REFUSAL="rewind: error: a running rewind streams $A to $SHOWN_B and catches it up itself (\`rewind status\` shows how); resync is for a peer nothing streams to now"
expect_error 1 "$REFUSAL" "$REWIND" resync $A --peer "$PEER_B" --home ha
expect_error 1 "$REFUSAL" "$REWIND" resync $A --peer "$PEER_B" --home ha --json

# 3. Failback. A streams to B; B converges, then stops receiving; A writes on, and is killed.
write_some "$SOCK" 60 0
wait_converged $A b.rewind
stop_receiver B
P=$(newest b.rewind)
write_some "$SOCK" 100 5000
X=$(newest $A)
[ "$X" = $((P + 101)) ] || fail "A is at seq:$X, expected seq:$((P + 101))"; ok
kill -9 "$A_PID"; wait "$A_PID" 2>/dev/null || true
[ "$(newest $A)" = "$X" ] || fail "A's mirror holds seq:$(newest $A) after the SIGKILL, not seq:$X"; ok
out=$("$REWIND" promote b.rewind --to b.img)
[ "$out" = "promoted b.rewind at seq:$P to generation 1; b.img holds the volume (64.0 MiB)
continue with: rewind serve b.img --mirror b.rewind" ] || fail "promote said [$out]"; ok
# A's former mirror, as the SIGKILL left it, for the second rejoin (after B compacts).
cp -a $A a-copy.rewind
# A seq after the failover point, as A wrote it (never replicated).
S=$((P + 50))
"$REWIND" restore $A --at "seq:$S" --to a-old-s.img >/dev/null
PORT_A=$(free_port)
PEER_A="$ID_A@127.0.0.1:$PORT_A" SHOWN_A="$SHORT_A@127.0.0.1:$PORT_A"
start_server b.img --mirror b.rewind --home hb --replicate-to "$PEER_A"
B_SOCK=$SOCK
MARK=$(wc -l < "$T/serve.log")
write_some "$B_SOCK" 150 8000
Q=$(newest b.rewind)
[ "$Q" = $((P + 151)) ] || fail "B is at seq:$Q, expected seq:$((P + 151))"; ok
# Without --rejoin: refused, as before.
expect_error 1 "rewind: error: $A is an origin's mirror (serve writes it), not a replica; receive into a new directory, move it aside, or, for a former origin rejoining after a failover, give --rejoin" \
    timeout 30 "$REWIND" receive $A --listen "127.0.0.1:$PORT_A" --peer-id "$ID_B" --home ha
[ "$(newest $A)" = "$X" ] || fail "the refused receive changed A's mirror"; ok
# With --rejoin: the records after seq:P are cut; A follows B from seq:P on.
RECV_PORT=$PORT_A start_receiver A $A --peer-id "$ID_B" --rejoin
wait_converged b.rewind $A
grep -qF "$A was an origin's mirror; it is a replica from now on (--rejoin)" recv-A.log || { cat recv-A.log >&2; fail "A did not log becoming a replica"; }; ok
grep -qE "link from $SHORT_B \(127\.0\.0\.1:[0-9]+\): rejoining: seq:$((P + 1))…seq:$X of generation 0, written after the failover point and never replicated, are cut \($((X - P)) records\)$" recv-A.log \
    || { cat recv-A.log >&2; fail "A did not log cutting seq:$((P + 1))…seq:$X"; }; ok
grep -qE ": the sender's generation 1 \(continuing from seq:$P\) replaces generation 0$" recv-A.log || fail "A did not take on generation 1"; ok
grep -qE ": resuming after seq:$P \(the sender has seq:$Q\)$" recv-A.log || fail "A did not resume after seq:$P"; ok
since_mark "$T/serve.log" "$MARK" | grep -qF "link to $SHOWN_A: streaming from seq:$((P + 1))" || fail "B did not stream to A from seq:$((P + 1))"; ok
# A's records after seq:P are B's, record for record (seq, time, kind, range, checksum).
"$REWIND" timeline $A --since "seq:$P" --json > a-tl.txt
"$REWIND" timeline b.rewind --since "seq:$P" --json | cmp -s - a-tl.txt || fail "A's records after seq:$P are not B's"; ok
[ "$(wc -l < a-tl.txt)" = $((Q - P + 1)) ] || fail "A lists $(wc -l < a-tl.txt) records from seq:$P, expected $((Q - P + 1))"; ok
! since_mark "$T/serve.log" "$MARK" | grep -qE "link to $SHOWN_A: .*(seeding|catching)" || fail "B seeded or caught A up instead of streaming"; ok
expect_output "ok: seq:$Q is identical on $SHOWN_A (0 questions, 0 hashes received; 44 bytes sent, 32 received)" \
    "$REWIND" verify b.rewind --peer "$PEER_A" --home hb
"$REWIND" status $A --json | grep -q '"role":"replica"' || fail "A is not a replica after rejoining"; ok
for s in $P $((P + 75)) $Q; do same_at "$s" b.rewind $A; done
same_at "$S" b.rewind $A
"$REWIND" restore $A --at "seq:$S" --to a-new-s.img >/dev/null
! cmp -s a-old-s.img a-new-s.img || fail "A's seq:$S still reads as what A wrote before the failover"; ok
rm -f a-old-s.img a-new-s.img

# The copy of A's former mirror rejoins after B compacted past the failover point: a catch-up
# by checksum tree, with exactly the blocks that differ between B's seq:P and its newest.
# (B compacts up to what A acked: A is stopped once it holds B's newest.)
write_some "$B_SOCK" 30 12000
wait_converged b.rewind $A
stop_receiver A
Q2=$(newest b.rewind)
stop_server
"$REWIND" restore b.rewind --at "seq:$P" --to b-p.img >/dev/null
"$REWIND" restore b.rewind --at "seq:$Q2" --to b-q.img >/dev/null
read -r K2 RUNS2 QQ2 QSENT2 QRECV2 <<<"$("$PY" diff.py b-p.img b-q.img)"
"$REWIND" compact b.rewind --to latest >/dev/null
[ ! -e "b.rewind/peers/$ID_A.dirty" ] || fail "B recorded a dirty set for A, which held its newest"; ok
mv recv-A.log recv-A1.log
RECV_PORT=$PORT_A start_receiver A a-copy.rewind --peer-id "$ID_B" --rejoin
MARK=$(wc -l < "$T/serve.log")
start_server b.img --mirror b.rewind --home hb --replicate-to "$PEER_A"
wait_converged b.rewind a-copy.rewind
write_some "$SOCK" 10 14000
Q3=$(newest b.rewind)
wait_converged b.rewind a-copy.rewind
since_mark "$T/serve.log" "$MARK" > serve-b2.log
grep -qF "link to $SHOWN_A: the peer holds seq:$P, before this mirror's oldest point seq:$Q2, with no record of the blocks changed since; comparing checksum trees" serve-b2.log \
    || { cat serve-b2.log >&2; fail "B did not compare checksum trees with A"; }; ok
grep -qF "link to $SHOWN_A: $K2 blocks differ ($QQ2 questions, $((QSENT2 + QRECV2)) bytes of checksums exchanged)" serve-b2.log \
    || { cat serve-b2.log >&2; fail "B did not find the $K2 differing blocks"; }; ok
grep -qF "link to $SHOWN_A: the peer holds seq:$P, folded here since; catching it up to seq:$Q2 as one point: $K2 blocks changed, $((K2 * BS)) bytes of data" serve-b2.log \
    || fail "B did not catch A up with $K2 blocks"; ok
grep -qF "link to $SHOWN_A: caught up to seq:$Q2 ($((K2 * BS)) bytes of data sent)" serve-b2.log || fail "B did not log the catch-up's end"; ok
grep -qF "link to $SHOWN_A: streaming from seq:$((Q2 + 1))" serve-b2.log || fail "B did not stream after the catch-up"; ok
grep -qF "a-copy.rewind was an origin's mirror; it is a replica from now on (--rejoin)" recv-A.log || { cat recv-A.log >&2; fail "the copy did not log becoming a replica"; }; ok
grep -qE "link from $SHORT_B \(127\.0\.0\.1:[0-9]+\): rejoining: seq:$((P + 1))…seq:$X of generation 0, written after the failover point and never replicated, are cut \($((X - P)) records\)$" recv-A.log \
    || { cat recv-A.log >&2; fail "the copy did not log cutting seq:$((P + 1))…seq:$X"; }; ok
grep -qE ": catching up from seq:$P to seq:$Q2 as one point \($K2 blocks in $RUNS2 runs\)$" recv-A.log || { cat recv-A.log >&2; fail "the copy did not log the catch-up"; }; ok
"$REWIND" timeline a-copy.rewind --since "seq:$P" --json > copy-tl.txt
"$PY" - copy-tl.txt "$P" "$Q2" "$Q3" "$K2" <<'PY' || fail "the copy's timeline after seq:$P is not a catch-up at seq:$Q2 and the records after"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
p, q2, q3, k = map(int, sys.argv[2:])
assert [r["seq"] for r in recs] == [p, q2] + list(range(q2 + 1, q3 + 1)), [r["seq"] for r in recs]
assert (recs[1]["kind"], recs[1]["from"], recs[1]["blocks"]) == ("catch-up", p, k), recs[1]
PY
ok
expect_output "ok: seq:$Q3 is identical on $SHOWN_A (0 questions, 0 hashes received; 44 bytes sent, 32 received)" \
    "$REWIND" verify b.rewind --peer "$PEER_A" --home hb
"$REWIND" restore a-copy.rewind --at "seq:$Q2" --to cmp.img >/dev/null
cmp -s b-q.img cmp.img || fail "the copy's seq:$Q2 is not B's"; ok
rm -f cmp.img b-p.img b-q.img
same_at "$Q3" b.rewind a-copy.rewind
echo "rejoin after B's fold: $K2 blocks differ in $RUNS2 runs ($QQ2 questions, $((QSENT2 + QRECV2)) bytes of checksums)"

# A peer gone for good: forget-peer is refused while B's server runs, then removes A's entry
# (and so its hold on retention); wrong or ambiguous IDs are refused by name.
expect_error 1 "rewind: error: a running rewind owns b.rewind; stop it first (and start it again without --replicate-to for that peer)" \
    "$REWIND" forget-peer b.rewind "$ID_A"
stop_server
HELD=$("$REWIND" status b.rewind --json | "$PY" -c 'import json,sys; p = json.load(sys.stdin)["peers"]; assert len(p) == 1, p; print(p[0]["id"], p[0]["durableSeq"])')
[ "$HELD" = "$ID_A $Q3" ] || fail "B's peers before forget-peer: [$HELD], expected A at seq:$Q3"; ok
expect_error 1 "rewind: error: b.rewind keeps nothing for a peer 0123 (its peers: ${ID_A:0:16}…)" "$REWIND" forget-peer b.rewind 0123
expect_error 1 "rewind: error: b.rewind keeps nothing for a peer ${ID_B:0:12} (its peers: ${ID_A:0:16}…)" "$REWIND" forget-peer b.rewind "${ID_B:0:12}"
expect_output "forgot peer $ID_A at 127.0.0.1:$PORT_A: it held seq:$Q3; retention no longer waits for it" \
    "$REWIND" forget-peer b.rewind "${ID_A:0:10}"
[ "$("$REWIND" status b.rewind --json | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))')" = 0 ] || fail "B still lists A after forget-peer"; ok
[ -z "$(ls b.rewind/peers/ 2>/dev/null)" ] || fail "B's peers/ still holds $(ls b.rewind/peers/)"; ok
expect_error 1 "rewind: error: b.rewind keeps nothing for a peer $ID_A (its peers: none)" "$REWIND" forget-peer b.rewind "$ID_A"
finish
