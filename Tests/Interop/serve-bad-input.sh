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
stop_server
"$REWIND" verify b.img.rewind --against b.img >/dev/null || fail "verify after bad input"; ok
finish
