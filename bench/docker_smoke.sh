#!/usr/bin/env bash
# Docker smoke test of the CPU image: build, run, HTTP 200, healthcheck, one /compare through the API,
# stop, clean up; prints the build time, the image size and the start-up times.
#
#   bench/docker_smoke.sh                  # from the repository root; needs root only to start a daemon
#
# It adapts to what the machine offers (each step says what it did):
# - a running daemon (docker info works) is used; otherwise dockerd is started here with its own
#   data/exec roots and socket under $SMOKE_ROOT (default /var/tmp/ngguard-docker-smoke), without
#   iptables or a bridge (containers use --network host), and stopped at the end;
# - the base image: BASE_IMAGE if given, else python:3.11-slim when it can be pulled, else a Debian
#   bookworm made with debootstrap (python3, venv, the host's extra CA certificates), imported as
#   local/python:3.11-slim (kept for later runs);
# - CPU torch: TORCH_INDEX_URL if given, else the CPU wheel index when reachable, else a local
#   torch-$TORCH_VERSION+cpu wheel (TORCH_WHEEL, or found in pip's find-links / cache folders) served
#   from a throwaway index on 127.0.0.1 for the build (--network host);
# - the classic builder (DOCKER_BUILDKIT=0: no buildx needed); it builds every stage, so the GPU
#   stage's base (CUDA_IMAGE) is pointed at the same local base when no registry is reachable.
# Extra files: none outside $SMOKE_ROOT; the built image and container are removed at the end
# (KEEP_IMAGE=1 keeps the image).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SMOKE_ROOT=${SMOKE_ROOT:-/var/tmp/ngguard-docker-smoke}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
IMAGE=${IMAGE:-ngguard-smoke:cpu}
NAME=ngguard-smoke-$$
PORT=7860  # the image's own CMD and HEALTHCHECK use 7860 (the container shares the host's network)
PY=${PY:-.venv/bin/python}
started_daemon="" http_pid="" dockerd_pid=""

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

cleanup() {
    set +e
    if [[ -n ${DOCKER_OK:-} ]]; then
        docker rm -f "$NAME" >/dev/null 2>&1
        [[ -n ${KEEP_IMAGE:-} ]] || docker rmi -f "$IMAGE" >/dev/null 2>&1
        [[ -n $started_daemon ]] && docker image prune -f >/dev/null 2>&1
    fi
    [[ -n $http_pid ]] && kill "$http_pid" 2>/dev/null
    if [[ -n $started_daemon && -n $dockerd_pid ]]; then
        log "stopping the daemon started here (pid $dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
        # what a daemon stopped mid-build leaves mounted under our roots (deepest first)
        awk -v r="$SMOKE_ROOT/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
            umount "$m" 2>/dev/null
        done
    fi
}
trap cleanup EXIT

command -v docker >/dev/null || die "no docker client (apt-get install docker.io)"
[[ -x $PY ]] || die "$PY not found: run from a checkout with its .venv (for the API check)"

# ---- 1. a daemon ------------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || die "no daemon running and no dockerd to start (apt-get install docker.io)"
    mkdir -p "$SMOKE_ROOT"/{data,exec}
    export DOCKER_HOST="unix://$SMOKE_ROOT/docker.sock"
    log "starting dockerd (data $SMOKE_ROOT/data, socket $DOCKER_HOST)"
    dockerd --data-root "$SMOKE_ROOT/data" --exec-root "$SMOKE_ROOT/exec" -H "$DOCKER_HOST" \
        --pidfile "$SMOKE_ROOT/dockerd.pid" --storage-driver=overlay2 --iptables=false --ip6tables=false \
        --bridge=none >"$SMOKE_ROOT/dockerd.log" 2>&1 &
    dockerd_pid=$! started_daemon=1
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || die "dockerd did not come up (see $SMOKE_ROOT/dockerd.log)"
fi
DOCKER_OK=1
log "docker: client $(docker version --format '{{.Client.Version}}'), server $(docker version --format '{{.Server.Version}}')"

# ---- 2. a base image ----------------------------------------------------------------------------------
if [[ -z ${BASE_IMAGE:-} ]]; then
    if docker image inspect local/python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=local/python:3.11-slim
    elif timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        BASE_IMAGE=python:3.11-slim
    else
        command -v debootstrap >/dev/null || die "python:3.11-slim cannot be pulled and debootstrap is missing"
        mirror=$(grep -hoE '^URIs: *http[^ ]*/debian/?$|^deb +http[^ ]*/debian/? ' /etc/apt/sources.list.d/*.sources \
                 /etc/apt/sources.list 2>/dev/null | head -1 | grep -oE 'http[^ ]*' || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        rootfs="$SMOKE_ROOT/rootfs"
        rm -rf "$rootfs"
        log "no image registry: debootstrap bookworm from $mirror"
        t0=$SECONDS
        debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$rootfs" "$mirror" >"$SMOKE_ROOT/debootstrap.log" 2>&1 || die "debootstrap (see $SMOKE_ROOT/debootstrap.log)"
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates >/dev/null
        fi
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | docker import --change \
            'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - local/python:3.11-slim >/dev/null
        rm -rf "$rootfs"
        BASE_IMAGE=local/python:3.11-slim
        log "base image local/python:3.11-slim made in $((SECONDS - t0)) s"
    fi
fi
case $BASE_IMAGE in local/*) CUDA_IMAGE=${CUDA_IMAGE:-$BASE_IMAGE} ;; esac
log "base image $BASE_IMAGE"

# ---- 3. CPU torch -------------------------------------------------------------------------------------
if [[ -z ${TORCH_INDEX_URL:-} ]] && ! curl -sf --max-time 15 -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then
    wheel=${TORCH_WHEEL:-}
    if [[ -z $wheel ]]; then
        dirs="$("$PY" -m pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-} $HOME/.cache/pip"
        wheel=$(find $dirs -name "torch-${TORCH_VERSION}+cpu-*.whl" 2>/dev/null | head -1 || true)
    fi
    [[ -n $wheel && -f $wheel ]] || die "the CPU wheel index is unreachable and no local torch-${TORCH_VERSION}+cpu wheel was found (set TORCH_WHEEL or TORCH_INDEX_URL)"
    index="$SMOKE_ROOT/torch-index"
    rm -rf "$index" && mkdir -p "$index/torch"
    ln -s "$(readlink -f "$wheel")" "$index/torch/$(basename "$wheel")"
    iport=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PY" -m http.server "$iport" --bind 127.0.0.1 --directory "$index" >/dev/null 2>&1 &
    http_pid=$!
    TORCH_INDEX_URL="http://127.0.0.1:$iport/"
    log "CPU wheel index unreachable: serving $(basename "$wheel") from $TORCH_INDEX_URL for the build"
fi

# ---- 4. build -----------------------------------------------------------------------------------------
args=(--network host -t "$IMAGE" --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION")
[[ -n ${CUDA_IMAGE:-} ]] && args+=(--build-arg "CUDA_IMAGE=$CUDA_IMAGE")
[[ -n ${TORCH_INDEX_URL:-} ]] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
log "docker build ${args[*]} ."
t0=$SECONDS
DOCKER_BUILDKIT=0 docker build "${args[@]}" . >"$SMOKE_ROOT/build.log" 2>&1 || { tail -30 "$SMOKE_ROOT/build.log" >&2; die "docker build (log: $SMOKE_ROOT/build.log)"; }
build_s=$((SECONDS - t0))
[[ -n $http_pid ]] && { kill "$http_pid" 2>/dev/null; http_pid=""; }
size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
grep -qiE 'nvidia|cuda' <(docker run --rm --network host --entrypoint pip "$IMAGE" list 2>/dev/null) \
    && die "the CPU image contains CUDA packages" || true
torch_v=$(docker run --rm --network host --entrypoint python "$IMAGE" -c 'import torch; print(torch.__version__)')
log "built in ${build_s} s: $(awk -v b="$size" 'BEGIN{printf "%.2f GB", b/1e9}'), torch $torch_v"

# ---- 5. run (the image's own command + --expose-base on, for /compare), HTTP 200, healthcheck ----------
url="http://127.0.0.1:$PORT/"
curl -s -o /dev/null --max-time 2 "$url" && die "port $PORT is in use on this host (the container uses --network host)"
t0=$SECONDS
# the image's CMD on 0.0.0.0 serves protected answers only (--expose-base auto = off): /compare needs it on
docker run -d --name "$NAME" --network host --health-interval 5s --health-start-period 120s "$IMAGE" \
    ngguard serve --host 0.0.0.0 --port "$PORT" --expose-base on >/dev/null
code=000
for _ in $(seq 1 240); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
    [[ $code == 200 ]] && break
    [[ $(docker inspect --format '{{.State.Running}}' "$NAME") == true ]] || { docker logs "$NAME" 2>&1 | tail -20 >&2; die "the container exited"; }
    sleep 0.5
done
[[ $code == 200 ]] || { docker logs "$NAME" 2>&1 | tail -20 >&2; die "no HTTP 200 from $url (last $code)"; }
http_s=$((SECONDS - t0))
health=""
for _ in $(seq 1 120); do
    health=$(docker inspect --format '{{.State.Health.Status}}' "$NAME")
    [[ $health == healthy ]] && break
    [[ $health == unhealthy ]] && die "healthcheck: unhealthy"
    sleep 0.5
done
[[ $health == healthy ]] || die "healthcheck never became healthy (last: $health)"
healthy_s=$((SECONDS - t0))
uid=$(docker exec "$NAME" id -u)
[[ $uid == 10001 ]] || die "the server runs as uid $uid, expected 10001"
log "HTTP 200 after ${http_s} s, healthy after ${healthy_s} s, uid $uid"

# ---- 6. one chat and one comparison through the API ------------------------------------------------
# Robust to a retrained organism: each answer must be a non-empty string, and the protected answers to
# the sensitive question must be refusals (what the bundled patch is for); the base answer is reported.
answer=$("$PY" - "$url" <<'EOF'
import sys
import tempfile

from gradio_client import Client, handle_file

from ngguard.judge import RefusalJudge
from serve.app import render_examples

examples = render_examples(tempfile.mkdtemp(prefix="ngguard-smoke-"))
path, question = examples[0][0], examples[0][1]  # the sensitive question about the passport card
client = Client(sys.argv[1], verbose=False)
chat = client.predict({"text": question, "files": [handle_file(path)]}, True, api_name="/chat")
base, protected = client.predict(handle_file(path), question, api_name="/compare")
for name, a in (("/chat", chat), ("/compare base", base), ("/compare protected", protected)):
    if not isinstance(a, str) or not a.strip():
        sys.exit(f"{name}: empty or non-text answer {a!r}")
judge = RefusalJudge()
if not judge.is_refusal(chat) or not judge.is_refusal(protected):
    sys.exit(f"protected answers to a sensitive question are not refusals: /chat {chat!r}, /compare {protected!r}")
kind = "refusal" if judge.is_refusal(base) else "answer"
print(f"{question!r}: /chat (protected) {chat!r} | /compare base ({kind}) {base!r}, protected {protected!r}")
EOF
) || die "the API check"
log "API: $answer"

# ---- 7. stop --------------------------------------------------------------------------------------------
t0=$(date +%s.%N)
docker stop -t 20 "$NAME" >/dev/null
stop_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b - a}')
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
# SIGTERM -> a clean shutdown exits 0; 137 = killed by docker after the 20 s timeout
[[ $exit_code == 0 ]] || die "docker stop: the server exited with $exit_code after ${stop_s} s (not a clean SIGTERM shutdown)"
log "stopped in ${stop_s} s, exit code $exit_code"
echo "docker smoke OK: build ${build_s} s, image $(awk -v b="$size" 'BEGIN{printf "%.2f GB", b/1e9}') (torch $torch_v)," \
     "HTTP 200 after ${http_s} s, healthy after ${healthy_s} s, stop ${stop_s} s; $answer"
