#!/usr/bin/env bash
# Catch-up over the replication link: 1 GiB written on A (fio, sequential 1 MiB) while its
# peer is down, then `rewind receive` B is started (seeded, then the records): time until B
# holds A's newest seq, MiB/s, and each side's CPU (ticks of 10 ms, /proc/PID/stat).
# Release build. usage: benchmarks/replication-catchup.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/rewind-catchup}
. benchmarks/common.sh
bench_setup "$DIR"
R=$REWIND; cd "$DIR"
trap 'kill ${AP:-} ${BP:-} 2>/dev/null; wait 2>/dev/null; cd /; rm -rf "$DIR"' EXIT
A=$("$R" id --home ha); B=$("$R" id --home hb)
PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
truncate -s 1G a.img
"$R" serve a.img --listen "unix:$DIR/a.sock" --replicate-to "$B@127.0.0.1:$PORT" --home ha --log-level warning 2>a.log >/dev/null & AP=$!
for _ in $(seq 100); do [ -S a.sock ] && break; sleep 0.1; done
fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/a.sock" --rw=write --bs=1M --iodepth=8 --size=1G --output-format=terse >/dev/null 2>&1
sync; sleep 1
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
newest() { "$R" status "$1" --json 2>/dev/null | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["newestSeq"])' 2>/dev/null || echo 0; }
a0=$(cpu $AP); t0=$(date +%s.%N)
"$R" receive b.rewind --listen "127.0.0.1:$PORT" --peer-id "$A" --home hb --log-level warning 2>b.log >/dev/null & BP=$!
target=$(newest a.img.rewind)
for _ in $(seq 6000); do [ "$(newest b.rewind)" -ge "$target" ] && break; sleep 0.05; done
t1=$(date +%s.%N); a1=$(cpu $AP); b1=$(cpu $BP)
/usr/bin/python3 -c "print('catch-up of seq:%s (1 GiB): %.2f s, %.0f MiB/s; CPU: sender %.2f ms/MiB, receiver %.2f ms/MiB' % ($target, $t1 - $t0, 1024 / ($t1 - $t0), ($a1 - $a0) * 10 / 1024, $b1 * 10 / 1024))"
