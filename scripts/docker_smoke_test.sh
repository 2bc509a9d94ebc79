#!/usr/bin/env bash
# Build the statex-serve image from a local Debian base (no registry needed),
# run it, and check a real /v1/completions answer from the bundled model; then
# run it as a user would with their own model, arguments after the image name
# (`--model /model ...`) and a checkpoint written here by `statex-train` (init,
# then expand) mounted read-only: the server must listen on 0.0.0.0 and read
# the files as the image's non-root user.
#
#   scripts/docker_smoke_test.sh            (needs docker.io + debootstrap; run as root)
#
# Environment: PASSKEY=1 to require exact passkey answers at >= 1K tokens,
# IMAGE (tag to build, default statex-serve:smoke), KEEP_IMAGE=1 to
# keep it, PIP_CERT_FILE (CA bundle for an intercepting proxy; default: pip's
# configured `cert`), BASE_IMAGE (skip debootstrap and use this image).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-statex-serve:smoke}
BASE_IMAGE=${BASE_IMAGE:-statex-base:bookworm}
PY=${PY:-.venv/bin/python}
log() { echo "[docker-smoke] $*" >&2; }
# BuildKit (for the build secret) needs either buildx or a client that still has
# the built-in builder: Debian's docker.io client (/usr/bin/docker) does.
DOCKER=docker
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi

# 1. a Docker daemon
if ! $DOCKER info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { log "dockerd not installed (apt-get install docker.io)"; exit 3; }
    log "starting dockerd"
    (dockerd >/tmp/statex-dockerd.log 2>&1 &)
    for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 1; done
    $DOCKER info >/dev/null 2>&1 || { log "dockerd did not start; see /tmp/statex-dockerd.log"; exit 3; }
fi

# 2. a local Debian base image with python3 + venv (no registry can be reached)
if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { log "debootstrap not installed"; exit 3; }
    rootfs=$(mktemp -d /tmp/statex-rootfs.XXXXXX)
    log "debootstrap bookworm -> $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >/tmp/statex-debootstrap.log 2>&1
    tar -C "$rootfs" -c . | $DOCKER import - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

# 3. the CPU torch wheel from wherever this machine's pip finds it
if ! ls docker/wheels/torch-2.13.0*.whl >/dev/null 2>&1; then
    log "fetching the CPU torch wheel into docker/wheels/"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d docker/wheels torch==2.13.0
fi

# 4. build; the proxy CA goes in as a BuildKit secret, never into a layer
cert=${PIP_CERT_FILE:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^global.cert='\(.*\)'$/\1/p" | head -1)}
secret_args=()
[ -n "$cert" ] && [ -f "$cert" ] && secret_args=(--secret "id=pip_cert,src=$cert")
log "building $IMAGE on $BASE_IMAGE"
DOCKER_BUILDKIT=1 $DOCKER build --progress=plain --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL= "${secret_args[@]}" \
    -t "$IMAGE" . >/tmp/statex-docker-build.log 2>&1 || { tail -40 /tmp/statex-docker-build.log; exit 1; }

# 5. run it and query the bundled model through the API (PASSKEY=1: also passkey retrieval)
name=statex-smoke-$$
port=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
cleanup() {
    $DOCKER rm -f "$name" "$name-mounted" >/dev/null 2>&1 || true
    [ "${KEEP_IMAGE:-0}" = 1 ] || $DOCKER rmi "$IMAGE" >/dev/null 2>&1 || true
}
trap cleanup EXIT
$DOCKER run -d --name "$name" -p "127.0.0.1:$port:8000" "$IMAGE" >/dev/null
$PY scripts/check_served_model.py --base-url "http://127.0.0.1:$port" --wait 180 ${PASSKEY:+--passkey} || {
    $DOCKER logs "$name" 2>&1 | tail -40; exit 1; }

# 6. with arguments and a mounted checkpoint from statex-train (init -> expand), as a user runs it
ckpt=$(mktemp -d /tmp/statex-smoke-ckpt.XXXXXX)
trap 'cleanup; rm -rf "$ckpt"' EXIT
$PY -m training.cli init --family gla --size tiny --out "$ckpt/init" >/dev/null
$PY -m training.cli expand --base "$ckpt/init" --every 2 --out "$ckpt/model" >/dev/null
port2=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
$DOCKER run -d --name "$name-mounted" -p "127.0.0.1:$port2:8000" -v "$ckpt/model:/model:ro" "$IMAGE" \
    --model /model --served-model-name mine --max-num-seqs 4 >/dev/null
$PY scripts/check_served_model.py --base-url "http://127.0.0.1:$port2" --wait 180 || {
    $DOCKER logs "$name-mounted" 2>&1 | tail -40; exit 1; }
$DOCKER rm -f "$name-mounted" >/dev/null
log "OK: the image serves a mounted statex-train checkpoint with extra arguments"

# 7. the image runs as a non-root user and holds no build secret
user=$($DOCKER inspect -f '{{.Config.User}}' "$IMAGE")
[ "$user" = statex ] || { log "image user is '$user', expected statex"; exit 1; }
if [ -n "$cert" ]; then
    $DOCKER run --rm --entrypoint sh "$IMAGE" -c 'test ! -e /run/secrets/pip_cert && ! env | grep -qi pip_cert' \
        || { log "build secret leaked into the image"; exit 1; }
    if $DOCKER history --no-trunc "$IMAGE" | grep -q "$(basename "$cert")"; then
        log "build secret path appears in the image history"; exit 1
    fi
fi
health=$($DOCKER inspect -f '{{.State.Health.Status}}' "$name")
log "container health: $health"
log "OK: $IMAGE serves the bundled model"
