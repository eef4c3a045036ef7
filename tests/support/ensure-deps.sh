#!/usr/bin/env bash
# Installs what s3bridge's tests need, skipping whatever is already there:
#   Debian packages: fuse3, s3fs, rsync, git, vim, curl, python3, python3-venv, samba,
#                    smbclient, apache2, php, libapache2-mod-php
#   from crates.io:  garage 2.5.0 (the S3 server; ~11 min to build once), fsx, pjdfstest
#   the dummy user pjdfstest switches to ("tests")
# Usage: tests/support/ensure-deps.sh [--no-conformance]
set -euo pipefail

want_conformance=1
[ "${1:-}" = "--no-conformance" ] && want_conformance=0

export PATH="$HOME/.cargo/bin:$PATH"
log() { echo "ensure-deps: $*" >&2; }

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need fusermount3 fuse3
need s3fs s3fs
need rsync rsync
need git git
need vim vim
need curl curl
need python3 python3
need pkg-config pkg-config
# Front ends the tests put on a mount (tests/samba.rs, tests/webapp.rs).
need smbd samba
need smbclient smbclient
need apache2 apache2
[ -e /usr/lib/apache2/modules/libphp8.2.so ] || ls /usr/lib/apache2/modules/libphp*.so >/dev/null 2>&1 \
    || missing+=(php libapache2-mod-php)
# moto (tests/support/moto.sh) is installed into a virtual environment.
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -e /dev/fuse ]; then
    log "/dev/fuse is missing: this machine cannot mount FUSE filesystems (load the fuse module)"
    exit 1
fi

command -v cargo >/dev/null || { log "cargo is missing: install Rust (https://rustup.rs)"; exit 1; }

install_crate() { # name version binary
    if ! command -v "$3" >/dev/null 2>&1 || ! "$3" --version 2>/dev/null | grep -q "$2"; then
        log "installing $1 $2 from crates.io (built once per machine)"
        cargo install --quiet --locked "$1" --version "$2"
    fi
}
install_crate garage 2.5.0 garage
# fsx also runs under injected S3 faults in tests/faults.rs.
install_crate fsx 0.3.2 fsx
if [ $want_conformance = 1 ]; then
    install_crate pjdfstest 0.2.2 pjdfstest
    id tests >/dev/null 2>&1 || echo 'tests:x:::Dummy user for pjdfstest:/:/usr/sbin/nologin' | newusers
    getent group nogroup >/dev/null || groupadd nogroup
fi
