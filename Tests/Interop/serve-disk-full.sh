#!/usr/bin/env bash
# A full disk under `rewind serve`, on a small tmpfs: once the source, or the journal under
# --on-full=fail, cannot take a write, the volume is fenced — the FLUSH or FUA write that
# covers the failure gets its errno, every later write EIO — while reads and other
# connections go on, SIGTERM still stops cleanly, and after space is freed a restart brings
# the source back to the journal's latest point: nothing acknowledged and flushed is lost,
# and verify passes. Under --on-full=compact (the default) a full journal gives up its oldest
# history instead: the writes go on, the oldest point moves, and the log says how much was folded.
. "$(dirname "$0")/functions.sh"
requires nbdsh
[ "$(id -u)" = 0 ] || { echo "SKIP: mounting a tmpfs needs root" >&2; exit 77; }
cd "$T"
MOUNTS=()
umount_all() {  # the servers hold files there: stop them first
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    for m in "${MOUNTS[@]:-}"; do [ -n "$m" ] && umount "$m" 2>/dev/null || true; done
    cleanup
}
trap umount_all EXIT
small_fs() {  # small_fs DIR SIZE — a tmpfs of SIZE at DIR
    mkdir -p "$1"
    mount -t tmpfs -o "size=$2" tmpfs "$1" || { echo "SKIP: cannot mount a tmpfs" >&2; exit 77; }
    MOUNTS+=("$T/$1")
}

# The client: 1 MiB writes of pattern i at i MiB until one fails; prints what it saw.
# FUA=1 asks FUA on every write (each is answered at its commit, with its own errno).
cat > fill.py <<'PYEOF'
import errno, os, sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
fua = nbd.CMD_FLAG_FUA if os.environ.get("FUA") == "1" else 0
MiB = 1 << 20
h.pwrite(b"A" * (4 * MiB), 0); h.flush()           # fits: 4 MiB, flushed
first_err = None; written = 0
for i in range(4, 60):
    try:
        h.pwrite(bytes([i]) * MiB, i * MiB, fua)
        written += 1
    except nbd.Error as e:
        first_err = e.errno; break
try:
    h.flush(); flush_err = 0
except nbd.Error as e:
    flush_err = e.errno
try:
    h.pwrite(b"z" * 4096, 0); later_err = 0
except nbd.Error as e:
    later_err = e.errno
ok_read = h.pread(4 * MiB, 0) == b"A" * (4 * MiB)
print(first_err, flush_err, later_err, ok_read, written)
PYEOF

# --- the source's file system fills (the source writes run on the applier thread) ---
small_fs src 12M
start_server src/vol.img --size 64M --mirror "$T/vol.rewind" --metrics 127.0.0.1:0
METRICS=$(sed 's/.*"metrics":"\([^"]*\)".*/\1/' "$SERVER_JSON")
curl -s "http://$METRICS/metrics" | grep -qx 'rewind_volume_fenced 0.0' || fail "metrics: rewind_volume_fenced 0 before the failure"; ok
read -r first flush later readok written < <(FUA=0 "$PY" fill.py "$UNIX_URI") || fail "client on a full source"
# Plain writes are answered before they reach the source: the failure surfaces at the FLUSH
# (EIO, as a disk reports a writeback error) unless a later write already met the fence.
[ "$flush" = EIO ] || fail "flush after the source filled: errno $flush, expected EIO"; ok
[ "$later" = EIO ] || fail "write after the fence: errno $later, expected EIO"; ok
[ "$readok" = True ] || fail "flushed data unreadable after the fence"; ok
[ "$first" = None ] || [ "$first" = EIO ] || fail "a write failed with errno $first"; ok
grep -q "volume fenced, every further write fails with EIO: source write failed" "$T/serve.log" \
    || fail "no fencing message: $(tail -3 "$T/serve.log")"; ok
nbdinfo --size "$UNIX_URI" | grep -qx 67108864 || fail "a second connection after the fence"; ok
# The gauge is set by the thread that fenced, a moment after the error reached the client.
fenced_metric() { curl -s "http://$METRICS/metrics" | grep -qx 'rewind_volume_fenced 1.0'; }
eventually fenced_metric || fail "metrics: rewind_volume_fenced 1 after the failure"; ok
kill -TERM "$SERVER_PID"; status=0; wait "$SERVER_PID" || status=$?
[ $status = 3 ] || fail "a fenced server exited $status on SIGTERM, expected 3"; ok
grep -q "stopped; writes were refused since: source write failed" "$T/serve.log" || fail "stop message of a fenced volume"; ok
mount -o remount,size=128M "$T/src"
start_server src/vol.img --mirror "$T/vol.rewind"
stop_server
grep -q "replaying records" "$T/serve.log" || fail "the restart did not replay the journal into the source"; ok
"$REWIND" verify "$T/vol.rewind" --against src/vol.img >/dev/null 2>&1 || fail "verify after the source filled"; ok
"$PY" - src/vol.img <<'PYEOF' || fail "flushed data lost after the source filled"
import sys
d = open(sys.argv[1], "rb").read(4 << 20)
assert d == b"A" * (4 << 20)
PYEOF
ok

# --- the journal's file system fills, --on-full=fail (FUA writes: the failing one gets ENOSPC) ---
: > "$T/serve.log"
small_fs mir 24M
start_server big.img --size 64M --mirror "$T/mir/vol.rewind" --on-full fail
read -r first flush later readok written < <(FUA=1 "$PY" fill.py "$UNIX_URI") || fail "client on a full journal"
[ "$first" = ENOSPC ] || fail "the FUA write that filled the journal: errno $first, expected ENOSPC"; ok
[ "$flush" = EIO ] || fail "flush after the journal filled: errno $flush, expected EIO"; ok
[ "$later" = EIO ] || fail "write after the fence: errno $later, expected EIO"; ok
[ "$readok" = True ] || fail "flushed data unreadable after the fence"; ok
grep -q "volume fenced, every further write fails with EIO: journal append failed" "$T/serve.log" \
    || fail "no fencing message: $(tail -3 "$T/serve.log")"; ok
kill -TERM "$SERVER_PID"; status=0; wait "$SERVER_PID" || status=$?
[ $status = 3 ] || fail "a fenced server exited $status on SIGTERM, expected 3"; ok
mount -o remount,size=256M "$T/mir"
start_server big.img --mirror "$T/mir/vol.rewind"
stop_server
"$REWIND" verify "$T/mir/vol.rewind" --against big.img >/dev/null 2>&1 || fail "verify after the journal filled"; ok
# Every FUA write answered before the failure is in the journal and the source.
"$PY" - big.img "$written" <<'PYEOF' || fail "acknowledged FUA writes lost after the journal filled"
import sys
MiB = 1 << 20
f = open(sys.argv[1], "rb")
assert f.read(4 * MiB) == b"A" * (4 * MiB)
for i in range(4, 4 + int(sys.argv[2])):
    assert f.read(MiB) == bytes([i]) * MiB, i
PYEOF
ok

# --- the journal's file system fills, --on-full=compact (the default): 40 FUA rewrites of the
# same 2 MiB, 80 MiB of history on a 24 MiB file system: every write succeeds, the oldest
# history is folded into the base to make room ---
: > "$T/serve.log"
small_fs mir2 24M
start_server big2.img --size 64M --mirror "$T/mir2/vol.rewind"
"$PY" - "$UNIX_URI" <<'PYEOF' || fail "FUA rewrites on a full journal under --on-full=compact"
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
MiB = 1 << 20
for i in range(40):
    h.pwrite(bytes([i + 1]) * (2 * MiB), 8 * MiB, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(2 * MiB, 8 * MiB) == bytes([40]) * (2 * MiB)
PYEOF
ok
grep -q "journal full (.*): gave up the oldest history to make room, folding seq:" "$T/serve.log" \
    || fail "no warning of the history given up: $(tail -3 "$T/serve.log")"; ok
stop_server
oldest=$("$REWIND" status "$T/mir2/vol.rewind" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["oldestSeq"])')
[ "$oldest" -gt 0 ] || fail "the oldest point did not move: seq:$oldest"; ok
"$REWIND" verify "$T/mir2/vol.rewind" --against big2.img >/dev/null 2>&1 || fail "verify after making room"; ok
"$PY" - big2.img <<'PYEOF' || fail "the last rewrite is not in the source"
import sys
f = open(sys.argv[1], "rb"); f.seek(8 << 20)
assert f.read(2 << 20) == bytes([40]) * (2 << 20)
PYEOF
ok
finish
