#!/usr/bin/env bash
# rewind tap when the upstream misbehaves or goes away, and around its own stops:
# - nbdkit's error filter fails some writes: the host gets EIO for exactly those, and the
#   journal holds exactly the writes that succeeded (offsets, contents, restore).
# - the upstream is killed and restarted under load: hosts get errors, not hangs; the tap
#   reconnects (log, metrics); every acknowledged write is in the upstream and the mirror,
#   which equals the upstream again (requests in doubt journalled as the upstream holds them).
# - a write that bypassed a stopped tap: after a crash the start finds and journals it; after
#   a clean stop the start trusts the mirror (--check full compares anyway).
# - operator mistakes: no upstream, a bad URI, an unreachable one, a second tap of a mirror, a
#   serve's mirror, a mirror of another size, a serve-only config key.
. "$(dirname "$0")/functions.sh"
for tool in nbdkit nbdinfo openssl curl; do requires $tool; done
[ -x "$PY" ] && "$PY" -c 'import nbd' 2>/dev/null || { echo "SKIP: python3-libnbd not installed" >&2; exit 77; }
cd "$T"

# start_tap MIRROR UPSTREAM-URI [options...]: sets TAP_PID, TAP_URI; waits until it listens.
start_tap() {
    local mirror=$1 up=$2; shift 2
    TAP_SOCK="$T/tap-$RANDOM.sock"
    rm -f tap.json
    "$REWIND" tap --upstream "$up" --mirror "$mirror" --listen "unix:$TAP_SOCK" --json "$@" > tap.json 2>>tap.log &
    TAP_PID=$!
    PIDS+=("$TAP_PID")
    for _ in $(seq 300); do [ -s tap.json ] && break; kill -0 $TAP_PID 2>/dev/null || break; sleep 0.1; done
    [ -s tap.json ] || { cat tap.log >&2; fail "rewind tap did not start"; }
    TAP_URI="nbd+unix:///?socket=$TAP_SOCK"
}
stop_tap() {
    kill -TERM "$TAP_PID"; local s=0; wait "$TAP_PID" || s=$?
    [ $s = 0 ] || fail "rewind tap exited $s on SIGTERM"
}
start_nbdkit() {  # start_nbdkit SOCKET [nbdkit args...]
    local sock=$1; shift
    rm -f "$sock"
    nbdkit -f -U "$sock" "$@" 2>>nbdkit.log &
    NBDKIT_PID=$!
    PIDS+=("$NBDKIT_PID")
    for _ in $(seq 200); do [ -S "$sock" ] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && return; sleep 0.05; done
    fail "nbdkit did not start"
}
records() { "$REWIND" timeline "$1" --json | "$PY" -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r["kind"], r["offset"], r["length"])'; }

# --- nbdkit's error filter: 40 writes to distinct blocks, some failed by the upstream ---
truncate -s 8M e.img
start_nbdkit "$T/e.sock" --filter=error file e.img error-pwrite=EIO error-pwrite-rate=35% error-zero=EIO error-zero-rate=0%
start_tap e.rewind "nbd+unix:///?socket=$T/e.sock"
nbdsh_out=$("$PY" - "$TAP_URI" <<'EOF'
import nbd, sys, random
random.seed(7)
h = nbd.NBD(); h.connect_uri(sys.argv[1])
ok, failed = [], []
for i in range(40):
    off = i * 65536
    data = bytes([i + 1]) * 4096
    try:
        h.pwrite(data, off)
        ok.append(off)
    except nbd.Error as e:
        assert e.errno == "EIO", (e.errno, e.string)
        failed.append(off)
h.flush()
model = bytearray(8 << 20)
for off in ok: model[off:off + 4096] = bytes([off // 65536 + 1]) * 4096
assert h.pread(8 << 20, 0) == bytes(model), "a read through the tap differs from the writes that succeeded"
open("e.model", "wb").write(model)
print(len(ok), len(failed), " ".join(map(str, ok)))
EOF
) || fail "nbdsh through the error filter"
read -r nok nfailed okoffs <<<"$nbdsh_out"
[ "$nok" -gt 5 ] && [ "$nfailed" -gt 5 ] || fail "the error filter failed $nfailed of 40 writes: expected some of each"; ok
stop_tap
got=$(records e.rewind | awk '$1 == "write" {print $2}' | tr '\n' ' ' | sed 's/ $//')
[ "$got" = "$okoffs" ] || fail "journalled writes at [$got], the upstream completed [$okoffs]"; ok
[ "$(records e.rewind | grep -c '^write ')" = "$nok" ] || fail "write records != $nok"; ok
"$REWIND" restore e.rewind --at latest --to e.out >/dev/null
cmp e.out e.model || fail "restore latest differs from the writes that succeeded"; ok
cmp e.img e.model || fail "the upstream's image differs from the writes that succeeded"; ok
kill -9 "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true

# --- the upstream killed and restarted under load ---
head -c 16M /dev/urandom > k.img
start_nbdkit "$T/k.sock" file k.img
start_tap k.rewind "nbd+unix:///?socket=$T/k.sock" --metrics 127.0.0.1:0
METRICS=$(sed 's/.*"metrics":"\([^"]*\)".*/\1/' tap.json)
"$PY" - "$TAP_URI" > k.result <<'EOF' &
import nbd, sys, time, random
random.seed(11)
h = nbd.NBD(); h.connect_uri(sys.argv[1])
acked, failed, t0 = {}, set(), time.time()
i = 0
# 2.5 s of writes, each to its own 4 KiB block (some unaligned, read back by the tap), with
# 16 in flight; then until 30 s for the tap to be back.
blocks = random.sample(range(4096), 4000)
inflight = []
def done(block, data, err):
    if err.value != 0: failed.add(block)
    else: acked[block] = data
    return 1
while time.time() - t0 < 2.5 and i < len(blocks):
    b = blocks[i]; i += 1
    off = b * 4096 + (random.randrange(1, 4000) if i % 5 == 0 else 0)
    n = 4096 - (off - b * 4096) if i % 5 == 0 else 4096
    data = bytes([b % 251 + 1]) * n
    while h.aio_in_flight() >= 16: h.poll(-1)
    try:
        h.aio_pwrite(data, off, lambda err, b=b, off=off, data=data: done(b, (off, data), err))
    except nbd.Error:
        failed.add(b)
    time.sleep(0.002)
while h.aio_in_flight() > 0: h.poll(-1)
# Back within 30 s: a FLUSH succeeds again.
while True:
    try: h.flush(); break
    except nbd.Error:
        if time.time() - t0 > 30: raise
        time.sleep(0.1)
for b, (off, data) in acked.items():
    assert h.pread(len(data), off) == data, "acknowledged write at %d lost" % off
print(len(acked), len(failed))
EOF
LOAD=$!
sleep 0.8
kill -9 "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true
sleep 0.7
start_nbdkit "$T/k.sock" file k.img
wait $LOAD || fail "the load through the tap failed or hung (see above)"
read -r nacked nfailed < k.result
[ "$nacked" -gt 50 ] && [ "$nfailed" -gt 0 ] || fail "acked $nacked, failed $nfailed: expected both while the upstream was away"; ok
grep -q "upstream nbd+unix:///?socket=$T/k.sock dropped: requests fail with EIO until it is back; reconnecting" tap.log || fail "no log line for the drop"; ok
grep -q "upstream nbd+unix:///?socket=$T/k.sock is back after" tap.log || fail "no log line for the reconnection"; ok
curl -s "http://$METRICS/metrics" | grep -q '^rewind_tap_reconnects_total 1$' || fail "metrics: $(curl -s "http://$METRICS/metrics" | grep rewind_tap)"; ok
curl -s "http://$METRICS/metrics" | grep -q "^rewind_tap_upstream_up 1" || fail "metrics: $(curl -s "http://$METRICS/metrics" | grep rewind_tap)"; ok
stop_tap
# Requests in doubt were journalled as the upstream holds them: the mirror equals it.
"$REWIND" verify k.rewind --against k.img >/dev/null 2>&1 || fail "mirror differs from the upstream after the reconnection: $("$REWIND" verify k.rewind --against k.img 2>&1 | tail -1)"; ok

# --- a misbehaving upstream (fake_nbd_upstream.py): a reply of garbage, one with a cookie
# no request has, a short read, a chunk of 64 MiB never negotiated. The host gets EIO for the
# request it hit (and for what it sends while the tap reconnects), never a hang; the tap
# reconnects; acknowledged writes are there, and the mirror equals the upstream's file ---
for mode in garbage cookie short oversize; do
    head -c 4M /dev/urandom > f.img
    rm -rf f.rewind "$T/f.sock"; : > tap.log
    "$PY" "$HERE/fake_nbd_upstream.py" "$T/f.sock" f.img $mode 5 2>>fake.log & FAKE=$!; PIDS+=($FAKE)
    for _ in $(seq 100); do [ -S "$T/f.sock" ] && break; sleep 0.05; done
    [ -S "$T/f.sock" ] || { cat fake.log >&2; fail "fake_nbd_upstream.py did not start"; }
    start_tap f.rewind "nbd+unix:///?socket=$T/f.sock"
    "$PY" - "$TAP_URI" <<'EOF2' || fail "the host's requests through a misbehaving upstream ($mode)"
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
acked, failures = {}, 0
for i in range(20):
    data = bytes([i + 1]) * 4096
    try:
        h.pwrite(data, i * 8192); acked[i * 8192] = data
        assert h.pread(4096, i * 8192) == data
    except nbd.Error as e:
        assert e.errno == "EIO", e.errno
        failures += 1; time.sleep(0.3)
t0 = time.time()
while True:
    try: h.flush(); break
    except nbd.Error:
        assert time.time() - t0 < 10, "the tap did not come back"
        time.sleep(0.1)
for off, data in acked.items(): assert h.pread(4096, off) == data, off
assert failures >= 1 and len(acked) >= 10, (failures, len(acked))
EOF2
    ok
    grep -q "upstream nbd+unix:///?socket=$T/f.sock dropped" tap.log || fail "$mode: no drop logged"; ok
    grep -q "is back after" tap.log || fail "$mode: no reconnection logged"; ok
    stop_tap
    "$REWIND" verify f.rewind --against f.img >/dev/null 2>&1 || fail "$mode: the mirror differs from the upstream: $("$REWIND" verify f.rewind --against f.img 2>&1 | tail -1)"; ok
    kill $FAKE; wait $FAKE 2>/dev/null || true
done

# --- a write that bypassed the tap: found after a crash, trusted after a clean stop ---
start_tap k.rewind "nbd+unix:///?socket=$T/k.sock"
grep -q "the last tap of nbd+unix:///?socket=$T/k.sock stopped cleanly at seq:" tap.log || fail "a start after a clean stop compared"; ok
"$PY" -c "import nbd; h = nbd.NBD(); h.connect_uri('$TAP_URI'); h.pwrite(b'\x42' * 4096, 8 << 20); h.flush()"
kill -9 "$TAP_PID"; wait "$TAP_PID" 2>/dev/null || true
"$PY" -c "import nbd; h = nbd.NBD(); h.connect_uri('nbd+unix:///?socket=$T/k.sock'); h.pwrite(b'\x99' * 10, 12345678); h.flush()"
last=$("$REWIND" status k.rewind --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["newestSeq"])')
: > tap.log
start_tap k.rewind "nbd+unix:///?socket=$T/k.sock"
grep -q "no clean stop of a tap of nbd+unix:///?socket=$T/k.sock recorded in k.rewind: comparing the mirror with the upstream" tap.log || fail "no comparison after a crash"; ok
grep -q "the upstream differed from the mirror's seq:$last in 1 blocks (writes that bypassed the tap, or were unjournalled at a crash): journalled as seq:$((last + 1))...seq:$((last + 1))" tap.log \
    || fail "the bypassing write: $(grep differed tap.log || echo no line)"; ok
stop_tap
[ "$(records k.rewind | tail -n 1)" = "write 12345344 4096" ] || fail "the bypassing write's record: $(records k.rewind | tail -n 1)"; ok
"$REWIND" verify k.rewind --against "nbd+unix:///?socket=$T/k.sock" >/dev/null 2>&1 || fail "verify --against the upstream after the start's comparison"; ok
# After a clean stop a bypassing write goes unseen — unless --check full.
"$PY" -c "import nbd; h = nbd.NBD(); h.connect_uri('nbd+unix:///?socket=$T/k.sock'); h.pwrite(b'\x17' * 4096, 4096); h.flush()"
: > tap.log
start_tap k.rewind "nbd+unix:///?socket=$T/k.sock"
grep -q "stopped cleanly" tap.log || fail "a clean stop was not trusted"; ok
stop_tap
"$REWIND" verify k.rewind --against "nbd+unix:///?socket=$T/k.sock" >/dev/null 2>&1 && fail "verify --against found no bypassing write"; ok
: > tap.log
start_tap k.rewind "nbd+unix:///?socket=$T/k.sock" --check full
grep -q "comparing the mirror with the upstream (--check full)" tap.log || fail "--check full did not compare"; ok
grep -q "in 1 blocks" tap.log || fail "--check full: $(grep -E 'differed|equals' tap.log)"; ok
stop_tap
"$REWIND" verify k.rewind --against "nbd+unix:///?socket=$T/k.sock" >/dev/null 2>&1 || fail "verify after --check full"; ok

# --- a TLS upstream: nbdkit with X.509 certificates (nbds+unix://…&tls-certificates=DIR) ---
mkdir pki
( cd pki
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=rewind test CA" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext.cnf
  openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 2 -extfile ext.cnf 2>/dev/null
) || fail "openssl could not make the test certificates"
truncate -s 8M t.img
nbdkit -f -U "$T/t.sock" --tls=require --tls-certificates="$T/pki" file t.img 2>>nbdkit.log & NBDKIT_PID=$!; PIDS+=($NBDKIT_PID)
for _ in $(seq 100); do [ -S "$T/t.sock" ] && break; sleep 0.05; done
TLS_URI="nbds+unix:///?socket=$T/t.sock&tls-certificates=$T/pki"
: > tap.log
start_tap t.rewind "$TLS_URI"
"$PY" -c "import nbd; h = nbd.NBD(); h.connect_uri('$TAP_URI'); h.pwrite(b'\x5e' * 65536, 1 << 20); h.flush(); assert h.pread(65536, 1 << 20) == b'\x5e' * 65536"
stop_tap
[ "$(records t.rewind | grep -c '^write 1048576 65536$')" = 1 ] || fail "the write through a TLS upstream was not journalled: $(records t.rewind)"; ok
"$REWIND" verify t.rewind --against "$TLS_URI" >/dev/null 2>&1 || fail "verify --against the TLS upstream: $("$REWIND" verify t.rewind --against "$TLS_URI" 2>&1 | tail -1)"; ok
cmp <(head -c $(( (1 << 20) + 65536 )) t.img | tail -c 65536) <(head -c 65536 /dev/zero | tr '\0' '\136') || fail "the TLS upstream's image lacks the write"; ok
# Without TLS, or trusting another CA, the upstream is refused with the reason.
expect_last_error 1 "rewind: error: upstream nbd+unix:///?socket=$T/t.sock: the server refused export \"\": NBD_REP_ERR_TLS_REQD" \
    "$REWIND" tap --upstream "nbd+unix:///?socket=$T/t.sock" --mirror t2.rewind
mkdir other && openssl req -x509 -newkey rsa:2048 -nodes -keyout other/k.pem -out other/ca-cert.pem -days 2 -subj "/CN=other" 2>/dev/null
OUT=$("$REWIND" tap --upstream "nbds+unix:///?socket=$T/t.sock&tls-certificates=$T/other" --mirror t2.rewind 2>&1 >/dev/null) && fail "a server the CA did not sign was trusted"
printf '%s\n' "$OUT" | tail -n 1 | grep -q "^rewind: error: upstream nbds+unix:///?socket=$T/t.sock&tls-certificates=$T/other: .*" \
    || fail "an untrusted server's refusal: $OUT"; ok
[ ! -e t2.rewind ] || fail "a refused TLS start left a mirror"; ok
kill -9 "$NBDKIT_PID"; wait "$NBDKIT_PID" 2>/dev/null || true

# --- operator mistakes ---
start_tap k.rewind "nbd+unix:///?socket=$T/k.sock"
expect_error 1 "rewind: error: k.rewind/owner.lock is busy: another rewind process (serve, tap, receive or rollback) owns this mirror" \
    "$REWIND" tap --upstream "nbd+unix:///?socket=$T/k.sock" --mirror k.rewind --listen "unix:$T/second.sock"
stop_tap
expect_error 1 "rewind: error: http://x: the scheme http is not one of nbd, nbds, nbd+unix, nbds+unix" \
    "$REWIND" tap --upstream http://x --mirror x.rewind
expect_error 1 "rewind: error: upstream nbd://127.0.0.1:1/x: cannot connect to 127.0.0.1:1: Connection refused" \
    "$REWIND" tap --upstream nbd://127.0.0.1:1/x
[ ! -e x.rewind ] && [ ! -e upstream.rewind ] || fail "a refused start left a mirror"; ok
expect_error 64 "Error: give --upstream NBD-URI (or \`upstream = \"...\"\` in the config file)" "$REWIND" tap
# A config file: tap's keys; serve's source is not one of them.
printf 'source = "v.img"\n' > bad.toml
expect_error 1 "rewind: error: bad.toml:1: unknown key \"source\" (known: accept-damage, ack, block-size, check, description, export, home, keep-age, keep-size, listen, log-level, max-connections, metrics, mirror, on-full, peer-keep-size, peer-min-free, replicate-to, retention-interval, sync-timeout, upstream)" \
    "$REWIND" tap --config bad.toml
printf 'upstream = "nbd+unix:///?socket=%s/k.sock"\nmirror = "k.rewind"\nlisten = "unix:%s/cfg.sock"\ncheck = "full"\nexport = "cfg"\n' "$T" "$T" > tap.toml
: > tap.log
"$REWIND" tap --config tap.toml --json > cfg.json 2>>tap.log & CFG=$!; PIDS+=($CFG)
for _ in $(seq 300); do [ -s cfg.json ] && break; sleep 0.1; done
grep -q '"export":"cfg"' cfg.json || fail "tap --config: $(cat cfg.json tap.log)"; ok
grep -q "comparing the mirror with the upstream (--check full)" tap.log || fail "check = \"full\" from the config file was not taken"; ok
[ "$(nbdinfo --size "nbd+unix:///cfg?socket=$T/cfg.sock")" = 16777216 ] || fail "the tap from a config file does not serve"; ok
kill -TERM $CFG; wait $CFG || fail "tap --config did not stop cleanly"
printf 'check = "sometimes"\n' > bad2.toml
expect_error 1 "rewind: error: bad2.toml:1: check: invalid check \"sometimes\" (use auto, full or none)" \
    "$REWIND" tap --upstream "nbd+unix:///?socket=$T/k.sock" --config bad2.toml
truncate -s 8M s.img
"$REWIND" init s.rewind --from s.img >/dev/null
"$REWIND" serve s.img --mirror s.rewind --listen "unix:$T/s.sock" > /dev/null 2>>serve.log & SP=$!
for _ in $(seq 100); do [ -S "$T/s.sock" ] && break; sleep 0.05; done
kill -TERM $SP; wait $SP
expect_last_error 1 "rewind: error: mirror s.rewind journals the file $T/s.img (rewind serve): a tap needs a mirror of its own" \
    "$REWIND" tap --upstream "nbd+unix:///?socket=$T/k.sock" --mirror s.rewind
"$REWIND" init o.rewind --size 4M >/dev/null
expect_last_error 1 "rewind: error: upstream nbd+unix:///?socket=$T/k.sock is 16777216 bytes but mirror o.rewind holds a volume of 4194304: not its mirror" \
    "$REWIND" tap --upstream "nbd+unix:///?socket=$T/k.sock" --mirror o.rewind
finish
