#!/usr/bin/env bash
# Start, by hand, what `mtseg cluster up` starts: a SeaweedFS object store (S3 API) and a Ray head
# with the dashboard (the Jobs API) and token authentication, both on 127.0.0.1 only.
#
#   cluster/local/up.sh                 # from the repo root, after `make setup`
#   source runs/local-cluster/env.sh    # the client settings it wrote
#   mtseg submit train --config jobs/configs/demo.yaml data.uri=s3://mtseg/shards train.storage_path=s3://mtseg/runs
#   cluster/local/down.sh
#
# Settings (environment, all optional):
#   MTSEG_LOCAL_DIR   state, data and logs             (default runs/local-cluster)
#   MTSEG_BUCKET      bucket created in SeaweedFS      (default mtseg)
#   MTSEG_S3_PORT     S3 port                          (default 8333; SeaweedFS also uses
#                     MTSEG_WEED_{MASTER,VOLUME,FILER,ADMIN}_PORT, default 9333/8080/8888/23646,
#                     and each port + 10000 for gRPC)
#   MTSEG_RAY_PORT    Ray GCS port                     (default 6379)
#   MTSEG_DASHBOARD_PORT  dashboard / Jobs API port    (default 8265)
#   MTSEG_NUM_CPUS    CPUs the head offers             (default: all)
#   MTSEG_RAY_START_ARGS  more `ray start` flags, e.g. other agent ports when another Ray runs here
set -euo pipefail

DIR=${MTSEG_LOCAL_DIR:-runs/local-cluster}
BUCKET=${MTSEG_BUCKET:-mtseg}
S3_PORT=${MTSEG_S3_PORT:-8333}
RAY_PORT=${MTSEG_RAY_PORT:-6379}
DASHBOARD_PORT=${MTSEG_DASHBOARD_PORT:-8265}
VENV_BIN=${MTSEG_VENV_BIN:-$(pwd)/.venv/bin}
LOOPBACK=127.0.0.1

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
[ -x "$VENV_BIN/weed" ] && [ -x "$VENV_BIN/ray" ] || { echo "up.sh: $VENV_BIN has no weed/ray: run 'make setup' first" >&2; exit 2; }
# Ray puts Unix sockets under <dir>/ray/session_<date>_<pid>/sockets/ (~70 more characters), and
# a socket path may not exceed 107 bytes.
if [ $(( ${#DIR} + 70 )) -gt 107 ]; then
    echo "up.sh: $DIR is too long for Ray's socket paths; set MTSEG_LOCAL_DIR to a shorter directory" >&2; exit 2
fi

# Credentials of the store: SeaweedFS reads them from its environment and refuses any others.
# Kept across restarts so existing clients keep working; the file is private to the user.
if [ ! -f "$DIR/s3.env" ]; then
    umask 077
    printf 'AWS_ACCESS_KEY_ID=mtseg-local\nAWS_SECRET_ACCESS_KEY=%s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$DIR/s3.env"
fi
set -a; . "$DIR/s3.env"; set +a

# ---- SeaweedFS: master, volume, filer and S3 gateway in one process, bound to loopback.
if [ -f "$DIR/weed.pid" ] && kill -0 "$(cat "$DIR/weed.pid")" 2>/dev/null; then
    echo "seaweedfs: already running (pid $(cat "$DIR/weed.pid"))"
else
    mkdir -p "$DIR/seaweedfs"
    setsid "$VENV_BIN/weed" mini -dir="$DIR/seaweedfs" -ip=$LOOPBACK -ip.bind=$LOOPBACK \
        -s3.port="$S3_PORT" -master.port="${MTSEG_WEED_MASTER_PORT:-9333}" \
        -volume.port="${MTSEG_WEED_VOLUME_PORT:-8080}" -filer.port="${MTSEG_WEED_FILER_PORT:-8888}" \
        -admin.port="${MTSEG_WEED_ADMIN_PORT:-23646}" -admin.ui=false -webdav=false \
        -s3.port.iceberg=0 -s3.port.lance=0 -bucket="$BUCKET" \
        >> "$DIR/weed.log" 2>&1 < /dev/null &
    echo $! > "$DIR/weed.pid"
    for _ in $(seq 1 120); do
        (exec 3<>"/dev/tcp/$LOOPBACK/$S3_PORT") 2>/dev/null && break
        kill -0 "$(cat "$DIR/weed.pid")" 2>/dev/null || { echo "up.sh: SeaweedFS exited; see $DIR/weed.log" >&2; exit 1; }
        sleep 0.25
    done
    echo "seaweedfs: S3 on http://$LOOPBACK:$S3_PORT, bucket $BUCKET"
fi

# ---- Ray head. Token auth on: the token is ~/.ray/auth_token (made here if missing), which
# `mtseg submit` and `ray` read too. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 plus the loopback node
# address keep every Ray port on 127.0.0.1. The venv's bin goes first on PATH so that job
# entrypoints (`python jobs/train.py`) run this venv's Python.
"$VENV_BIN/ray" get-auth-token --generate > /dev/null 2>&1
if [ -f "$DIR/ray.address" ] && (exec 3<>"/dev/tcp/$LOOPBACK/$DASHBOARD_PORT") 2>/dev/null; then
    echo "ray: already running ($(cat "$DIR/ray.address"))"
else
    # shellcheck disable=SC2086 # MTSEG_RAY_START_ARGS is a list of flags
    PATH="$VENV_BIN:$PATH" RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    AWS_ENDPOINT_URL_S3="http://$LOOPBACK:$S3_PORT" AWS_REGION=us-east-1 \
        "$VENV_BIN/ray" start --head --node-ip-address=$LOOPBACK --port="$RAY_PORT" \
        --include-dashboard=true --dashboard-host=$LOOPBACK --dashboard-port="$DASHBOARD_PORT" \
        --temp-dir="$DIR/ray" --disable-usage-stats ${MTSEG_NUM_CPUS:+--num-cpus=$MTSEG_NUM_CPUS} \
        ${MTSEG_RAY_START_ARGS:-} > "$DIR/ray-start.log" 2>&1 \
        || { echo "up.sh: ray start failed; see $DIR/ray-start.log" >&2; exit 1; }
    echo "$LOOPBACK:$RAY_PORT" > "$DIR/ray.address"
    echo "ray: head $LOOPBACK:$RAY_PORT, Jobs API http://$LOOPBACK:$DASHBOARD_PORT"
fi

# ---- What a client shell needs (no secret is printed; the file is private to the user).
umask 077
cat > "$DIR/env.sh" <<EOF
export AWS_ENDPOINT_URL_S3=http://$LOOPBACK:$S3_PORT
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_REGION=us-east-1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=token
export RAY_ADDRESS=$LOOPBACK:$RAY_PORT
export RAY_API_SERVER_ADDRESS=http://$LOOPBACK:$DASHBOARD_PORT
EOF
echo "client settings: source $DIR/env.sh"
