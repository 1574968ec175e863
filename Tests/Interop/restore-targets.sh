#!/usr/bin/env bash
# Where `restore --to` may write: never into a mirror, over the source of a running server, or
# over a directory or character device; a symlink is followed to the file it names; restores
# racing to one target never leave a mix of two images or a temporary file; a block device is
# written in place, whole, only with --force. The block-device part needs a loop device
# (root, losetup); without one it prints "SKIP loop device" and the rest still runs.
. "$(dirname "$0")/functions.sh"
requires flock
cd "$T"

LOOPS=() CHILDREN=() LOCKER=""
# hold_lock FILE — take an exclusive flock on FILE in the background, as a running
# `rewind serve` holds on its source; returns once it is held. stop_locker releases it.
# (-o: only flock itself holds the lock, not its sleep.)
hold_lock() {
    flock -x -o "$1" sleep 30 &
    LOCKER=$!
    local _
    for _ in $(seq 1 200); do
        flock -n -s "$1" true 2>/dev/null || return 0
        sleep 0.05
    done
    fail "flock did not take its lock on $1"
}
# stop_locker — end hold_lock's `flock FILE sleep`: its sleep first (flock then exits and the
# lock goes), then flock itself.
stop_locker() {
    [ -n "$LOCKER" ] || return 0
    pkill -P "$LOCKER" 2>/dev/null || true
    kill "$LOCKER" 2>/dev/null || true
    wait "$LOCKER" 2>/dev/null || true
    LOCKER=""
}
cleanup_targets() {
    for p in "${CHILDREN[@]:-}"; do [ -n "$p" ] && { kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }; done
    stop_locker
    for d in "${LOOPS[@]:-}"; do [ -n "$d" ] && { losetup -d "$d" 2>/dev/null || true; }; done
    cleanup
}
trap cleanup_targets EXIT

# no_leftovers — no temporary restore file anywhere under $T (or in /dev).
no_leftovers() {
    local left
    left=$(find "$T" /dev -maxdepth 3 -name '.*.rewind-restore.*' 2>/dev/null || true)
    [ -z "$left" ] || fail "temporary files were left: $left"
    ok
}

# --- a mirror with 200 records over a random seed; the plain restores of two points ---
TORTURE=$(dirname "$REWIND")/rewind-torture
SIZE=4194304
head -c $SIZE /dev/urandom > seed.img
"$REWIND" init m --from seed.img >/dev/null
"$TORTURE" append m 7 200 10
M=$(realpath m)
"$REWIND" restore m --at seq:50 --to a.img >/dev/null
"$REWIND" restore m --at seq:200 --to b.img >/dev/null
if cmp -s a.img b.img; then fail "seq:50 and seq:200 restore to the same image"; fi; ok
listing=$(ls -A m)

# --- never into a mirror: this one, below it, another one, through a symlink ---
expect_error 1 "rewind: error: m/x.img is inside the mirror $M; restore to a path outside it" \
    "$REWIND" restore m --at latest --to m/x.img
expect_error 1 "rewind: error: m/journal/x.img is inside the mirror $M; restore to a path outside it" \
    "$REWIND" restore m --at latest --to m/journal/x.img
expect_error 1 "rewind: error: m/base.img is inside the mirror $M; restore to a path outside it" \
    "$REWIND" restore m --at latest --to m/base.img --force
expect_error 1 "rewind: error: m is the mirror $M; restore to a path outside it" \
    "$REWIND" restore m --at latest --to m --force
"$REWIND" init m2 --size 1M >/dev/null
expect_error 1 "rewind: error: m2/x.img is inside the mirror $(realpath m2); restore to a path outside it" \
    "$REWIND" restore m --at latest --to m2/x.img
expect_error 1 "rewind: error: m2 is the mirror $(realpath m2); restore to a path outside it" \
    "$REWIND" restore m --at latest --to m2
ln -s m/log into-m
expect_error 1 "rewind: error: into-m/x.img is inside the mirror $M; restore to a path outside it" \
    "$REWIND" restore m --at latest --to into-m/x.img
ln -s m/base.img base-link.img
expect_error 1 "rewind: error: base-link.img is inside the mirror $M; restore to a path outside it" \
    "$REWIND" restore m --at oldest --to base-link.img --force
[ "$(ls -A m)" = "$listing" ] || fail "a refused restore changed the mirror's files"; ok
cmp m/base.img seed.img || fail "a refused restore wrote into base.img"; ok

# --- only a file or a block device ---
mkdir d
expect_error 1 "rewind: error: d is a directory; restore to a file or a block device" \
    "$REWIND" restore m --at latest --to d --force
expect_error 1 "rewind: error: /dev/null is a character device; restore to a file or a block device" \
    "$REWIND" restore m --at latest --to /dev/null --force
[ -c /dev/null ] || fail "/dev/null is no longer a character device"; ok
expect_error 1 "rewind: error: realpath nodir: No such file or directory (ENOENT)" \
    "$REWIND" restore m --at latest --to nodir/x.img

# --- never over the source of a running server (it holds an exclusive flock on it) ---
cp a.img served.img
hold_lock served.img
expect_error 1 "rewind: error: served.img is the source of a running rewind serve; stop it first (or restore elsewhere)" \
    "$REWIND" restore m --at seq:200 --to served.img --force
expect_error 1 "rewind: error: served.img is the source of a running rewind serve; stop it first (or restore elsewhere)" \
    "$REWIND" restore m --at seq:200 --to served.img
cmp served.img a.img || fail "a refused restore changed a served source"; ok
stop_locker
"$REWIND" restore m --at seq:200 --to served.img --force >/dev/null
cmp served.img b.img || fail "restore over a file no longer served"; ok
no_leftovers

# --- a symlink is followed: the file it names is replaced, the link stays ---
mkdir sub
ln -s sub/real.img link.img
expect_error 1 "rewind: error: link.img is a symlink to a missing file" \
    "$REWIND" restore m --at seq:50 --to link.img --force
[ ! -e sub/real.img ] || fail "a restore through a dangling symlink created its file"; ok
: > sub/real.img
expect_error 1 "rewind: error: link.img already exists (use --force to overwrite)" \
    "$REWIND" restore m --at seq:50 --to link.img
hold_lock sub/real.img
expect_error 1 "rewind: error: link.img is the source of a running rewind serve; stop it first (or restore elsewhere)" \
    "$REWIND" restore m --at seq:50 --to link.img --force
stop_locker
"$REWIND" restore m --at seq:50 --to link.img --force >/dev/null
[ -L link.img ] && [ "$(readlink link.img)" = sub/real.img ] || fail "the symlink was replaced"; ok
cmp sub/real.img a.img || fail "the symlink's file differs from a plain restore of seq:50"; ok
ln -s ../link.img sub/link2.img
"$REWIND" restore m --at seq:200 --to sub/link2.img --force >/dev/null
[ -L sub/link2.img ] && [ -L link.img ] || fail "a chain of symlinks was replaced"; ok
cmp sub/real.img b.img || fail "a chain of symlinks: its file differs from a plain restore of seq:200"; ok
no_leftovers

# --- restores racing to one target: one whole image or the other, never a mix ---
for i in 1 2 3 4 5; do
    "$REWIND" restore m --at seq:50 --to c.img --force >/dev/null 2>c1.err & p1=$!
    "$REWIND" restore m --at seq:200 --to c.img --force >/dev/null 2>c2.err & p2=$!
    CHILDREN=("$p1" "$p2")
    s1=0 s2=0
    wait "$p1" || s1=$?
    wait "$p2" || s2=$?
    CHILDREN=()
    [ $s1 = 0 ] && [ $s2 = 0 ] || fail "racing restores $i exited $s1 and $s2: $(cat c1.err c2.err)"
    cmp -s c.img a.img || cmp -s c.img b.img || fail "racing restores $i left an image equal to neither point"; ok
    no_leftovers
done
# without --force to a new name: one restore wins, the other is refused, nothing is replaced
for i in 1 2 3; do
    rm -f n.img
    "$REWIND" restore m --at seq:50 --to n.img >/dev/null 2>n1.err & p1=$!
    "$REWIND" restore m --at seq:200 --to n.img >/dev/null 2>n2.err & p2=$!
    CHILDREN=("$p1" "$p2")
    s1=0 s2=0
    wait "$p1" || s1=$?
    wait "$p2" || s2=$?
    CHILDREN=()
    case "$s1 $s2" in
        "0 1") winner=a.img; loser=n2.err ;;
        "1 0") winner=b.img; loser=n1.err ;;
        *) fail "racing restores without --force $i exited $s1 and $s2: $(cat n1.err n2.err)" ;;
    esac
    [ "$(head -n 1 $loser)" = "rewind: error: n.img already exists (use --force to overwrite)" ] ||
        fail "the refused racing restore said [$(head -n 1 $loser)]"; ok
    cmp n.img $winner || fail "racing restores without --force $i: n.img is not the winner's image"; ok
    no_leftovers
done

# --- a block device: only with --force, then every byte of the volume, nothing past it ---
modprobe loop 2>/dev/null || true
head -c $((SIZE + 1048576)) /dev/urandom > disk.img
cp disk.img disk-before.img
DEV=$(losetup -f --show disk.img 2>/dev/null) || DEV=""
[ -z "$DEV" ] || LOOPS+=("$DEV")
if [ -n "$DEV" ] && [ -b "$DEV" ]; then
    expect_error 1 "rewind: error: $DEV is a block device; add --force to overwrite its contents" \
        "$REWIND" restore m --at seq:50 --to "$DEV"
    ln -s "$DEV" dev-link
    expect_error 1 "rewind: error: dev-link is a block device; add --force to overwrite its contents" \
        "$REWIND" restore m --at seq:50 --to dev-link
    hold_lock "$DEV"
    expect_error 1 "rewind: error: $DEV is the source of a running rewind serve; stop it first (or restore elsewhere)" \
        "$REWIND" restore m --at seq:50 --to "$DEV" --force
    stop_locker
    if [ -x "$PY" ]; then
        "$PY" -c 'import os, sys, time; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL); print("held", flush=True); time.sleep(30)' \
            "$DEV" > held.txt &
        holder=$!
        CHILDREN=("$holder")
        for _ in $(seq 1 200); do
            grep -q held held.txt 2>/dev/null && break
            kill -0 "$holder" 2>/dev/null || fail "could not open $DEV exclusively"
            sleep 0.05
        done
        expect_error 1 "rewind: error: $DEV is in use (mounted or opened exclusively)" \
            "$REWIND" restore m --at seq:50 --to "$DEV" --force
        kill "$holder" 2>/dev/null || true
        wait "$holder" 2>/dev/null || true
        CHILDREN=()
    fi
    cmp "$DEV" disk-before.img || fail "a refused restore wrote into the device"; ok

    out=$("$REWIND" restore m --at seq:50 --to "$DEV" --force) || fail "restore onto $DEV --force failed"
    [ "$out" = "restored seq:50 onto the block device $DEV (4.0 MiB written)" ] || fail "restore onto the device said [$out]"; ok
    cmp -n $SIZE "$DEV" a.img || fail "the device differs from a plain restore of seq:50"; ok
    cmp -i $SIZE:$SIZE "$DEV" disk-before.img || fail "a restore onto the device wrote past the volume"; ok
    expect_output '{"bytes":'$SIZE',"device":true,"image":"dev-link","seq":200}' \
        "$REWIND" restore m --at seq:200 --to dev-link --force --json
    [ -L dev-link ] && [ -b "$DEV" ] || fail "restoring through a symlink to a device replaced a node"; ok
    cmp -n $SIZE "$DEV" b.img || fail "the device differs from a plain restore of seq:200"; ok

    head -c 524288 /dev/urandom > small.img
    SMALL=$(losetup -f --show small.img 2>/dev/null) || SMALL=""
    [ -z "$SMALL" ] || LOOPS+=("$SMALL")
    if [ -n "$SMALL" ] && [ -b "$SMALL" ]; then
        expect_error 1 "rewind: error: $SMALL is 524288 bytes, the volume is $SIZE" \
            "$REWIND" restore m --at seq:50 --to "$SMALL" --force
    fi
    no_leftovers
else
    echo "SKIP loop device"
fi

finish
