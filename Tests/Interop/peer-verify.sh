#!/usr/bin/env bash
# `rewind verify MIRROR --peer ID@HOST:PORT`, from outside: A serves and replicates to B
# (`rewind receive`); A's mirror is compared with B's copy by checksum tree over the link.
# - identical copies: the exact ok line, nothing asked beyond the root;
# - an older point of A against B's newest: the differing blocks equal, range for range, what
#   comparing the two restored images block by block finds; the report names both points; the
#   questions, hashes and bytes exchanged are exactly those of a top-down walk of the differing
#   nodes (fanout 16);
# - nothing changes on either side (timelines, plain verify), compaction of A keeps the answer;
# - refusals and usage errors, each with its exact message (a wrong peer ID, a --home without
#   a key pair, a peer ahead of this mirror without --at among them);
# - the receiver goes on streaming after the inspections, and logs them.
. "$(dirname "$0")/functions.sh"
requires "$PY"
"$PY" -c 'import nbd' 2>/dev/null || { echo "SKIP: python3-libnbd not installed" >&2; exit 77; }
cd "$T"
for u in a b c; do eval "ID_${u^^}=\$(\"\$REWIND\" id --home h$u)"; done

newest() { "$REWIND" timeline "$1" --since latest --json 2>/dev/null | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.readline())["seq"])' 2>/dev/null || echo -1; }
converged() { [ "$(newest "$1")" = "$(newest "$2")" ]; }
wait_converged() { for _ in $(seq 300); do converged "$1" "$2" && return 0; sleep 0.2; done; fail "$2 did not reach $1's seq:$(newest "$1") (at seq:$(newest "$2"))"; }
workload() {  # workload SOCKET SEED COUNT: COUNT writes/zeroes/trims of 1–3 blocks, then one FLUSH
    "$PY" - "$1" "$2" "$3" <<'PY'
import nbd, random, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
written = []
for _ in range(int(sys.argv[3])):
    n = rng.randrange(1, 4); r = rng.random()
    # Zeroes and trims mostly over blocks written before, so that they change something.
    block = rng.choice(written) if r < 0.15 and written and rng.random() < 0.8 else rng.randrange(16384 - n)
    block = min(block, 16384 - n)
    if r < 0.08: h.zero(n * 4096, block * 4096)
    elif r < 0.15: h.trim(n * 4096, block * 4096)
    else: h.pwrite(rng.randbytes(n * 4096), block * 4096); written.append(block)
h.flush(); h.shutdown()
PY
}
# verify_peer ARGS...: `rewind verify` with its stdout in $OUT and exit status in $STATUS.
verify_peer() { STATUS=0; OUT=$("$REWIND" verify "$@" 2>verify.err) || STATUS=$?; }

# What `rewind verify --peer` counts per frame: the frame on the wire, body + 16 (length,
# header, checksum). The first exchange, inspect (28-byte body) and inspectReady (16), is 44 + 32.
FRAME=16
cat > expect.py <<'PY'
# expect.py MINE.img THEIRS.img PEER SHOWN SEQ PEERSEQ FRAME: the report `rewind verify --peer`
# must give when this mirror at SEQ holds MINE.img and the peer, at PEERSEQ, THEIRS.img, from the
# images alone. PEER is ID@HOST:PORT in full (--json), SHOWN its short form (the text).
# Writes expected.json (the --json object) and expected.txt (the text form).
import json, sys
mine, theirs, peer, shown, seq, peer_seq = sys.argv[1:5] + [int(sys.argv[5]), int(sys.argv[6])]
FRAME, BS, FANOUT, BATCH = int(sys.argv[7]), 4096, 16, 4096
a, b = open(mine, "rb").read(), open(theirs, "rb").read()
assert len(a) == len(b) == 64 << 20
nblocks = len(a) // BS
diff = [i for i in range(nblocks) if a[i * BS:(i + 1) * BS] != b[i * BS:(i + 1) * BS]]
ranges = []
for d in diff:
    if ranges and ranges[-1][0] + ranges[-1][1] == d * BS: ranges[-1][1] += BS
    else: ranges.append([d * BS, BS])
# The tree: level 0 the blocks, each level above one node per FANOUT below, up to one root.
counts = [nblocks]
while counts[-1] > 1: counts.append(-(-counts[-1] // FANOUT))
top = len(counts) - 1
queries, hashes, sent, received, bound = 0, 0, FRAME + 28, FRAME + 16, 0   # inspect, inspectReady
per_level = []
if diff:
    for level in range(top, 0, -1):
        parents = sorted({d // FANOUT ** level for d in diff})   # the differing nodes asked about
        per_level.append(len(parents))
        bound += FANOUT * len(parents)
        for i in range(0, len(parents), BATCH):
            batch = parents[i:i + BATCH]
            answered = sum(min((p + 1) * FANOUT, counts[level - 1]) - p * FANOUT for p in batch)
            queries += 1; hashes += answered
            sent += FRAME + 1 + 4 + 8 * len(batch); received += FRAME + 8 * answered
zeroed = sum(1 for d in diff if a[d * BS:(d + 1) * BS] != bytes(BS) and b[d * BS:(d + 1) * BS] == bytes(BS))
def human(n):
    units, v, i = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"], float(n), 0
    while v >= 1024 and i < len(units) - 1: v /= 1024; i += 1
    return "%d B" % n if i == 0 else "%.1f %s" % (v, units[i])
json.dump({"ok": not diff, "peer": peer, "seq": seq, "peerSeq": peer_seq, "differingBlocks": len(diff), "differingBytes": len(diff) * BS,
           "ranges": ranges, "queries": queries, "hashesReceived": hashes, "bytesSent": sent, "bytesReceived": received},
          open("expected.json", "w"))
ex = "%d questions, %d hashes received; %d bytes sent, %d received" % (queries, hashes, sent, received)
points = "seq:%d" % seq if seq == peer_seq else "seq:%d here and seq:%d" % (seq, peer_seq)
with open("expected.txt", "w") as f:
    if not diff:
        f.write("ok: %s %s identical on %s (%s)\n" % (points, "is" if seq == peer_seq else "are", shown, ex))
    else:
        f.write("%s %s on %s: %d blocks (%s) in %d ranges (%s)\n" % (points, "differs" if seq == peer_seq else "differ", shown,
                                                                  len(diff), human(len(diff) * BS), len(ranges), ex))
        for off, n in ranges[:20]:
            f.write("  bytes %d+%d (blocks %d…%d)\n" % (off, n, off // BS, (off + n) // BS - 1))
        if len(ranges) > 20: f.write("  … %d more ranges (--json lists them all)\n" % (len(ranges) - 20))
# For the script: blocks, ranges, blocks holding data in MINE and zeroes in THEIRS, hashes, the 16×parents bound, parents per level.
print(len(diff), len(ranges), zeroed, hashes, bound, " ".join(map(str, per_level)))
PY
same_json() {  # $OUT, parsed, equals expected.json (the differing fields to stderr)
    printf '%s' "$OUT" | "$PY" -c 'import json,sys; got=json.load(sys.stdin); want=json.load(open("expected.json"))
if got != want:
    for k in sorted(set(got) | set(want)):
        if got.get(k) != want.get(k): print("  %s: got %s, expected %s" % (k, str(got.get(k))[:200], str(want.get(k))[:200]), file=sys.stderr)
    sys.exit(1)'
}

# 1. A serves and replicates to B; a random workload; B converges; the copies are identical.
start_receiver B b.rewind --peer-id "$ID_A"
PEER_B="$ID_B@127.0.0.1:$PORT_B"
SHOWN_B="${ID_B:0:16}…@127.0.0.1:$PORT_B"
start_server a.img --size 64M --home ha --replicate-to "$PEER_B"
A=a.img.rewind
workload "$SOCK" 7 400
N=$(newest $A)
[ "$N" = 401 ] || fail "A is at seq:$N after 400 requests and a FLUSH, expected seq:401"; ok
wait_converged $A b.rewind
"$REWIND" timeline $A --json > a-before.txt
"$REWIND" timeline b.rewind --json > b-before.txt
INSPECTIONS=0   # connections B's inspector answers (A's identity, A's volume)

expect_output "ok: seq:$N is identical on $SHOWN_B (0 questions, 0 hashes received; 44 bytes sent, 32 received)" \
    "$REWIND" verify $A --peer "$PEER_B" --home ha
INSPECTIONS=$((INSPECTIONS + 1))
verify_peer $A --peer "$PEER_B" --home ha --json; INSPECTIONS=$((INSPECTIONS + 1))
[ "$STATUS" = 0 ] || fail "verify --peer --json of identical copies exited $STATUS"; ok
"$REWIND" restore $A --at "seq:$N" --to a-now.img >/dev/null
"$PY" expect.py a-now.img a-now.img "$PEER_B" "$SHOWN_B" "$N" "$N" $FRAME >/dev/null
same_json || fail "verify --peer --json of identical copies said $OUT"; ok
# --at an earlier point holding the same volume (seq:N is the FLUSH): identical too, and the
# report names both points.
expect_output "ok: seq:$((N - 1)) here and seq:$N are identical on $SHOWN_B (0 questions, 0 hashes received; 44 bytes sent, 32 received)" \
    "$REWIND" verify $A --peer "$PEER_B" --home ha --at "seq:$((N - 1))"
INSPECTIONS=$((INSPECTIONS + 1))

# 2. An older point of A against B's newest: the differing blocks are exactly those of the
# two restored images. B's mirror is restored from disk while it receives (a reader). The
# report names this mirror's point (--at) and the peer's, Q (its newest), which B's log says too.
last_compared_at() { [ "$(grep "inspection from ${ID_A:0:16}… (127.0.0.1:[0-9]*): comparing at seq:" recv-B.log | tail -n 1 | sed 's/.*comparing at seq://')" = "$1" ]; }
Q=$(newest b.rewind)
[ "$Q" = "$N" ] || fail "B is at seq:$Q, A at seq:$N"; ok
"$REWIND" restore b.rewind --at "seq:$Q" --to q.img >/dev/null
cmp -s q.img a-now.img || fail "B's seq:$Q is not A's seq:$N byte for byte"; ok
for P in $((N - 150)) 0; do
    verify_peer $A --peer "$PEER_B" --home ha --at "seq:$P" --json; INSPECTIONS=$((INSPECTIONS + 1))
    [ "$STATUS" = 1 ] || fail "verify --peer --at seq:$P --json exited $STATUS, expected 1 (blocks differ)"; ok
    eventually last_compared_at "$Q" || fail "B's last inspection did not compare at seq:$Q"; ok
    rm -f p.img; "$REWIND" restore $A --at "seq:$P" --to p.img >/dev/null
    read -r K R Z H BOUND LEVELS <<<"$("$PY" expect.py p.img q.img "$PEER_B" "$SHOWN_B" "$P" "$Q" $FRAME)"
    [ "$K" -gt 100 ] && [ "$R" -gt 20 ] || fail "seq:$P and seq:$Q differ in only $K blocks, $R ranges: the workload is too small"; ok
    [ "$P" = 0 ] || [ "$Z" -gt 0 ] || fail "no block zeroed or trimmed after seq:$P: zero/trim are not exercised"; ok
    same_json || fail "verify --peer --at seq:$P --json is not what comparing the images gives"; ok
    cp expected.json "expected-$P.json"; printf '%s' "$OUT" > "got-$P.json"
    # 3. What was exchanged: only the children of differing nodes, one question per level.
    [ "$H" -le "$BOUND" ] || fail "seq:$P: $H hashes received, more than 16 × differing parents = $BOUND"; ok
    echo "seq:$P vs seq:$Q: $K blocks in $R ranges ($Z zeroed or trimmed since); differing nodes per level (top down): $LEVELS;" \
         "$H hashes received (bound $BOUND, the whole tree's leaves alone are $((64 << 20 >> 12)))"
    # The text form, every line of it (the first 20 ranges, then how many more).
    verify_peer $A --peer "$PEER_B" --home ha --at "seq:$P"; INSPECTIONS=$((INSPECTIONS + 1))
    [ "$STATUS" = 1 ] || fail "verify --peer --at seq:$P exited $STATUS, expected 1"; ok
    [ "$OUT" = "$(cat expected.txt)" ] || { diff <(printf '%s\n' "$OUT") expected.txt >&2 || true; fail "verify --peer --at seq:$P printed other text"; }; ok
    [ "$(printf '%s\n' "$OUT" | grep -c '^  bytes ')" = "$(( R < 20 ? R : 20 ))" ] || fail "not min($R, 20) range lines"; ok
    [ ! -s verify.err ] || fail "verify --peer wrote to stderr: $(cat verify.err)"; ok
done

# 4. Nothing changed on either side.
"$REWIND" timeline $A --json > a-after.txt
"$REWIND" timeline b.rewind --json > b-after.txt
cmp -s a-before.txt a-after.txt || fail "A's timeline changed with the inspections"; ok
cmp -s b-before.txt b-after.txt || fail "B's timeline changed with the inspections"; ok
# Plain verify passes on both, and finds the same on each: N records, the writes' payload.
PAYLOAD=$("$PY" -c 'import json,sys
n = sum(json.loads(l)["length"] for l in open(sys.argv[1]) if json.loads(l)["kind"] == "write")
v, i = float(n), 0
while v >= 1024 and i < 5: v /= 1024; i += 1
print("%.1f %s" % (v, ["B", "KiB", "MiB", "GiB", "TiB", "PiB"][i]))' b-after.txt)
VERIFIED_A=$("$REWIND" verify $A) || fail "plain verify of A failed after the inspections"
[[ "$VERIFIED_A" =~ ^"ok: $N records, $PAYLOAD of payload and "[0-9]+" index entries verified"$ ]] || fail "verify of A said [$VERIFIED_A]"; ok
expect_output "$VERIFIED_A" "$REWIND" verify b.rewind
"$REWIND" restore b.rewind --at "seq:$Q" --to q2.img >/dev/null
cmp -s q.img q2.img || fail "B's seq:$Q changed"; ok

# 5. Refusals and usage errors.
start_receiver C c.rewind --peer-id "$ID_A"
SHOWN_C_AT_C="${ID_C:0:16}…@127.0.0.1:$PORT_C"
# A receiver that was never seeded.
expect_error 1 "rewind: error: comparing with $SHOWN_C_AT_C: refused by the peer: this receiver has no mirror yet" \
    "$REWIND" verify $A --peer "$ID_C@127.0.0.1:$PORT_C" --home ha
verify_peer $A --peer "$ID_C@127.0.0.1:$PORT_C" --home ha --json
[ "$STATUS" = 1 ] && [ "$OUT" = '{"error":"comparing with '"$SHOWN_C_AT_C"': refused by the peer: this receiver has no mirror yet","ok":false}' ] \
    || fail "verify --peer --json of an unseeded receiver: status $STATUS, [$OUT]"; ok
[ ! -e c.rewind ] || fail "an inspection created the unseeded receiver's mirror"; ok
# Nothing listening.
kill "$PID_C"; wait "$PID_C" 2>/dev/null || true
expect_error 1 "rewind: error: comparing with $SHOWN_C_AT_C: cannot connect: connection refused" \
    "$REWIND" verify $A --peer "$ID_C@127.0.0.1:$PORT_C" --home ha
# B's address with C's ID: this end refuses the certificate B presents, and says why.
SHOWN_C_AT_B="${ID_C:0:16}…@127.0.0.1:$PORT_B"
WRONG_ID="comparing with $SHOWN_C_AT_B: TLS handshake refused: the peer presented identity $ID_B, not $ID_C"
expect_error 1 "rewind: error: $WRONG_ID" "$REWIND" verify $A --peer "$ID_C@127.0.0.1:$PORT_B" --home ha
verify_peer $A --peer "$ID_C@127.0.0.1:$PORT_B" --home ha --json
[ "$STATUS" = 1 ] && [ "$OUT" = '{"error":"'"$WRONG_ID"'","ok":false}' ] \
    || fail "verify --peer --json with C's ID at B's address: status $STATUS, [$OUT]"; ok
eventually grep -q "refused a link from 127.0.0.1:[0-9]*: TLS handshake refused by the peer: it does not know this unit's identity, or this unit does not know its (check \`rewind id\` on both)" recv-B.log \
    || fail "B did not log the client refusing its certificate"; ok
# A unit B was not given (--peer-id): B refuses it in the handshake.
expect_error 1 "rewind: error: comparing with $SHOWN_B: TLS handshake refused by the peer: it does not know this unit's identity (give it this unit's \`rewind id\`)" \
    "$REWIND" verify $A --peer "$PEER_B" --home hc
eventually grep -q "refused a link from 127.0.0.1:[0-9]*: TLS handshake refused: its identity $ID_C is not one this unit was given (--peer-id)" recv-B.log \
    || fail "B did not log refusing C"; ok
# A --home without a key pair: refused before connecting, and not created.
expect_error 1 "rewind: error: h-none holds no unit identity (key.pem); give the --home of the unit the peer streams from (\`rewind id --home DIR\` shows its ID)" \
    "$REWIND" verify $A --peer "$PEER_B" --home h-none
[ ! -e h-none ] || fail "verify --peer created the --home it was given"; ok
# Another volume than B's.
"$REWIND" init x.rewind --size 64M >/dev/null
UUID_X=$("$REWIND" status x.rewind --json | sed 's/.*"uuid":"\([^"]*\)".*/\1/')
UUID_B=$("$REWIND" status b.rewind --json | sed 's/.*"uuid":"\([^"]*\)".*/\1/')
expect_error 1 "rewind: error: comparing with $SHOWN_B: refused by the peer: the client's volume $UUID_X (67108864 bytes in blocks of 4096) is not this mirror's $UUID_B (67108864 in blocks of 4096)" \
    "$REWIND" verify x.rewind --peer "$PEER_B" --home ha
# A point this mirror does not have.
expect_error 1 "rewind: error: seq:9999 is after the newest record seq:$N" \
    "$REWIND" verify $A --peer "$PEER_B" --home ha --at seq:9999
INSPECTIONS=$((INSPECTIONS + 1))   # B answered before this end found it has no such point
# Usage (ArgumentParser's validation: exit 64).
truncate -s 64M img
expect_error 64 "Error: give --against or --peer, not both" "$REWIND" verify $A --peer "$PEER_B" --home ha --against img
expect_error 64 "Error: --home goes with --peer" "$REWIND" verify $A --home ha
expect_error 64 "Error: --at needs --against IMAGE or --peer PEER" "$REWIND" verify $A --at seq:3
expect_error 64 "Error: invalid peer \"$PORT_B\": give ID@HOST:PORT (ID from \`rewind id\` on that unit)" \
    "$REWIND" verify $A --peer "$PORT_B" --home ha
expect_error 64 "Error: invalid peer \"$ID_B@127.0.0.1\": give ID@HOST:PORT with a port from 1 to 65535" \
    "$REWIND" verify $A --peer "$ID_B@127.0.0.1" --home ha
[ "$(newest b.rewind)" = "$Q" ] || fail "B moved"; ok

# Compaction folds part of A's journal into its base (its checksum map follows): the same
# answer for a later point, identical at the newest, and points before the horizon refused.
# A is stopped for it (a served mirror compacts only up to what its source is synced through);
# its mirror compares as well unserved. A copy of it as of seq:N, taken while it is stopped,
# stays behind B for the check in 6.
stop_server
cp -a $A a-copy.rewind
C=$((N - 300))
"$REWIND" compact $A --to "seq:$C" >/dev/null
P=$((N - 150))
verify_peer $A --peer "$PEER_B" --home ha --at "seq:$P" --json; INSPECTIONS=$((INSPECTIONS + 1))
[ "$STATUS" = 1 ] || fail "after compaction, verify --at seq:$P exited $STATUS"; ok
cp "expected-$P.json" expected.json
same_json || fail "after compaction, verify --at seq:$P gives another answer"; ok
expect_output "ok: seq:$N is identical on $SHOWN_B (0 questions, 0 hashes received; 44 bytes sent, 32 received)" \
    "$REWIND" verify $A --peer "$PEER_B" --home ha
INSPECTIONS=$((INSPECTIONS + 1))
expect_error 1 "rewind: error: seq:$((C - 1)) is before the oldest restorable point seq:$C (compacted into the base)" \
    "$REWIND" verify $A --peer "$PEER_B" --home ha --at "seq:$((C - 1))"
INSPECTIONS=$((INSPECTIONS + 1))

# 6. The receiver goes on streaming after the inspections, and logged each of them.
kill -0 "$PID_B" || fail "B's receiver is gone"; ok
start_server a.img --home ha --replicate-to "$PEER_B"
workload "$SOCK" 8 100
N2=$(newest $A)
[ "$N2" = $((N + 101)) ] || fail "A is at seq:$N2, expected seq:$((N + 101))"; ok
wait_converged $A b.rewind
expect_output "ok: seq:$N2 is identical on $SHOWN_B (0 questions, 0 hashes received; 44 bytes sent, 32 received)" \
    "$REWIND" verify $A --peer "$PEER_B" --home ha
INSPECTIONS=$((INSPECTIONS + 1))
# The copy of A's mirror at seq:N against B, now ahead of it: refused without --at (B answered).
expect_error 1 "rewind: error: comparing with $SHOWN_B: the peer holds seq:$N2, after this mirror's newest seq:$N; compare another point of this mirror with --at (e.g. --at latest)" \
    "$REWIND" verify a-copy.rewind --peer "$PEER_B" --home ha
INSPECTIONS=$((INSPECTIONS + 1))
"$REWIND" restore $A --at latest --to a2.img >/dev/null
"$REWIND" restore b.rewind --at latest --to b2.img >/dev/null
cmp -s a2.img b2.img || fail "B's newest is not A's after the inspections"; ok
# Every inspection that reached B's inspector: one "comparing at" line and one "done" line.
inspected() { [ "$(grep -c "inspection from ${ID_A:0:16}… (127.0.0.1:[0-9]*): comparing at seq:" recv-B.log)" = "$INSPECTIONS" ]; }
eventually inspected || fail "B logged $(grep -c 'comparing at seq:' recv-B.log) inspections, expected $INSPECTIONS"; ok
[ "$(grep -c "comparing at seq:$N2\$" recv-B.log)" = 2 ] || fail "B did not log the last 2 inspections at seq:$N2"; ok
done_lines() { [ "$(grep -c "inspection from ${ID_A:0:16}… (127.0.0.1:[0-9]*): done (" recv-B.log)" = "$INSPECTIONS" ]; }
eventually done_lines || fail "B logged $(grep -c ': done (' recv-B.log) finished inspections, expected $INSPECTIONS"; ok
# Differing: 2 points × (--json, text) and 1 after compaction, each one question per level (4).
[ "$(grep -c ": done (4 questions)\$" recv-B.log)" = 5 ] || fail "B did not log 5 inspections of 4 questions"; ok
[ "$(grep -c ": done (0 questions)\$" recv-B.log)" = $((INSPECTIONS - 5)) ] || fail "B did not log $((INSPECTIONS - 5)) inspections of 0 questions"; ok
stop_server
finish
