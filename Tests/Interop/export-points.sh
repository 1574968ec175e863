#!/usr/bin/env bash
# Points in time over NBD: serve's NAME@POINT exports, NBD_OPT_LIST with bookmarks and clean
# refusals of unknown names; bookmarks of the durable FLUSH point, also under write load;
# `rewind export` beside a running serve (read-only, BLOCK_STATUS holes, sparse copies
# byte-identical to restore); writable overlays that never touch the mirror; --consistent;
# pins against compaction, retention and rollback, released when the export is SIGKILLed.
. "$(dirname "$0")/functions.sh"
for tool in qemu-img qemu-io nbdinfo nbdcopy nbdsh; do requires $tool; done
"$PY" -c 'import nbd' 2>/dev/null || { echo "SKIP: python3-libnbd not installed" >&2; exit 77; }
cd "$T"

M=vol.img.rewind
MiB=1048576
at() { echo "nbd+unix:///vol.img@$1?socket=$SOCK"; }             # serve's NAME@POINT
qio() { qemu-io -f raw -t none "$1" "${@:2}" >/dev/null; }         # writable, exact reads
qro() { qemu-io -r -f raw "$1" "${@:2}" >/dev/null; }               # read-only open
field() { sed "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/"; }           # one field of a JSON line
records() { "$REWIND" timeline $M --json; }
# (sed -n, not grep: no match is an empty answer, not a failed pipeline)
last_flush() { records | sed -n '/"kind":"flush"/p' | tail -n 1 | field seq; }
newest() { "$REWIND" status $M --json | field newestSeq; }
# the seq of the (single) write record at OFFSET of LENGTH bytes
write_seq() { records | sed -n "/\"kind\":\"write\",\"length\":$2,\"offset\":$1,/p" | field seq; }
# the first flush record after seq $1
flush_after() { records | sed -n '/"kind":"flush"/p' | field seq | awk -v s="$1" '$1 > s && !found { print; found = 1 }'; }
kind_of() { "$REWIND" timeline $M --since seq:$1 --until seq:$1 --json | field kind; }
allocated() { echo $(($(stat -c %b "$1") * 512)); }
map() { nbdinfo --map "$1" | awk '{ print $1, $2, $3 }' | tr '\n' ';'; }
# grep that reads all its input: under pipefail, `cmd | grep -q` fails when cmd gets SIGPIPE
contains() { grep "$@" >/dev/null; }

# refused URI MESSAGE — the server answers NBD_REP_ERR_UNKNOWN with exactly MESSAGE (qemu
# prints it), nbdinfo exits non-zero too
refused() {
    local uri=$1 want=$2 err status=0
    err=$(qemu-io -r -f raw "$uri" -c 'read 0 512' 2>&1 >/dev/null) || status=$?
    [ $status != 0 ] || fail "qemu-io opened $uri"
    printf '%s\n' "$err" | contains -Fx "server reported: $want" || fail "$uri: qemu-io said [$err], expected the server to report [$want]"
    ok
    nbdinfo "$uri" >/dev/null 2>&1 && fail "nbdinfo opened $uri"; ok
}

# start_export MIRROR [export options...] — `rewind export ... --json` on a fresh Unix socket;
# sets EXPORT_PID, ESOCK, EXPORT_URI (the default name), EXPORT_JSON (its line). Waits until it listens.
start_export() {
    local mirror=$1; shift
    ESOCK="$T/export-$RANDOM.sock"
    local out="$T/export-$RANDOM.json"
    "$REWIND" export "$mirror" --listen "unix:$ESOCK" --json "$@" >"$out" 2>>"$T/export.log" &
    EXPORT_PID=$!
    PIDS+=("$EXPORT_PID")
    for _ in $(seq 1 100); do
        [ -s "$out" ] && break
        kill -0 "$EXPORT_PID" 2>/dev/null || { cat "$T/export.log" >&2; fail "rewind export $mirror $* exited early"; }
        sleep 0.1
    done
    [ -s "$out" ] || fail "rewind export did not start listening"
    EXPORT_JSON=$(cat "$out")
    EXPORT_URI=$(printf '%s\n' "$EXPORT_JSON" | field uri)
}
stop_export() {  # SIGTERM: a clean stop, exit 0
    kill -TERM "$EXPORT_PID"
    local status=0
    wait "$EXPORT_PID" || status=$?
    [ $status = 0 ] || fail "rewind export exited $status on SIGTERM"; ok
}

# ===== 1. serve answers NAME@POINT; bookmarks name the durable FLUSH point =====
start_server vol.img --size 64M
qio "$UNIX_URI" -c "write -P 0x11 0 1M" -c flush || fail "qemu-io pattern A"; ok
kinds() { records | field kind | tr '\n' ' '; }
kinds_are() { [ "$(kinds)" = "$1" ]; }
# qemu-io flushes once more as it closes the image
eventually kinds_are "write flush flush " || fail "timeline after pattern A: $(kinds)"; ok
N=$(last_flush)
[ "$N" = 3 ] || fail "the last flush is seq:$N"; ok
expect_output "bookmark first = seq:$N" "$REWIND" bookmark $M first
expect_error 1 "rewind: error: bookmark \"first\" already exists (use --force to move it)" "$REWIND" bookmark $M first
FIRST_TIME=$("$REWIND" bookmarks $M --json | field time)
[ "$(records | sed -n ${N}p | field time)" = "$FIRST_TIME" ] || fail "bookmark time is not seq:$N's"; ok

qio "$UNIX_URI" -c "write -P 0x22 512k 256k" || fail "qemu-io pattern B"; ok
eventually kinds_are "write flush flush write flush " || fail "timeline after pattern B: $(kinds)"; ok
for p in bookmark:first seq:$N seq:1; do
    qro "$(at $p)" -c "read -P 0x11 0 1M" -c "read -P 0 1M 63M" || fail "vol.img@$p does not hold pattern A"; ok
done
qro "nbd+unix:///@bookmark:first?socket=$SOCK" -c "read -P 0x11 0 1M" || fail "@bookmark:first (empty name)"; ok
for p in latest seq:5; do
    qro "$(at $p)" -c "read -P 0x11 0 512k" -c "read -P 0x22 512k 256k" -c "read -P 0x11 768k 256k" -c "read -P 0 1M 63M" \
        || fail "vol.img@$p does not hold pattern B over A"; ok
done
for p in oldest seq:0; do
    qro "$(at $p)" -c "read -P 0 0 64M" || fail "vol.img@$p is not all zeroes"; ok
done
T4=$(records | sed -n 4p | field time)
qro "$(at time:$T4)" -c "read -P 0x22 512k 256k" || fail "vol.img@time:$T4"; ok
nbdinfo --json "$(at time:$T4)" | contains -Fx '	"description": "vol.img as of seq:4 (read-only)",' || fail "time:$T4 does not resolve to seq:4"; ok
nbdinfo --json "$(at seq:$N)" | contains -Fx '	"description": "vol.img as of seq:3 (read-only)",' || fail "description of seq:$N"; ok
qemu-img info --output=json "$(at bookmark:first)" | contains '"virtual-size": 67108864' || fail "qemu-img info of vol.img@bookmark:first"; ok
[ "$(nbdinfo --size "$(at latest)")" = 67108864 ] || fail "nbdinfo --size of vol.img@latest"; ok
nbdinfo --can read-only "$(at bookmark:first)" || fail "vol.img@bookmark:first is not read-only"; ok
nbdinfo --can read-only "$UNIX_URI" && fail "vol.img is read-only"; ok
list=$(nbdinfo --list "$UNIX_URI")
printf '%s\n' "$list" | contains -Fx 'export="vol.img":' || fail "--list lacks vol.img"; ok
printf '%s\n' "$list" | contains -Fx 'export="vol.img@bookmark:first":' || fail "--list lacks vol.img@bookmark:first: $list"; ok
printf '%s\n' "$list" | contains -Fx "	description: vol.img as of seq:3, $FIRST_TIME (read-only)" || fail "--list description: $list"; ok
[ "$(printf '%s\n' "$list" | grep -c '^export=')" = 2 ] || fail "--list offers other exports: $list"; ok
# the URI --list gives (':' as %3A) works as it is, with libnbd and with qemu
listed=$(printf '%s\n' "$list" | sed -n 's/^	uri: \(nbd+unix:\/\/\/vol.img@bookmark%3Afirst?socket=.*\)$/\1/p')
[ -n "$listed" ] || fail "--list gives no URI for vol.img@bookmark:first: $list"; ok
nbdinfo --json "$listed" | contains -Fx '	"description": "vol.img as of seq:3 (read-only)",' || fail "nbdinfo $listed"; ok
qro "$listed" -c "read -P 0x11 0 1M" || fail "qemu-io $listed"; ok
# a bookmark name may hold ':' and '@' (only the first '@' splits NAME@POINT)
expect_output "bookmark x@y:z = seq:$N" "$REWIND" bookmark $M x@y:z --at bookmark:first
nbdinfo --list "$UNIX_URI" | contains -Fx 'export="vol.img@bookmark:x@y:z":' || fail "--list lacks vol.img@bookmark:x@y:z"; ok
qro "$(at bookmark:x@y:z)" -c "read -P 0x11 0 1M" || fail "vol.img@bookmark:x@y:z"; ok
qro "nbd+unix:///vol.img@bookmark%3Ax%40y%3Az?socket=$SOCK" -c "read -P 0x11 0 1M" || fail "vol.img@bookmark:x@y:z, percent-encoded"; ok
expect_output "removed bookmark x@y:z" "$REWIND" bookmark $M x@y:z --delete

# unknown names: a clean NBD_REP_ERR_UNKNOWN with a message, and the server stays up
refused "$(at bookmark:nope)" 'vol.img@bookmark:nope: no bookmark named "nope"'
refused "$(at seq:999999)" "vol.img@seq:999999: seq:999999 is after the newest record seq:5"
refused "$(at garbage)" 'vol.img@garbage: invalid point "garbage": use seq:N, time:RFC3339, bookmark:NAME, latest or oldest'
refused "$(at time:2000-01-01T00:00:00Z)" "vol.img@time:2000-01-01T00:00:00Z: no point at or before 2000-01-01T00:00:00Z: the oldest point is seq:0 at $("$REWIND" status $M --json | field oldestTime)"
refused "$(at bookmark:x@y:z)" 'vol.img@bookmark:x@y:z: no bookmark named "x@y:z"'
refused "$(at "")" 'vol.img@: invalid point "": use seq:N, time:RFC3339, bookmark:NAME, latest or oldest'
refused "nbd+unix:///@?socket=$SOCK" '@: invalid point "": use seq:N, time:RFC3339, bookmark:NAME, latest or oldest'
refused "nbd+unix:///x?socket=$SOCK" 'no export named "x" (this server offers "vol.img" and "vol.img@POINT")'
refused "nbd+unix:///other@latest?socket=$SOCK" 'no export named "other@latest" (this server offers "vol.img" and "vol.img@POINT")'
kill -0 "$SERVER_PID" || fail "the server died of unknown export names"; ok
qro "$UNIX_URI" -c "read -P 0x22 512k 256k" || fail "the server no longer serves after refusals"; ok
qro "$(at bookmark:first)" -c "read -P 0x11 0 1M" || fail "the server no longer serves points after refusals"; ok

# a NAME@POINT connection pins its point while it stays connected
"$PY" - "$(at seq:1)" "$T/conn.ready" "$T/conn.stop" <<'PYEOF' &
import nbd, os, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.pread(4096, 0) == b"\x11" * 4096
open(sys.argv[2], "w").close()
for _ in range(300):
    if os.path.exists(sys.argv[3]): break
    time.sleep(0.1)
h.shutdown()
PYEOF
CONN_PID=$!; PIDS+=("$CONN_PID")
for _ in $(seq 1 100); do [ -e conn.ready ] && break; sleep 0.1; done
[ -e conn.ready ] || fail "the NAME@POINT client did not connect"
status=$("$REWIND" status $M)
printf '%s\n' "$status" | contains "^pin          seq:1 held by nbd export vol.img@seq:1 (pid $SERVER_PID) since 20.*Z$" || fail "no pin for a connected vol.img@seq:1: $status"; ok
printf '%s\n' "$status" | contains -Fx "retention    stops at seq:1 while it is pinned" || fail "status retention line: $status"; ok
touch conn.stop; wait "$CONN_PID" || fail "the NAME@POINT client failed"; ok
no_pins() { [ "$("$REWIND" status $M --json | sed 's/.*"pins":\(\[[^]]*\]\).*/\1/')" = "[]" ]; }
eventually no_pins || fail "a disconnected vol.img@seq:1 still pins: $("$REWIND" status $M)"; ok

# ===== 2. export beside the running serve: zero/trim records are holes, copies are sparse =====
qio "$UNIX_URI" -c "write -z 128k 128k" -c "discard 768k 256k" -c "write -P 0x33 4M 1M" -c "write -z 4M 64k" -c flush \
    || fail "qemu-io zero/trim"; ok
eventually kinds_are "write flush flush write flush zero trim write zero flush flush " || fail "timeline after zero/trim: $(kinds)"; ok
S=$(last_flush)
[ "$S" = 11 ] || fail "the last flush is seq:$S"; ok
expect_output "bookmark sparse = seq:$S" "$REWIND" bookmark $M sparse
start_export $M --at bookmark:sparse
[ "$EXPORT_JSON" = "{\"export\":\"vol.img\",\"listening\":[\"unix:$ESOCK\"],\"mirror\":\"$M\",\"overlay\":null,\"seq\":$S,\"size\":67108864,\"uri\":\"nbd+unix:///vol.img?socket=$ESOCK\",\"writable\":false}" ] \
    || fail "export --json said $EXPORT_JSON"; ok
want_map="0 131072 0;131072 131072 3;262144 524288 0;786432 3473408 3;4259840 983040 0;5242880 61865984 3;"
[ "$(map "$EXPORT_URI")" = "$want_map" ] || fail "export's BLOCK_STATUS: $(map "$EXPORT_URI")"; ok
[ "$(map "nbd+unix:///?socket=$ESOCK")" = "$want_map" ] || fail "BLOCK_STATUS of the export's empty name"; ok
[ "$(map "$(at bookmark:sparse)")" = "$want_map" ] || fail "serve's vol.img@bookmark:sparse BLOCK_STATUS: $(map "$(at bookmark:sparse)")"; ok
nbdinfo --can read-only "$EXPORT_URI" || fail "the export is not read-only"; ok
"$REWIND" restore $M --at bookmark:sparse --to r.img >/dev/null || fail "restore bookmark:sparse"; ok
nbdcopy "nbd+unix:///?socket=$ESOCK" copy.img || fail "nbdcopy from the export"; ok
qemu-img convert -f raw -O raw "$EXPORT_URI" conv.img || fail "qemu-img convert from the export"; ok
for f in copy.img conv.img; do
    cmp r.img $f || fail "$f differs from restore at seq:$S"; ok
    a=$(allocated $f)
    [ "$a" -ge 1638400 ] && [ "$a" -le $((4 * MiB)) ] || fail "$f has $a bytes allocated, expected the 1638400 of data"; ok
done
qro "$EXPORT_URI" -c "read -P 0x11 0 128k" -c "read -P 0 128k 128k" -c "read -P 0x11 256k 256k" -c "read -P 0x22 512k 256k" \
    -c "read -P 0 768k 3328k" -c "read -P 0x33 4160k 960k" || fail "export's bytes"; ok
# other points through the export, read-only; unknown names refused there too
qro "nbd+unix:///vol.img@bookmark:first?socket=$ESOCK" -c "read -P 0x11 0 1M" || fail "vol.img@bookmark:first through export"; ok
refused "nbd+unix:///x?socket=$ESOCK" 'no export named "x" (this server offers "vol.img" and "vol.img@POINT")'
# writes to a read-only point: EPERM, whether libnbd refuses them or the server does
for u in "$EXPORT_URI" "$(at latest)"; do
    "$PY" - "$u" <<'PYEOF' || fail "writes to read-only $u"
import errno, nbd, sys
for strict in (True, False):
    h = nbd.NBD()
    if not strict:  # send them anyway: the server must answer EPERM itself
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)
    h.connect_uri(sys.argv[1])
    assert h.is_read_only()
    ops = [("write", lambda: h.pwrite(b"\xee" * 4096, 0))]
    if not strict:  # (libnbd itself answers EINVAL to zero and trim, which the export does not offer)
        ops += [("zero", lambda: h.zero(4096, 0)), ("trim", lambda: h.trim(4096, 0))]
    for name, op in ops:
        try:
            op()
        except nbd.Error as e:
            assert e.errno in (errno.EPERM, "EPERM"), (strict, name, e.errno, e.string)  # libnbd gives the name
        else:
            raise SystemExit("%s to a read-only export succeeded (strict=%s)" % (name, strict))
    assert h.pread(4096, 0) == b"\x11" * 4096
    h.shutdown()
PYEOF
    ok
done
stop_export
expect_error 64 'Error: an export name cannot hold "@" (it separates NAME@POINT)' "$REWIND" export $M --at latest --export a@b
# a named export; NAME@POINT follows the name
"$REWIND" export $M --at seq:1 --export snap --listen "unix:$T/snap.sock" >snap.out 2>>export.log &
SNAP_PID=$!; PIDS+=("$SNAP_PID")
for _ in $(seq 1 100); do [ "$(wc -l <snap.out)" -ge 3 ] && break; sleep 0.1; done
[ "$(cat snap.out)" = "rewind: exporting $M at seq:1 (67108864 bytes), read-only
  listening on unix:$T/snap.sock
  connect with: nbdinfo 'nbd+unix:///snap?socket=$T/snap.sock'" ] || fail "export said [$(cat snap.out)]"; ok
qro "nbd+unix:///snap?socket=$T/snap.sock" -c "read -P 0x11 0 1M" || fail "export --export snap"; ok
qro "nbd+unix:///snap@seq:5?socket=$T/snap.sock" -c "read -P 0x22 512k 256k" || fail "snap@seq:5"; ok
refused "nbd+unix:///vol.img@seq:5?socket=$T/snap.sock" 'no export named "vol.img@seq:5" (this server offers "snap" and "snap@POINT")'
kill -TERM $SNAP_PID; wait $SNAP_PID || fail "export --export snap exited $? on SIGTERM"; ok

# ===== 3. bookmarks under write load =====
# A background client writes to 8M..16M without flushing (round 1) or flushing every 8th write
# (round 2). A separate connection writes a unique 1 MiB pattern and flushes; the bookmark made
# right after names a FLUSH record at or after that flush, and that point holds the pattern.
for round in 1 2; do
    rm -f load.stop load.count
    "$PY" - "$UNIX_URI" $round <<'PYEOF' &
import nbd, os, random, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
flushing = sys.argv[2] == "2"
rnd = random.Random(int(sys.argv[2])); n = 0; end = time.time() + 60
while not os.path.exists("load.stop") and time.time() < end:
    h.pwrite(bytes([rnd.randrange(1, 256)]) * 65536, 8 * 2**20 + rnd.randrange(128) * 65536)
    n += 1
    if flushing and n % 8 == 0: h.flush()
open("load.count", "w").write(str(n))
h.shutdown()
PYEOF
    LOAD_PID=$!; PIDS+=("$LOAD_PID")
    sleep 0.3
    for i in 1 2 3; do
        p=$((round * 16 + i)); off=$(((32 + round * 4 + i) * MiB))
        nbdsh -u "$UNIX_URI" -c "h.pwrite(bytes([$p]) * 2**20, $off); h.flush()" || fail "write+flush on a separate connection"; ok
        out=$("$REWIND" bookmark $M load$round$i) || fail "bookmark under load"
        B=$(printf '%s\n' "$out" | sed -n 's/^bookmark load'$round$i' = seq:\([0-9]*\)$/\1/p')
        [ -n "$B" ] || fail "bookmark load$round$i printed no seq"
        W=$(write_seq $off $MiB); F=$(flush_after "$W")
        [ -n "$W" ] && [ -n "$F" ] || fail "no write+flush records for pattern $p (W=$W F=$F)"
        if [ $round = 1 ]; then
            # the only flush after the pattern's write is this connection's
            [ "$B" = "$F" ] || fail "round 1: bookmark load1$i = seq:$B, expected the flush seq:$F"; ok
        else
            [ "$B" -ge "$F" ] || fail "round 2: bookmark load2$i = seq:$B is before the first flush seq:$F after the pattern's write"; ok
        fi
        [ "$(kind_of $B)" = flush ] || fail "bookmark load$round$i = seq:$B is a $(kind_of $B) record"; ok
        qro "$(at bookmark:load$round$i)" -c "read -P $p $off 1M" || fail "vol.img@bookmark:load$round$i lacks pattern $p"; ok
    done
    # the whole round through one standalone export of the last bookmark
    start_export $M --at bookmark:load${round}3
    [ "$(printf '%s\n' "$EXPORT_JSON" | field seq)" = "$B" ] || fail "export of bookmark:load${round}3 is not at seq:$B"; ok
    for i in 1 2 3; do
        qro "$EXPORT_URI" -c "read -P $((round * 16 + i)) $(((32 + round * 4 + i) * MiB)) 1M" || fail "export of load${round}3 lacks pattern $i"; ok
    done
    stop_export
    touch load.stop; wait "$LOAD_PID" || fail "the background writer failed"; ok
    [ "$(cat load.count)" -gt 0 ] || fail "the background writer wrote nothing"; ok
done

# ===== 4. writable overlays: writes go to the overlay, never to the mirror =====
# a flush on a new connection: every write the background clients had answered is durable and indexed
nbdsh -u "$UNIX_URI" -c "h.flush()" || fail "flush after the load"; ok
"$REWIND" restore $M --at latest --to before.img >/dev/null || fail "restore latest before the overlay"; ok
records >timeline.before
"$REWIND" status $M --json | field newestSeq >newest.before
start_export $M --at seq:$N --overlay ov.img
[ "$EXPORT_JSON" = "{\"export\":\"vol.img\",\"listening\":[\"unix:$ESOCK\"],\"mirror\":\"$M\",\"overlay\":\"ov.img\",\"seq\":$N,\"size\":67108864,\"uri\":\"nbd+unix:///vol.img?socket=$ESOCK\",\"writable\":true}" ] \
    || fail "overlay export --json said $EXPORT_JSON"; ok
nbdinfo --can read-only "$EXPORT_URI" && fail "the overlay export is read-only"; ok
nbdinfo --list "$EXPORT_URI" | contains -Fx "	description: vol.img as of seq:$N with overlay ov.img" || fail "overlay export description"; ok
qio "$EXPORT_URI" -c "write -P 0x55 2M 64k" -c "write -P 0x66 100k 4k" -c "write -z 0 4k" -c "write -P 0x77 1020k 8k" \
    -c "discard 512k 64k" -c "read -P 0x55 2M 64k" -c "read -P 0x66 100k 4k" -c "read -P 0 0 4k" -c "read -P 0x11 4k 96k" \
    -c "read -P 0x77 1020k 8k" -c "read -P 0 512k 64k" -c flush || fail "writes and reads through the overlay export"; ok
# zeroed and trimmed overlay blocks are holes like the point's
want_map="0 4096 3;4096 520192 0;524288 65536 3;589824 462848 0;1052672 1044480 3;2097152 65536 0;2162688 64946176 3;"
[ "$(map "$EXPORT_URI")" = "$want_map" ] || fail "overlay export's BLOCK_STATUS: $(map "$EXPORT_URI")"; ok
# a second connection sees the merged view: overlay over seq:N
qro "$EXPORT_URI" -c "read -P 0 0 4k" -c "read -P 0x11 4k 96k" -c "read -P 0x66 100k 4k" -c "read -P 0x11 104k 408k" \
    -c "read -P 0 512k 64k" -c "read -P 0x11 576k 444k" \
    -c "read -P 0x77 1020k 8k" -c "read -P 0 1028k 1020k" -c "read -P 0x55 2M 64k" -c "read -P 0 2112k 63424k" \
    || fail "merged reads on a new connection"; ok
# the export's NAME@POINT exports stay read-only
nbdinfo --can read-only "nbd+unix:///vol.img@latest?socket=$ESOCK" || fail "NAME@POINT beside an overlay is writable"; ok
# SIGTERM with an idle client still connected: a prompt, clean stop
"$PY" -c 'import nbd, sys, time; h = nbd.NBD(); h.connect_uri(sys.argv[1]); open("idle.ready", "w").close(); time.sleep(60)' \
    "$EXPORT_URI" 2>/dev/null &
IDLE_PID=$!; PIDS+=("$IDLE_PID")
for _ in $(seq 1 100); do [ -e idle.ready ] && break; sleep 0.1; done
[ -e idle.ready ] || fail "the idle client did not connect"
t0=$(date +%s)
stop_export
[ $(($(date +%s) - t0)) -le 5 ] || fail "export took $(($(date +%s) - t0)) s to stop with an idle client"; ok
kill "$IDLE_PID" 2>/dev/null || true
a=$(allocated ov.img)
[ "$a" -le $((2 * MiB)) ] || fail "the overlay is not sparse: $a bytes allocated"; ok
# the mirror is untouched
"$REWIND" restore $M --at latest --to after.img >/dev/null
cmp before.img after.img || fail "the overlay changed the mirror's latest point"; ok
records | cmp -s - timeline.before || fail "the overlay changed the timeline"; ok
"$REWIND" restore $M --at seq:$N --to exp.img >/dev/null
"$REWIND" restore $M --at seq:$N --to plain.img >/dev/null
qro "nbd+unix:///?socket=$SOCK" -c "read -P 0x11 0 4k" || fail "the live volume changed"; ok
# restore --overlay = the point + the overlay's writes
head -c 65536 /dev/zero | tr '\0' '\125' | dd of=exp.img bs=1k seek=2048 conv=notrunc status=none
head -c 4096 /dev/zero | tr '\0' '\146' | dd of=exp.img bs=1k seek=100 conv=notrunc status=none
dd if=/dev/zero of=exp.img bs=1k seek=0 count=4 conv=notrunc status=none
dd if=/dev/zero of=exp.img bs=1k seek=512 count=64 conv=notrunc status=none
head -c 8192 /dev/zero | tr '\0' '\167' | dd of=exp.img bs=1k seek=1020 conv=notrunc status=none
"$REWIND" restore $M --at seq:$N --overlay ov.img --to got.img >/dev/null || fail "restore --overlay"; ok
cmp exp.img got.img || fail "restore --overlay differs from seq:$N plus the overlay's writes"; ok
"$REWIND" restore $M --at seq:$N --to plain2.img >/dev/null
cmp plain.img plain2.img || fail "restore seq:$N changed after restore --overlay"; ok
# the same overlay at its own point again: the writes are still there
start_export $M --at bookmark:first --overlay ov.img
qro "$EXPORT_URI" -c "read -P 0x55 2M 64k" -c "read -P 0 0 4k" -c "read -P 0x77 1020k 8k" -c "read -P 0 512k 64k" || fail "reopened overlay lost writes"; ok
stop_export
# an overlay is bound to its point and its mirror
L=$(newest)
expect_error 1 "rewind: error: ov.img is an overlay of seq:$N, not of seq:$L: give --at seq:$N, or a new file" \
    "$REWIND" export $M --at latest --overlay ov.img --listen "unix:$T/x.sock"
expect_error 1 "rewind: error: $T/ov.img is an overlay of seq:$N, not of seq:1: give --at seq:$N, or a new file" \
    "$REWIND" restore $M --at seq:1 --overlay "$T/ov.img" --to x.img
expect_error 1 "rewind: error: before.img is not a rewind overlay (give a new file's path to create one)" \
    "$REWIND" export $M --at seq:$N --overlay before.img --listen "unix:$T/x.sock"
expect_error 1 "rewind: error: before.img is not a rewind overlay (give a new file's path to create one)" \
    "$REWIND" restore $M --at seq:$N --overlay before.img --to x.img
"$REWIND" init other.rewind --size 64M >/dev/null
expect_error 1 "rewind: error: ov.img is an overlay of the mirror $("$REWIND" status $M --json | field uuid), not of other.rewind ($("$REWIND" status other.rewind --json | field uuid))" \
    "$REWIND" restore other.rewind --at latest --overlay ov.img --to x.img
[ ! -e x.img ] || fail "a refused restore --overlay left x.img"; ok
cmp before.img after.img && [ "$(newest)" = "$(cat newest.before)" ] || fail "the mirror changed"; ok

# ===== 5. --consistent: a point snapped back to the newest FLUSH record =====
nbdsh -u "$UNIX_URI" -c '
h.pwrite(b"\xa1" * 65536, 48 * 2**20)
h.flush()
h.pwrite(b"\xa2" * 65536, 49 * 2**20)
h.pwrite(b"\xa3" * 4096, 48 * 2**20)
' || fail "nbdsh write, flush, writes"; ok   # libnbd does not flush as it disconnects
# the unflushed writes reach the index once the volume is idle
indexed() { W3=$(write_seq $((48 * MiB)) 4096); [ -n "$W3" ] && [ "$(newest)" = "$W3" ]; }
eventually indexed || fail "the unflushed writes never reached the index"; ok
W1=$(write_seq $((48 * MiB)) 65536); CF=$(flush_after "$W1")
[ "$CF" = $((W1 + 1)) ] && [ "$W3" = $((W1 + 3)) ] || fail "records W1=$W1 F=$CF W3=$W3"; ok
out=$("$REWIND" restore $M --at seq:$W3 --consistent --to k.img) || fail "restore --consistent"
case "$out" in "restored seq:$CF to k.img (64.0 MiB, "*" blocks from the journal)") ok ;; *) fail "restore --consistent said [$out]" ;; esac
"$REWIND" restore $M --at seq:$CF --to kf.img >/dev/null
cmp k.img kf.img || fail "restore --at seq:$W3 --consistent differs from seq:$CF"; ok
"$REWIND" restore $M --at seq:$W3 --to k3.img >/dev/null
cmp -s k.img k3.img && fail "--consistent made no difference"; ok
"$REWIND" restore $M --at seq:$((W3 - 1)) --consistent --to kj.img --json | contains "\"image\":\"kj.img\",\"seq\":$CF}$" \
    || fail "restore --at seq:$((W3 - 1)) --consistent is not at seq:$CF"; ok
"$REWIND" restore $M --at latest --consistent --to kl.img --json | contains "\"seq\":$CF}$" || fail "restore --at latest --consistent"; ok
cmp k.img kj.img && cmp k.img kl.img || fail "--consistent images differ"; ok
expect_output "bookmark cons = seq:$CF" "$REWIND" bookmark $M cons --at seq:$W3 --consistent
# a flush record is its own consistent point
expect_output "bookmark cons = seq:$CF" "$REWIND" bookmark $M cons --at seq:$CF --consistent --force
# without --at, a bookmark names the durable point: the unflushed writes after it are not in
expect_output "bookmark durable = seq:$CF" "$REWIND" bookmark $M durable
expect_output "bookmark durable = seq:$W3" "$REWIND" bookmark $M durable --at latest --force
start_export $M --at seq:$W3 --consistent
[ "$(printf '%s\n' "$EXPORT_JSON" | field seq)" = "$CF" ] || fail "export --consistent said $EXPORT_JSON"; ok
qro "$EXPORT_URI" -c "read -P 0xa1 48M 64k" -c "read -P 0 49M 64k" || fail "export --consistent bytes"; ok
stop_export

# ===== 6. pins: compaction, retention and rollback stop at a running export's point =====
stop_server   # compaction of a served mirror waits for the source's sync; stop it instead
L=$(newest)
expect_output "bookmark stopped = seq:$L" "$REWIND" bookmark $M stopped   # no server: latest
"$REWIND" restore $M --at latest --to latest.before >/dev/null
start_export $M --at bookmark:first
P=$EXPORT_PID
status=$("$REWIND" status $M)
printf '%s\n' "$status" | contains "^pin          seq:$N held by rewind export vol.img --at bookmark:first (pid $P) since 20[-0-9]*T[0-9:.]*Z$" \
    || fail "status shows no pin: $status"; ok
printf '%s\n' "$status" | contains -Fx "retention    stops at seq:$N while it is pinned" || fail "status retention line: $status"; ok
[ "$(printf '%s\n' "$status" | grep -c '^pin ')" = 1 ] || fail "status shows other pins: $status"; ok
"$REWIND" status $M --json | contains "\"pins\":\[{\"holder\":\"rewind export vol.img --at bookmark:first\",\"pid\":$P,\"seq\":$N,\"since\":\"20[^\"]*Z\"}\]" \
    || fail "status --json pins: $("$REWIND" status $M --json)"; ok
ls $M/pins | contains "^0*$N-$P-.*\.pin$" || fail "no pin file: $(ls $M/pins)"; ok
expect_error 1 "rewind: error: seq:$((N + 1)) is after seq:$N, a point in use by rewind export vol.img --at bookmark:first (pid $P); stop it, or compact to seq:$N at most" \
    "$REWIND" compact $M --to seq:$((N + 1))
expect_error 1 "rewind: error: seq:$L is after seq:$N, a point in use by rewind export vol.img --at bookmark:first (pid $P); stop it, or compact to seq:$N at most" \
    "$REWIND" compact $M --to latest
expect_error 1 "rewind: error: seq:$N is in use by rewind export vol.img --at bookmark:first (pid $P), and a rollback to seq:1 removes it; stop that export first" \
    "$REWIND" rollback $M --at seq:1 --yes
[ "$("$REWIND" status $M --json | field oldestSeq)" = 0 ] && [ "$(newest)" = "$L" ] || fail "a refused compaction or rollback changed the mirror"; ok
# retention folds up to the pin, not past it
out=$("$REWIND" compact $M --keep-size 0)
case "$out" in "compacted seq:0..seq:$N: $N records, "*) ok ;; *) fail "retention with a pin said [$out]" ;; esac
[ "$("$REWIND" status $M --json | field oldestSeq)" = "$N" ] || fail "oldest is not the pin's seq:$N"; ok
expect_output "nothing to compact: every record is inside the window" "$REWIND" compact $M --keep-size 0
qro "$EXPORT_URI" -c "read -P 0x11 0 1M" -c "read -P 0 1M 63M" || fail "the pinned export changed under compaction"; ok
expect_error 1 "rewind: error: seq:1 is before the oldest restorable point seq:$N (compacted into the base)" \
    "$REWIND" export $M --at seq:1 --listen "unix:$T/x.sock"
# SIGKILL releases the pin; the compaction goes through
status=0; { kill -KILL "$P"; wait "$P"; } 2>/dev/null || status=$?   # (bash's "Killed" notice muted)
[ $status = 137 ] || fail "the export exited $status on SIGKILL"; ok
status=$("$REWIND" status $M)
printf '%s\n' "$status" | contains -E '^(pin|retention) ' && fail "a killed export still pins: $status"; ok
"$REWIND" status $M --json | contains '"pins":\[\]' || fail "status --json still lists pins"; ok
[ -z "$(ls $M/pins)" ] || fail "the killed export's pin file is left: $(ls $M/pins)"; ok
out=$("$REWIND" compact $M --to seq:$((N + 1)))
case "$out" in "compacted seq:$N..seq:$((N + 1)): 1 records, "*) ok ;; *) fail "compact after SIGKILL said [$out]" ;; esac
"$REWIND" restore $M --at latest --to latest.after >/dev/null
cmp latest.before latest.after || fail "compaction changed the latest point"; ok
"$REWIND" verify $M --against vol.img >/dev/null 2>verify.log || { cat verify.log >&2; fail "verify against the source"; }; ok

# ===== 7. one writer per overlay =====
# Two writable exports of one overlay each read-modify-write its blocks under a lock of their
# own process only, so writes of part of a block through one are lost to the other's (both
# acknowledged, flushed): a second writable export of an overlay in use must be refused, as
# qemu refuses a second writer of an image. (Last: it fails while the overlay is not locked.)
start_export $M --at latest --overlay ov7.img
"$REWIND" export $M --at latest --overlay ov7.img --listen "unix:$T/second.sock" --json >second.out 2>second.err &
SECOND_PID=$!; PIDS+=("$SECOND_PID")
for _ in $(seq 1 100); do
    kill -0 "$SECOND_PID" 2>/dev/null && [ ! -s second.out ] || break
    sleep 0.1
done
[ -s second.out ] && fail "a second writable export of ov7.img is serving beside the first (pid $EXPORT_PID): their writes to the same blocks overwrite each other's"
status=0; wait "$SECOND_PID" || status=$?
[ $status = 1 ] || fail "the second export of an overlay in use exited $status (stderr: $(cat second.err))"; ok
case "$(head -n 1 second.err)" in "rewind: error: "*ov7.img*) ok ;; *) fail "the second export of an overlay in use said [$(head -n 1 second.err)]" ;; esac
qio "$EXPORT_URI" -c "write -P 0x88 4k 2k" -c "read -P 0x88 4k 2k" || fail "the first overlay export after the refusal"; ok
stop_export
finish
