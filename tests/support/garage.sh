#!/usr/bin/env bash
# Runs a single-node Garage S3 server on 127.0.0.1 with one bucket and one access key.
#
#   tests/support/garage.sh start DIR   # starts it (if not running); prints shell exports
#   tests/support/garage.sh stop DIR
#
# DIR keeps Garage's configuration, data, keys and pid. Starting again with the same DIR
# reuses them (same port, keys and bucket contents). The exports printed by `start`:
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_DEFAULT_REGION,
# S3BRIDGE_TEST_ENDPOINT, S3BRIDGE_TEST_BUCKET (bucket name: $GARAGE_BUCKET, default
# s3bridge-test). Garage comes from `cargo install garage --version 2.5.0 --locked`.
set -euo pipefail

cmd=${1:?usage: garage.sh start|stop DIR}
dir=${2:?usage: garage.sh start|stop DIR}
export PATH="$HOME/.cargo/bin:$PATH"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

case "$cmd" in
start)
    command -v garage >/dev/null || {
        echo "garage is not installed: cargo install garage --version 2.5.0 --locked" >&2
        exit 1
    }
    mkdir -p "$dir/meta" "$dir/data"
    if [ ! -f "$dir/server.env" ]; then
        cat > "$dir/server.env" <<EOF
port=$(free_port)
rpc_port=$(free_port)
rpc_secret=$(hex 32)
key_id=GK$(hex 12)
key_secret=$(hex 32)
bucket=${GARAGE_BUCKET:-s3bridge-test}
EOF
        chmod 600 "$dir/server.env"
    fi
    # shellcheck disable=SC1091
    . "$dir/server.env"
    cat > "$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$rpc_secret"

[s3_api]
api_bind_addr = "127.0.0.1:$port"
s3_region = "us-east-1"
root_domain = ".s3.localhost"
EOF
    chmod 600 "$dir/garage.toml"
    if [ -f "$dir/garage.pid" ] && kill -0 "$(cat "$dir/garage.pid")" 2>/dev/null; then
        : # already running: only wait for it and print its exports
    else
        GARAGE_DEFAULT_ACCESS_KEY=$key_id GARAGE_DEFAULT_SECRET_KEY=$key_secret \
        GARAGE_DEFAULT_BUCKET=$bucket RUST_LOG=${GARAGE_LOG:-warn} \
            setsid garage -c "$dir/garage.toml" server --single-node --default-bucket \
            >> "$dir/garage.log" 2>&1 < /dev/null &
        echo $! > "$dir/garage.pid"
    fi
    # Ready once a signed listing of the bucket succeeds (the key and bucket exist).
    for _ in $(seq 1 300); do
        code=$(curl -s -o /dev/null -w '%{http_code}' \
            --aws-sigv4 "aws:amz:us-east-1:s3" --user "$key_id:$key_secret" \
            -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
            "http://127.0.0.1:$port/$bucket?list-type=2&max-keys=1" || true)
        if [ "$code" = 200 ]; then
            echo "export AWS_ACCESS_KEY_ID=$key_id"
            echo "export AWS_SECRET_ACCESS_KEY=$key_secret"
            echo "export AWS_REGION=us-east-1"
            echo "export AWS_DEFAULT_REGION=us-east-1"
            echo "export S3BRIDGE_TEST_ENDPOINT=http://127.0.0.1:$port"
            echo "export S3BRIDGE_TEST_BUCKET=$bucket"
            exit 0
        fi
        if ! kill -0 "$(cat "$dir/garage.pid")" 2>/dev/null; then
            echo "garage exited; its log ($dir/garage.log):" >&2
            tail -20 "$dir/garage.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "garage did not become ready in 30 s; its log ($dir/garage.log):" >&2
    tail -20 "$dir/garage.log" >&2
    exit 1
    ;;
stop)
    if [ -f "$dir/garage.pid" ]; then
        pid=$(cat "$dir/garage.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/garage.pid"
    fi
    ;;
*)
    echo "usage: garage.sh start|stop DIR" >&2
    exit 2
    ;;
esac
