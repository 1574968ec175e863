#!/usr/bin/env bash
# rewind tap in front of qemu-nbd, nbdkit (file plugin) and nbd-server: serve-clients.sh's
# checks with every real client run through the tap (TAP_UPSTREAM: functions.sh's
# start_server). Afterwards the upstream's image equals the mirror's latest point, and
# restoring sampled seqs equals the client's model. Then serve-bad-input.sh's malformed
# requests from hosts, through a tap in front of nbdkit.
set -euo pipefail
here=$(dirname "$0")
for upstream in qemu-nbd nbdkit nbd-server; do
    command -v "$upstream" >/dev/null 2>&1 || { echo "SKIP: $upstream not installed" >&2; exit 77; }
    echo "--- upstream: $upstream"
    TAP_UPSTREAM=$upstream bash "$here/serve-clients.sh"
done
echo "--- bad input from hosts, upstream: nbdkit"
TAP_UPSTREAM=nbdkit bash "$here/serve-bad-input.sh"
