# Shared helpers for the interop and CLI scripts (in the style of nbdkit's tests/functions.sh).
# Each script: set -euo pipefail; . functions.sh; then checks. A failed check exits non-zero.
set -euo pipefail
REWIND=${REWIND:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.build/debug/rewind}
T=$(mktemp -d /tmp/rewind-interop.XXXXXX)
PIDS=()
cleanup() {
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

# expect_output "exact stdout" command...
expect_output() {
    local want=$1; shift
    local got; got=$("$@") || fail "$* failed"
    [ "$got" = "$want" ] || fail "$*: stdout was [$got], expected [$want]"
    ok
}

requires() { command -v "$1" >/dev/null 2>&1 || { echo "SKIP: $1 not installed" >&2; exit 77; }; }

finish() { echo "$(basename "$0"): $CHECKS checks passed"; }
