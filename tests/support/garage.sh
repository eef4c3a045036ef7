#!/usr/bin/env bash
# Starts a single-node Garage S3 server on 127.0.0.1 with one bucket and one key.
#
#   tests/support/garage.sh start DIR [PORT]   # prints shell exports for the server
#   tests/support/garage.sh stop DIR
#
# DIR holds Garage's config, data and pid file. The exports printed by `start` are:
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, S3BRIDGE_TEST_ENDPOINT,
# S3BRIDGE_TEST_BUCKET. Garage itself comes from `cargo install garage` (see ensure-deps.sh).
set -euo pipefail

cmd=${1:?usage: garage.sh start|stop DIR [PORT]}
dir=${2:?usage: garage.sh start|stop DIR [PORT]}
garage_bin=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

case "$cmd" in
start)
    port=${3:-$(free_port)}
    rpc_port=$(free_port)
    mkdir -p "$dir/meta" "$dir/data"
    secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    key_id="GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    key_secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    bucket=${S3BRIDGE_TEST_BUCKET:-s3bridge-test}
    cat > "$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$secret"

[s3_api]
api_bind_addr = "127.0.0.1:$port"
s3_region = "us-east-1"
root_domain = ".s3.localhost"
EOF
    GARAGE_DEFAULT_ACCESS_KEY=$key_id GARAGE_DEFAULT_SECRET_KEY=$key_secret \
    GARAGE_DEFAULT_BUCKET=$bucket RUST_LOG=${GARAGE_LOG:-warn} \
        setsid "$garage_bin" -c "$dir/garage.toml" server --single-node --default-bucket \
        > "$dir/garage.log" 2>&1 < /dev/null &
    echo $! > "$dir/garage.pid"
    for _ in $(seq 1 300); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/$bucket?list-type=2" || true)
        if [ "$code" = 403 ] || [ "$code" = 200 ]; then
            # Ready for HTTP; wait until the bucket and key exist too.
            if AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$key_secret AWS_DEFAULT_REGION=us-east-1 \
                aws --endpoint-url "http://127.0.0.1:$port" s3api head-bucket --bucket "$bucket" \
                >/dev/null 2>&1; then
                echo "export AWS_ACCESS_KEY_ID=$key_id"
                echo "export AWS_SECRET_ACCESS_KEY=$key_secret"
                echo "export AWS_REGION=us-east-1"
                echo "export AWS_DEFAULT_REGION=us-east-1"
                echo "export S3BRIDGE_TEST_ENDPOINT=http://127.0.0.1:$port"
                echo "export S3BRIDGE_TEST_BUCKET=$bucket"
                exit 0
            fi
        fi
        if ! kill -0 "$(cat "$dir/garage.pid")" 2>/dev/null; then
            echo "garage exited; its log:" >&2
            cat "$dir/garage.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "garage did not become ready in 30 s; its log:" >&2
    cat "$dir/garage.log" >&2
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
    echo "usage: garage.sh start|stop DIR [PORT]" >&2
    exit 2
    ;;
esac
