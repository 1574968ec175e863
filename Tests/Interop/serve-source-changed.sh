#!/usr/bin/env bash
# A source written without rewind between two serves is refused at the next start, with the
# recovery in the message, and nothing is served; both recoveries the message gives work as
# printed. A clean restart, a `touch` (times only) and a crash (SIGKILL, then the journal's
# replay) are not refused. An interrupted `rollback --source` is finished only with the same
# source, and serve names it too.
. "$(dirname "$0")/functions.sh"
requires qemu-io
cd "$T"
# The recovery commands are run as the messages print them.
rewind() { "$REWIND" "$@"; }
QIO=(qemu-io -f raw -t none)

newest() { "$REWIND" status "$1" --json | sed 's/.*"newestSeq":\([0-9]*\).*/\1/'; }
byte_at() { dd if="$1" bs=1 skip="$2" count=1 status=none | od -An -tx1 | tr -d ' \n'; }
# The text between the Nth pair of backquotes in a message.
quoted() { printf '%s\n' "$1" | awk -F'`' -v n="$2" '{ print $(2 * n) }'; }

# serve_refused "exact message" SOURCE [serve options...] — serve exits 1 with the message
# (bounded: a serve that started anyway is stopped by timeout and fails the check), having
# bound no socket.
serve_refused() {
    local want=$1; shift
    local sock="$T/refused.sock"
    expect_error 1 "rewind: error: $want" timeout 30 "$REWIND" serve "$@" --listen "unix:$sock" --log-level error
    [ ! -e "$sock" ] || fail "a refused serve bound its socket"; ok
}

changed_message() {  # SOURCE MIRROR SEQ WHAT
    echo "$1 changed since rewind serve stopped at seq:$3 ($4): something wrote it without rewind. To put back the mirror's version run \`rewind restore $2 --at seq:$3 --to $1.restored && cp --sparse=always $1.restored $1 && sync $1 && rm $1.restored\`; to keep the source as it is now, move the mirror aside (\`mv $2 $2.old\`) and serve again, which starts a new mirror from it"
}

# --- (1) serve, write, stop cleanly: a restart serves ---
start_server v.img --size 1M
"${QIO[@]}" "$UNIX_URI" -c 'write -P 0x11 0 64k' -c 'write -P 0x22 512k 4k' -c flush >/dev/null || fail "qemu-io write"; ok
stop_server
start_server v.img
"${QIO[@]}" "$UNIX_URI" -c 'read -P 0x11 0 64k' -c 'read -P 0x22 512k 4k' >/dev/null || fail "read after a clean restart"; ok
stop_server
"$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify after a clean restart"; ok
SEQ=$(newest v.img.rewind)
[ "$SEQ" -ge 3 ] || fail "the writes were not journalled (newest seq:$SEQ)"; ok

# --- (2) one byte changed behind rewind's back: refused, nothing replayed or served ---
ino=$(stat -c %i v.img)
printf '\x5a' | dd of=v.img bs=1 seek=100 conv=notrunc status=none
MSG=$(changed_message v.img v.img.rewind "$SEQ" "block 0 differs from the mirror's latest point")
serve_refused "$MSG" v.img
serve_refused "$MSG" v.img  # still, until the user chooses
[ "$(byte_at v.img 100)" = 5a ] || fail "a refused serve wrote the source"; ok
[ "$(newest v.img.rewind)" = "$SEQ" ] || fail "a refused serve changed the journal"; ok

# --- (3) the first recovery, as printed: the mirror's version put back in place ---
recovery=$(quoted "$MSG" 1)
case "$recovery" in "rewind restore v.img.rewind --at seq:$SEQ --to v.img.restored && "*) ok ;; *) fail "recovery [$recovery]" ;; esac
eval "$recovery" >/dev/null || fail "the recovery [$recovery] failed"; ok
[ "$(stat -c %i v.img)" = "$ino" ] || fail "the recovery replaced the source (the mirror would refuse it)"; ok
[ ! -e v.img.restored ] || fail "the recovery left v.img.restored"; ok
: > "$T/serve.log"
start_server v.img
"${QIO[@]}" "$UNIX_URI" -c 'read -P 0x11 0 64k' >/dev/null || fail "read after the recovery"; ok
"${QIO[@]}" "$UNIX_URI" -c 'write -P 0x33 128k 4k' -c flush >/dev/null || fail "write after the recovery"; ok
stop_server
grep -qF "v.img was touched since rewind serve stopped at seq:$SEQ (its mtime or ctime moved), but every sampled block matches the mirror: serving it" "$T/serve.log" \
    || fail "no notice of the touched source: $(tail -3 "$T/serve.log")"; ok
"$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify after the recovery"; ok

# --- the other recovery, as printed: keep the source (here grown by a block), new mirror ---
SEQ=$(newest v.img.rewind)
truncate -s $((1048576 + 4096)) v.img
MSG=$(changed_message v.img v.img.rewind "$SEQ" "it is 1052672 bytes, it was 1048576")
serve_refused "$MSG" v.img
recovery=$(quoted "$MSG" 2)
[ "$recovery" = "mv v.img.rewind v.img.rewind.old" ] || fail "recovery [$recovery]"; ok
eval "$recovery"
start_server v.img
"${QIO[@]}" "$UNIX_URI" -c 'read -P 0x33 128k 4k' -c 'read -P 0 1M 4k' >/dev/null || fail "read through the new mirror"; ok
stop_server
"$REWIND" status v.img.rewind --json | grep -q '"volumeSize":1052672' || fail "no new mirror of the source as it is now"; ok
[ "$(newest v.img.rewind.old)" = "$SEQ" ] || fail "the old mirror lost its history"; ok
"$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify with the new mirror"; ok

# --- (4) `touch` moves the times only: served, with a notice ---
start_server v.img
"${QIO[@]}" "$UNIX_URI" -c 'write -P 0x44 256k 8k' -c flush >/dev/null || fail "write before touch"; ok
stop_server
SEQ=$(newest v.img.rewind)
touch v.img
: > "$T/serve.log"
start_server v.img
"${QIO[@]}" "$UNIX_URI" -c 'read -P 0x44 256k 8k' >/dev/null || fail "read after touch"; ok
stop_server
grep -qF "v.img was touched since rewind serve stopped at seq:$SEQ" "$T/serve.log" || fail "no notice after touch"; ok
"$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify after touch"; ok

# --- (5) crash: SIGKILL after writes; the restart replays, no false refusal ---
start_server v.img
"${QIO[@]}" "$UNIX_URI" -c 'write -P 0x55 0 256k' -c flush -c 'write -P 0x66 1M 4k' -c flush >/dev/null || fail "write before the crash"; ok
kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
start_server v.img
"${QIO[@]}" "$UNIX_URI" -c 'read -P 0x55 0 256k' -c 'read -P 0x66 1M 4k' >/dev/null || fail "flushed writes after the crash"; ok
kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true  # a crash with nothing written since the start
start_server v.img
stop_server
"$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify after the crashes"; ok

# --- (6) an interrupted rollback --source is finished only with that source ---
SRC=$(realpath v.img)
K=$(( $(newest v.img.rewind) - 1 ))
status=0
REWIND_CRASH_AT=rollback.target-recorded "$REWIND" rollback v.img.rewind --at "seq:$K" --source v.img --yes >/dev/null 2>&1 || status=$?
[ "$status" = 137 ] || fail "the rollback was not killed at rollback.target-recorded (exit $status)"; ok
FINISH="finish it with \`rewind rollback v.img.rewind --at seq:$K --source $SRC --yes\`"
expect_error 1 "rewind: error: an interrupted rollback to seq:$K was reverting $SRC; $FINISH" \
    "$REWIND" rollback v.img.rewind --at "seq:$K" --yes
cp v.img other.img
expect_error 1 "rewind: error: an interrupted rollback to seq:$K was reverting $SRC (inode $(stat -c %i v.img) on device $(stat -c %Hd:%Ld v.img)), and $(realpath other.img) (inode $(stat -c %i other.img) on device $(stat -c %Hd:%Ld other.img)) is another file; $FINISH" \
    "$REWIND" rollback v.img.rewind --at "seq:$K" --source other.img --yes
serve_refused "an interrupted rollback to seq:$K is unfinished; $FINISH" v.img
eval "$(quoted "$FINISH" 1)" >/dev/null || fail "finishing the rollback as printed"; ok
[ "$(newest v.img.rewind)" = "$K" ] || fail "the rollback did not finish"; ok
"$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify after the finished rollback"; ok
start_server v.img
stop_server
finish
