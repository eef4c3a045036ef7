#!/usr/bin/env bash
# Conformance: pjdfstest (POSIX semantics, group by group) and fsx (data integrity under
# random operations) on a real s3bridge mount of the test server.
#
# Needs the S3BRIDGE_TEST_* / AWS_* variables of tests/support/garage.sh and a built
# s3bridge (S3BRIDGE_BIN, default target/debug/s3bridge). Prints a summary table and writes
# it to target/conformance-summary.md. Fails on any failure not listed, with its reason, in
# pjdfstest.toml's expected_failures.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${S3BRIDGE_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/s3bridge}
fsx_ops=${FSX_OPS:-20000}
export PATH="$HOME/.cargo/bin:$PATH"
# pjdfstest's EROFS cases remount read-only and back: mount(8) hands that to mount.fuse3,
# which runs `s3bridge` from a cleared environment's PATH. A link for the run where it looks
# first, unless an s3bridge is installed there.
helper_link=
if [ ! -e /usr/local/sbin/s3bridge ]; then
    ln -s "$bin" /usr/local/sbin/s3bridge
    helper_link=/usr/local/sbin/s3bridge
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/s3bridge-conformance.XXXXXX")
chmod 0755 "$work"
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() {
    cd /
    if grep -q " $mnt " /proc/mounts; then
        "$bin" unmount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    fi
    rm -rf "$work"
    [ -z "$helper_link" ] || rm -f "$helper_link"
}
trap cleanup EXIT

"$bin" mount "$S3BRIDGE_TEST_BUCKET:conformance-$$/" "$mnt" \
    --endpoint-url "$S3BRIDGE_TEST_ENDPOINT" --cache-dir "$work/cache" --allow-other

summary=$root/target/conformance-summary.md
mkdir -p "$root/target"
results=$work/results.txt
: > "$results"
unexpected=0

groups=(chmod chown ftruncate link mkdir mkfifo mknod open posix_fallocate rename rmdir symlink truncate unlink utimensat)
for group in "${groups[@]}"; do
    dir=$mnt/pjd-$group
    mkdir -p "$dir"
    chmod 0755 "$dir"
    out=$work/pjd-$group.txt
    (cd "$dir" && NO_COLOR=1 pjdfstest -c "$here/pjdfstest.toml" -p "$dir" "$group::" > "$out" 2>&1) || true
    # Keep only this group's own tests ("link::" also matches "unlink::...").
    grep -E "^$group::[^ ]+ +(ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)$" "$out" \
        | sed -E 's/ +/ /' >> "$results" || true
    if grep -qE "^$group::[^ ]+ +(FAILED|PASSED UNEXPECTEDLY)$" "$out"; then
        unexpected=1
        echo "pjdfstest $group: unexpected results:" >&2
        grep -E "^$group::[^ ]+ +(FAILED|PASSED UNEXPECTEDLY)$" -A3 "$out" >&2
    fi
    if ! grep -q "^Summary" "$out"; then
        unexpected=1
        echo "pjdfstest $group: the runner did not finish; its output:" >&2
        tail -30 "$out" >&2
    fi
done

count() { grep -cE "$1" "$results" || true; }
pass=$(count ' ok$')
fail=$(count ' (FAILED|PASSED UNEXPECTEDLY)$')
expected=$(count ' failed as expected$')
skipped=$(count ' skipped$')

mkdir -p "$mnt/fsx"
fsx_out=$work/fsx.txt
fsx_status=failed
if (cd "$work" && fsx -f "$here/fsx.toml" -N "$fsx_ops" -S 20251129 -P "$work" "$mnt/fsx/file" > "$fsx_out" 2>&1) \
    && grep -q "All operations completed A-OK" "$fsx_out"; then
    fsx_status=passed
else
    unexpected=1
    echo "fsx failed:" >&2
    tail -40 "$fsx_out" >&2
fi

{
    echo "| suite | passed | failed | expected failures (S3 limits) | skipped |"
    echo "|---|---|---|---|---|"
    echo "| pjdfstest 0.2.2 | $pass | $fail | $expected | $skipped |"
    echo "| fsx 0.3.2, $fsx_ops random operations | $([ $fsx_status = passed ] && echo "$fsx_ops ops" || echo 0) | $([ $fsx_status = passed ] && echo 0 || echo 1) | 0 | 0 |"
    echo
    echo "Skipped pjdfstest cases:"
    grep ' skipped$' "$results" | awk '{print "- " $1}'
} > "$summary"
cat "$summary"
exit $unexpected
