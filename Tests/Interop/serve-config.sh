#!/usr/bin/env bash
# The serve config file is TOML. A CRLF file, `# comments` after values and every key work as
# TOML says, and the command line wins over the file. A duplicate key, an unknown key (or a
# [table]), a bad duration or size, a value of the wrong type and a syntax error are refused
# with FILE:LINE (the parser's errors with FILE:LINE:COLUMN), one line on stderr and exit
# status 1, before anything is created: after each refusal the directory is as it was.
. "$(dirname "$0")/functions.sh"
requires nbdinfo
cd "$T"
MiB=1048576
KNOWN="accept-damage, ack, block-size, description, export, home, keep-age, keep-size, listen, log-level, max-connections, metrics, mirror, on-full, peer-keep-size, peer-min-free, replicate-to, retention-interval, size, source, sync-timeout"

# start_config_server FILE [serve options...] — `rewind serve --config FILE --json`, listening
# where the file says; sets SERVER_PID and SERVER_JSON (its --json line). Waits until it listens.
start_config_server() {
    local file=$1; shift
    SERVER_JSON="$T/config-$RANDOM.json"
    "$REWIND" serve --config "$file" --json "$@" >"$SERVER_JSON" 2>>"$T/serve.log" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 1 300); do
        [ -s "$SERVER_JSON" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$T/serve.log" >&2; fail "rewind serve --config $file exited early"; }
        sleep 0.1
    done
    fail "rewind serve --config $file did not start listening"
}

# json_has TEXT — the server's --json line holds TEXT.
json_has() { grep -qF -- "$1" "$SERVER_JSON" || fail "--json line lacks [$1]: $(cat "$SERVER_JSON")"; ok; }

# refused STATUS "stderr line" ARGS... — `rewind serve ARGS...` exits STATUS with that first
# line on stderr, and leaves the directory as it was (no source, no mirror, nothing else).
refused() {
    local status=$1 line=$2; shift 2
    local before; before=$(ls -A)
    expect_error "$status" "$line" "$REWIND" serve "$@"
    [ "$(ls -A)" = "$before" ] || fail "refused serve $* changed the directory: [$before] -> [$(ls -A)]"; ok
}

# --- a CRLF file works: no value keeps the carriage return ---
printf '# vol0, written on Windows\r\nsource = "crlf.img"\r\nsize = "1M"   # created sparse\r\nlisten = ["unix:%s"]\r\nexport = "crlf"\r\nkeep-age = "7d"\r\n' \
    "$T/crlf.sock" > crlf.toml
start_config_server crlf.toml
json_has "\"listening\":[\"unix:$T/crlf.sock\"]"
json_has '"export":"crlf"'
[ "$(nbdinfo --size "nbd+unix:///crlf?socket=$T/crlf.sock")" = $MiB ] || fail "nbdinfo through the CRLF-configured server"; ok
stop_server
[ -f crlf.img ] && [ -d crlf.img.rewind ] || fail "CRLF config: no crlf.img or crlf.img.rewind: $(ls -A)"; ok
[[ "$(ls -A)" != *$'\r'* ]] || fail "CRLF config: a file name holds a carriage return: $(ls -A | od -c)"; ok

# --- a `# comment` after a value is a comment, not part of the value (no file named after it) ---
cat > comment.toml <<CONF
source = "comment.img"      # the volume
mirror = "comment.mirror"   # not the default beside it
size = $MiB                 # bytes, as an integer
listen = "unix:$T/comment.sock"   # one address, as a string
log-level = "info"# no blank before the comment
CONF
start_config_server comment.toml
json_has "\"listening\":[\"unix:$T/comment.sock\"]"
json_has '"export":"comment.img"'
[ "$(nbdinfo --size "nbd+unix:///comment.img?socket=$T/comment.sock")" = $MiB ] || fail "nbdinfo through the commented config's server"; ok
stop_server
[ -f comment.img ] && [ -d comment.mirror ] || fail "comment config: no comment.img or comment.mirror: $(ls -A)"; ok
[ ! -e comment.img.rewind ] || fail "comment config: the mirror went to the default place"; ok
[[ "$(ls -A)" != *'#'* ]] || fail "a file is named after a comment: $(ls -A)"; ok

# --- every key; the command line wins over the file ---
cat > all.toml <<CONF
source = "all.img"
mirror = "all.mirror"
size = "2M"
listen = ["unix:$T/all.sock", "127.0.0.1:0"]
export = "all"
description = "every key"
block-size = 4096
keep-age = "7d"
keep-size = "10G"
metrics = "127.0.0.1:0"
log-level = "warning"
max-connections = 8
retention-interval = "10s"
accept-damage = false
CONF
start_config_server all.toml --export cli --size 1M
json_has '"export":"cli"'
json_has "\"size\":$MiB"
json_has "\"listening\":[\"unix:$T/all.sock\",\"127.0.0.1:"
json_has '"metrics":"127.0.0.1:'
json_has '"mirror":"all.mirror"'
info=$(nbdinfo "nbd+unix:///cli?socket=$T/all.sock") || fail "nbdinfo through the every-key server"
[[ $info == *'description: every key'* ]] || fail "the file's description not served: $info"; ok
stop_server
[ "$(stat -c %s all.img)" = $MiB ] || fail "--size on the command line did not win over the file"; ok

# --- refusals: the file's place, one line, exit 1, nothing created ---
cat > dup.toml <<'CONF'
source = "dup.img"
size = "1M"
keep-age = "1d"
keep-age = "7d"
CONF
# The format before TOML let listen repeat; TOML does not.
cat > dup-listen.toml <<'CONF'
listen = "127.0.0.1:0"
listen = "unix:dup.sock"
source = "dup.img"
size = "1M"
CONF
cat > unknown.toml <<'CONF'
source = "unknown.img"
size = "1M"
bogus = 1
CONF
cat > table.toml <<'CONF'
source = "table.img"
size = "1M"

[serve]
listen = "127.0.0.1:0"
CONF
cat > duration.toml <<'CONF'
source = "duration.img"
size = "1M"
keep-age = "5x"
CONF
cat > size.toml <<'CONF'
source = "size.img"
size = "12Q"
block-size = 1000
CONF
cat > syntax.toml <<'CONF'
# the format before TOML: unquoted values
source = syntax.img
size = 1M
CONF
cat > type-listen.toml <<'CONF'
source = "type.img"
size = "1M"
listen = 10809
CONF
cat > type-array.toml <<'CONF'
source = "type.img"
size = "1M"
listen = ["127.0.0.1:0", 10809]
CONF
cat > type-bool.toml <<'CONF'
source = "type.img"
size = "1M"
accept-damage = "yes"
CONF
cat > type-int.toml <<'CONF'
source = "type.img"
size = "1M"
block-size = "4K"
CONF
cat > bad-values.toml <<'CONF'
source = "bad.img"
size = "1M"
log-level = "loud"
CONF
cat > bad-address.toml <<'CONF'
source = "bad.img"
size = "1M"
listen = ["127.0.0.1:0", "nonsense:port"]
CONF
cat > nul.toml <<'CONF'
source = "nul\u0000.img"
size = "1M"
CONF
cat > nul-key.toml <<'CONF'
source = "nul.img"
size = "1M"
"nul\u0000" = 1
CONF
cat > on-full.toml <<'CONF'
source = "bad.img"
size = "1M"
on-full = "panic"
CONF
cat > ack.toml <<'CONF'
source = "ack.img"
size = "1M"
ack = "eventually"
CONF
cat > peer.toml <<'CONF'
source = "peer.img"
size = "1M"
replicate-to = ["nobody@host:7310"]
CONF
printf 'source = "\xff.img"\nsize = "1M"\n' > latin1.toml
printf 'size = "1M"\n' > nosource.toml

refused 1 "rewind: error: dup.toml:4:12: Error while parsing key-value pair: cannot redefine existing string 'keep-age'" --config dup.toml
refused 1 "rewind: error: dup-listen.toml:2:10: Error while parsing key-value pair: cannot redefine existing string 'listen'" --config dup-listen.toml
refused 1 "rewind: error: unknown.toml:3: unknown key \"bogus\" (known: $KNOWN)" --config unknown.toml
refused 1 "rewind: error: table.toml:4: unknown key \"serve\" (known: $KNOWN)" --config table.toml
refused 1 "rewind: error: duration.toml:3: keep-age: invalid duration \"5x\": use a number with s, m, h or d (e.g. 15m, 7d)" --config duration.toml
# A bad value in the file is refused even where the command line overrides it.
refused 1 "rewind: error: duration.toml:3: keep-age: invalid duration \"5x\": use a number with s, m, h or d (e.g. 15m, 7d)" --config duration.toml --keep-age 1d
# The first bad line in the file is reported (size on line 2, not block-size on line 3).
refused 1 "rewind: error: size.toml:2: size: invalid size \"12Q\": use bytes or a number with K, M, G or T (e.g. 512M)" --config size.toml
refused 1 "rewind: error: syntax.toml:2:10: Error while parsing value: could not determine value type" --config syntax.toml
refused 1 "rewind: error: type-listen.toml:3: listen: expected a string or an array of strings" --config type-listen.toml
refused 1 "rewind: error: type-array.toml:3: listen: expected a string or an array of strings" --config type-array.toml
refused 1 "rewind: error: type-bool.toml:3: accept-damage: expected true or false" --config type-bool.toml
refused 1 "rewind: error: type-int.toml:3: block-size: expected an integer" --config type-int.toml
refused 1 "rewind: error: bad-values.toml:3: log-level: invalid log level \"loud\"" --config bad-values.toml
refused 1 "rewind: error: on-full.toml:3: on-full: invalid policy \"panic\" (use compact or fail)" --config on-full.toml
refused 1 "rewind: error: ack.toml:3: ack: invalid value \"eventually\" (use async or sync)" --config ack.toml
refused 1 "rewind: error: peer.toml:3: replicate-to: invalid peer \"nobody@host:7310\": its ID must be the 64 hex digits \`rewind id\` prints on that unit" --config peer.toml
refused 1 "rewind: error: bad-address.toml:3: listen: invalid address \"nonsense:port\": use HOST:PORT or unix:PATH" --config bad-address.toml
refused 1 'rewind: error: nul.toml:1: a string holds a NUL character (\u0000)' --config nul.toml
refused 1 'rewind: error: nul-key.toml:3: a string holds a NUL character (\u0000)' --config nul-key.toml
refused 1 "rewind: error: latin1.toml:1:11: not UTF-8 text" --config latin1.toml
refused 1 "rewind: error: cannot read config file missing.toml: No such file or directory" --config missing.toml
refused 1 "rewind: error: config file /dev/zero is larger than 1 MiB" --config /dev/zero
refused 64 "Error: give SOURCE (or \`source = \"...\"\` in the config file)" --config nosource.toml
# The command line's own values are checked before anything is created too.
refused 64 "Error: invalid block size 0: use a power of two from 512 to 1M (e.g. 4096)" cli.img --size 1M --block-size 0
refused 64 "Error: invalid max-connections 0: use a positive number" cli.img --size 1M --max-connections 0
refused 64 "Error: invalid --on-full \"panic\": use compact or fail" cli.img --size 1M --on-full panic
for f in dup unknown table duration size syntax type bad nul cli ack peer; do
    [ ! -e $f.img ] && [ ! -e $f.img.rewind ] || fail "a refused serve created $f.img or its mirror"; ok
done
finish
