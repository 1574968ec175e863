#!/usr/bin/env bash
# Malformed handshakes and requests against rewind serve (Tests/Interop/nbd_bad_input.py),
# then nbdsh's errno checks; afterwards the server is still up and its mirror verifies.
. "$(dirname "$0")/functions.sh"
requires nbdsh
cd "$T"
start_server b.img --size 16M
"$PY" "$HERE/nbd_bad_input.py" "$SOCK" b.img 16777216 || fail "nbd_bad_input.py"; ok
nbdsh -u "$UNIX_URI" -c '
import errno
h.set_strict_mode(0)
s = h.get_size()
def bad(f, e):
    try:
        f(); raise SystemExit("accepted")
    except nbd.Error as x:
        assert x.errnum == e, x
bad(lambda: h.pread(512, s), errno.EINVAL)
bad(lambda: h.pwrite(b"a" * 512, s), errno.ENOSPC)
bad(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
bad(lambda: h.zero(512, s), errno.ENOSPC)
bad(lambda: h.trim(512, s), errno.ENOSPC)
' || fail "nbdsh errno checks"; ok
kill -0 "$SERVER_PID" || fail "the server died"; ok
# NAME@POINT through the server: malformed and unknown points are a clean NBD_REP_ERR_UNKNOWN.
for name in 'b.img@' 'b.img@seq:' 'b.img@seq:99999999' 'b.img@bookmark:none' 'b.img@time:yesterday' \
            'b.img@bookmark:../../x' 'other@seq:0' "b.img@$(head -c 3000 /dev/zero | tr '\0' x)"; do
    "$PY" - "$name" "$SOCK" <<'PY' || fail "NAME@POINT $name"
import nbd, sys
h = nbd.NBD()
h.set_export_name(sys.argv[1])
try:
    h.connect_unix(sys.argv[2]); raise SystemExit("accepted " + sys.argv[1][:40])
except nbd.Error as e:
    assert "server has no export named" in str(e) and e.errnum == 2, e  # NBD_REP_ERR_UNKNOWN
PY
    ok
done
kill -0 "$SERVER_PID" || fail "the server died after bad export names"; ok
stop_server
"$REWIND" verify b.img.rewind --against b.img >/dev/null || fail "verify after bad input"; ok

# The same bad input against `rewind export`: writable into an overlay (the whole script
# applies), then read-only (writes EPERM).
"$REWIND" export b.img.rewind --at latest --overlay "$T/b.overlay" --listen "unix:$T/x.sock" > x.out 2> x.err &
X=$!; PIDS+=($X)
for _ in $(seq 1 100); do [ -S "$T/x.sock" ] && break; sleep 0.1; done
before=$("$REWIND" timeline b.img.rewind --json | md5sum)
"$PY" "$HERE/nbd_bad_input.py" "$T/x.sock" b.img 16777216 || fail "nbd_bad_input.py against export --overlay"; ok
kill -0 "$X" || fail "the export died"; ok
kill -TERM "$X"; wait "$X" || fail "the export exited non-zero on SIGTERM"; ok
[ "$("$REWIND" timeline b.img.rewind --json | md5sum)" = "$before" ] || fail "the overlay export changed the mirror"; ok
"$REWIND" export b.img.rewind --at latest --listen "unix:$T/y.sock" > y.out 2> y.err &
Y=$!; PIDS+=($Y)
for _ in $(seq 1 100); do [ -S "$T/y.sock" ] && break; sleep 0.1; done
nbdsh -u "nbd+unix:///b.img?socket=$T/y.sock" -c '
import errno
h.set_strict_mode(0)
s = h.get_size()
assert h.is_read_only()
def bad(f, e):
    try:
        f(); raise SystemExit("accepted")
    except nbd.Error as x:
        assert x.errnum == e, x
bad(lambda: h.pwrite(b"a" * 512, 0), errno.EPERM)
bad(lambda: h.zero(512, 0), errno.EPERM)
bad(lambda: h.trim(512, 0), errno.EPERM)
bad(lambda: h.pread(512, s), errno.EINVAL)
h.flush()
' || fail "nbdsh checks against a read-only export"; ok
kill -0 "$Y" || fail "the read-only export died"; ok
finish
