#!/usr/bin/env bash
# Invariants 2 and 5 under concurrency, and invariant 4 under SIGKILL:
# - one connection checks every read against a model of the writes answered before it
#   (no FLUSH: queued, journalling, at the applier or in the source), beside fio load;
# - several connections write overlapping ranges at once (fio jobs, nbdcopy, nbdsh aio);
#   afterwards the source equals the mirror's latest point and every record verifies;
# - the server is SIGKILLed at random instants under write load; every write the client saw
#   FLUSHed is in the source and the journal after restart, and the mirror verifies.
. "$(dirname "$0")/functions.sh"
for tool in fio nbdsh nbdcopy; do requires $tool; done
cd "$T"

# --- concurrency: 4 fio jobs + 2 nbdsh writers on overlapping blocks, all at once ---
start_server c.img --size 32M
fio --name=a --ioengine=nbd --uri="$UNIX_URI" --rw=randwrite --bs=4k --size=8M --iodepth=16 --numjobs=2 \
    --time_based --runtime=4 --output=/dev/null &
FIO1=$!
fio --name=b --ioengine=nbd --uri="$TCP_URI" --rw=randrw --bsrange=512-64k --size=8M --iodepth=8 --numjobs=2 \
    --time_based --runtime=4 --output=/dev/null &
FIO2=$!
WRITERS=()
for n in 1 2; do
nbdsh -u "$UNIX_URI" -c '
import random
random.seed('$n')
cookies = []
for i in range(3000):
    off = random.randrange(0, 8 << 20, 512)
    data = bytes([random.randrange(256)]) * random.choice([512, 4096, 5000, 65536])
    cookies.append(h.aio_pwrite(data, off))
    if len(cookies) >= 32:
        h.poll(-1)
        cookies = [c for c in cookies if not h.aio_command_completed(c)]
while cookies:
    h.poll(-1)
    cookies = [c for c in cookies if not h.aio_command_completed(c)]
h.flush()
' &
WRITERS+=($!)
done
wait $FIO1 || fail "fio a"
wait $FIO2 || fail "fio b"
for w in "${WRITERS[@]}"; do wait "$w" || fail "an nbdsh aio writer failed"; done
ok
stop_server
"$REWIND" verify c.img.rewind --against c.img >/dev/null || fail "source != mirror latest after concurrent writers"; ok
records=$("$REWIND" status c.img.rewind --json | sed 's/.*"newestSeq":\([0-9]*\).*/\1/')
[ "$records" -gt 6000 ] || fail "only $records records from the concurrent writers"; ok

# --- read-your-writes against a model, no FLUSH: reads see answered writes wherever they
# are (queued, being journalled, at the applier, in the source), in order, while fio keeps
# the writer busy on a disjoint range ---
start_server m.img --size 16M
fio --name=load --ioengine=nbd --uri="$TCP_URI" --rw=randwrite --bs=4k --offset=8M --size=8M --iodepth=16 \
    --time_based --runtime=120 --output=/dev/null &
LOAD=$!; PIDS+=("$LOAD")
nbdsh -u "$UNIX_URI" -c '
import random
random.seed(11)
SIZE = 8 << 20
model = bytearray(SIZE)          # a fresh sparse volume reads as zeros
inflight = []
def reap(limit):
    while len(inflight) > limit:
        h.poll(-1)
        inflight[:] = [c for c in inflight if not h.aio_command_completed(c)]
reads = 0
for i in range(6000):
    r = random.random()
    off = random.randrange(0, SIZE - 65536)
    if r < 0.70:
        n = random.choice([1, 512, 4096, 5000, 65536])
        data = random.randbytes(n)
        inflight.append(h.aio_pwrite(data, off)); model[off:off + n] = data
    elif r < 0.78:
        n = random.choice([4096, 65536, 1000])
        inflight.append(h.aio_zero(n, off)); model[off:off + n] = bytes(n)
    elif r < 0.84:
        n = random.choice([4096, 65536])
        inflight.append(h.aio_trim(n, off)); model[off:off + n] = bytes(n)
    else:
        reap(0)                   # answered, not flushed
        n = min(random.choice([512, 4096, 65536, 300000]), SIZE - off)
        got = h.pread(n, off)
        assert got == bytes(model[off:off + n]), "read %d+%d differs from the model after %d requests" % (off, n, i)
        reads += 1
    reap(31)
reap(0)
assert reads > 500, reads
open("m.model", "wb").write(model)
' || fail "a read did not see the answered writes before it"
ok
kill -INT $LOAD 2>/dev/null || true; wait $LOAD 2>/dev/null || true  # load only: its own status does not matter
stop_server
cmp <(head -c 8M m.img) m.model || fail "the source differs from the model after a clean stop"; ok
"$REWIND" verify m.img.rewind --against m.img >/dev/null || fail "source != mirror latest after the model run"; ok
"$REWIND" restore m.img.rewind --at latest --to m.latest >/dev/null 2>&1 || fail "restore latest"
cmp <(head -c 8M m.latest) m.model || fail "the mirror's latest point differs from the model"; ok

# --- crash: SIGKILL under write load, restart, check every flushed write ---
RUNS=${REWIND_SERVE_CRASH_RUNS:-12}
rm -rf k.img k.img.rewind
gen=0
for run in $(seq 1 $RUNS); do
    start_server k.img --size 16M
    # Each generation writes 4 KiB stamped blocks at fresh offsets, flushing every 8 writes;
    # the client prints the highest block index it has seen flushed.
    nbdsh -u "$UNIX_URI" -c '
import sys, struct
gen = '$run'
i = 0
while True:
    off = ((gen * 131 + i) % 4096) * 4096
    h.pwrite(struct.pack("<QQ", gen, i) * 256, off)
    i += 1
    if i % 8 == 0:
        h.flush()
        print(i, flush=True)
' > flushed.$run 2>/dev/null &
    CLIENT=$!
    sleep 0.$((RANDOM % 8 + 2))
    kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    wait $CLIENT 2>/dev/null || true
    flushed=$(tail -n 1 flushed.$run 2>/dev/null || echo 0)
    flushed=${flushed:-0}
    # Restart: the server replays the journal into the source before serving.
    start_server k.img
    nbdsh -u "$UNIX_URI" -c '
import struct
gen, flushed = '$run', '$flushed'
for i in range(flushed):
    off = ((gen * 131 + i) % 4096) * 4096
    g, j = struct.unpack("<QQ", h.pread(16, off))
    # write i, or a later write of this generation to the same block (j = i + 4096 n)
    assert g == gen and j >= i and (j - i) % 4096 == 0, "flushed write %d of generation %d lost: found (%d, %d)" % (i, gen, g, j)
' || fail "run $run: a flushed write was lost (flushed $flushed)"
    ok
    stop_server
    "$REWIND" verify k.img.rewind --against k.img >/dev/null || fail "run $run: mirror and source differ after restart"; ok
done
finish
