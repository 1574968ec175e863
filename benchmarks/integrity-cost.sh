#!/usr/bin/env bash
# The cost of checking the index (mirror format 3): the same release build before and after,
# side by side, alternating, on this machine. Restore of a 4 GiB volume with 10 % of its
# blocks changed by random 4 KiB writes (one record, one index entry, one cross-check per
# block) and point-in-time random 4 KiB reads (rewind-bench), verify of a mirror of RECORDS
# random records (rewind-torture), and random 4 KiB writes at QD 16 through serve
# (serve-bench's randwrite16). Prints one line per run and the medians' ratios (after ÷ before).
# usage: benchmarks/integrity-cost.sh BEFORE_DIR AFTER_DIR [WORK_DIR] [RUNS]
#   *_DIR: a `.build/release` folder holding rewind, rewind-bench and rewind-torture
#   e.g. git worktree add /tmp/old 8cad2f4 && (cd /tmp/old && swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=$1 AFTER=$2 WORK=${3:-/tmp/rewind-integrity-cost} RUNS=${4:-3}
RECORDS=${RECORDS:-200000}
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
declare -A results
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
bench_json() {  # bench_json DIR GROUP NAME-PREFIX -> the rewind figure of that row
    "$1/rewind-bench" "$WORK/b" --only "$2" --json 2>/dev/null | grep "\"name\":\"$3" | sed 's/.*"rewind":\([0-9.e+-]*\).*/\1/'
}
for run in $(seq 1 "$RUNS"); do
    for side in BEFORE AFTER; do
        dir=${!side}
        restore=$(bench_json "$dir" restore "restore ")
        reads=$(bench_json "$dir" reads "point-in-time")
        rm -rf "$WORK/v"; "$dir/rewind" init "$WORK/v" --size 1G >/dev/null
        "$dir/rewind-torture" append "$WORK/v" 7 "$RECORDS" 64 >/dev/null
        sync
        t0=$(date +%s.%N); "$dir/rewind" verify "$WORK/v" >/dev/null; t1=$(date +%s.%N)
        verify=$(echo "$t1 - $t0" | bc)
        writes=$(REWIND_BIN="$dir/rewind" JOBS=randwrite16 benchmarks/serve-bench.sh "$WORK/sb" 10 2>/dev/null \
            | awk -F'|' '/random 4 KiB write.*QD 16/ {print $3}' | grep -o '[0-9][0-9.,]*' | head -1 | tr -d ,)
        echo "run $run $side: restore ${restore}s, point reads ${reads}/s, verify of $RECORDS records ${verify}s, randwrite QD16 ${writes} IOPS"
        results[$side-restore]+="$restore " results[$side-reads]+="$reads " results[$side-verify]+="$verify " results[$side-writes]+="${writes:-0} "
    done
done
for k in restore reads verify writes; do
    b=$(echo "${results[BEFORE-$k]}" | median) a=$(echo "${results[AFTER-$k]}" | median)
    echo "$k: before $b, after $a, after/before $(echo "scale=3; $a / $b" | bc)"
done
