#!/usr/bin/env bash
# The bit-flip campaign: a mirror written through `rewind serve` by a real client (libnbd),
# then ITERATIONS (default 2000) single damages — one bit flipped in, or a truncation of,
# journal/data.mdb or a payload log file, at a random offset. After each, `restore` of a
# checkpoint either exits 1 with a `rewind: error: ` line or gives exactly the right image,
# never a signal or a hang; `verify` either reports the damage or passes, and when it passes
# every checkpoint restores exactly. Prints a table of outcomes by damage and the messages
# users were shown. The work is in integrity_campaign.py.
#   SEED=n        the run's seed (printed; default random, 5336 when CI is set)
#   ITERATIONS=n  how many damages (default 2000)
#   ONLY=i        run iteration i only (with the SEED a failure printed)
#   REUSE=DIR     use the mirror a failing run kept in /tmp/rewind-integrity-SEED (it prints
#                 the DIR) instead of writing a new one: the mirror's bytes depend on timing
#                 (commit batching, timestamps), so only this reproduces a case exactly
#   TIMEOUT=s     per command (default 20)
. "$(dirname "$0")/functions.sh"
"$PY" -c 'import nbd' 2>/dev/null || { echo "SKIP: python3-libnbd not installed" >&2; exit 77; }
# CI runs one fixed seed (a landing is reproducible: the same workload and the same damages,
# though the mirror's bytes depend on timing); by hand, a new seed each run explores further.
if [ -n "${CI:-}" ]; then SEED=${SEED:-5336}; else SEED=${SEED:-$RANDOM}; fi
export SEED ITERATIONS=${ITERATIONS:-2000} REWIND
echo "integrity-campaign.sh: SEED=$SEED ITERATIONS=$ITERATIONS${ONLY:+ ONLY=$ONLY}${REUSE:+ REUSE=$REUSE}"
cd "$T"
# the damaged copies live in memory when they can: ~3 copies of a ~12 MiB mirror per iteration
C=$T/c
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    C=$(mktemp -d /dev/shm/rewind-campaign.XXXXXX)
    trap 'rm -rf "$C"; cleanup' EXIT
fi
mkdir -p "$C"
if [ -n "${REUSE:-}" ]; then
    cp -a --sparse=always "$REUSE/mirror" "$REUSE/expected" "$REUSE/points.json" "$C/"
else
    # a 4 MiB volume, 4 KiB blocks, written one request at a time by libnbd
    start_server v.img --size 4M --block-size 4096
    "$PY" "$HERE/integrity_campaign.py" workload "$UNIX_URI" "$SEED" "$C" || fail "the workload through serve"; ok
    stop_server
    count=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["count"])' "$C/points.json")
    newest=$("$REWIND" status v.img.rewind --json | sed 's/.*"newestSeq":\([0-9]*\).*/\1/')
    [ "$newest" = "$count" ] || fail "newest seq $newest != $count requests"; ok
    "$REWIND" verify v.img.rewind --against v.img >/dev/null || fail "verify --against the source"; ok
    bm=$("$PY" -c 'import json, sys; print("%s --at seq:%d" % tuple(json.load(open(sys.argv[1]))["bookmark"]))' "$C/points.json")
    # shellcheck disable=SC2086
    "$REWIND" bookmark v.img.rewind $bm >/dev/null || fail "bookmark $bm"; ok
    cp -a --sparse=always v.img.rewind "$C/mirror"
fi
status=0
KEEP_DIR="/tmp/rewind-integrity-$SEED" "$PY" "$HERE/integrity_campaign.py" campaign "$C" | tee campaign.out || status=$?
read -r word n _ fails < <(tail -n 1 campaign.out)
[ "$word" = CHECKS ] || fail "integrity_campaign.py ended early (exit $status)"
CHECKS=$((CHECKS + n))
[ "$status" = 0 ] && [ "$fails" = 0 ] || fail "$fails failures (seed $SEED)"
finish
