#!/usr/bin/env bash
# rewind serve against the real clients users use, over a Unix socket and over TCP:
# qemu-img, qemu-io, nbdcopy, nbdinfo, nbdsh, fio. After each, the mirror verifies against
# the source, and restoring seq:k gives exactly what the client had after k requests.
# With TAP_UPSTREAM set (tap-clients.sh), every check runs through `rewind tap` in front of
# that server (functions.sh's start_server), which then serves the source file.
. "$(dirname "$0")/functions.sh"
for tool in qemu-img qemu-io nbdcopy nbdinfo nbdsh fio fincore; do requires $tool; done
cd "$T"

for transport in unix tcp; do
    uri() { if [ $transport = unix ]; then echo "$UNIX_URI"; else echo "$TCP_URI"; fi; }

    # --- nbdinfo: what the export advertises ---
    rm -rf v.img v.img.rewind
    start_server v.img --size 64M
    U=$(uri)
    for can in flush fua trim zero fast-zero df multi-conn cache; do
        if [ -n "${TAP_UPSTREAM:-}" ] && [ $can != df ] && [ $can != multi-conn ] && [ $can != cache ]; then
            # A tap offers what its upstream offers (TRIM where it can zero); the others are its own.
            want=yes; nbdinfo --can ${can/trim/zero} "$UPSTREAM_URI" || want=no
            got=yes; nbdinfo --can $can "$U" || got=no
            [ $got = $want ] || fail "nbdinfo --can $can: the tap says $got, $TAP_UPSTREAM says $want"; ok
            continue
        fi
        nbdinfo --can $can "$U" || fail "nbdinfo --can $can"; ok
    done
    nbdinfo --can read-only "$U" && fail "read-only advertised"; ok
    [ "$(nbdinfo --size "$U")" = 67108864 ] || fail "size"; ok
    nbdinfo --json "$U" | grep -q '"export-name": "v.img"' || fail "export name"; ok
    nbdinfo --list "$U" | grep -q 'export="v.img"' || fail "nbdinfo --list"; ok
    nbdinfo "${U/\/v.img/\/}" >/dev/null || fail "the empty export name"; ok

    # --- qemu-io: every write-nature command, then exact reads; the timeline shows them in order ---
    qemu-io -f raw -t none "$U" -c 'write -P 0xa5 0 1M' -c 'write -f -P 0x5a 1M 64k' -c 'write -z 2M 1M' \
        -c 'write -z -u 3M 1M' -c 'discard 0 4k' -c flush -c 'read -P 0 0 4k' -c 'read -P 0xa5 4k 1020k' \
        -c 'read -P 0x5a 1M 64k' -c 'read -P 0 2M 2M' >/dev/null || fail "qemu-io ($transport)"; ok
    kinds() { "$REWIND" timeline v.img.rewind --json | sed 's/.*"fua":\([a-z]*\),"kind":"\([a-z]*\)".*/\2\/\1/' | tr '\n' ' '; }
    # qemu-io flushes once more as it closes the image
    expected="write/false write/true zero/false zero/false trim/false flush/false flush/false "
    kinds_expected() { [ "$(kinds)" = "$expected" ]; }
    eventually kinds_expected || fail "timeline after qemu-io: $(kinds)"; ok
    eventually "$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify after qemu-io"; ok
    # seq:1 = after the first write only
    head -c 1048576 /dev/zero | tr '\0' '\245' > expect1.img; truncate -s 64M expect1.img
    "$REWIND" restore v.img.rewind --at seq:1 --to r.img --force >/dev/null
    cmp r.img expect1.img || fail "restore seq:1 after qemu-io"; ok
    # (nbd-server offers no block status: through a tap, everything is data.)
    [ "${TAP_UPSTREAM:-}" = nbd-server ] || { nbdinfo --map "$U" | grep -q "hole,zero" || fail "nbdinfo --map shows no holes"; ok; }
    qemu-img map --output=json -f raw "$U" | grep -q '"data": true' || fail "qemu-img map"; ok

    # --- qemu-img convert / compare ---
    head -c 24M /dev/urandom > ref.img; truncate -s 64M ref.img
    qemu-img convert -n -O raw ref.img "$U" || fail "qemu-img convert"; ok
    qemu-img compare -f raw -F raw ref.img "$U" >/dev/null || fail "qemu-img compare"; ok
    eventually "$REWIND" verify v.img.rewind --against ref.img >/dev/null || fail "mirror latest != ref after qemu-img"; ok

    # --- nbdcopy both ways, several connections ---
    head -c 40M /dev/urandom > ref2.img; truncate -s 64M ref2.img
    journal_sizes() {  # bytes in the payload log's files, and how many of them are in the page cache
        echo "$(stat -c %s v.img.rewind/log/*.log | awk '{s += $1} END {print s + 0}') $(fincore --bytes --noheadings --output RES v.img.rewind/log/*.log | awk '{s += $1} END {print s + 0}')"
    }
    read -r total0 cached0 <<<"$(journal_sizes)"
    nbdcopy --flush -C 4 ref2.img "$U" || fail "nbdcopy to"; ok
    # the journal's payload leaves the page cache once durable (docs/design.md, Serving)
    read -r total1 cached1 <<<"$(journal_sizes)"
    [ $((total1 - total0)) -gt $((32 << 20)) ] && [ $((cached1 - cached0)) -lt $(((total1 - total0) / 4)) ] \
        || fail "journal pages left in the page cache: $((cached1 - cached0)) of $((total1 - total0)) new bytes"; ok
    nbdcopy -C 4 "$U" out.img || fail "nbdcopy from"; ok
    cmp out.img ref2.img || fail "nbdcopy round trip"; ok
    eventually "$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify after nbdcopy"; ok
    eventually "$REWIND" verify v.img.rewind --against ref2.img >/dev/null || fail "mirror latest != ref2"; ok
    # the point before the copy still holds the qemu-img content

    # --- large structured reads: zero runs come back as OFFSET_HOLE chunks and the bytes are
    # exact, whether the read is served from the page cache on the event loop or by the pool ---
    nbdsh -u "$U" -c '
base = 50 * 2**20
h.pwrite(b"\x5a" * 4096, base + 300 * 1024)
h.flush()
expect = bytearray(2**20); expect[300 * 1024:304 * 1024] = b"\x5a" * 4096
for attempt in range(3):
    kinds = []; got = bytearray(b"\xee" * 2**20)
    def chunk(sub, off, status, err):
        kinds.append(status); got[off - base:off - base + len(sub)] = sub
        return 0
    h.pread_structured(2**20, base, chunk)
    assert got == expect, attempt
    assert nbd.READ_HOLE in kinds and nbd.READ_DATA in kinds, (attempt, kinds)
' || fail "structured reads of a mostly-zero range ($transport)"; ok
    eventually "$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify after structured reads"; ok

    stop_server

    # --- nbdsh: one request at a time; restore seq:k equals the model after k requests ---
    rm -rf s.img s.img.rewind models; mkdir models
    start_server s.img --size 4M
    U=$(uri)
    nbdsh --base-allocation -u "$U" -c '
import random, os
random.seed(5)
size = h.get_size()
model = bytearray(size)
k = 0
def save():
    open("models/%d.img" % k, "wb").write(model)
save()
for i in range(120):
    op = random.randrange(10)
    off = random.randrange(size - 70000)
    n = random.randrange(1, 70000)
    if op < 6:
        data = bytes(random.randrange(256) for _ in range(16)) * (n // 16 + 1)
        data = data[:n]
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if op == 0 else 0)
        model[off:off+n] = data
    elif op < 7:
        h.zero(n, off)
        model[off:off+n] = bytes(n)
    elif op < 8:
        h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
        model[off:off+n] = bytes(n)
    elif op < 9:
        h.trim(n, off)
        model[off:off+n] = bytes(n)
    else:
        h.flush()
    k += 1
    save()
    assert h.pread(n, off) == bytes(model[off:off+n]), "read back after request %d" % k
assert h.pread(size, 0) == bytes(model)
# block status reports the trimmed/zeroed ranges as holes or data, never past the end
seen = []
h.block_status(size, 0, lambda ctx, off, entries, err: seen.extend(entries))
assert sum(seen[0::2]) <= size and sum(seen[0::2]) > 0
open("models/count", "w").write(str(k))
' || fail "nbdsh workload ($transport)"; ok
    k=$(cat models/count)
    newest() { "$REWIND" status s.img.rewind --json | sed 's/.*"newestSeq":\([0-9]*\).*/\1/'; }
    newest_is_k() { [ "$(newest)" = "$k" ]; }
    eventually newest_is_k || fail "newest seq $(newest) != $k requests"; ok
    for i in 0 1 2 17 60 99 $k; do
        "$REWIND" restore s.img.rewind --at seq:$i --to r.img --force >/dev/null
        cmp r.img models/$i.img || fail "restore seq:$i differs from what nbdsh had written after $i requests"; ok
    done
    "$REWIND" verify s.img.rewind --against s.img >/dev/null || fail "verify after nbdsh"; ok
    stop_server

    # --- fio's nbd engine, queue depth 32, verified ---
    rm -rf f.img f.img.rewind
    start_server f.img --size 256M
    U=$(uri)
    fio --name=v --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --size=64M --iodepth=32 --fsync=64 \
        --verify=crc32c --verify_fatal=1 --output=/dev/null || fail "fio verify ($transport)"; ok
    fio --name=seq --ioengine=nbd --uri="$U" --rw=write --bs=1M --size=64M --offset=128M --iodepth=8 \
        --verify=crc32c --verify_fatal=1 --output=/dev/null || fail "fio sequential ($transport)"; ok
    stop_server
    "$REWIND" verify f.img.rewind --against f.img >/dev/null || fail "verify after fio"; ok
done
[ -z "${TAP_UPSTREAM:-}" ] || echo "(through rewind tap, upstream $TAP_UPSTREAM)"
finish
