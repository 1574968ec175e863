#!/usr/bin/env bash
# Install the Debian packages rewind builds and tests with, where missing.
# usage: scripts/install-deps.sh [build|test]
set -euo pipefail
want=(liblmdb-dev libxxhash-dev pkg-config)
if [ "${1:-build}" = test ]; then
    # Real NBD clients and peers for the interop tests and benchmarks.
    want+=(qemu-utils libnbd-bin python3-libnbd nbdkit nbd-server fio rsync lmdb-utils curl e2fsprogs time)
    # openssl: the TLS upstream test makes its own CA and server certificate.
    want+=(openssl)
    # A Linux guest for the ext4 crash-consistency test (about 1 GiB).
    want+=(libguestfs-tools linux-image-amd64)
fi
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
