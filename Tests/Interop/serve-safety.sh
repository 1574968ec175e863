#!/usr/bin/env bash
# One server per source and per socket: a second `serve` on a Unix socket path a live server
# answers on is refused (and the live one keeps its socket and its clients); a dead server's
# socket is reused; a path holding something else is refused; a server removes only its own
# socket when it stops; a second `serve` of a served source through another mirror is refused
# (flock on SOURCE; for a block device also O_EXCL, which refuses a mounted device); a mirror
# is refused with another source, or with its source replaced by another file behind its back.
. "$(dirname "$0")/functions.sh"
for tool in nbdinfo qemu-io; do requires $tool; done
cd "$T"
MOUNTS=()
LOOPS=()
cleanup_all() {  # the servers hold the loop device: stop them first
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    for m in "${MOUNTS[@]:-}"; do [ -n "$m" ] && umount "$m" 2>/dev/null || true; done
    for l in "${LOOPS[@]:-}"; do [ -n "$l" ] && losetup -d "$l" 2>/dev/null || true; done
    cleanup
}
trap cleanup_all EXIT
MiB=1048576

# --- (a) a second serve on a live server's socket is refused; the live one keeps serving ---
start_server a.img --size 1M
S1=$SERVER_PID; SOCK1=$SOCK; URI1=$UNIX_URI
A=$(realpath a.img)  # what the mirror records: the canonical path
qemu-io -f raw -t none "$URI1" -c 'write -P 0x5a 0 64k' >/dev/null || fail "qemu-io write through the first server"; ok
expect_error 1 "rewind: error: unix:$SOCK1: another server is listening on this socket" \
    "$REWIND" serve b.img --size 1M --listen "unix:$SOCK1"
[ ! -e b.img ] && [ ! -e b.img.rewind ] || fail "a refused serve created files"; ok
[ -S "$SOCK1" ] || fail "the live server's socket is gone after a refused serve"; ok
[ "$(nbdinfo --size "$URI1")" = $MiB ] || fail "nbdinfo through the first server after a refused serve"; ok
qemu-io -f raw -t none "$URI1" -c 'read -P 0x5a 0 64k' >/dev/null || fail "qemu-io read through the first server"; ok

# --- a server stopping removes only its own socket, not one bound at its path since ---
rm "$SOCK1"
start_server c.img --size 1M --listen "unix:$SOCK1"
S2=$SERVER_PID; SOCK2=$SOCK
kill -TERM "$S1"; status=0; wait "$S1" || status=$?
[ $status = 0 ] || fail "the first server exited $status on SIGTERM"; ok
[ -S "$SOCK1" ] || fail "a stopping server removed another server's socket at its old path"; ok
[ "$(nbdinfo --size "nbd+unix:///c.img?socket=$SOCK1")" = $MiB ] || fail "the second server through the path it took over"; ok
stop_server
[ ! -e "$SOCK1" ] && [ ! -e "$SOCK2" ] || fail "a stopped server left its own sockets"; ok

# --- (b) a SIGKILLed server's socket is stale: the next serve takes the path ---
K=$T/fixed.sock
start_server a.img --listen "unix:$K"
kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
[ -S "$K" ] || fail "no stale socket after SIGKILL (the case is not tested)"; ok
start_server a.img --listen "unix:$K"
[ "$(nbdinfo --size "nbd+unix:///a.img?socket=$K")" = $MiB ] || fail "serve on a dead server's socket"; ok
qemu-io -f raw -t none "nbd+unix:///a.img?socket=$K" -c 'read -P 0x5a 0 64k' >/dev/null || fail "read after the restart"; ok

# --- (c) something other than a socket at the path is refused and left alone (checked before the source) ---
echo keep > "$T/not-a-socket"
expect_error 1 "rewind: error: unix:$T/not-a-socket: exists and is not a socket" \
    "$REWIND" serve c.img --listen "unix:$T/not-a-socket"
[ "$(cat "$T/not-a-socket")" = keep ] || fail "a refused serve touched the file at the socket path"; ok

# --- (d) a second serve of a served source through another mirror is refused ---
expect_error 1 "rewind: error: a.img is busy: another rewind serve has it open (pid $SERVER_PID)" \
    "$REWIND" serve a.img --mirror other.rewind --listen 127.0.0.1:0
[ ! -e other.rewind ] || fail "a refused serve created its mirror"; ok
stop_server
start_server a.img --mirror other.rewind
[ "$(nbdinfo --size "$UNIX_URI")" = $MiB ] || fail "serve through another mirror once the first server stopped"; ok
stop_server

# --- (e) a mirror refuses another source; the same file moved is still its source ---
truncate -s 1M b.img
expect_error 1 "rewind: error: mirror a.img.rewind belongs to source $A; b.img is another file (use --mirror to give b.img its own mirror)" \
    "$REWIND" serve b.img --mirror a.img.rewind --listen 127.0.0.1:0
"$REWIND" verify a.img.rewind --against a.img >/dev/null || fail "the mirror after a refused serve"; ok
mv a.img moved.img
start_server moved.img --mirror a.img.rewind
stop_server
grep -qF "source of mirror a.img.rewind was $A (inode" "$T/serve.log" \
    || fail "no notice of the moved source: $(tail -3 "$T/serve.log")"; ok
grep -qF "is now $(realpath moved.img) (inode" "$T/serve.log" || fail "the moved source's new path not recorded"; ok
mv moved.img a.img
start_server a.img
stop_server

# --- (f) the source replaced by another file (a copy renamed over it) is refused ---
old=$(stat -c %i a.img)
cp a.img a.new && mv a.new a.img
new=$(stat -c %i a.img)
[ "$old" != "$new" ] || fail "cp + mv kept the inode (the case is not tested)"; ok
expect_error 1 "rewind: error: mirror a.img.rewind belongs to source $A, but that file was replaced since (inode $old, now $new): a.img is not the file the mirror journals (use --mirror to give a.img its own mirror)" \
    "$REWIND" serve a.img --listen 127.0.0.1:0

# --- block device (a loop device, when the machine has them): O_EXCL beside the flock ---
truncate -s 16M blk.img
if LOOP=$(losetup -f --show blk.img 2>/dev/null) && [ -b "$LOOP" ]; then
    LOOPS+=("$LOOP")
    start_server "$LOOP" --mirror "$T/blk.rewind"
    expect_error 1 "rewind: error: $LOOP is busy: another rewind serve has it open (pid $SERVER_PID)" \
        "$REWIND" serve "$LOOP" --mirror "$T/blk2.rewind" --listen 127.0.0.1:0
    [ ! -e "$T/blk2.rewind" ] || fail "a refused serve of a device created its mirror"; ok
    stop_server
    mkdir -p mnt
    if mkfs.ext4 -q -F "$LOOP" >/dev/null 2>&1 && mount "$LOOP" mnt 2>/dev/null; then
        MOUNTS+=("$T/mnt")
        expect_error 1 "rewind: error: $LOOP is busy: the block device is mounted, or another program holds it open exclusively (O_EXCL)" \
            "$REWIND" serve "$LOOP" --mirror "$T/blk.rewind" --listen 127.0.0.1:0
        umount mnt
    else
        echo "note: cannot mount on $LOOP here; the mounted-device case is skipped" >&2
    fi
else
    echo "note: no loop device here; the block-device cases are skipped" >&2
fi
finish
