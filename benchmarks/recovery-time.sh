#!/usr/bin/env bash
# Start-up time of `rewind serve` after an unclean stop, against the length of the history.
# For each history of H records: a fresh 1 GiB sparse source and its mirror (`rewind init
# --from`, block size 4096); H records of rewind-torture's change stream appended through the
# library; one start and clean stop of serve, which brings the source up to the journal (not
# measured). Then serve again, WRITES random 4 KiB writes (the nbd Python module, no FLUSH),
# SETTLE seconds, SIGKILL; `sync`; and the timed start: from launching serve to its readiness
# line, with what it logged of the replay ("replayed N records: M blocks rewritten in S s").
# The unflushed work is the same at every H, so what grows with H is the start's cost per
# record of history. An older build logs only "replayed M blocks": its records come from the
# "replaying records seq:A...seq:B" line and its rewrite time from when the two lines arrived.
# Prints the machine, then a markdown table (--json: one JSON object per line).
# usage: benchmarks/recovery-time.sh [--quick] [--json] [--cold] [HISTORY...]
#   HISTORY: records of history, e.g. 1000 100000; without any, HISTORIES="..." if set, else
#            1000 100000 1000000 (--quick: 1000 100000). 1,000,000 records take several GiB under BENCH_DIR.
#   --cold: drop the page cache before the timed start (root), as after a power cut.
#   REWIND=PATH TORTURE=PATH: the binaries (default .build/release/rewind, .build/release/rewind-torture;
#            nothing is built here), e.g. an older build's for comparison.
#   FILL_WRITES=1: a history of writes only (the stream's zeroes, trims and FLUSHes become
#            one-block writes): its large zero ranges make a 1,000,000-record fill take hours.
#   BENCH_DIR (/tmp): where the temporary folder goes. WRITES (2000), SETTLE (0.5 s), BATCH (1000,
#   records per append), SEED (7), SIZE (1G), START_TIMEOUT (600 s: a start, a stop), FILL_TIMEOUT (3600 s).
# The server syncs the source every 10 s after it starts (sourceSyncedSeq), and a start
# replays only what came after that sync: the writes and SETTLE must end within those 10 s, or
# fewer records are replayed (the script says so; SETTLE=0.2 kills sooner).
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REWIND=$(realpath -m -- "${REWIND:-$ROOT/.build/release/rewind}")
TORTURE=$(realpath -m -- "${TORTURE:-$ROOT/.build/release/rewind-torture}")
WRITES=${WRITES:-2000} SETTLE=${SETTLE:-0.5} BATCH=${BATCH:-1000} SEED=${SEED:-7} SIZE=${SIZE:-1G}
START_TIMEOUT=${START_TIMEOUT:-600} FILL_TIMEOUT=${FILL_TIMEOUT:-3600}
PY=/usr/bin/python3  # the system Python, which has libnbd's `nbd` module (the first python3 on PATH may not)

fail() { echo "recovery-time: $*" >&2; exit 1; }
note() { echo "recovery-time: $*" >&2; }

JSON=0 QUICK=0 COLD=0
LIST=()
for a in "$@"; do
    case $a in
        --json) JSON=1 ;;
        --quick) QUICK=1 ;;
        --cold) COLD=1 ;;
        -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        -*) echo "recovery-time: unknown option $a (see --help)" >&2; exit 2 ;;
        *) LIST+=("$a") ;;
    esac
done
if [ ${#LIST[@]} -eq 0 ]; then
    if [ -n "${HISTORIES:-}" ]; then read -r -a LIST <<< "$HISTORIES"
    elif [ $QUICK = 1 ]; then LIST=(1000 100000)
    else LIST=(1000 100000 1000000); fi
fi
for n in "${LIST[@]}" "$WRITES" "$BATCH" "$START_TIMEOUT" "$FILL_TIMEOUT"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "recovery-time: '$n' is not a positive whole number" >&2; exit 2; }
done
[[ $SEED =~ ^[0-9]+$ ]] || { echo "recovery-time: SEED '$SEED' is not a whole number" >&2; exit 2; }
[[ $SETTLE =~ ^[0-9]*\.?[0-9]+$ ]] || { echo "recovery-time: SETTLE '$SETTLE' is not a number of seconds" >&2; exit 2; }
[ -x "$REWIND" ] || fail "no rewind binary at $REWIND (swift build -c release, or REWIND=PATH)"
[ -x "$TORTURE" ] || fail "no rewind-torture binary at $TORTURE (swift build -c release, or TORTURE=PATH)"
"$PY" -c 'import nbd' 2>/dev/null || fail "$PY lacks the nbd module (python3-libnbd: scripts/install-deps.sh test)"
if [ $COLD = 1 ] && [ ! -w /proc/sys/vm/drop_caches ]; then fail "--cold drops the page cache: run as root"; fi

mkdir -p "${BENCH_DIR:-/tmp}"
WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/rewind-recovery.XXXXXX")
# Everything started here, by pid: the server, the two readers of its output, a foreground step.
SERVER= OUT_READER= ERR_READER= CHILD= RC=
cleanup() {
    local p
    for p in $SERVER $OUT_READER $ERR_READER $CHILD; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
[ ${#WORK} -le 80 ] || fail "BENCH_DIR is too long a path for a unix socket under it: $WORK"

alive() {  # alive PID: running (not exited, not a zombie waiting to be reaped)
    local s
    { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
    s=${s##*) }
    [ "${s:0:1}" != Z ]
}
wait_exit() {  # wait_exit PID SECONDS: reap PID once it exits, its status in RC; false if it still runs after SECONDS
    local deadline=$((SECONDS + $2))
    while alive "$1"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.02
    done
    RC=0
    wait "$1" 2>/dev/null || RC=$?
}
run_bounded() {  # run_bounded SECONDS WHAT CMD...: run CMD in the background (a signal stops this script at once), at most SECONDS
    local limit=$1 what=$2
    shift 2
    "$@" &
    CHILD=$!
    wait_exit "$CHILD" "$limit" || fail "$what: still running after $limit s"
    CHILD=
    [ "$RC" = 0 ] || fail "$what failed (exit status $RC)"
}
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.3f", b - a}'; }
stamp() {  # each line of stdin, after the time it arrived (seconds since the epoch)
    local line
    while IFS= read -r line || [ -n "$line" ]; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done
}

# start_server DIR TAG: serve DIR/vol.img on DIR/nbd.sock; its stdout and stderr go, each line
# stamped with the time it arrived, to DIR/TAG.out and DIR/TAG.err. T0: when it was launched.
start_server() {
    local d=$1 tag=$2
    rm -f "$d/nbd.sock" "$d/out.fifo" "$d/err.fifo"
    mkfifo "$d/out.fifo" "$d/err.fifo"
    stamp < "$d/out.fifo" > "$d/$tag.out" &
    OUT_READER=$!
    stamp < "$d/err.fifo" > "$d/$tag.err" &
    ERR_READER=$!
    T0=$EPOCHREALTIME
    "$REWIND" serve "$d/vol.img" --mirror "$d/vol.img.rewind" --listen "unix:$d/nbd.sock" --json --log-level notice \
        > "$d/out.fifo" 2> "$d/err.fifo" &
    SERVER=$!
}
finish_readers() {  # once the server is gone: the readers have read its last lines
    wait_exit "$OUT_READER" 10 || fail "the reader of serve's stdout did not finish"
    wait_exit "$ERR_READER" 10 || fail "the reader of serve's stderr did not finish"
    OUT_READER= ERR_READER=
}
server_log() { cut -d' ' -f2- "$1" | tail -20; }
# wait_ready DIR TAG: until the server printed its readiness line ("listening"); READY: when it arrived.
wait_ready() {
    local d=$1 tag=$2 deadline=$((SECONDS + START_TIMEOUT))
    until grep -q listening "$d/$tag.out" 2>/dev/null; do
        if ! alive "$SERVER"; then
            local status=unknown
            if wait_exit "$SERVER" 10; then status=$RC; fi
            SERVER=
            finish_readers
            fail "rewind serve ($tag start) exited with status $status before it was ready; its stderr:"$'\n'"$(server_log "$d/$tag.err")"
        fi
        [ $SECONDS -lt $deadline ] || fail "rewind serve ($tag start) not ready after $START_TIMEOUT s"
        sleep 0.01
    done
    READY=$(awk '/listening/ {print $1; exit}' "$d/$tag.out")
}
stop_server() {  # stop_server DIR TAG: SIGTERM, and a clean stop (exit status 0) within START_TIMEOUT
    kill -TERM "$SERVER" 2>/dev/null || true  # gone already: wait_exit gives its status
    wait_exit "$SERVER" "$START_TIMEOUT" || fail "rewind serve ($2 start) still running $START_TIMEOUT s after SIGTERM"
    local status=$RC
    SERVER=
    finish_readers
    [ "$status" = 0 ] || fail "rewind serve ($2 start) stopped with status $status after SIGTERM; its stderr:"$'\n'"$(server_log "$1/$2.err")"
}

# The unflushed work: WRITES random 4 KiB writes at queue depth 16, the same offsets and bytes
# every time (SEED), every reply awaited, then NBD_CMD_DISC: no FLUSH, no FUA.
WRITER=$(cat <<'PY'
import random, sys
import nbd
uri, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
rng = random.Random(seed)
sent = []
for _ in range(count):
    while h.aio_in_flight() >= 16:
        h.poll(-1)
    buf = nbd.Buffer.from_bytearray(rng.randbytes(4096))
    sent.append((h.aio_pwrite(buf, rng.randrange(blocks) * 4096), buf))
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie, _ in sent:
    h.aio_command_completed(cookie)  # raises nbd.Error if that write failed
h.shutdown()
PY
)

# The machine, at the top.
NPROC=$(nproc) MEM=$(free -g | awk '/^Mem:/ {print $2}') KERNEL=$(uname -r)
read -r FSDEV FSTYPE FSAVAIL <<< "$(df -PT -BG "$WORK" | awk 'NR == 2 {print $1, $2, $5}')"
CACHE=warm; [ $COLD = 1 ] && CACHE=cold
if [ $JSON = 1 ]; then
    printf '{"nproc":%s,"memGiB":%s,"kernel":"%s","fileSystem":"%s","device":"%s","freeGiB":%s,"dir":"%s","rewind":"%s","torture":"%s","writes":%s,"settleSeconds":%s,"pageCache":"%s"}\n' \
        "$NPROC" "$MEM" "$KERNEL" "$FSTYPE" "$FSDEV" "${FSAVAIL%G}" "$WORK" "$REWIND" "$TORTURE" "$WRITES" "$SETTLE" "$CACHE"
else
    echo "machine: $NPROC CPUs, $MEM GiB RAM (free -g), kernel $KERNEL, $FSTYPE on $FSDEV ($FSAVAIL free) at $WORK"
    echo "rewind: $REWIND; rewind-torture: $TORTURE"
    echo "per history: $WRITES random 4 KiB writes, no FLUSH, SIGKILL $SETTLE s after the last reply; then sync; timed start with the page cache $CACHE"
    echo
    echo "| history records | records replayed | blocks rewritten | rewrite s | start to ready s |"
    echo "|---:|---:|---:|---:|---:|"
fi

LINE_TIMED=0
NEW_RE='replayed ([0-9]+) records: ([0-9]+) blocks rewritten in ([0-9.]+) s'
WHOLE_RE='rewrote all ([0-9]+) blocks in ([0-9.]+) s'
OLD_RE='replayed ([0-9]+) blocks'
for H in "${LIST[@]}"; do
    d=$WORK/h$H
    mkdir "$d"
    truncate -s "$SIZE" "$d/vol.img"
    run_bounded "$START_TIMEOUT" "rewind init" "$REWIND" init "$d/vol.img.rewind" --from "$d/vol.img" --block-size 4096 >/dev/null

    # The history: H records through the library, no server; the mirror's sourceSyncedSeq stays at 0.
    t=$EPOCHREALTIME
    run_bounded "$FILL_TIMEOUT" "rewind-torture append" "$TORTURE" append "$d/vol.img.rewind" "$SEED" "$H" "$BATCH" ${FILL_WRITES:+--writes} >/dev/null
    fill=$(since "$t")
    note "history $H: appended in $fill s; mirror $(du -sh "$d/vol.img.rewind" | cut -f1)"

    # Not measured: this start replays the whole history into the source, and the clean stop
    # records the source as synced through the last record.
    t=$EPOCHREALTIME
    start_server "$d" catchup
    wait_ready "$d" catchup
    stop_server "$d" catchup
    grep -q "replaying records seq:1\.\.\.seq:$H " "$d/catchup.err" \
        || note "history $H: the first start did not log replaying seq:1...seq:$H; its stderr:"$'\n'"$(server_log "$d/catchup.err")"
    note "history $H: first start (source brought up to the journal) and clean stop in $(since "$t") s"

    # The unclean stop: unflushed writes, then SIGKILL.
    start_server "$d" crash
    wait_ready "$d" crash
    t=$EPOCHREALTIME
    run_bounded 300 "the $WRITES writes" "$PY" -c "$WRITER" "nbd+unix:///?socket=$d/nbd.sock" "$WRITES" "$SEED"
    wrote=$(since "$t")
    sleep "$SETTLE"
    killed=$(since "$READY")
    kill -KILL "$SERVER" 2>/dev/null || fail "rewind serve exited before the SIGKILL"
    gone=1
    { wait_exit "$SERVER" 60 || gone=0; } 2>/dev/null  # without bash's "Killed" notice
    [ $gone = 1 ] || fail "rewind serve still running 60 s after SIGKILL"
    SERVER=
    finish_readers
    note "history $H: $WRITES writes in $wrote s; SIGKILL $killed s after the server was ready"
    sync
    if [ $COLD = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi

    # The timed start.
    start_server "$d" timed
    wait_ready "$d" timed
    ready=$(awk -v a="$T0" -v b="$READY" 'BEGIN {printf "%.3f", b - a}')
    stop_server "$d" timed

    err=$d/timed.err
    read -r first last <<< "$(sed -n 's/.*replaying records seq:\([0-9]*\)\.\.\.seq:\([0-9]*\).*/\1 \2/p' "$err" | head -1)"
    replaying_at=$(awk '/replaying records seq:/ {print $1; exit}' "$err")
    records=0 blocks=0 rewrite=0 timed_by=log
    [ -n "$first" ] && records=$((last - first + 1))
    done_line=$(grep -m1 -E "$NEW_RE|$WHOLE_RE|$OLD_RE" "$err" || true)
    if [[ $done_line =~ $NEW_RE ]]; then
        records=${BASH_REMATCH[1]} blocks=${BASH_REMATCH[2]} rewrite=${BASH_REMATCH[3]}
    elif [[ $done_line =~ $WHOLE_RE ]]; then
        blocks=${BASH_REMATCH[1]} rewrite=${BASH_REMATCH[2]}
        note "history $H: the records to replay were already folded into the base: the whole volume was rewritten"
    elif [[ $done_line =~ $OLD_RE ]]; then
        # An older build: no time in the line; from when its two lines arrived.
        blocks=${BASH_REMATCH[1]} timed_by=lines LINE_TIMED=1
        rewrite=$(awk -v a="$replaying_at" -v b="${done_line%% *}" 'BEGIN {printf "%.3f", b - a}')
    else
        timed_by=none
        note "history $H: the start replayed nothing (no 'replayed' line): the source was synced through the last record before the SIGKILL"
    fi
    if [ "$records" -lt "$WRITES" ]; then
        note "history $H: replayed $records records, not the $WRITES written: the server synced the source (every 10 s) before the SIGKILL, $killed s after it was ready; SETTLE=0.2 kills sooner"
    elif [ "$records" -gt "$WRITES" ]; then
        note "history $H: replayed $records records, more than the $WRITES written"
    elif [ -n "$first" ] && [ "$first" != $((H + 1)) ]; then
        note "history $H: the replay began at seq:$first, not seq:$((H + 1))"
    fi

    if [ $JSON = 1 ]; then
        printf '{"history":%s,"writes":%s,"recordsReplayed":%s,"firstReplayedSeq":%s,"blocksRewritten":%s,"rewriteSeconds":%s,"rewriteTimedBy":"%s","startToReadySeconds":%s,"killedAfterReadySeconds":%s,"fillSeconds":%s}\n' \
            "$H" "$WRITES" "$records" "${first:-null}" "$blocks" "$rewrite" "$timed_by" "$ready" "$killed" "$fill"
    else
        mark=; [ $timed_by = lines ] && mark=" *"
        echo "| $H | $records | $blocks | $rewrite$mark | $ready |"
    fi
    rm -rf "$d"  # the next history's mirror needs the room
done
if [ $JSON = 0 ] && [ $LINE_TIMED = 1 ]; then
    echo
    echo "\* an older build, which logs no time: from the arrival of its \"replaying records\" line to its \"replayed N blocks\" line"
fi
