#!/usr/bin/env bash
# The daemon around the protocol: config file, metrics endpoint, retention while serving,
# SIGTERM draining, the connection limit, the handshake deadline, one owner per mirror, and
# start-up errors (one clear line, non-zero exit).
. "$(dirname "$0")/functions.sh"
requires nbdsh
cd "$T"

# --- start-up errors ---
expect_error 1 "rewind: error: missing.img does not exist (give --size to create it)" "$REWIND" serve missing.img
expect_error 64 "Error: invalid address \"nonsense:port\": use HOST:PORT or unix:PATH" "$REWIND" serve x.img --size 1M --listen nonsense:port
expect_error 64 "Error: invalid log level \"loud\"" "$REWIND" serve x.img --size 1M --log-level loud
printf 'listen = "127.0.0.1:0"\nbogus = 1\n' > bad.conf
expect_error 1 "rewind: error: bad.conf:2: unknown key \"bogus\" (known: accept-damage, ack, block-size, description, export, home, keep-age, keep-size, listen, log-level, max-connections, metrics, mirror, on-full, peer-keep-size, peer-min-free, replicate-to, retention-interval, size, source, sync-timeout)" "$REWIND" serve x.img --config bad.conf
[ ! -e missing.img ] && [ ! -e missing.img.rewind ] || fail "a refused start created files"; ok

# --- config file + metrics + retention while serving ---
cat > serve.conf <<CONF
# rewind serve configuration (TOML): same keys as the options
source = "cfg.img"
size = "16M"
export = "vol0"
keep-size = "256K"
retention-interval = "1s"
metrics = "127.0.0.1:0"
max-connections = 3
CONF
SOCK="$T/cfg.sock"
"$REWIND" serve --config serve.conf --listen "unix:$SOCK" --json > cfg.json 2>cfg.log &
SERVER_PID=$!; PIDS+=("$SERVER_PID")
for _ in $(seq 1 100); do [ -s cfg.json ] && break; sleep 0.1; done
grep -q '"export":"vol0"' cfg.json || fail "config export name not used: $(cat cfg.json)"; ok
METRICS=$(sed 's/.*"metrics":"\([^"]*\)".*/\1/' cfg.json)
U="nbd+unix:///vol0?socket=$SOCK"
nbdsh -u "$U" -c '
for i in range(64):
    h.pwrite(bytes([i]) * 65536, (i % 32) * 65536)
h.flush()
' || fail "writes through the config-file server"; ok
sleep 2.5  # two retention passes
m=$(curl -s "http://$METRICS/metrics")
echo "$m" | grep -q '^rewind_nbd_requests_total{command="write"} 64$' || fail "metrics: write count"; ok
echo "$m" | grep -q '^rewind_nbd_bytes_total{command="write"} 4194304$' || fail "metrics: write bytes"; ok
echo "$m" | grep -q '^rewind_journal_records_total 65$' || fail "metrics: journal records"; ok
echo "$m" | grep -q 'rewind_nbd_request_duration_seconds_bucket{command="write"' || fail "metrics: latency histogram"; ok
echo "$m" | grep -q '^rewind_flush_duration_seconds_count 1$' || fail "metrics: flush latency"; ok
echo "$m" | grep -Eq '^rewind_compactions_total [1-9]' || fail "metrics: no compaction ran"; ok
[ "$("$REWIND" status cfg.img.rewind --json | sed 's/.*"journalPayloadBytes":\([0-9]*\).*/\1/')" -le 262144 ] || fail "retention did not hold keep-size"; ok
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$METRICS/other")" = 404 ] || fail "metrics 404"; ok

# --- one owner per mirror ---
expect_error 1 "rewind: error: cfg.img.rewind/owner.lock is busy: another rewind process (serve, receive or rollback) owns this mirror" "$REWIND" serve cfg.img --listen 127.0.0.1:0
expect_error 1 "rewind: error: cfg.img.rewind/owner.lock is busy: another rewind process (serve, receive or rollback) owns this mirror" "$REWIND" rollback cfg.img.rewind --at latest --yes
# a bookmark works beside the live server
"$REWIND" bookmark cfg.img.rewind live >/dev/null || fail "bookmark beside serve"; ok

# --- connection limit (3): the 4th is closed at once, the first 3 keep working ---
"$PY" - "$SOCK" <<'PYEOF' || fail "connection limit"
import socket, sys, time
socks = []
for i in range(3):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); assert len(s.recv(18)) == 18; socks.append(s)
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
assert s.recv(18) == b"", "4th connection was served"
PYEOF
ok

# --- handshake deadline: an idle client is dropped after 10 s ---
"$PY" - "$SOCK" <<'PYEOF' || fail "handshake deadline"
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.settimeout(15); s.connect(sys.argv[1]); s.recv(18)
t = time.time()
assert s.recv(1) == b"" and 9 <= time.time() - t <= 13, time.time() - t
PYEOF
ok

# --- SIGTERM drains in-flight requests: a client mid-stream gets every reply it waits for ---
nbdsh -u "$U" -c '
import os, signal
cookies = [h.aio_pwrite(bytes([7]) * 1048576, i * 1048576) for i in range(8)]
os.kill('$SERVER_PID', signal.SIGTERM)
while cookies:
    h.poll(-1)
    cookies = [c for c in cookies if not h.aio_command_completed(c)]
' 2>/dev/null || true
wait "$SERVER_PID" || fail "serve did not exit 0 on SIGTERM"; ok
grep -q "stopped cleanly" cfg.log || fail "no clean-stop message"; ok
"$REWIND" verify cfg.img.rewind --against cfg.img >/dev/null || fail "mirror != source after SIGTERM"; ok
"$REWIND" status cfg.img.rewind --json | grep -q '"bookmarks":{"live":' || fail "bookmark lost"; ok
finish
