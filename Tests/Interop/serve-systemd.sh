#!/usr/bin/env bash
# `rewind serve` under a service manager (sd_notify, Type=notify), with systemd emulated: a
# Python listener on a Unix datagram socket stands in for PID 1 and records every
# notification. READY=1 comes only once the server accepts connections, with its STATUS and
# MAINPID; WATCHDOG=1 keeps coming at WATCHDOG_USEC/2 when the watchdog is this process's and
# never when WATCHDOG_PID names another; SIGTERM sends STOPPING=1 and exits 0; a refused start
# sends no READY=1, says why in STATUS=refused: and exits 1; an abstract NOTIFY_SOCKET (@name)
# works; contrib/systemd/rewind-serve@.service passes `systemd-analyze verify`.
. "$(dirname "$0")/functions.sh"
requires nbdinfo
[ -x "$PY" ] || { echo "SKIP: $PY not installed" >&2; exit 77; }
cd "$T"
UNIT="$HERE/../../contrib/systemd/rewind-serve@.service"

# The stand-in for systemd: binds ADDR (a path, or @name in the abstract namespace), and writes
# one line per datagram to NOTES: monotonic seconds, the sender's pid (SCM_CREDENTIALS, as
# systemd checks NotifyAccess=main), the datagram with its newlines as '|'. NOTES appears once
# the socket is bound. Exits by itself after two minutes, so it never outlives a stuck test.
cat > notify_listener.py <<'PYEOF'
import socket, struct, sys, time
addr, notes = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.bind("\0" + addr[1:] if addr.startswith("@") else addr)
s.settimeout(0.2)
deadline = time.monotonic() + 120
with open(notes, "a", buffering=1) as f:
    while time.monotonic() < deadline:
        try:
            data, ancillary, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            continue
        pid = -1
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", cdata[:12])[0]
        f.write("%.6f %d %s\n" % (time.monotonic(), pid, data.decode(errors="replace").replace("\n", "|")))
PYEOF

# start_listener ADDR NOTES — the stand-in, waited for until bound.
start_listener() {
    "$PY" notify_listener.py "$1" "$2" &
    PIDS+=("$!")
    local i
    for i in $(seq 100); do [ -e "$2" ] && return 0; sleep 0.05; done
    fail "the notification listener did not bind $1"
}

# start_notified ADDR SOURCE [serve options...] — `rewind serve` on a Unix socket and a free
# TCP port with NOTIFY_SOCKET=ADDR and the NAME=VALUE pairs in NOTIFY_ENV (WATCHDOG_PID=self
# becomes the server's own pid, as systemd sets it). Sets SERVER_PID, SOCK, JSON; no waiting.
start_notified() {
    local addr=$1 source=$2; shift 2
    SOCK="$T/nbd-$RANDOM.sock"
    JSON="$T/serve-$RANDOM.json"
    # sh execs the server: its pid is the server's.
    env NOTIFY_SOCKET="$addr" ${NOTIFY_ENV[@]+"${NOTIFY_ENV[@]}"} \
        sh -c '[ "${WATCHDOG_PID:-}" = self ] && export WATCHDOG_PID=$$; exec "$@"' sh \
        "$REWIND" serve "$source" --listen "unix:$SOCK" --listen 127.0.0.1:0 --json "$@" >"$JSON" 2>>"$T/serve.log" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
}

# wait_for NOTES PATTERN [PID] — until a datagram matching PATTERN (grep -E) is recorded, for
# up to 30 s; fails early if PID (the server) exits first.
wait_for() {
    local notes=$1 pattern=$2 pid=${3:-} i
    for i in $(seq 300); do
        grep -Eq -- "$pattern" "$notes" && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            cat "$T/serve.log" >&2
            fail "rewind serve exited before sending $pattern"
        fi
        sleep 0.1
    done
    fail "no $pattern in 30 s (got: $(cat "$notes"))"
}

# line_of NOTES PATTERN — the line number of the first datagram matching PATTERN, or 0.
line_of() { awk -v p="$2" 'found == 0 && $0 ~ p { found = NR } END { print found + 0 }' "$1"; }

# stop_notified — SIGTERM; the server must exit 0.
stop_notified() {
    kill -TERM "$SERVER_PID"
    local status=0
    wait "$SERVER_PID" || status=$?
    [ "$status" = 0 ] || fail "rewind serve exited $status on SIGTERM"
    ok
}

# --- readiness, MAINPID, STATUS; the watchdog kept (WATCHDOG_PID = the server); STOPPING ---
start_listener "$T/notify1.sock" n1
NOTIFY_ENV=(WATCHDOG_USEC=200000 WATCHDOG_PID=self)
start_notified "$T/notify1.sock" a.img --size 16M
wait_for n1 '[ |]READY=1' "$SERVER_PID"
# At once, no retry: the server listened before it said so.
nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null || fail "READY=1 before the Unix socket accepts"; ok
[ -s "$JSON" ] || fail "READY=1 before the --json line"; ok
PORT=$(sed 's/.*"127.0.0.1:\([0-9]*\)".*/\1/' "$JSON")
nbdinfo --size "nbd://127.0.0.1:$PORT" >/dev/null || fail "READY=1 before the TCP port accepts"; ok
ready=$(grep -m 1 -E '[ |]READY=1' n1)
[[ "$ready" == *"|MAINPID=$SERVER_PID"* ]] || fail "MAINPID is not the server's pid $SERVER_PID: $ready"; ok
[ "$(echo "$ready" | cut -d' ' -f2)" = "$SERVER_PID" ] || fail "READY=1 not sent by the server itself: $ready"; ok
[[ "$ready" == *"|STATUS=serving a.img on unix:$SOCK, 127.0.0.1:$PORT|"* ]] || fail "STATUS with READY=1: $ready"; ok
first_ping=$(line_of n1 'WATCHDOG=1')
[ "$first_ping" = 0 ] || [ "$first_ping" -gt "$(line_of n1 'READY=1')" ] || fail "WATCHDOG=1 before READY=1"; ok
sleep 1.5
pings=$(grep -c ' WATCHDOG=1$' n1 || true)
[ "$pings" -ge 5 ] || fail "$pings WATCHDOG=1 in 1.5 s at WATCHDOG_USEC=200000, expected at least 5"; ok
# Paced by the watchdog, not by a slower timer: no gap near a second (systemd acts at 0.2 s).
gap=$(awk '$3 == "WATCHDOG=1" { if (last) { g = $1 - last; if (g > max) max = g } last = $1 } END { printf "%.3f", max }' n1)
awk -v g="$gap" 'BEGIN { exit !(g < 1.0) }' || fail "WATCHDOG=1 gap of $gap s"; ok
stop_notified
wait_for n1 '[ |]STOPPING=1'
stopping=$(line_of n1 'STOPPING=1')
[ "$(awk -v s="$stopping" 'NR > s && $3 == "WATCHDOG=1"' n1 | wc -l)" = 0 ] || fail "WATCHDOG=1 after STOPPING=1"; ok
[ "$(grep -c 'READY=1' n1)" = 1 ] || fail "READY=1 sent more than once"; ok

# --- the watchdog belongs to another process (WATCHDOG_PID): no pings, still ready ---
start_listener "$T/notify2.sock" n2
NOTIFY_ENV=(WATCHDOG_USEC=200000 "WATCHDOG_PID=$$")
start_notified "$T/notify2.sock" b.img --size 16M
wait_for n2 '[ |]READY=1' "$SERVER_PID"
sleep 1.5
[ "$(grep -c 'WATCHDOG=1' n2 || true)" = 0 ] || fail "WATCHDOG=1 sent though WATCHDOG_PID is another process's"; ok
stop_notified
wait_for n2 '[ |]STOPPING=1'

# --- an abstract NOTIFY_SOCKET (@name), no watchdog; a refused start beside it ---
ABSTRACT="@rewind-interop-$$-$RANDOM"
start_listener "$ABSTRACT" n3
NOTIFY_ENV=()
start_notified "$ABSTRACT" c.img --size 16M
wait_for n3 '[ |]READY=1' "$SERVER_PID"
nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null || fail "READY=1 (abstract socket) before the server accepts"; ok
grep -q "|MAINPID=$SERVER_PID" n3 || fail "MAINPID over the abstract socket"; ok
sleep 0.5
[ "$(grep -c 'WATCHDOG=1' n3 || true)" = 0 ] || fail "WATCHDOG=1 without WATCHDOG_USEC"; ok

# A second serve of the same mirror is refused: one line on stderr (journalled by systemd),
# exit 1, no READY=1, and the reason in STATUS=.
start_listener "$T/notify4.sock" n4
expect_error 1 "rewind: error: c.img.rewind/owner.lock is busy: another rewind process (serve, receive or rollback) owns this mirror" \
    env NOTIFY_SOCKET="$T/notify4.sock" "$REWIND" serve c.img --listen 127.0.0.1:0
wait_for n4 '^[^ ]+ [0-9-]+ STATUS=refused: c.img.rewind/owner.lock is busy'
! grep -q 'READY=1' n4 || fail "a refused start sent READY=1"; ok
stop_notified
wait_for n3 '[ |]STOPPING=1'

# A start refused before anything is opened: the same.
start_listener "$T/notify5.sock" n5
expect_error 1 "rewind: error: missing.img does not exist (give --size to create it)" \
    env NOTIFY_SOCKET="$T/notify5.sock" "$REWIND" serve missing.img --listen 127.0.0.1:0
wait_for n5 'STATUS=refused: missing.img does not exist'
! grep -q 'READY=1' n5 || fail "a refused start sent READY=1"; ok

# A NOTIFY_SOCKET that is neither a path nor @name: said on stderr, then served without it.
expect_error 1 "rewind: warning: NOTIFY_SOCKET=relative.sock is neither an absolute path nor an abstract socket (@name); not notifying the service manager" \
    env NOTIFY_SOCKET=relative.sock "$REWIND" serve missing.img --listen 127.0.0.1:0

# --- the unit file ---
grep -qx 'Type=notify' "$UNIT" && grep -qx 'NotifyAccess=main' "$UNIT" && grep -qx 'WatchdogSec=30' "$UNIT" \
    && grep -qx 'ExecStart=/usr/local/bin/rewind serve --config /etc/rewind/%i.toml' "$UNIT" \
    || fail "rewind-serve@.service lacks Type=notify, NotifyAccess=main, WatchdogSec=30 or its ExecStart"; ok
if command -v systemd-analyze >/dev/null 2>&1; then
    # verify wants ExecStart's program to exist: point it at the binary under test.
    mkdir units
    sed "s|/usr/local/bin/rewind|$REWIND|" "$UNIT" > "units/rewind-serve@vol0.service"
    out=$(systemd-analyze verify "units/rewind-serve@vol0.service" 2>&1) || fail "systemd-analyze verify: $out"
    # Unknown keys and bad values are only warnings (exit 0): none may be printed.
    [ -z "$(printf '%s\n' "$out" | grep 'rewind-serve@')" ] || fail "systemd-analyze verify: $out"
    ok
else
    echo "serve-systemd.sh: systemd-analyze not installed; the unit file was not verified" >&2
fi
finish
