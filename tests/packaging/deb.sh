#!/usr/bin/env bash
# The Debian package, end to end: builds it (packaging/build-deb.sh), installs it with
# dpkg -i, checks what it installed (binary, mount helper link, man pages, completions, a
# unit that verifies with its man page present), mounts a prefix of the test server from an
# fstab line through the installed helper, writes and reads back a file across a remount,
# and removes the package (leaving the machine as it was, even on failure).
#
# Needs root and the S3BRIDGE_TEST_* / AWS_* variables of tests/support/garage.sh; run by
# tests/run.sh after the other tests (it installs into /usr and /sbin, so not in parallel).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
fail() { echo "deb test: $*" >&2; exit 1; }

if dpkg -s s3bridge >/dev/null 2>&1; then
    fail "an s3bridge package is installed already; not touching it"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/s3bridge-deb.XXXXXX")
mnt=$work/mnt
cleanup() {
    status=$?
    if grep -q " $mnt " /proc/mounts; then umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; fi
    dpkg -r s3bridge >/dev/null 2>&1 || true
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT INT TERM

deb=$(packaging/build-deb.sh | tail -1)
[ -f "$deb" ] || fail "build-deb.sh printed no package path"
dpkg -i "$deb" >/dev/null
[ "$(/usr/bin/s3bridge --version)" = "s3bridge $(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)" ] \
    || fail "installed binary's version"
for link in /sbin/mount.s3bridge /sbin/mount.fuse.s3bridge; do
    [ "$(readlink "$link")" = /usr/bin/s3bridge ] || fail "mount helper link $link"
done
for f in /usr/share/man/man1/s3bridge.1.gz /usr/share/man/man1/s3bridge-mount.1.gz \
    /usr/share/bash-completion/completions/s3bridge /usr/share/zsh/vendor-completions/_s3bridge \
    /usr/share/fish/vendor_completions.d/s3bridge.fish /lib/systemd/system/s3bridge@.service; do
    [ -f "$f" ] || fail "$f not installed"
done
zcat /usr/share/man/man1/s3bridge-mount.1.gz | grep -q "MOUNTPOINT" || fail "man page content"
out=$(systemd-analyze verify s3bridge@example.service 2>&1 | grep -v "EnvironmentFile" || true)
[ -z "$out" ] || fail "installed unit: $out"

# Mount from an fstab line through the installed helper; mount's environment is empty, so
# the credentials come from a file.
mkdir -p "$mnt"
cat > "$work/credentials" <<CREDS
[default]
aws_access_key_id = $AWS_ACCESS_KEY_ID
aws_secret_access_key = $AWS_SECRET_ACCESS_KEY
CREDS
prefix=deb-$$/
opts="endpoint=$S3BRIDGE_TEST_ENDPOINT,region=us-east-1,cache_dir=$work/cache,credentials=$work/credentials,_netdev"
echo "$S3BRIDGE_TEST_BUCKET:$prefix $mnt s3bridge $opts 0 0" > "$work/fstab"
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin mount --fstab "$work/fstab" "$mnt"
echo "installed from the package" > "$mnt/hello.txt"
umount "$mnt"
while grep -q " $mnt " /proc/mounts; do sleep 0.1; done
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin mount --fstab "$work/fstab" "$mnt"
[ "$(cat "$mnt/hello.txt")" = "installed from the package" ] || fail "read back after remount"
# Read-only and back without a restart, through the installed mount.fuse.s3bridge.
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin mount -o remount,ro "$mnt"
grep " $mnt fuse.s3bridge ro," /proc/mounts >/dev/null || fail "remount,ro: $(grep " $mnt " /proc/mounts)"
if (echo refused > "$mnt/refused.txt") 2>/dev/null; then fail "a write to a read-only remount"; fi
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin mount -o remount,rw "$mnt"
grep " $mnt fuse.s3bridge rw," /proc/mounts >/dev/null || fail "remount,rw: $(grep " $mnt " /proc/mounts)"
code=$(curl -s -o "$work/body" -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
    "$S3BRIDGE_TEST_ENDPOINT/$S3BRIDGE_TEST_BUCKET/${prefix}hello.txt")
[ "$code" = 200 ] && [ "$(cat "$work/body")" = "installed from the package" ] || fail "object in the bucket"
umount "$mnt"
while grep -q " $mnt " /proc/mounts; do sleep 0.1; done
dpkg -r s3bridge >/dev/null
[ ! -e /sbin/mount.s3bridge ] && [ ! -e /sbin/mount.fuse.s3bridge ] && [ ! -e /usr/bin/s3bridge ] \
    || fail "dpkg -r left files"
echo "deb test: $(basename "$deb") installs, mounts from fstab, and removes cleanly"
