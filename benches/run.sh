#!/usr/bin/env bash
# The benchmark command: s3bridge against Debian's s3fs (use_cache) and rclone mount
# (--vfs-cache-mode writes), raw S3 and the local disk, on one Garage server on 127.0.0.1.
#
#   sudo benches/run.sh [--size-mib 1024] [--latency-ms 5] [--memory-mib 4096] [--only s3bridge,s3fs]
#
# Installs what is missing (fio, s3fs, rclone, Garage), builds s3bridge and the raw client
# in release mode once, runs benches/compare.py and writes benches/results/latest.{md,json,svg}.
# `--s3bridge PATH` (passed on to compare.py after the built one) measures another build,
# for an A/B of two commits in one sitting.
# Root: it mounts, drops the page cache between runs and adds latency on lo with tc netem
# (or, without sch_netem, through benches/latency_proxy.rs).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" != 0 ]; then
    echo "benches/run.sh: run as root (mounts, drop_caches, tc netem)" >&2
    exit 1
fi

tests/support/ensure-deps.sh --no-conformance
missing=()
for tool in fio rclone tc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    pkgs=("${missing[@]/tc/iproute2}")
    echo "bench: installing ${pkgs[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

echo "bench: building s3bridge, the raw S3 client and the latency proxy (release)" >&2
cargo build --release --quiet --bin s3bridge
bench_binary() {
    cargo bench --no-run --bench "$1" --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
raw=$(bench_binary raw_s3)
proxy=$(bench_binary latency_proxy)

work=$(mktemp -d "${TMPDIR:-/tmp}/s3bridge-bench.XXXXXX")
cleanup() {
    status=$?
    set +e
    tc qdisc del dev lo root 2>/dev/null
    grep -F " $work/" /proc/mounts | awk '{print $2}' | while read -r m; do
        umount -l "$(printf '%b' "$m")" 2>/dev/null
    done
    tests/support/garage.sh stop "$work/garage"
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT INT TERM
eval "$(tests/support/garage.sh start "$work/garage")"
python3 benches/compare.py --work "$work" --s3bridge "$target_dir/release/s3bridge" \
    --raw "$raw" --proxy "$proxy" "$@"
