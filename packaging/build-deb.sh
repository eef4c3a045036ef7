#!/usr/bin/env bash
# Builds the Debian package: target/debian/s3bridge_VERSION_ARCH.deb (its path is printed
# last). Installs cargo-deb if missing. Run from anywhere:
#
#   packaging/build-deb.sh
#   sudo dpkg -i target/debian/s3bridge_*.deb
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-deb >/dev/null || cargo install --quiet --locked cargo-deb
target=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --quiet --bin s3bridge
# cargo-deb reads assets relative to the package: the generated ones go to packaging/generated/ (not committed).
rm -rf packaging/generated
"$target/release/s3bridge" generate packaging/generated
cargo deb --no-build --quiet --no-strip

