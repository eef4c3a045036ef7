#!/usr/bin/env bash
# The test command: installs what is missing, builds once, starts a Garage S3 server (and
# moto, for conditional writes) on 127.0.0.1, and runs everything against it:
#   1. cargo fmt --check and cargo clippy -D warnings
#   2. unit tests (fs/ on the in-memory store, meta/, store/, cache/)
#   3. end-to-end tests: real FUSE mounts of the s3bridge binary, real programs, s3fs
#   4. the Debian package: built, installed, mounted with, removed (tests/packaging/deb.sh)
#   5. conformance: pjdfstest and fsx on a mount (tests/conformance/run.sh)
# Run as root (FUSE mounts, pjdfstest's user switching). Cleans up its server and mounts
# whatever happens.
#
# Environment: FSX_OPS (default 20000), S3BRIDGE_SKIP_CONFORMANCE=1 to skip step 4.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
start=$(date +%s)
step() { echo; echo "==> $* ($(( $(date +%s) - start ))s)"; }

if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: run as root (sudo tests/run.sh): the tests mount FUSE filesystems and switch users" >&2
    exit 1
fi

step "checking dependencies"
if [ "${S3BRIDGE_SKIP_CONFORMANCE:-0}" = 1 ]; then
    tests/support/ensure-deps.sh --no-conformance
else
    tests/support/ensure-deps.sh
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/s3bridge-test.XXXXXX")
chmod 0755 "$scratch"
export S3BRIDGE_TEST_SCRATCH=$scratch/mounts
cleanup() {
    status=$?
    set +e
    # Mounts a killed test may have left behind.
    grep -F " $scratch/" /proc/mounts | awk '{print $2}' | while read -r m; do
        umount -l "$(printf '%b' "$m")" 2>/dev/null || true
    done
    tests/support/garage.sh stop "$scratch/garage"
    tests/support/moto.sh stop "$scratch/moto"
    rm -rf "$scratch"
    exit $status
}
trap cleanup EXIT INT TERM

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

step "building"
cargo build --all-targets --quiet

step "starting Garage and moto on 127.0.0.1"
eval "$(tests/support/garage.sh start "$scratch/garage")"
echo "S3 endpoint $S3BRIDGE_TEST_ENDPOINT, bucket $S3BRIDGE_TEST_BUCKET"
# moto honours conditional writes, which Garage ignores (tests/conflicts.rs).
eval "$(tests/support/moto.sh start "$scratch/moto")"
echo "moto endpoint $S3BRIDGE_MOTO_ENDPOINT"

step "unit and end-to-end tests"
cargo test --quiet --all-targets -- --test-threads=2

step "packaging: build, install, mount with and remove the Debian package"
tests/packaging/deb.sh

if [ "${S3BRIDGE_SKIP_CONFORMANCE:-0}" != 1 ]; then
    step "conformance: pjdfstest and fsx"
    tests/conformance/run.sh
fi

step "all tests passed"
