#!/usr/bin/env bash
# Replication end to end, four units, each its own process, directory and --home:
#   A  rewind serve a.img --replicate-to B (through a fault proxy) --replicate-to D   (fan-out)
#   B  rewind receive b.rewind --replicate-to C                                      (cascade)
#   C  rewind receive c.rewind          D  rewind receive d.rewind
# (1) A random workload through NBD on A (writes at aligned and unaligned offsets, zeroes,
#     trims, flushes), half of it before B, C and D exist: they are seeded over the link (base
#     data included) and catch up; every unit's timeline is identical and `restore` at sampled
#     seqs gives byte-identical images, equal to the workload's model.
# (2) Faults on the A→B link: connections cut (RST), one byte of the TLS stream corrupted (the
#     record fails its AEAD check: the link resets), a short stall (no reset), a stall past the
#     30 s silence limit (both sides close), B SIGKILLed mid-stream and restarted, A SIGKILLed
#     mid-stream and restarted. After each: the logs name what happened, the resume seq is
#     exact, B converges, its timeline equals A's, restores are byte-identical.
# (3) Hostile clients against B: TLS without a certificate, a unit whose ID is not allowed,
#     garbage bytes, a truncated handshake, an allowed unit offering another volume. Each is
#     refused with its log line; B writes nothing, keeps running and keeps serving A.
# (4) A replica refuses `serve` and `rollback` with the exact message.
# Checks that a defect in rewind can fail are "soft": they are reported and the run goes on, so
# one run shows every failing check; the script then exits 1. Broken preconditions (a unit that
# does not start, no convergence within 60 s) stop it at once.
. "$(dirname "$0")/functions.sh"
requires "$PY"
"$PY" -c 'import nbd' 2>/dev/null || { echo "SKIP: python3-libnbd not installed" >&2; exit 77; }
cd "$T"
# KEEP_LOGS=DIR: the units' logs are copied there when the script ends (for a failing run).
keep_logs() { if [ -n "${KEEP_LOGS:-}" ]; then mkdir -p "$KEEP_LOGS" && cp "$T"/*.log "$T"/proxy/log "$KEEP_LOGS/" 2>/dev/null; fi; cleanup; }
trap keep_logs EXIT
MiB=1048576
SIZE=$((64 * MiB))
FAILED=()
# check DESCRIPTION command... — a check that goes on after failing (see above).
check() {
    local what=$1; shift
    if "$@"; then ok; else echo "FAIL: $what" >&2; FAILED+=("$what"); fi
}

# ---------------------------------------------------------------- helpers written here

# The workload: OPS requests one at a time, the last a FLUSH; every request one journal record.
cat > wl.py <<'EOF'
# wl.py URI SEED OPS MODEL [PACE]: OPS requests through libnbd, one at a time: writes of
# random sizes at aligned and unaligned offsets, zeroes, trims (read back as zeros), flushes;
# the last request is a FLUSH. MODEL: the volume before (read) and after (written); "-" for
# none: then a failing request ends the run quietly (its server was killed). PACE: seconds
# between requests. Prints the number of requests answered.
import nbd, random, sys, time
uri, seed, ops, model_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pace = float(sys.argv[5]) if len(sys.argv) > 5 else 0
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
model = bytearray(open(model_path, "rb").read()) if model_path != "-" else None
done = 0
try:
    for i in range(ops):
        kind = "flush" if i == ops - 1 else rng.choices(["write", "zero", "trim", "flush"], [70, 12, 10, 8])[0]
        if kind == "flush":
            h.flush()
        else:
            most = 256 << 10 if kind == "write" else 4 << 20
            if rng.random() < 0.5:
                n = rng.randint(1, most // 4096) * 4096
                off = rng.randrange(0, size - n + 1, 4096)
            else:
                n = rng.randint(1, most)
                off = rng.randint(0, size - n)
            if kind == "write":
                data = rng.randbytes(n)
                h.pwrite(data, off)
                if model is not None:
                    model[off:off + n] = data
            else:
                (h.zero if kind == "zero" else h.trim)(n, off)
                if model is not None:
                    model[off:off + n] = bytes(n)
        done += 1
        if pace:
            time.sleep(pace)
except nbd.Error:
    if model is not None:
        raise
if model is not None:
    open(model_path, "wb").write(model)
print(done)
EOF

# The fault proxy between A and B.
cat > proxy.py <<'EOF'
# proxy.py DIR: a TCP proxy on 127.0.0.1 (its port in DIR/port), steered by files in DIR:
#   target   the receiver's port (until it exists, a connection is closed at once)
#   stall    while it exists, nothing is read from either side (TCP pushes back)
#   cut      one-shot: every open connection is reset (RST both ways); the file is removed
#   corrupt  one-shot: one byte in the middle of the next TLS application-data record from the
#            sender, on a connection older than 1 s (past its handshake), is inverted; the
#            file is removed
# The first 16 KiB each sender sent (its TLS handshake and first records) go to DIR/conn-N.bin.
# One line per event in DIR/log. Stops on SIGTERM.
import os, select, signal, socket, struct, sys, time
ctl = sys.argv[1]
def path(n): return os.path.join(ctl, n)
log = open(path("log"), "a", buffering=1)
def say(s): log.write(s + "\n")
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0))
ls.listen(16)
with open(path("port.tmp"), "w") as f:
    f.write("%d\n" % ls.getsockname()[1])
os.rename(path("port.tmp"), path("port"))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))

class Records:
    """Follows the TLS record boundaries of one direction; inverts one payload byte on demand."""
    def __init__(self):
        self.hdr, self.left, self.kind, self.length = b"", 0, 0, 0
    def feed(self, data, corrupt):
        data, i, hit = bytearray(data), 0, None
        while i < len(data):
            if self.left == 0:
                take = bytes(data[i:i + 5 - len(self.hdr)])
                self.hdr += take
                i += len(take)
                if len(self.hdr) == 5:
                    self.kind, self.length = self.hdr[0], struct.unpack(">H", self.hdr[3:5])[0]
                    self.left, self.hdr = self.length, b""
                continue
            n = min(self.left, len(data) - i)
            start, mid = self.length - self.left, self.length // 2
            if corrupt and hit is None and self.kind == 0x17 and self.length >= 32 and start <= mid < start + n:
                data[i + mid - start] ^= 0xFF
                hit = (mid, self.length)
            i += n
            self.left -= n
        return bytes(data), hit

pairs = []  # [sender side, receiver side, Records, opened, number]
count = 0
def drop(p, reset):
    for s in p[:2]:
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    pairs.remove(p)
while True:
    stalled = os.path.exists(path("stall"))
    if os.path.exists(path("cut")):
        n = len(pairs)
        for p in list(pairs):
            drop(p, True)
        say("cut %d" % n)
        os.unlink(path("cut"))
    watch = [ls] + ([] if stalled else [s for p in pairs for s in p[:2]])
    ready, _, _ = select.select(watch, [], [], 0.05)
    for s in ready:
        if s is ls:
            c, _ = ls.accept()
            count += 1
            try:
                u = socket.create_connection(("127.0.0.1", int(open(path("target")).read())), timeout=5)
                u.settimeout(None)
            except Exception as e:
                say("conn %d refused: %s" % (count, type(e).__name__))
                c.close()
                continue
            for x in (c, u):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pairs.append([c, u, Records(), time.monotonic(), count])
            say("conn %d open" % count)
            continue
        p = next((p for p in pairs if s in p[:2]), None)
        if p is None:
            continue
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            say("conn %d closed by the %s" % (p[4], "sender" if s is p[0] else "receiver"))
            drop(p, False)
            continue
        if s is p[0]:
            rec = path("conn-%d.bin" % p[4])
            if not os.path.exists(rec) or os.path.getsize(rec) < 16384:
                with open(rec, "ab") as f:
                    f.write(data)  # before any corruption: what the sender sent
            armed = os.path.exists(path("corrupt")) and time.monotonic() - p[3] > 1
            data, hit = p[2].feed(data, armed)
            if hit:
                os.unlink(path("corrupt"))
                say("conn %d corrupted: byte %d of a %d-byte record" % (p[4], hit[0], hit[1]))
        try:
            (p[1] if s is p[0] else p[0]).sendall(data)
        except OSError:
            say("conn %d closed by the %s" % (p[4], "receiver" if s is p[0] else "sender"))
            drop(p, False)
EOF

# Hostile clients.
cat > probe.py <<'EOF'
# probe.py KIND PORT: one hostile client against a receiver. Prints its own port first (the
# receiver's log names it), then "closed" once the receiver has closed the connection, or
# "open" if it is still open after 10 s. KIND: nocert (TLS 1.3 without a client certificate),
# garbage (4 KiB of random bytes), truncated (the first 40 bytes of a real ClientHello, then
# the client closes: prints only its port), replay FILE (a real sender's recorded bytes, sent
# again as they were: a replayed handshake).
import os, socket, ssl, sys
kind, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=10)
print(s.getsockname()[1], flush=True)
def outcome(read):
    try:
        while read(4096):
            pass
        print("closed")
    except socket.timeout:
        print("open")
    except (ssl.SSLError, OSError):
        print("closed")
if kind == "nocert":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        t = ctx.wrap_socket(s)
        t.sendall(b"\0" * 64)
        outcome(t.recv)
    except (ssl.SSLError, OSError):
        print("closed")
elif kind == "garbage":
    s.sendall(os.urandom(4096))
    outcome(s.recv)
elif kind == "replay":
    s.sendall(open(sys.argv[3], "rb").read())
    outcome(s.recv)
elif kind == "truncated":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert len(hello) > 40 and hello[0] == 0x16
    s.sendall(hello[:40])
    s.close()
EOF

# newest MIRROR — its newest seq ("" if status fails).
newest() { "$REWIND" status "$1" --json 2>/dev/null | sed -n 's/.*"newestSeq":\([0-9]*\).*/\1/p'; }
# json MIRROR EXPR — a Python expression over d, status's JSON.
json() { "$REWIND" status "$1" --json | "$PY" -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$2"; }
# wait_seq SEQ MIRROR... — until every mirror's newest seq is SEQ (60 s at most).
wait_seq() {
    local want=$1 m i got; shift
    for i in $(seq 300); do
        got=1
        for m in "$@"; do [ "$(newest "$m")" = "$want" ] || { got=0; break; }; done
        [ $got = 1 ] && return 0
        sleep 0.2
    done
    for m in "$@"; do echo "  $m: newest seq $(newest "$m")" >&2; done
    tail -n 5 A.log B.log C.log D.log >&2
    fail "no convergence on seq:$want within 60 s"
}
rx() { printf '%s' "$1" | sed 's/[].()[*+?{}|^$\\]/\\&/g'; }  # a literal as an extended regex
# mark LOG — its line count now; since LOG MARK — its lines after the mark.
mark() { wc -l < "$1"; }
since() { tail -n +$(($2 + 1)) "$1"; }
# logged LOG MARK TEXT — TEXT appears after the mark; wait_logged: waits up to 20 s for it.
logged() { since "$1" "$2" | grep -qF -- "$3"; }
wait_logged() { local i; for i in $(seq 100); do logged "$@" && return 0; sleep 0.2; done; logged "$@"; }
has_line() { since "$1" "$2" | grep -qE -- "$(rx "$3")$"; }
nlogged() { since "$1" "$2" | grep -cF -- "$3" || true; }
# same_timeline M1 M2... — identical `timeline --json` (seqs, times, kinds, offsets, lengths, checksums).
same_timeline() {
    local first=$1 m; shift
    "$REWIND" timeline "$first" --json > tl.first || return 1
    for m in "$@"; do
        "$REWIND" timeline "$m" --json > tl.other || return 1
        cmp -s tl.first tl.other || { echo "  timeline of $m differs from $first's:" >&2; diff tl.first tl.other | head -5 >&2; return 1; }
    done
}
# same_images SEQ M1 M2... — `restore --at seq:SEQ` of each gives byte-identical images (M1's
# kept as img.first).
same_images() {
    local seq=$1 first=$2 m; shift 2
    rm -f img.first img.other
    "$REWIND" restore "$first" --at "seq:$seq" --to img.first >/dev/null 2>restore.err || { cat restore.err >&2; return 1; }
    for m in "$@"; do
        rm -f img.other
        "$REWIND" restore "$m" --at "seq:$seq" --to img.other >/dev/null 2>restore.err || { cat restore.err >&2; return 1; }
        cmp img.other img.first >&2 || { echo "  $m at seq:$seq differs from $first" >&2; return 1; }
    done
}
# compare_units M... — timelines equal, and images equal at the first, the newest and 3 seqs
# between (chosen at random).
compare_units() {
    local top s
    top=$(newest "$1")
    check "timelines of $* identical at seq:$top" same_timeline "$@"
    for s in 0 $(shuf -i 1-$((top - 1)) -n 3 | sort -n) "$top"; do
        check "restore at seq:$s identical on $*" same_images "$s" "$@"
    done
}

# ---------------------------------------------------------------- the units

for u in A B C D E F; do
    "$REWIND" id --home "home$u" > "id$u" || fail "rewind id --home home$u"
    grep -qxE '[0-9a-f]{64}' "id$u" || fail "rewind id printed $(cat "id$u")"
done
IA=$(cat idA) IB=$(cat idB) IC=$(cat idC) ID=$(cat idD) IE=$(cat idE) IF=$(cat idF)
[ "$(sort -u idA idB idC idD idE idF | wc -l)" = 6 ] || fail "two units got the same ID"; ok
short() { printf '%s…' "${1:0:16}"; }
freeport() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PC=$(freeport) PD=$(freeport)

mkdir proxy
"$PY" proxy.py proxy & PROXY_PID=$!; PIDS+=("$PROXY_PID")
for _ in $(seq 50); do [ -s proxy/port ] && break; sleep 0.1; done
PP=$(cat proxy/port) || fail "the proxy did not start"

# start_origin — `rewind serve a.img` (A) streaming to B (through the proxy) and to D; logs
# to A.log. Sets A_PID and URI.
start_origin() {
    local sock="$T/a-$RANDOM.sock"
    "$REWIND" serve a.img --listen "unix:$sock" --json --home homeA \
        --replicate-to "$IB@127.0.0.1:$PP" --replicate-to "$ID@127.0.0.1:$PD" >a.json 2>>A.log &
    A_PID=$!; PIDS+=("$A_PID")
    for _ in $(seq 300); do
        [ -s a.json ] && break
        kill -0 "$A_PID" 2>/dev/null || { cat A.log >&2; fail "rewind serve (A) exited early"; }
        sleep 0.1
    done
    [ -s a.json ] || fail "rewind serve (A) did not start listening"
    rm a.json
    URI="nbd+unix:///a.img?socket=$sock"
}
# start_receiver U MIRROR PORT [options...] — `rewind receive` as unit U (homeU, U.log, U.json);
# sets RECV_PID and RECV_PORT.
start_receiver() {
    local u=$1 mirror=$2 port=$3; shift 3
    rm -f "$u.json"
    "$REWIND" receive "$mirror" --listen "127.0.0.1:$port" --home "home$u" --json "$@" >"$u.json" 2>>"$u.log" &
    RECV_PID=$!; PIDS+=("$RECV_PID")
    for _ in $(seq 300); do
        [ -s "$u.json" ] && break
        kill -0 "$RECV_PID" 2>/dev/null || { cat "$u.log" >&2; fail "rewind receive ($u) exited early"; }
        sleep 0.1
    done
    [ -s "$u.json" ] || fail "rewind receive ($u) did not start listening"
    RECV_PORT=$(sed 's/.*"listen":"127.0.0.1:\([0-9]*\)".*/\1/' "$u.json")
}
start_B() { start_receiver B b.rewind "$1" --peer-id "$IA" --peer-id "$IF" --replicate-to "$IC@127.0.0.1:$PC"; B_PID=$RECV_PID; }

# ---------------------------------------------------------------- (1) seeding, cascade, fan-out

# The source holds data before its mirror exists: base.img has it, and seeding must carry it.
truncate -s $SIZE a.img
"$PY" - <<'EOF'
import random
rng = random.Random(18)
with open("a.img", "r+b") as f:
    for _ in range(6):
        f.seek(rng.randrange(0, 60 << 20))
        f.write(rng.randbytes(rng.randint(1, 1 << 20)))
EOF
cp a.img base0.img
# What a seed sends: every 4 KiB block of base.img that is not all zeros.
SEED_BYTES=$("$PY" -c '
d = open("base0.img", "rb").read()
z = bytes(4096)
print(sum(4096 for i in range(0, len(d), 4096) if d[i:i + 4096] != z))')

start_origin
UA=$(json a.img.rewind 'd["uuid"]')
cp base0.img model.img
expect_output 200 "$PY" wl.py "$URI" 1 200 model.img
cp model.img model200.img
wait_seq 200 a.img.rewind; ok
check "A is an origin" [ "$(json a.img.rewind 'd["role"]')" = origin ]
check "A lists B and D as peers, neither reached yet" \
    [ "$(json a.img.rewind '" ".join(sorted("%s@%s:%s:%s" % (p["id"], p["address"], p["durableSeq"], p["lagRecords"]) for p in d["peers"]))')" \
      = "$(printf '%s\n' "$IB@127.0.0.1:$PP:0:200" "$ID@127.0.0.1:$PD:0:200" | sort | tr '\n' ' ' | sed 's/ $//')" ]

# B (any free port; the proxy learns it), C (B's peer: cascade), D (A's second peer: fan-out).
start_B 0; PB=$RECV_PORT
echo "$PB" > proxy/target
start_receiver C c.rewind "$PC" --peer-id "$IB"; C_PID=$RECV_PID
start_receiver D d.rewind "$PD" --peer-id "$IA"; D_PID=$RECV_PID
check "B's --json line" grep -qxF "{\"listen\":\"127.0.0.1:$PB\",\"id\":\"$IB\",\"home\":\"homeB\",\"mirror\":\"b.rewind\"}" B.json
# More writes while they are seeded and catch up.
expect_output 200 "$PY" wl.py "$URI" 2 200 model.img 0.005
cp model.img model400.img
wait_seq 400 a.img.rewind b.rewind c.rewind d.rewind; ok

check "A logged B's seed" grep -qF "link to $(short "$IB")@127.0.0.1:$PP: seeded, $SEED_BYTES bytes of base sent" A.log
check "A logged D's seed" grep -qF "link to $(short "$ID")@127.0.0.1:$PD: seeded, $SEED_BYTES bytes of base sent" A.log
check "B logged its seed from A" grep -qE "$(rx "link from $(short "$IA") (127.0.0.1:")[0-9]+\): seeding b\.rewind: volume $UA, $SIZE bytes, as of seq:0$" B.log
check "B was seeded with the base" grep -qF ": seeded b.rewind ($SEED_BYTES bytes of data) as of seq:0" B.log
check "C was seeded by B" grep -qF ": seeded c.rewind ($SEED_BYTES bytes of data) as of seq:0" C.log
check "D was seeded by A" grep -qF ": seeded d.rewind ($SEED_BYTES bytes of data) as of seq:0" D.log
check "B logged its seed of C" grep -qF "link to $(short "$IC")@127.0.0.1:$PC: seeded, $SEED_BYTES bytes of base sent" B.log
check "B, C, D are replicas" [ "$(json b.rewind 'd["role"]') $(json c.rewind 'd["role"]') $(json d.rewind 'd["role"]')" = "replica replica replica" ]
check "same volume UUID on every unit" [ "$(for m in a.img.rewind b.rewind c.rewind d.rewind; do json $m 'd["uuid"]'; done | sort -u | wc -l)" = 1 ]
peers_caught_up() {  # peers_caught_up MIRROR SEQ ID@ADDR... — each peer durable at SEQ, no lag, streaming
    local m=$1 seq=$2; shift 2
    [ "$(json "$m" '" ".join(sorted("%s@%s %s %s %s %s" % (p["id"], p["address"], p["durableSeq"], p["lagRecords"], p["lagBytes"], p["state"]) for p in d["peers"]))')" \
      = "$(for p in "$@"; do echo "$p $seq 0 0 streaming"; done | sort | tr '\n' ' ' | sed 's/ $//')" ]
}
check "A's peers table: B and D durable at seq:400, no lag" eventually peers_caught_up a.img.rewind 400 "$IB@127.0.0.1:$PP" "$ID@127.0.0.1:$PD"
check "B's peers table: C durable at seq:400, no lag" eventually peers_caught_up b.rewind 400 "$IC@127.0.0.1:$PC"
check "C and D stream to nobody" [ "$(json c.rewind 'len(d["peers"])') $(json d.rewind 'len(d["peers"])')" = "0 0" ]

compare_units a.img.rewind b.rewind c.rewind d.rewind
for m in a.img.rewind b.rewind c.rewind d.rewind; do
    check "$m at seq:0 equals the source before serving (the seeded base)" eval 'same_images 0 $m && cmp img.first base0.img'
    check "$m at seq:200 equals the model" eval 'same_images 200 $m && cmp img.first model200.img'
    check "$m at seq:400 equals the model" eval 'same_images 400 $m && cmp img.first model400.img'
done

# ---------------------------------------------------------------- (2) faults on the A→B link

TOP=400
# writes_during N SEED — N paced requests in the background; WL_PID, output in wl.out.
# Returns once B holds some of them (A commits its index about once a second under load),
# so that the fault that follows strikes mid-stream.
writes_during() {
    "$PY" wl.py "$URI" "$2" "$1" - 0.01 > wl.out & WL_PID=$!; PIDS+=("$WL_PID")
    local i s
    for i in $(seq 100); do
        s=$(newest b.rewind)
        [ -n "$s" ] && [ "$s" -gt "$TOP" ] && return 0
        sleep 0.2
    done
    fail "B got none of the records written on A within 20 s (it holds seq:$s, A seq:$(newest a.img.rewind))"
}
# end_writes — waits for them; TOP becomes the newest seq A must reach.
end_writes() {
    wait "$WL_PID" || fail "the workload failed"
    TOP=$((TOP + $(cat wl.out)))
}
# proxy_do CMD — one-shot command; waits until the proxy took it (10 s at most).
proxy_do() {
    touch "proxy/$1"
    for _ in $(seq 100); do [ -e "proxy/$1" ] || return 0; sleep 0.1; done
    fail "the proxy did not $1 within 10 s"
}
# after_fault — A and B converge on TOP; B's timeline is A's; images at the newest seq and
# one other are identical.
after_fault() {
    wait_seq "$TOP" a.img.rewind b.rewind
    check "after $1: B's timeline is A's" same_timeline a.img.rewind b.rewind
    check "after $1: restore at seq:$TOP identical on A and B" same_images "$TOP" a.img.rewind b.rewind
    local s; s=$(shuf -i 1-"$TOP" -n 1)
    check "after $1: restore at seq:$s identical on A and B" same_images "$s" a.img.rewind b.rewind
}
# resumed_exactly MARK_A MARK_B — every "resuming after seq:N" B logged since the marks has
# A's "streaming from seq:N+1", and there is at least one.
resumed_exactly() {
    local n k=0
    for n in $(since B.log "$2" | sed -n "s/.*link from $(short "$IA") (127.0.0.1:[0-9]*): resuming after seq:\([0-9]*\) (the sender has seq:[0-9]*)$/\1/p"); do
        logged A.log "$1" "link to $(short "$IB")@127.0.0.1:$PP: streaming from seq:$((n + 1))" || { echo "  A did not stream from seq:$((n + 1))" >&2; return 1; }
        k=$((k + 1))
    done
    [ $k -ge 1 ]
}
LINK_A="link to $(short "$IB")@127.0.0.1:$PP: "
FROM_A="link from $(short "$IA") (127.0.0.1:"
# a_reset MARK — A logged a failure of its link to B, and that it reconnects.
a_reset() { since A.log "$1" | grep -qE "^.*$(rx "$LINK_A").*; reconnecting \(backoff up to 15 s\)$"; }

# (a) the connection cut (RST both ways) while A is written; twice, each after the link ran
# a while, and each time the sender must say so (not only the first time).
for cut in 1 2; do
    ma=$(mark A.log) mb=$(mark B.log) mp=$(mark proxy/log)
    writes_during 400 $((10 + cut))
    proxy_do cut
    end_writes
    after_fault "cut $cut"
    check "cut $cut: the proxy cut one connection" has_line proxy/log "$mp" "cut 1"
    check "cut $cut: B logged the link's end" eval 'since B.log $mb | grep -qE "$(rx "$FROM_A")[0-9]+\): closed$"'
    check "cut $cut: B logged the new link" wait_logged B.log "$mb" "): connected"
    check "cut $cut: B resumed where it was, A streamed from there" resumed_exactly "$ma" "$mb"
    check "cut $cut: A logged the reset and the reconnect (\"${LINK_A}…; reconnecting (backoff up to 15 s)\")" a_reset "$ma"
done

# (b) one byte of a TLS record corrupted: the record fails its check, B resets the link
ma=$(mark A.log) mb=$(mark B.log)
writes_during 400 12
proxy_do corrupt
end_writes
after_fault "a corrupted byte"
check "proxy: one byte corrupted" grep -qE '^conn [0-9]+ corrupted: byte [0-9]+ of a [0-9]+-byte record$' proxy/log
check "corruption: B found the bad record and closed the link" eval 'since B.log $mb | grep -qE "$(rx "$FROM_A")[0-9]+\): .*BAD_DECRYPT.*; closing$"'
check "corruption: B resumed where it was, A streamed from there" resumed_exactly "$ma" "$mb"
check "corruption: A logged the reset and the reconnect" a_reset "$ma"

# (c) a 3 s stall: TCP holds the stream back; no reset, B catches up after
ma=$(mark A.log) mb=$(mark B.log)
writes_during 300 13
touch proxy/stall; sleep 0.5
s1=$(newest b.rewind); sleep 2.5; s2=$(newest b.rewind)
rm proxy/stall
end_writes
check "stall: B got nothing while the proxy stalled (seq:$s1, then seq:$s2)" [ "$s1" = "$s2" ]
after_fault "a 3 s stall"
check "stall: B stalled behind A" [ "$s2" -lt "$TOP" ]
check "stall: no reconnect" [ "$(nlogged B.log "$mb" "): connected")" = 0 ]
check "stall: A did not reconnect" [ "$(nlogged A.log "$ma" "${LINK_A}streaming from")" = 0 ]
check "stall: A logged nothing" [ "$(nlogged A.log "$ma" "$LINK_A")" = 0 ]

# (d) a stall past the 30 s silence limit: both ends close, A reconnects once it lifts
ma=$(mark A.log) mb=$(mark B.log)
touch proxy/stall
expect_output 50 "$PY" wl.py "$URI" 14 50 -
TOP=$((TOP + 50))
for _ in $(seq 200); do logged B.log "$mb" ": nothing heard for 30 s; closing" && logged A.log "$ma" "${LINK_A}nothing heard for 30 s; reconnecting" && break; sleep 0.2; done
check "silence: B closed the silent link" logged B.log "$mb" ": nothing heard for 30 s; closing"
check "silence: A closed the silent link" logged A.log "$ma" "${LINK_A}nothing heard for 30 s; reconnecting (backoff up to 15 s)"
rm proxy/stall
after_fault "a 35 s stall"
check "silence: B resumed where it was, A streamed from there" resumed_exactly "$ma" "$mb"

# (e) B SIGKILLed mid-stream, restarted on its port
ma=$(mark A.log) mb=$(mark B.log)
writes_during 400 15
kill -KILL "$B_PID"; wait "$B_PID" 2>/dev/null || true
held=$(newest b.rewind) before=$TOP
check "B held a seq when killed" [ -n "$held" ]
sleep 0.5
start_B "$PB"
end_writes
check "B was killed mid-stream (it held seq:$held of seq:$before..$TOP)" eval '[ "$held" -gt "$before" ] && [ "$held" -lt "$TOP" ]'
after_fault "B killed"
# The restarted B resumes after what it holds durably: at least what its index showed when it
# was killed (records synced in its log but not yet indexed are recovered at the restart).
line=$(since B.log "$mb" | grep -E "$(rx "$FROM_A")[0-9]+\): resuming after seq:[0-9]+ \(the sender has seq:[0-9]+\)$" | head -n 1)
n=$(printf '%s' "$line" | sed -n 's/.*resuming after seq:\([0-9]*\) .*/\1/p')
sender=$(printf '%s' "$line" | sed -n 's/.*(the sender has seq:\([0-9]*\))$/\1/p')
check "B killed: B resumed after seq:$n, what it held (seq:$held at the kill), before A's seq:$sender" \
    eval '[ -n "$n" ] && [ "$n" -ge "$held" ] && [ "$n" -le "$sender" ]'
check "B killed: A streamed from seq:$((n + 1))" logged A.log "$ma" "${LINK_A}streaming from seq:$((n + 1))"
check "B killed: not seeded again" [ "$(nlogged B.log "$mb" "seeding")" = 0 ]
wait_seq "$TOP" c.rewind
check "B killed: C (B's peer) caught up again" same_timeline a.img.rewind c.rewind

# (f) A SIGKILLed mid-stream, restarted on the same source and mirror
ma=$(mark A.log) mb=$(mark B.log) md=$(mark D.log)
writes_during 100000 16
kill -KILL "$A_PID"; wait "$A_PID" 2>/dev/null || true
wait "$WL_PID" 2>/dev/null || true
check "A was killed mid-stream (the workload was cut short: $(cat wl.out) requests answered)" [ "$(cat wl.out)" -lt 100000 ]
start_origin
TOP=$(newest a.img.rewind)
wait_logged B.log "$mb" ": resuming after seq:" || fail "B resumed nothing after A's restart"
check "A killed: B resumed from A as it restarted (\"the sender has seq:$TOP\")" \
    eval 'since B.log $mb | grep -qE "$(rx "$FROM_A")[0-9]+\): resuming after seq:[0-9]+ \(the sender has seq:$TOP\)$"'
check "A killed: D resumed from A as it restarted" wait_logged D.log "$md" ": resuming after seq:"
check "A killed: D's line" eval 'since D.log $md | grep -qE "$(rx "$FROM_A")[0-9]+\): resuming after seq:[0-9]+ \(the sender has seq:$TOP\)$"'
expect_output 100 "$PY" wl.py "$URI" 17 100 -
TOP=$((TOP + 100))
after_fault "A killed"
check "A killed: B resumed after its seq" resumed_exactly "$ma" "$mb"
wait_seq "$TOP" c.rewind d.rewind
check "A killed: D caught up" same_timeline a.img.rewind d.rewind

# ---------------------------------------------------------------- (3) hostile clients against B

wait_seq "$TOP" a.img.rewind b.rewind c.rewind d.rewind
"$REWIND" timeline b.rewind --json > b.before
ls -R b.rewind | grep -v '^control.sock$' > b.files.before
md5sum < b.rewind/base.img > b.base.before
mb=$(mark B.log) ma=$(mark A.log)

for kind in nocert garbage; do
    "$PY" probe.py "$kind" "$PB" > "probe.$kind" || fail "probe $kind"
    p=$(head -n 1 "probe.$kind")
    check "$kind: B closed the connection" [ "$(sed -n 2p "probe.$kind")" = closed ]
    check "$kind: B refused it (\"refused a link from 127.0.0.1:$p: \")" wait_logged B.log "$mb" "refused a link from 127.0.0.1:$p: "
done
check "nocert: B's line" has_line B.log "$mb" "refused a link from 127.0.0.1:$(head -n 1 probe.nocert): TLS handshake refused: no certificate was presented"
check "garbage: B's line" has_line B.log "$mb" "refused a link from 127.0.0.1:$(head -n 1 probe.garbage): not a TLS 1.3 handshake (WRONG_VERSION_NUMBER)"
"$PY" probe.py truncated "$PB" > probe.truncated || fail "probe truncated"
p=$(head -n 1 probe.truncated)
check "truncated handshake: B refused it" wait_logged B.log "$mb" "refused a link from 127.0.0.1:$p: not a TLS 1.3 handshake ("
# A replayed handshake: A's first connection through the proxy, byte for byte. TLS 1.3 gives
# the replay a new server random, so the recorded client Finished (and every record after it)
# fails its check: refused, nothing written.
rec=$(ls -S "$T"/proxy/conn-*.bin | head -n 1)
[ "$(stat -c %s "$rec")" -gt 1000 ] || fail "no recorded handshake to replay"
"$PY" probe.py replay "$PB" "$rec" > probe.replay || fail "probe replay"
p=$(head -n 1 probe.replay)
check "replayed handshake: B closed the connection" [ "$(sed -n 2p probe.replay)" = closed ]
check "replayed handshake: B's line" wait_logged B.log "$mb" "refused a link from 127.0.0.1:$p: TLS handshake failed its integrity check ("

# E: a unit whose ID B does not allow (its own self-signed certificate), same volume size.
"$REWIND" serve e.img --size 64M --listen "unix:$T/e.sock" --home homeE --replicate-to "$IB@127.0.0.1:$PB" --json >e.json 2>E.log &
E_PID=$!; PIDS+=("$E_PID")
check "stranger: B refused it, naming its identity" wait_logged B.log "$mb" ": TLS handshake refused: its identity $IE is not one this unit was given (--peer-id)"
check "stranger: B's line" eval 'since B.log $mb | grep -qE "refused a link from 127\.0\.0\.1:[0-9]+: TLS handshake refused: its identity $IE is not one this unit was given \(--peer-id\)$"'
check "stranger: E was told" wait_logged E.log 0 "link to $(short "$IB")@127.0.0.1:$PB: TLS handshake refused by the peer: it does not know this unit's identity (give it this unit's \`rewind id\`); reconnecting (backoff up to 15 s)"
kill -TERM "$E_PID"; wait "$E_PID" || fail "E exited $? on SIGTERM"
check "stranger: E holds B as a peer that never answered" [ "$(json e.img.rewind '[(p["id"], p["durableSeq"], p["state"]) for p in d["peers"]]')" = "[('$IB', 0, 'stopped')]" ]

# F: a unit B allows, serving another volume.
"$REWIND" serve f.img --size 64M --listen "unix:$T/f.sock" --home homeF --replicate-to "$IB@127.0.0.1:$PB" --json >f.json 2>F.log &
F_PID=$!; PIDS+=("$F_PID")
for _ in $(seq 50); do [ -s f.json ] && break; sleep 0.1; done
UF=$(json f.img.rewind 'd["uuid"]')
WHY="the sender offers volume $UF, this mirror holds $UA"
check "wrong volume: B refused it" wait_logged B.log "$mb" "link from $(short "$IF") (127.0.0.1:"
check "wrong volume: B's line" eval 'since B.log $mb | grep -qE "link from $(short "$IF") \(127\.0\.0\.1:[0-9]+\): refused: $WHY$"'
check "wrong volume: F was told why" wait_logged F.log 0 "link to $(short "$IB")@127.0.0.1:$PB: refused by the peer: $WHY; reconnecting (backoff up to 15 s)"
sleep 1
kill -TERM "$F_PID"; wait "$F_PID" || fail "F exited $? on SIGTERM"
check "wrong volume: A's link to B was left alone (no \"replaces\")" [ "$(nlogged B.log "$mb" "replaces the one from")" = 0 ]
check "wrong volume: A's link to B was left alone (A did not reconnect)" [ "$(nlogged A.log "$ma" "${LINK_A}streaming from")" = 0 ]

kill -0 "$B_PID" || fail "B died under hostile clients"; ok
check "hostile clients: B wrote nothing (timeline)" eval '"$REWIND" timeline b.rewind --json | cmp -s - b.before'
check "hostile clients: B wrote nothing (files)" eval 'ls -R b.rewind | grep -v "^control.sock$" | cmp -s - b.files.before'
check "hostile clients: B wrote nothing (base.img)" eval 'md5sum < b.rewind/base.img | cmp -s - b.base.before'
check "hostile clients: no seed begun" [ ! -e b.rewind.creating ]
# B still serves A.
expect_output 100 "$PY" wl.py "$URI" 18 100 -
TOP=$((TOP + 100))
wait_seq "$TOP" a.img.rewind b.rewind c.rewind d.rewind; ok

# ---------------------------------------------------------------- every unit, once more

compare_units a.img.rewind b.rewind c.rewind d.rewind
for m in b.rewind c.rewind d.rewind; do
    check "$m at seq:0 equals the source before serving" eval 'same_images 0 $m && cmp img.first base0.img'
    check "$m at seq:400 equals the model" eval 'same_images 400 $m && cmp img.first model400.img'
    check "rewind verify $m" eval '"$REWIND" verify $m >/dev/null 2>verify.err'
done
check "A's peers table: B and D durable at seq:$TOP" eventually peers_caught_up a.img.rewind "$TOP" "$IB@127.0.0.1:$PP" "$ID@127.0.0.1:$PD"

# Clean stops: exit 0, and each receiver names the seq it holds.
for u in C D B; do
    pid_var=${u}_PID
    kill -TERM "${!pid_var}"; status=0; wait "${!pid_var}" || status=$?
    check "$u exits 0 on SIGTERM" [ $status = 0 ]
    check "$u's last line" eval 'tail -n 1 $u.log | grep -qF "stopped; $(echo $u | tr BCD bcd).rewind holds seq:$TOP"'
done
kill -TERM "$A_PID"; status=0; wait "$A_PID" || status=$?
check "A exits 0 on SIGTERM" [ $status = 0 ]
check "A's source is its journal's newest point" eval '"$REWIND" verify a.img.rewind --against a.img >/dev/null 2>verify.err'
check "A's source equals B's newest image" eval 'same_images $TOP b.rewind && cmp img.first a.img'

# ---------------------------------------------------------------- (4) a replica is no origin

"$REWIND" timeline b.rewind --json > b.final
truncate -s $SIZE x.img
MSG="rewind: error: b.rewind is a replica: it receives its volume from another unit (rewind receive); make it an origin first with \`rewind promote b.rewind --to SOURCE\`"
expect_error 1 "$MSG" "$REWIND" serve x.img --mirror b.rewind --listen "unix:$T/x.sock"
expect_error 1 "$MSG" "$REWIND" rollback b.rewind --at seq:1 --yes
expect_error 1 "$MSG" "$REWIND" rollback b.rewind --at seq:1 --source x.img --yes
check "the refused commands left B as it was" eval '"$REWIND" timeline b.rewind --json | cmp -s - b.final'
check "the refused commands left x.img alone" cmp x.img <(head -c $SIZE /dev/zero)
status=0; "$REWIND" serve y.img --size 64M --mirror b.rewind --listen "unix:$T/y.sock" 2>y.err || status=$?
check "serve --size on a replica: exit 1" [ $status = 1 ]
check "serve --size on a replica: the message" [ "$(tail -n 1 y.err)" = "$MSG" ]
check "serve --size on a replica: refused before anything is done (stderr: $(head -n 1 y.err))" [ "$(wc -l < y.err)" = 1 ]
check "serve --size on a replica: no source created (y.img)" [ ! -e y.img ]

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "$(basename "$0"): ${#FAILED[@]} checks failed, $CHECKS passed:" >&2
    printf '  %s\n' "${FAILED[@]}" >&2
    exit 1
fi
finish
