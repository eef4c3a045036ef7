#!/usr/bin/env bash
# Runs moto's S3 server on 127.0.0.1 with one bucket: the S3 server of the tests that need
# conditional writes (If-Match / If-None-Match), which Garage ignores.
#
#   tests/support/moto.sh start DIR   # starts it (installing moto[server] into a venv under
#                                     # ~/.cache/s3bridge-moto if needed); prints exports
#   tests/support/moto.sh stop DIR
#
# Exports: S3BRIDGE_MOTO_ENDPOINT, S3BRIDGE_MOTO_BUCKET (credentials: test / test).
set -euo pipefail

cmd=${1:?usage: moto.sh start|stop DIR}
dir=${2:?usage: moto.sh start|stop DIR}
venv=${S3BRIDGE_MOTO_VENV:-$HOME/.cache/s3bridge-moto}
bucket=s3bridge-moto

case "$cmd" in
start)
    if [ ! -x "$venv/bin/moto_server" ]; then
        echo "moto.sh: installing moto[server] into $venv (once per machine)" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet 'moto[server]==5.*' >&2
    fi
    mkdir -p "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
    setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >> "$dir/moto.log" 2>&1 < /dev/null &
    echo $! > "$dir/moto.pid"
    url="http://127.0.0.1:$port"
    for _ in $(seq 1 300); do
        code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT \
            --aws-sigv4 "aws:amz:us-east-1:s3" --user "test:test" \
            -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$url/$bucket" || true)
        if [ "$code" = 200 ]; then
            echo "export S3BRIDGE_MOTO_ENDPOINT=$url"
            echo "export S3BRIDGE_MOTO_BUCKET=$bucket"
            exit 0
        fi
        sleep 0.1
    done
    echo "moto did not become ready in 30 s; its log ($dir/moto.log):" >&2
    tail -20 "$dir/moto.log" >&2
    exit 1
    ;;
stop)
    if [ -f "$dir/moto.pid" ]; then
        kill "$(cat "$dir/moto.pid")" 2>/dev/null || true
        rm -f "$dir/moto.pid"
    fi
    ;;
*)
    echo "usage: moto.sh start|stop DIR" >&2
    exit 2
    ;;
esac
