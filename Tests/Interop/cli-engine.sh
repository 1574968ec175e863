#!/usr/bin/env bash
# The engine's CLI end to end: init, writes through the library's test child, timeline,
# bookmarks, restore, compact, rollback, verify, status; and bad input to every command:
# one clear line on stderr, a non-zero exit, nothing changed.
. "$(dirname "$0")/functions.sh"
cd "$T"

# --- bad arguments (exit 64 from the parser, exact first line) ---
expect_error 64 "Error: give exactly one of --size and --from" "$REWIND" init m
expect_error 64 "Error: give exactly one of --size and --from" "$REWIND" init m --size 1M --from x.img
expect_error 64 "Error: The value 'ten' is invalid for '--size <size>': invalid size \"ten\": use bytes or a number with K, M, G or T (e.g. 512M)" "$REWIND" init m --size ten
expect_error 1 "rewind: error: block size 1000 must be a power of two from 512 to 1M" "$REWIND" init m --size 1M --block-size 1000
expect_error 1 "rewind: error: volume size 1000 is not a multiple of the block size 4096" "$REWIND" init m --size 1000
expect_error 1 "rewind: error: the volume size must be greater than zero" "$REWIND" init m --size 0
expect_error 1 "rewind: error: open nothere.img: No such file or directory (ENOENT)" "$REWIND" init m --from nothere.img
[ ! -e m ] && [ ! -e m.creating ] || fail "a failed init left files behind"; ok

# --- a real mirror with content ---
head -c 1048576 /dev/urandom > seed.img
"$REWIND" init m --from seed.img --block-size 4096 >/dev/null
expect_output "" "$REWIND" timeline m --json
"$REWIND" verify m --against seed.img >/dev/null
expect_error 1 "rewind: error: differs at offset 0: /dev/null is 0 bytes, the volume is 1048576" "$REWIND" verify m --against /dev/null
status_before=$("$REWIND" status m --json)

# --- bad input against an existing mirror: nothing may change ---
expect_error 1 "rewind: error: m already exists; refusing to overwrite a mirror" "$REWIND" init m --size 1M
expect_error 1 "rewind: error: seq:5 is after the newest record seq:0" "$REWIND" restore m --at seq:5 --to out.img
expect_error 64 "Error: The value 'seq:-1' is invalid for '--at <at>': invalid point \"seq:-1\": use seq:N, time:RFC3339, bookmark:NAME, latest or oldest" "$REWIND" restore m --at seq:-1 --to out.img
expect_error 64 "Error: The value 'time:yesterday' is invalid for '--at <at>': invalid time in point \"time:yesterday\": expected RFC 3339, e.g. time:2026-11-25T14:00:00Z" "$REWIND" restore m --at time:yesterday --to out.img
expect_error 1 "rewind: error: no point at or before 2000-01-01T00:00:00Z: the oldest point is seq:0 at $("$REWIND" status m --json | sed 's/.*"oldestTime":"\([^"]*\)".*/\1/')" "$REWIND" restore m --at time:2000-01-01T00:00:00Z --to out.img
expect_error 1 "rewind: error: no bookmark named \"nope\"" "$REWIND" restore m --at bookmark:nope --to out.img
expect_error 64 "Error: The value 'bookmark:a b' is invalid for '--at <at>': invalid bookmark name \"a b\": use 1 to 255 letters, digits and - _ . : @" "$REWIND" restore m --at "bookmark:a b" --to out.img
expect_error 1 "rewind: error: nothere is not a rewind mirror: no such directory" "$REWIND" status nothere
expect_error 1 "rewind: error: seed.img is not a rewind mirror: not a directory" "$REWIND" timeline seed.img
mkdir plain
expect_error 1 "rewind: error: plain is not a rewind mirror: journal/data.mdb is missing" "$REWIND" verify plain
expect_error 64 "Error: rollback deletes every record after the point; add --yes to confirm" "$REWIND" rollback m --at seq:0
expect_error 64 "Error: give --keep-age, --keep-size or --to" "$REWIND" compact m
expect_error 64 "Error: --to cannot be combined with --keep-age/--keep-size" "$REWIND" compact m --to latest --keep-age 1d
expect_error 64 "Error: The value '5x' is invalid for '--keep-age <keep-age>': invalid duration \"5x\": use a number with s, m, h or d (e.g. 15m, 7d)" "$REWIND" compact m --keep-age 5x
expect_error 64 "Error: --at needs --against IMAGE or --peer PEER" "$REWIND" verify m --at latest
expect_error 1 "rewind: error: seq:1 is after the newest record seq:0" "$REWIND" bookmark m b1 --at seq:1
expect_error 64 "Error: Missing expected argument '<mirror>'" "$REWIND" status
[ "$("$REWIND" status m --json)" = "$status_before" ] || fail "bad input changed the mirror"; ok
[ ! -e out.img ] && [ ! -e out.img.partial ] || fail "a refused restore left a file"; ok

# --- restore of seq:0 equals the seed image; a bookmark names it ---
"$REWIND" restore m --at oldest --to r0.img >/dev/null
cmp r0.img seed.img || fail "restore oldest differs from the seed"; ok
expect_output "bookmark start = seq:0" "$REWIND" bookmark m start --at oldest
expect_output '{"name":"start","seq":0,"time":"'"$("$REWIND" status m --json | sed 's/.*"oldestTime":"\([^"]*\)".*/\1/')"'"}' "$REWIND" bookmarks m --json
expect_error 1 "rewind: error: bookmark \"start\" already exists (use --force to move it)" "$REWIND" bookmark m start
expect_error 1 "rewind: error: r0.img already exists (use --force to overwrite)" "$REWIND" restore m --at latest --to r0.img
expect_output "nothing to compact: every record is inside the window" "$REWIND" compact m --keep-age 1d
expect_output "rolled back from seq:0 to seq:0: 0 records removed" "$REWIND" rollback m --at latest --yes

# --- a mirror with 2000 records of random writes, zeroes, trims and flushes ---
TORTURE=$(dirname "$REWIND")/rewind-torture
SEED=77 SIZE=1048576 BS=4096
"$REWIND" init w --size 1M >/dev/null
"$TORTURE" append w $SEED 2000 7
[ "$("$REWIND" timeline w --json | wc -l)" = 2000 ] || fail "timeline does not list 2000 records"; ok
for k in 1 999 2000; do
    read -r kind offset length < <("$TORTURE" describe $SEED $SIZE $BS $k)
    line=$("$REWIND" timeline w --since seq:$k --until seq:$k --json)
    case "$line" in
        "{\"checksum\":\"0x"*"\",\"fua\":"*",\"kind\":\"$kind\",\"length\":$length,\"offset\":$offset,\"seq\":$k,\"time\":\"20"*"Z\"}") ok ;;
        *) fail "timeline record $k is [$line], expected $kind $offset $length" ;;
    esac
done
total=$("$REWIND" timeline w --every 1h --json | sed 's/.*"records":\([0-9]*\).*/\1/' | awk '{s+=$1} END {print s}')
[ "$total" = 2000 ] || fail "timeline --every counted $total records"; ok
for k in 0 1 2 500 1234 1999 2000; do
    "$TORTURE" model $SEED $SIZE $BS $k model.img
    "$REWIND" restore w --at seq:$k --to r.img --force >/dev/null
    cmp r.img model.img || fail "restore seq:$k differs from the model"; ok
    "$REWIND" verify w --at seq:$k --against model.img >/dev/null || fail "verify --at seq:$k"; ok
done
expect_output "bookmark mid = seq:1000" "$REWIND" bookmark w mid --at seq:1000
"$TORTURE" model $SEED $SIZE $BS 1000 model.img
"$REWIND" restore w --at bookmark:mid --to r.img --force >/dev/null && cmp r.img model.img || fail "restore bookmark:mid"; ok
t=$("$REWIND" timeline w --since seq:1000 --until seq:1000 --json | sed 's/.*"time":"\([^"]*\)".*/\1/')
"$REWIND" restore w --at "time:$t" --to r.img --force --json | grep -q '"seq":1000' || fail "time:$t does not resolve to seq 1000"; ok

# compaction up to a point: earlier points refused, later ones exact
out=$("$REWIND" compact w --to seq:500)
case "$out" in "compacted seq:0..seq:500: 500 records, "*" folded, "*" blocks written into the base") ok ;; *) fail "compact said [$out]" ;; esac
expect_error 1 "rewind: error: seq:499 is before the oldest restorable point seq:500 (compacted into the base)" "$REWIND" restore w --at seq:499 --to r2.img
"$TORTURE" model $SEED $SIZE $BS 500 model.img
"$REWIND" restore w --at oldest --to r.img --force >/dev/null && cmp r.img model.img || fail "restore oldest after compaction"; ok
"$REWIND" verify w >/dev/null || fail "verify after compaction"; ok
"$REWIND" status w --json | grep -q '"oldestSeq":500' || fail "status oldestSeq"; ok

# rollback with --source: the source is reverted in place to seq:1500
"$TORTURE" model $SEED $SIZE $BS 2000 src.img
"$TORTURE" model $SEED $SIZE $BS 1500 model.img
out=$("$REWIND" rollback w --at seq:1500 --source src.img --yes)
case "$out" in "rolled back from seq:2000 to seq:1500: 500 records removed, "*" source blocks rewritten") ok ;; *) fail "rollback said [$out]" ;; esac
cmp src.img model.img || fail "the source was not reverted to seq:1500"; ok
"$REWIND" verify w --against src.img >/dev/null || fail "verify --against the reverted source"; ok
expect_error 1 "rewind: error: seq:1600 is after the newest record seq:1500" "$REWIND" restore w --at seq:1600 --to r3.img
# history continues from seq 1501 with the same stream
"$TORTURE" append w $SEED 10
"$TORTURE" model $SEED $SIZE $BS 1510 model.img
"$REWIND" verify w --against model.img >/dev/null || fail "appending after rollback"; ok

# retention by size: keep at most 64 KiB of payload
"$REWIND" compact w --keep-size 64K >/dev/null
[ "$("$REWIND" status w --json | sed 's/.*"journalPayloadBytes":\([0-9]*\).*/\1/')" -le 65536 ] || fail "keep-size left too much"; ok
"$REWIND" verify w --against model.img >/dev/null || fail "verify after keep-size"; ok

# a damaged log chunk with an intact one after it (synced, never indexed): the first command
# to open the mirror warns — one exact line, exit 0 — keeps the cut bytes, and the journal
# ends before the damage
"$REWIND" init d --size 1M >/dev/null
read -r at seq < <("$TORTURE" damage-log d $SEED)
err=$("$REWIND" status d 2>&1 >/dev/null) || fail "status of a mirror with a damaged log failed: $err"
kept=$(ls d/damaged-log)
name=${kept%.log}; bytes=$(( 16#${name#*-} - 16#${name%-*} ))
want="rewind: warning: the journal's log is damaged at byte $at (seq:$seq failed its checks) and 1 intact chunk claiming seq:$((seq + 3))...seq:$((seq + 5)) followed; the journal now ends at seq:$((seq - 1)), and the $bytes bytes from there were kept in d/damaged-log/$kept"
[ "$err" = "$want" ] || fail "damage warning was [$err], expected [$want]"; ok
[ "$("$REWIND" status d --json | sed 's/.*"newestSeq":\([0-9]*\).*/\1/')" = $((seq - 1)) ] || fail "the journal does not end before the damage"; ok
err=$("$REWIND" verify d 2>&1 >/dev/null) || fail "verify after the damage was cut: $err"
[ -z "$err" ] || fail "a second open warned again: [$err]"; ok

# rewind id: made once, stable, the SHA-256 of the public key's SubjectPublicKeyInfo.
id1=$("$REWIND" id --home "$T/home")
[ "$("$REWIND" id --home "$T/home")" = "$id1" ] || fail "rewind id changed on the second run"; ok
[ "$(REWIND_HOME="$T/home" "$REWIND" id)" = "$id1" ] || fail "REWIND_HOME was not used"; ok
[ "$(stat -c %a "$T/home" "$T/home/key.pem" | tr '\n' ' ')" = "700 600 " ] || fail "the home or the key is readable by others"; ok
if command -v openssl >/dev/null; then
    spki=$(openssl pkey -in "$T/home/key.pem" -pubout -outform DER | sha256sum | cut -d' ' -f1)
    [ "$spki" = "$id1" ] || fail "the ID $id1 is not the SHA-256 of the public key's SPKI ($spki)"; ok
    openssl x509 -in "$T/home/cert.pem" -noout -subject | grep -qx "subject=CN = $id1" || fail "the certificate's CN is not the ID"; ok
fi
echo garbage > "$T/home/key.pem"
expect_error 1 "rewind: error: $T/home/key.pem is not a P-256 private key in PEM (invalidPEMDocument)" "$REWIND" id --home "$T/home"

# Replication's arguments: refused with the reason before anything is created or bound.
id64=$(printf 'a%.0s' $(seq 64))
expect_error 64 "Error: give at least one --peer-id (the ID \`rewind id\` prints on the sending unit)" "$REWIND" receive r.rewind --listen 127.0.0.1:1
expect_error 64 "Error: invalid --peer-id \"xyz\": an ID is the 64 hex digits \`rewind id\` prints" "$REWIND" receive r.rewind --listen 127.0.0.1:1 --peer-id xyz
expect_error 64 "Error: --listen takes HOST:PORT (the link runs over TCP)" "$REWIND" receive r.rewind --listen unix:/tmp/x --peer-id "$id64"
expect_error 64 "Error: --ack sync needs a peer to wait for: give --replicate-to ID@HOST:PORT" "$REWIND" serve v.img --size 1M --ack sync
expect_error 64 "Error: invalid peer \"abc\": give ID@HOST:PORT (ID from \`rewind id\` on that unit)" "$REWIND" serve v.img --size 1M --replicate-to abc
expect_error 64 "Error: invalid peer \"$id64@host\": give ID@HOST:PORT with a port from 1 to 65535" "$REWIND" serve v.img --size 1M --replicate-to "$id64@host"
expect_error 64 "Error: invalid --ack \"maybe\": use async or sync" "$REWIND" serve v.img --size 1M --ack maybe
[ ! -e v.img ] && [ ! -e r.rewind ] || fail "a refused command created something"; ok
expect_error 1 "rewind: error: m is already an origin; serve it (rewind serve SOURCE --mirror m)" "$REWIND" promote m --to p.img

finish
