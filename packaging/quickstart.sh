#!/usr/bin/env bash
# From a fresh Debian machine to a mounted bucket in one command.
#
#   sudo packaging/quickstart.sh
#       No S3 at hand: builds s3bridge, starts a local Garage S3 server (data under
#       /var/lib/s3bridge-quickstart) and mounts its bucket "s3bridge" at /mnt/s3bridge.
#
#   sudo packaging/quickstart.sh BUCKET[:PREFIX] MOUNTPOINT [s3bridge mount options...]
#       Your own bucket: builds s3bridge and mounts it, with credentials and region from the
#       usual AWS places (environment, ~/.aws, instance role). For S3-compatible servers add
#       --endpoint-url URL.
#
# s3bridge is installed to /usr/local/bin. Unmount with `s3bridge unmount MOUNTPOINT`.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
say() { echo "quickstart: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "run as root (sudo $0 ...): it installs packages and mounts under /mnt"
    exit 1
fi

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { say "cargo is missing: install Rust first (https://rustup.rs)"; exit 1; }

say "building s3bridge (release; the first build takes a few minutes)"
(cd "$root" && cargo build --release --quiet)
install -m 0755 "${CARGO_TARGET_DIR:-$root/target}/release/s3bridge" /usr/local/bin/s3bridge

if [ $# -gt 0 ]; then
    [ $# -ge 2 ] || { say "usage: $0 [BUCKET[:PREFIX] MOUNTPOINT [options]]"; exit 2; }
    mkdir -p "$2"
    /usr/local/bin/s3bridge mount "$@"
    say "mounted $1 at $2"
    exit 0
fi

if ! command -v garage >/dev/null; then
    say "installing the Garage S3 server from crates.io (about 11 minutes on 2 cores, once)"
    cargo install --quiet --locked garage --version 2.5.0
fi
state=/var/lib/s3bridge-quickstart
mkdir -p "$state"
chmod 0700 "$state"
GARAGE_BUCKET=s3bridge "$root/tests/support/garage.sh" start "$state/garage" > "$state/server.env"
# shellcheck disable=SC1091
. "$state/server.env"
mnt=/mnt/s3bridge
mkdir -p "$mnt"
if grep -q " $mnt " /proc/mounts; then
    say "$mnt is already mounted"
else
    /usr/local/bin/s3bridge mount "$S3BRIDGE_TEST_BUCKET" "$mnt" --endpoint-url "$S3BRIDGE_TEST_ENDPOINT"
fi
cat <<EOF

  A local Garage bucket "$S3BRIDGE_TEST_BUCKET" is mounted at $mnt.

    echo hello > $mnt/a.txt            # an object "a.txt" in the bucket
    ls -l $mnt

  The server's credentials and endpoint:   . $state/server.env
  Use the bucket with any S3 client, e.g.  aws --endpoint-url \$S3BRIDGE_TEST_ENDPOINT s3 ls s3://$S3BRIDGE_TEST_BUCKET/
  Unmount:                                 s3bridge unmount $mnt
  Stop the server:                         $root/tests/support/garage.sh stop $state/garage

EOF
