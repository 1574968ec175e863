#!/usr/bin/env bash
# Crash consistency on a real file system: a Linux guest (libguestfs appliance under TCG)
# runs an ext4 workload on a volume served by rewind — mkfs, files created, written,
# fsynced, renamed, deleted — with writeback caching, discards and several requests in flight.
# Then, for every FLUSH point and for random points, the restored image, after ext4's own
# journal replay on a copy, passes `e2fsck -fn`, and every file fsynced before that point
# has its exact content.
#
# How "fsynced before that point" is known: after each file is fsynced and renamed into
# /final, the guest writes its number with O_DIRECT|O_DSYNC into a marker block past the end
# of the file system. Restoring a point and reading the marker gives L: files 1..L were durable
# before it. REWIND_EXT4_FILES (default 40) sets the workload size; the full run is
# `REWIND_EXT4_FILES=400 REWIND_EXT4_RANDOM_POINTS=200 Tests/Interop/serve-ext4.sh`.
. "$(dirname "$0")/functions.sh"
requires guestfish; requires e2fsck; requires debugfs
ls /boot/vmlinuz-* >/dev/null 2>&1 || { echo "SKIP: no kernel for the libguestfs appliance" >&2; exit 77; }
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg
FILES=${REWIND_EXT4_FILES:-40}
RANDOM_POINTS=${REWIND_EXT4_RANDOM_POINTS:-30}
cd "$T"

start_server e.img --size 256M
MARKER_SECTOR=$((220 * 2048))   # 220 MiB: past the 200 MiB file system
content() { yes "rewind ext4 file $1" | head -c $(( ($1 * 7919) % 150000 + 100 )); }

# The guest's workload, uploaded into the appliance (the file system is mounted at /sysroot).
cat > workload.sh <<WORKLOAD
set -e
M=/sysroot
# The served drive by its size (256 MiB): inside the appliance the kernel names disks in the
# order it finds them, and once the appliance's own root disk came first (mkfs then refused
# "/dev/sda is mounted"). The API calls below address drives by libguestfs's names.
DEV=
for s in /sys/block/sd* /sys/block/vd*; do
    [ -e "\$s/size" ] && [ "\$(cat \$s/size)" = 524288 ] && DEV=/dev/\${s##*/}
done
[ -n "\$DEV" ] || { echo "no 256 MiB drive in the appliance" >&2; exit 1; }
mkdir -p \$M/final \$M/tmp
sync
marker() { printf '%-512s' "\$1" | dd of=\$DEV bs=512 seek=$MARKER_SECTOR conv=notrunc oflag=direct,dsync 2>/dev/null; }
marker 0
i=1
while [ \$i -le $FILES ]; do
    yes "rewind ext4 file \$i" | head -c \$(( (\$i * 7919) % 150000 + 100 )) > \$M/tmp/f\$i
    sync \$M/tmp/f\$i
    mv \$M/tmp/f\$i \$M/final/f\$i
    sync \$M/final
    if [ \$((i % 5)) = 0 ]; then rm -f \$M/final/f\$((i - 3)); fi
    if [ \$((i % 7)) = 0 ]; then dd if=/dev/zero of=\$M/tmp/scratch bs=64k count=16 2>/dev/null; rm \$M/tmp/scratch; fi
    marker \$i
    i=\$((i + 1))
done
echo workload-done
WORKLOAD
timeout 900 guestfish > guest.log 2>&1 <<GUESTFISH || { cat guest.log >&2; fail "guest workload"; }
add "" protocol:nbd server:unix:$SOCK format:raw cachemode:writeback discard:besteffort
run
mke2fs /dev/sda fstype:ext4 blocksize:4096 blockscount:51200
mount-options discard /dev/sda /
upload workload.sh /workload.sh
debug sh "sh /sysroot/workload.sh"
umount-all
GUESTFISH
grep -q workload-done guest.log || { cat guest.log >&2; fail "the guest workload did not finish"; }
ok
stop_server
"$REWIND" verify e.img.rewind --against e.img >/dev/null || fail "mirror latest != source after the guest"; ok

# Points to check: every FLUSH record, and random points.
last=$("$REWIND" status e.img.rewind --json | sed 's/.*"newestSeq":\([0-9]*\).*/\1/')
"$REWIND" timeline e.img.rewind --json | grep '"kind":"flush"' | sed 's/.*"seq":\([0-9]*\).*/\1/' > points
for _ in $(seq 1 "$RANDOM_POINTS"); do echo $(( (RANDOM * 32768 + RANDOM) % last + 1 )); done >> points
sort -n -u points -o points
"$REWIND" timeline e.img.rewind --json | grep '"kind":"flush"' | sed 's/.*"seq":\([0-9]*\).*/\1/' > flushes
: > flush-points
checked=0 files_checked=0
while read -r k; do
    "$REWIND" restore e.img.rewind --at seq:$k --to p.img --force >/dev/null
    L=$(dd if=p.img bs=512 skip=$MARKER_SECTOR count=1 2>/dev/null | tr -d ' \0')
    [ -n "$L" ] || continue            # before the workload started: nothing to check yet
    grep -qx "$k" flushes && echo "$k $L" >> flush-points
    e2fsck -E journal_only -y p.img >/dev/null 2>&1 || true
    e2fsck -fn p.img >fsck.out 2>&1 || { cat fsck.out >&2; fail "seq:$k: e2fsck -fn failed after journal replay"; }
    rm -rf d; mkdir d
    debugfs -R "rdump /final d" p.img >/dev/null 2>&1 || fail "seq:$k: cannot read /final"
    for i in $(seq 1 "$L"); do
        f=d/final/f$i
        if [ ! -e "$f" ]; then
            # step j removes file j-3 when j is a multiple of 5: f$i may be gone
            [ $(( (i + 3) % 5 )) = 0 ] || fail "seq:$k: file f$i, fsynced before the point (marker $L), is missing"
            continue
        fi
        cmp -s "$f" <(content "$i") || fail "seq:$k: file f$i has the wrong content"
        files_checked=$((files_checked + 1))
    done
    # any file present in /final (even after the marker) was fsynced before its rename: exact
    for f in d/final/f*; do
        [ -e "$f" ] || continue
        i=${f##*/f}
        cmp -s "$f" <(content "$i") || fail "seq:$k: file f$i present with the wrong content"
    done
    checked=$((checked + 1)); ok
done < points
[ $checked -ge 5 ] || fail "only $checked points had a file system"; ok

# An export of a FLUSH point in the middle of the workload, with no copy: the appliance mounts
# it read-only (libguestfs lays a throw-away overlay under a read-only drive, so ext4 replays
# its journal there) and every file fsynced before the point reads back exactly.
read -r xk xL < <(awk '$2 >= 3' flush-points | sed -n "$(( ($(awk '$2 >= 3' flush-points | wc -l) + 1) / 2 ))p")
[ -n "$xk" ] || fail "no FLUSH point with 3 files fsynced"
"$REWIND" export e.img.rewind --at seq:$xk --listen "unix:$T/x.sock" > export.out 2> export.err &
PIDS+=($!)
for _ in $(seq 1 100); do [ -S "$T/x.sock" ] && break; sleep 0.1; done
[ -S "$T/x.sock" ] || { cat export.err >&2; fail "rewind export did not start"; }
rm -rf xd; mkdir xd
timeout 600 guestfish > xguest.log 2>&1 <<GUESTFISH || { cat xguest.log >&2; fail "guestfish on the export of seq:$xk"; }
add "" protocol:nbd server:unix:$T/x.sock format:raw readonly:true
run
mount-ro /dev/sda /
copy-out /final $T/xd
GUESTFISH
xfiles=0
for i in $(seq 1 "$xL"); do
    f=xd/final/f$i
    if [ ! -e "$f" ]; then
        [ $(( (i + 3) % 5 )) = 0 ] || fail "export of seq:$xk: file f$i, fsynced before the point (marker $xL), is missing"
        continue
    fi
    cmp -s "$f" <(content "$i") || fail "export of seq:$xk: file f$i has the wrong content"
    xfiles=$((xfiles + 1))
done
for f in xd/final/f*; do
    [ -e "$f" ] || continue
    i=${f##*/f}
    cmp -s "$f" <(content "$i") || fail "export of seq:$xk: file f$i present with the wrong content"
done
[ $xfiles -ge 2 ] || fail "export of seq:$xk: only $xfiles files compared"; ok
echo "ext4: $checked points checked ($(grep -c . points) candidates, $files_checked fsynced files compared), journal ended at seq:$last; export of FLUSH point seq:$xk mounted in the appliance, $xfiles files compared"
finish
