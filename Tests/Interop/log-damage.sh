#!/usr/bin/env bash
# A payload log file deleted or cut short behind rewind's back: `status` reports it (and
# exits 1), `restore` of a point that needs the lost payload fails naming the record, and
# `serve` refuses to append after the loss unless started with --accept-damage.
. "$(dirname "$0")/functions.sh"
requires qemu-io
cd "$T"

start_server v.img --size 4M
for i in 0 1 2 3; do qemu-io -f raw "$UNIX_URI" -c "write -P $((0x40 + i)) $((i * 65536)) 64k" -c flush >/dev/null; done
stop_server
"$REWIND" status v.img.rewind >/dev/null || fail "status of a healthy mirror"; ok
end=$("$REWIND" status v.img.rewind --json | sed 's/.*"newestSeq":\([0-9]*\).*/\1/')
"$REWIND" restore v.img.rewind --at latest --to whole.img >/dev/null

# qemu-io writes (FUA), then flushes twice (its flush, and at close): seq 1, 4, 7, 10 are
# the 64 KiB writes, and byte 100000 of the log lies inside seq 4's payload
[ "$end" = 12 ] || fail "expected 12 records, found $end"; ok
[ "$("$REWIND" timeline v.img.rewind --since seq:4 --until seq:4 --json | sed 's/.*"kind":"\([a-z]*\)".*"offset":\([0-9]*\).*/\1 \2/')" = "write 65536" ] \
    || fail "seq:4 is not the second write"; ok
log=v.img.rewind/log/0000000000000000.log
truncate -s 100000 "$log"
# the journal needs the log up to its end (logEnd), shorter than the file (which holds zeros
# prewritten ahead): read it from the message, then check the whole line
err=$("$REWIND" status v.img.rewind 2>&1 >/dev/null) && fail "status of a cut log passed"
need=$(printf '%s\n' "$err" | sed -n 's/.*the journal needs \([0-9]*\):.*/\1/p')
[ -n "$need" ] && [ "$need" -gt 131072 ] || fail "status said [$err]"; ok
first=$("$REWIND" timeline v.img.rewind --json | grep -c '"kind":"write"')
expect_error 1 "rewind: error: the journal's log is damaged: log/0000000000000000.log is 100000 bytes, the journal needs $need: the payload of seq:4 and later records in it is gone" "$REWIND" status v.img.rewind
out=$("$REWIND" status v.img.rewind 2>/dev/null || true)
printf '%s\n' "$out" | grep -qx "log          DAMAGED: log/0000000000000000.log is 100000 bytes, the journal needs $need: the payload of seq:4 and later records in it is gone" || fail "status text does not show the damage: $out"; ok
js=$("$REWIND" status v.img.rewind --json 2>/dev/null || true)
case "$js" in *'"logDamage":["log/0000000000000000.log is 100000 bytes'*) ok ;; *) fail "status --json has no logDamage: $js" ;; esac
[ "$first" -ge 4 ] || fail "expected 4 writes in the timeline"; ok
# a point before the loss still restores; one after fails naming a record
"$REWIND" restore v.img.rewind --at seq:3 --to one.img >/dev/null || fail "restore of seq:3 (payload intact)"; ok
err=$("$REWIND" restore v.img.rewind --at latest --to late.img 2>&1 >/dev/null) && fail "restore of a point whose payload is gone succeeded"
case "$err" in "rewind: error: record seq:"*" is corrupt: block "*": its payload (log position "*") is missing from log/") ok ;; *) fail "restore said [$err]" ;; esac
[ ! -e late.img ] || fail "a failed restore left its image"; ok

# serve refuses to journal after the loss, and says how to go on
expect_error 1 "rewind: error: mirror v.img.rewind is damaged: log/0000000000000000.log is 100000 bytes, the journal needs $need: the payload of seq:4 and later records in it is gone; \`rewind verify v.img.rewind\` shows what is lost; start with --accept-damage to serve anyway (points that need the lost payload stay unreadable)" "$REWIND" serve v.img --listen "unix:$T/refused.sock"
[ ! -e "$T/refused.sock" ] || fail "a refused serve left its socket"; ok
# --accept-damage serves, and new writes are journalled and readable
start_server v.img --accept-damage
qemu-io -f raw "$UNIX_URI" -c "write -P 0x77 1M 4k" -c flush >/dev/null
stop_server
grep -q "serving anyway (--accept-damage)" "$T/serve.log" || fail "serve --accept-damage did not log the damage"; ok
new=$("$REWIND" status v.img.rewind --json 2>/dev/null | sed 's/.*"newestSeq":\([0-9]*\).*/\1/' || true)
[ "$new" -gt "$end" ] || fail "no new records after --accept-damage"; ok
"$REWIND" restore v.img.rewind --at seq:3 --to one-again.img >/dev/null && cmp one.img one-again.img || fail "seq:3 changed"; ok
# writing past the cut left a hole where the payload was: the loss is still reported
err=$("$REWIND" status v.img.rewind 2>&1 >/dev/null) && fail "status after --accept-damage passed"
case "$err" in "rewind: error: the journal's log is damaged: log/0000000000000000.log has a hole at byte "*" (its payload was lost): the payload of seq:4 and later records in it is gone") ok ;; *) fail "status said [$err]" ;; esac

# a deleted log file
rm -f "$log"
expect_error 1 "rewind: error: the journal's log is damaged: log/0000000000000000.log is missing: the payload of seq:1 and later records in it is gone" "$REWIND" status v.img.rewind
finish
