#!/usr/bin/env bash
# The soak: mixed load (creates, renames, deletes, reads back) on a write-back mount while
# the daemon is killed with SIGKILL at random moments and mounted again, for MINUTES
# (default 30); then every acknowledged file is checked in the bucket byte for byte.
# Prints the operations done and the bytes verified. Run as root:
#
#   tests/soak.sh [MINUTES]
#
# S3BRIDGE_CRASH_SEED=N replays a run (its seed is printed first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
export S3BRIDGE_SOAK_MINUTES=${1:-30}
tests/support/ensure-deps.sh --no-conformance
scratch=$(mktemp -d "${TMPDIR:-/tmp}/s3bridge-soak.XXXXXX")
chmod 0755 "$scratch"
export S3BRIDGE_TEST_SCRATCH=$scratch/mounts
cleanup() {
    grep -F " $scratch/" /proc/mounts | awk '{print $2}' | while read -r m; do
        umount -l "$(printf '%b' "$m")" 2>/dev/null || true
    done
    tests/support/garage.sh stop "$scratch/garage"
    rm -rf "$scratch"
}
trap cleanup EXIT INT TERM
cargo build --quiet --all-targets
eval "$(tests/support/garage.sh start "$scratch/garage")"
echo "soak: $S3BRIDGE_SOAK_MINUTES minutes against Garage at $S3BRIDGE_TEST_ENDPOINT"
cargo test --quiet --test durability soak_mixed_load_with_random_kills -- --ignored --nocapture
