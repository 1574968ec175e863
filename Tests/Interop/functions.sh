# Shared helpers for the interop and CLI scripts (in the style of nbdkit's tests/functions.sh).
# Each script: set -euo pipefail; . functions.sh; then checks. A failed check exits non-zero.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REWIND=${REWIND:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.build/debug/rewind}
T=$(mktemp -d /tmp/rewind-interop.XXXXXX)
PIDS=()
cleanup() {
    [ -s "$T/nbd-server.pid" ] && kill -9 -- "-$(cat "$T/nbd-server.pid")" 2>/dev/null || true
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    rm -rf "$T"
}
trap cleanup EXIT
CHECKS=0

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { CHECKS=$((CHECKS + 1)); }

# expect_error STATUS "exact stderr line" command...  — fails unless the command exits with
# STATUS and its stderr's first line is exactly the message.
expect_error() {
    local want_status=$1 want=$2; shift 2
    local out err status=0
    err=$("$@" 2>&1 >/dev/null) || status=$?
    [ "$status" = "$want_status" ] || fail "$* exited $status, expected $want_status (stderr: $err)"
    local first; first=$(printf '%s\n' "$err" | head -n 1)
    [ "$first" = "$want" ] || fail "$*: stderr was [$first], expected [$want]"
    ok
}

# Like expect_error, on the last line of stderr (a long comparison prints progress first; a
# daemon logs before it refuses).
expect_last_error() {
    local want_status=$1 want=$2; shift 2
    local err status=0
    err=$("$@" 2>&1 >/dev/null) || status=$?
    [ "$status" = "$want_status" ] || fail "$* exited $status, expected $want_status (stderr: $err)"
    [ "$(printf '%s\n' "$err" | tail -n 1)" = "$want" ] || fail "$*: stderr ended [$(printf '%s\n' "$err" | tail -n 1)], expected [$want]"
    ok
}
# expect_output "exact stdout" command...
expect_output() {
    local want=$1; shift
    local got; got=$("$@") || fail "$* failed"
    [ "$got" = "$want" ] || fail "$*: stdout was [$got], expected [$want]"
    ok
}

requires() { command -v "$1" >/dev/null 2>&1 || { echo "SKIP: $1 not installed" >&2; exit 77; }; }

finish() { echo "$(basename "$0"): $CHECKS checks passed"; }
# Run a check until it passes, for up to 10 s. A reader sees a running server's records once
# it commits its index, 1 ms after the volume goes idle; on a loaded disk that commit can take
# longer than the next command takes to start. A check that never passes still fails.
eventually() { local i; for i in $(seq 50); do "$@" && return 0; sleep 0.2; done; "$@"; }

# start_server SOURCE [serve options...] — starts `rewind serve` on a Unix socket and a free
# TCP port; sets SERVER_PID, SOCK, PORT, UNIX_URI, TCP_URI, SERVER_JSON (its --json line). Waits until it listens.
# With TAP_UPSTREAM=qemu-nbd, nbdkit or nbd-server, SOURCE is served by that server instead
# (created sparse with --size N) and `rewind tap` stands in front of it with the mirror
# SOURCE.rewind and the export name SOURCE's file name, so a script of serve's checks runs
# through tap unchanged.
start_server() {
    local source=$1; shift
    SOCK="$T/nbd-$RANDOM.sock"
    local log="$T/serve-$RANDOM.json"
    SERVER_JSON=$log
    if [ -n "${TAP_UPSTREAM:-}" ]; then
        local args=() size=""
        while [ $# -gt 0 ]; do
            if [ "$1" = --size ]; then size=$2; shift 2; else args+=("$1"); shift; fi
        done
        [ -e "$source" ] || truncate -s "$size" "$source"
        start_upstream "$source"
        "$REWIND" tap --upstream "$UPSTREAM_URI" --mirror "$source.rewind" --export "$(basename "$source")" \
            --listen "unix:$SOCK" --listen 127.0.0.1:0 --json "${args[@]}" >"$log" 2>>"$T/serve.log" &
    else
        "$REWIND" serve "$source" --listen "unix:$SOCK" --listen 127.0.0.1:0 --json "$@" >"$log" 2>>"$T/serve.log" &
    fi
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 1 300); do
        if [ -s "$log" ]; then break; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$T/serve.log" >&2; fail "rewind serve exited early"; }
        sleep 0.1
    done
    [ -s "$log" ] || fail "rewind serve did not start listening"
    PORT=$(sed 's/.*"127.0.0.1:\([0-9]*\)".*/\1/' "$log")
    local name; name=$(sed 's/.*"export":"\([^"]*\)".*/\1/' "$log")
    UNIX_URI="nbd+unix:///$name?socket=$SOCK"
    TCP_URI="nbd://127.0.0.1:$PORT/$name"
}

# start_upstream IMAGE — serve IMAGE with $TAP_UPSTREAM (qemu-nbd, nbdkit's file plugin or
# nbd-server) as tap's upstream; sets UPSTREAM_PID and UPSTREAM_URI. Waits until it answers.
start_upstream() {
    local image=$1
    case "$TAP_UPSTREAM" in
    qemu-nbd)
        # (-e 2: the tap's connection, and nbdinfo's when a check asks the upstream itself.)
        local sock="$T/up-$RANDOM.sock"
        qemu-nbd -f raw -t -e 2 -k "$sock" -x up --discard=unmap --aio=threads "$image" 2>>"$T/upstream.log" &
        UPSTREAM_PID=$!
        UPSTREAM_URI="nbd+unix:///up?socket=$sock" ;;
    nbdkit)
        local sock="$T/up-$RANDOM.sock"
        nbdkit -f -U "$sock" file "$image" 2>>"$T/upstream.log" &
        UPSTREAM_PID=$!
        UPSTREAM_URI="nbd+unix:///?socket=$sock" ;;
    nbd-server)
        # It forks a process per client and daemonizes: its pid file names the listener, and
        # stop_upstream ends its process group (setsid), clients and all.
        local port=$(( 20000 + RANDOM % 30000 ))
        printf '[generic]\n    listenaddr = 127.0.0.1\n    port = %s\n    user = %s\n[up]\n    exportname = %s\n    flush = true\n    fua = true\n    trim = true\n' \
            "$port" "$(id -un)" "$(cd "$(dirname "$image")" && pwd)/$(basename "$image")" > "$T/nbd-server.conf"
        rm -f "$T/nbd-server.pid"
        nbd-server -C "$T/nbd-server.conf" -p "$T/nbd-server.pid" 2>>"$T/upstream.log" || fail "nbd-server did not start"
        for _ in $(seq 100); do [ -s "$T/nbd-server.pid" ] && break; sleep 0.05; done
        UPSTREAM_PID=-$(cat "$T/nbd-server.pid")
        UPSTREAM_URI="nbd://127.0.0.1:$port/up" ;;
    *) fail "unknown TAP_UPSTREAM $TAP_UPSTREAM" ;;
    esac
    [ "$TAP_UPSTREAM" = nbd-server ] || PIDS+=("$UPSTREAM_PID")
    for _ in $(seq 200); do nbdinfo --size "$UPSTREAM_URI" >/dev/null 2>&1 && return 0; sleep 0.05; done
    cat "$T/upstream.log" >&2; fail "$TAP_UPSTREAM did not answer at $UPSTREAM_URI"
}

stop_upstream() {
    kill -9 -- "$UPSTREAM_PID" 2>/dev/null || true
    wait "$UPSTREAM_PID" 2>/dev/null || true
}

# stop_server — SIGTERM and wait: a clean stop (drain, sync, close the journal); a tap's
# upstream after it.
stop_server() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local status=0
    wait "$SERVER_PID" || status=$?
    [ $status = 0 ] || fail "rewind serve exited $status on SIGTERM"
    [ -z "${TAP_UPSTREAM:-}" ] || stop_upstream
}

# Debian's python3 (python3-libnbd's `nbd` module lives there, not in the first python3 on PATH).
PY=/usr/bin/python3
# nbdsh's `#!/usr/bin/env python3` would find the wrong python3 first on PATH here.
nbdsh() { "$PY" -m nbd "$@"; }

# start_receiver NAME MIRROR [options...]: `rewind receive` on 127.0.0.1:$RECV_PORT (unset or 0:
# a free port) with home hNAME; sets PORT_<NAME>, PID_<NAME>. Waits until it listens.
start_receiver() {
    local name=$1 mirror=$2; shift 2
    rm -f "recv-$name.json"
    "$REWIND" receive "$mirror" --listen "127.0.0.1:${RECV_PORT:-0}" --home "h${name,,}" --json "$@" > "recv-$name.json" 2>>"recv-$name.log" &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do [ -s "recv-$name.json" ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    [ -s "recv-$name.json" ] || { cat "recv-$name.log" >&2; fail "rewind receive $name did not start"; }
    eval "PORT_$name=$(sed 's/.*"listen":"127.0.0.1:\([0-9]*\)".*/\1/' "recv-$name.json")"
    eval "PID_$name=$pid"
}
