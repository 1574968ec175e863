#!/usr/bin/env bash
# rewind as an NBD client of other servers (issue 20's upstreams). `rewind verify MIRROR
# --against NBD-URI` (the check for writes that bypassed a tap): the mirror's point compared
# byte for byte with an export of qemu-nbd, nbdkit and nbd-server (simple replies only), over
# Unix sockets and TCP; a changed byte is named by its offset and values with exit status 1; a
# size mismatch, a bad URI, a refused export and no server are clear errors. `rewind init
# MIRROR --from NBD-URI`: the base is the export's content, what BLOCK_STATUS calls zeros not
# read and not allocated.
. "$(dirname "$0")/functions.sh"
for tool in qemu-nbd nbdkit nbd-server qemu-io; do requires $tool; done
cd "$T"
PEERS=()
cleanup_peers() {
    for p in "${PEERS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
    for p in "${PEERS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    cleanup
}
trap cleanup_peers EXIT
wait_socket() { local i; for i in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; fail "no socket at $1"; }

# A mirror of 24 MiB of random data with a few writes after, and its newest point as a file.
head -c $((24 << 20)) /dev/urandom > a.img
ORIG=$(printf '%x' "$(od -An -tu1 -j 1048576 -N1 a.img | tr -d ' ')")   # before serve writes over it
"$REWIND" init m.rewind --from a.img >/dev/null
start_server a.img --mirror m.rewind
qemu-io -f raw -c "write -P 0x5a 1M 64k" -c "write -z 5M 1M" -c "write -P 0x11 23M 4k" "nbd+unix:///?socket=$SOCK" >/dev/null
stop_server
SEQ=$("$REWIND" status m.rewind --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["newestSeq"])')
[ "$SEQ" -ge 3 ] || fail "the mirror holds seq:$SEQ, expected the 3 writes (and qemu-io's FLUSH)"; ok
PLAIN=$("$REWIND" verify m.rewind)   # "ok: N records, … verified": --against adds what it compared
"$REWIND" restore m.rewind --at latest --to r.img >/dev/null

# qemu-nbd over a Unix socket: equal.
qemu-nbd -f raw -t -k "$T/q.sock" -x vol r.img 2>>peers.log & PEERS+=($!)
wait_socket "$T/q.sock"
expect_output "$PLAIN; seq:$SEQ equals nbd+unix:///vol?socket=$T/q.sock" \
    "$REWIND" verify m.rewind --against "nbd+unix:///vol?socket=$T/q.sock"
# An older point differs: at the first byte seq:1 wrote.
[ "$ORIG" = 5a ] || expect_last_error 1 "rewind: error: differs at offset 1048576: the mirror at seq:0 has 0x$ORIG, nbd+unix:///vol?socket=$T/q.sock has 0x5a" \
    "$REWIND" verify m.rewind --at seq:0 --against "nbd+unix:///vol?socket=$T/q.sock"
# A byte changed behind the mirror's back (as a write that bypassed a tap): named exactly.
WANT=$(printf '%x' "$(od -An -tu1 -j 20000003 -N1 r.img | tr -d ' ')")
[ "$WANT" != 77 ] || fail "the byte at 20000003 is 0x77 already (1 in 256): run again"
qemu-io -f raw -c "write -P 0x77 20000003 1" "nbd+unix:///vol?socket=$T/q.sock" >/dev/null
expect_last_error 1 "rewind: error: differs at offset 20000003: the mirror at seq:$SEQ has 0x$WANT, nbd+unix:///vol?socket=$T/q.sock has 0x77" \
    "$REWIND" verify m.rewind --against "nbd+unix:///vol?socket=$T/q.sock"
OUT=$("$REWIND" verify m.rewind --against "nbd+unix:///vol?socket=$T/q.sock" --json 2>/dev/null) && fail "verify --json exited 0"
[ "$OUT" = "{\"error\":\"differs at offset 20000003: the mirror at seq:$SEQ has 0x$WANT, nbd+unix:\\/\\/\\/vol?socket=${T//\//\\/}\\/q.sock has 0x77\"}" ] \
    || [ "$(printf '%s' "$OUT" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["error"])')" = "differs at offset 20000003: the mirror at seq:$SEQ has 0x$WANT, nbd+unix:///vol?socket=$T/q.sock has 0x77" ] \
    || fail "verify --json said [$OUT]"; ok
# An export the server does not have.
expect_error 1 "rewind: error: nbd+unix:///nope?socket=$T/q.sock: the server refused export \"nope\": NBD_REP_ERR_UNKNOWN: export 'nope' not present" \
    "$REWIND" verify m.rewind --against "nbd+unix:///nope?socket=$T/q.sock"

# nbdkit (file plugin) over TCP, and nbd-server (simple replies): equal again once repaired.
"$REWIND" restore m.rewind --at latest --to r2.img >/dev/null
PORT=$(( 20000 + RANDOM % 20000 ))
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$PORT" file r2.img 2>>peers.log & PEERS+=($!)
for i in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.05; done
expect_output "$PLAIN; seq:$SEQ equals nbd://127.0.0.1:$PORT" \
    "$REWIND" verify m.rewind --against "nbd://127.0.0.1:$PORT"
PORT2=$(( PORT + 1 ))
printf '[generic]\n    listenaddr = 127.0.0.1\n    port = %s\n    user = %s\n[vol]\n    exportname = %s\n' "$PORT2" "$(id -un)" "$T/r2.img" > nbd.conf
# (-d: one client, in the foreground; wait for its listener without connecting to it.)
nbd-server -C "$T/nbd.conf" -d 2>>peers.log & PEERS+=($!)
listening() { grep -qi " 0100007F:$(printf '%04X' "$1") 00000000:0000 0A " /proc/net/tcp; }
for i in $(seq 100); do listening "$PORT2" && break; sleep 0.05; done
expect_output "$PLAIN; seq:$SEQ equals nbd://127.0.0.1:$PORT2/vol" \
    "$REWIND" verify m.rewind --against "nbd://127.0.0.1:$PORT2/vol"

# A volume of another size, a URI that is no URI, and no server at all.
head -c $((16 << 20)) /dev/zero > small.img
qemu-nbd -f raw -t -k "$T/s.sock" small.img 2>>peers.log & PEERS+=($!)
wait_socket "$T/s.sock"
expect_error 1 "rewind: error: differs at offset 16777216: nbd+unix:///?socket=$T/s.sock is 16777216 bytes, the volume is 25165824" \
    "$REWIND" verify m.rewind --against "nbd+unix:///?socket=$T/s.sock"
expect_error 1 "rewind: error: nbd+unix:///x: it names no socket (…?socket=PATH)" "$REWIND" verify m.rewind --against "nbd+unix:///x"
expect_error 1 "rewind: error: nbd://127.0.0.1:1/x: cannot connect to 127.0.0.1:1: Connection refused" \
    "$REWIND" verify m.rewind --against "nbd://127.0.0.1:1/x"

# init --from an export: nbdkit's sparse memory with three writes (BLOCK_STATUS: only those
# are read), then nbd-server (no BLOCK_STATUS: all read, zero blocks still left as holes).
nbdkit -f --exit-with-parent -U "$T/k.sock" memory 256M 2>>peers.log & PEERS+=($!)
wait_socket "$T/k.sock"
qemu-io -f raw -c "write -P 0x21 0 64k" -c "write -P 0x42 100M 1M" -c "write -P 0x63 268431360 4k" "nbd+unix:///?socket=$T/k.sock" >/dev/null
"$REWIND" init k.rewind --from "nbd+unix:///?socket=$T/k.sock" > init.txt 2>init.err || fail "init --from nbdkit: $(cat init.err)"
grep -qE "^created mirror k.rewind: volume 268435456 bytes \(256.0 MiB\), block size 4096, uuid [0-9a-f-]{36}$" init.txt || fail "init said [$(cat init.txt)]"; ok
ALLOC=$(( $(stat -c %b k.rewind/base.img) * 512 ))
[ "$ALLOC" -ge $(( (64 + 1024 + 4) << 10 )) ] && [ "$ALLOC" -le $(( 2 << 20 )) ] || fail "k.rewind's base has $ALLOC bytes allocated, expected the 1,118,208 written"; ok
expect_output "$("$REWIND" verify k.rewind); seq:0 equals nbd+unix:///?socket=$T/k.sock" "$REWIND" verify k.rewind --against "nbd+unix:///?socket=$T/k.sock"
head -c $((8 << 20)) /dev/zero > z.img
printf 'data' | dd of=z.img bs=1 seek=$((3 << 20)) conv=notrunc 2>/dev/null
PORT3=$(( PORT + 2 ))
printf '[generic]\n    listenaddr = 127.0.0.1\n    port = %s\n    user = %s\n[vol]\n    exportname = %s\n' "$PORT3" "$(id -un)" "$T/z.img" > nbd3.conf
nbd-server -C "$T/nbd3.conf" -d 2>>peers.log & PEERS+=($!)
for i in $(seq 100); do listening "$PORT3" && break; sleep 0.05; done
"$REWIND" init z.rewind --from "nbd://127.0.0.1:$PORT3/vol" >/dev/null 2>init.err || fail "init --from nbd-server: $(cat init.err)"
[ "$(( $(stat -c %b z.rewind/base.img) * 512 ))" -le 65536 ] || fail "z.rewind's base is not sparse: $(stat -c %b z.rewind/base.img) sectors"; ok
expect_output "$("$REWIND" verify z.rewind); seq:0 equals z.img" "$REWIND" verify z.rewind --against z.img
expect_error 1 "rewind: error: nbd+unix:///?socket=$T/none: cannot connect to the socket $T/none: No such file or directory" "$REWIND" init n.rewind --from "nbd+unix:///?socket=$T/none"
[ ! -e n.rewind ] || fail "a failed init left n.rewind"; ok

expect_error 1 "rewind: error: nbd+unix:///?socket=$T/none: cannot connect to the socket $T/none: No such file or directory" \
    "$REWIND" verify m.rewind --against "nbd+unix:///?socket=$T/none"
finish
