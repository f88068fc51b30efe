#!/usr/bin/env bash
# Run the docker-compose demo for real with podman-compose and check that it works:
# bots in different containers hear each other (their replies prove it) and the
# broker's history holds the conversation.
#
#   scripts/compose-smoke.sh            # exit 0 ok, 1 failed, 77 skipped (no podman)
#
# It installs nothing. It needs podman and podman-compose; without a registry it
# builds a Debian base image with debootstrap (as root) once, then the zchat image
# with `--build-arg BASE=...`. It always tears down what it started (containers,
# network, volumes, the image it built). README.md ("Compose demo") has more.
#
# Environment:
#   ZCHAT_BASE            base image to build on (default: localhost/zchat-base:bookworm,
#                         built with debootstrap when absent)
#   ZCHAT_SMOKE_TIMEOUT   seconds to wait for the conversation (default 180)
#   ZCHAT_SMOKE_KEEP=1    keep the containers and image for a look (tear down by hand)
# For another compose file (scripts/compose-cluster-smoke.sh sets these):
#   ZCHAT_SMOKE_COMPOSE   the compose file; ZCHAT_SMOKE_BROKER its broker service to ask;
#   ZCHAT_SMOKE_BOTS      its bots; ZCHAT_SMOKE_SERVICES what to start (broker + bots);
#   ZCHAT_SMOKE_SIDES     "bot=side ..." : a reply must cross sides (bots on different brokers);
#   ZCHAT_SMOKE_EXTRAS    pip extras of the image ("[redis]"); ZCHAT_SMOKE_REDIS=1 builds
#                         Dockerfile.redis as $ZCHAT_REDIS_IMAGE too; ZCHAT_SMOKE_WEB=0: no web service
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMPOSE_FILE=${ZCHAT_SMOKE_COMPOSE:-$ROOT/docker-compose.yml}
BASE=${ZCHAT_BASE:-localhost/zchat-base:bookworm}
TIMEOUT=${ZCHAT_SMOKE_TIMEOUT:-180}
PROJECT="zchatsmoke$$$(date +%s)"
IMAGE="localhost/zchat-smoke:$PROJECT"
read -r -a BOTS <<<"${ZCHAT_SMOKE_BOTS:-alice bob carol}"
BROKER=${ZCHAT_SMOKE_BROKER:-broker}
read -r -a SERVICES <<<"${ZCHAT_SMOKE_SERVICES:-$BROKER ${BOTS[*]}}"
SIDES=${ZCHAT_SMOKE_SIDES:-}
REDIS_IMAGE="localhost/zchat-smoke-redis:$PROJECT"
CA=/etc/ssl/certs/ca-certificates.crt
T0=$SECONDS

say() { printf '[compose-smoke %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
skip() { say "SKIPPED: $*"; exit 77; }
die() { say "FAILED: $*"; exit 1; }

for tool in podman podman-compose python3; do
    command -v "$tool" >/dev/null 2>&1 || skip "$tool is not installed (apt-get install -y podman podman-compose runc)"
done

WORK=$(mktemp -d -t zchat-smoke.XXXXXX)
BUILT_IMAGE=0
STARTED=0

compose() { podman-compose -p "$PROJECT" -f "$COMPOSE_FILE" "$@"; }

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $STARTED == 1 ]]; then
        if [[ $rc != 0 ]]; then
            say "logs of every container (the run failed):"
            for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' 2>/dev/null); do
                echo "----- $c"
                podman logs --tail 40 "$c" 2>&1 || true
            done
        fi
        if [[ ${ZCHAT_SMOKE_KEEP:-0} == 1 ]]; then
            say "kept project $PROJECT and image $IMAGE (ZCHAT_SMOKE_KEEP=1)"
        else
            say "tearing down $PROJECT"
            compose down -v -t 2 >"$WORK/down.log" 2>&1 || true
            # podman-compose 1.0 leaves some of these behind; remove them by label and name.
            for c in $(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null); do
                podman rm -f -v "$c" >/dev/null 2>&1 || true
            done
            for v in $(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null); do
                podman volume rm -f "$v" >/dev/null 2>&1 || true
            done
            podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
        fi
    fi
    if [[ $BUILT_IMAGE == 1 && ${ZCHAT_SMOKE_KEEP:-0} != 1 ]]; then
        podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
        podman rmi -f "$REDIS_IMAGE" >/dev/null 2>&1 || true
        # untagged leftovers of zchat's build stage only (the Dockerfile labels it)
        podman image prune -f --filter label=org.zchat.stage=build >/dev/null 2>&1 || true
    fi
    [[ -n ${CONTAINERS_CONF_TMP:-} ]] && rm -f "$CONTAINERS_CONF_TMP"
    rm -rf "$WORK"
    say "done (exit $rc) after $((SECONDS - T0))s"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- base image

debian_mirror() {
    # The Debian URI apt already uses here (deb822 sources first, then sources.list).
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '{for (i = 2; i <= NF; i++) print $i}' | grep -E '/debian/?$' | head -n1 || true)
    if [[ -z $uri ]]; then
        uri=$(grep -hsE '^deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{print ($2 ~ /^\[/) ? $3 : $2}' | grep -E '/debian/?$' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if ! podman image exists "$BASE"; then
    [[ $BASE == localhost/zchat-base:bookworm ]] || die "base image $BASE is not present"
    [[ $(id -u) == 0 ]] || skip "base image $BASE is missing and building it needs root (debootstrap)"
    command -v debootstrap >/dev/null 2>&1 || skip "base image $BASE is missing and debootstrap is not installed"
    mirror=$(debian_mirror)
    say "building base image $BASE with debootstrap from $mirror (about a minute)"
    rootfs="$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$rootfs" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    tar -C "$rootfs" -c . | podman import - "$BASE" >"$WORK/import.log" 2>&1 || { cat "$WORK/import.log"; die "podman import failed"; }
    rm -rf "$rootfs"
fi

# ---------------------------------------------------------------- podman works?

probe() { podman run --rm --network none "$BASE" true >"$WORK/probe.log" 2>&1; }
if ! probe; then
    # This sandbox needs the two settings of containers.md; use them from a private
    # file rather than touching the system's when they are not set there.
    if command -v runc >/dev/null 2>&1; then
        CONTAINERS_CONF_TMP=$(mktemp -t zchat-containers.XXXXXX.conf)
        printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' >"$CONTAINERS_CONF_TMP"
        export CONTAINERS_CONF=$CONTAINERS_CONF_TMP
        say "podman failed with the system settings; retrying with default_ulimits=[] and runtime=runc"
    fi
    probe || { cat "$WORK/probe.log"; die "podman cannot run a container here"; }
fi

# ---------------------------------------------------------------- zchat image

build_args=(--network host --build-arg "BASE=$BASE")
[[ -f $CA ]] && build_args+=(-v "$CA:$CA:ro")
say "building $IMAGE on $BASE"
BUILT_IMAGE=1
podman build "${build_args[@]}" --build-arg "EXTRAS=${ZCHAT_SMOKE_EXTRAS:-}" -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; die "image build failed"; }
say "image built"
if [[ ${ZCHAT_SMOKE_REDIS:-0} == 1 ]]; then
    say "building $REDIS_IMAGE (Redis from Debian's packages) on $BASE"
    podman build "${build_args[@]}" -f "$ROOT/Dockerfile.redis" -t "$REDIS_IMAGE" "$ROOT" >"$WORK/build-redis.log" 2>&1 \
        || { tail -30 "$WORK/build-redis.log"; die "Redis image build failed"; }
    export ZCHAT_REDIS_IMAGE=$REDIS_IMAGE
fi

# ---------------------------------------------------------------- up

export ZCHAT_IMAGE=$IMAGE
STARTED=1
# the web service's host port: a free one, not 8080 (which may be taken here)
ZCHAT_WEB_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export ZCHAT_WEB_PORT
WEB=()
[[ ${ZCHAT_SMOKE_WEB:-1} == 1 ]] && WEB=(web)
say "starting project $PROJECT: ${SERVICES[*]} ${WEB[*]} (web on host port $ZCHAT_WEB_PORT)"
# Services are named: podman-compose 1.0 ignores profiles and would start `talk` too.
compose up -d --no-build "${SERVICES[@]}" "${WEB[@]}" >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; die "podman-compose up failed"; }

broker_ctr="${PROJECT}_${BROKER}_1"
deadline=$((SECONDS + TIMEOUT))

say "waiting for the broker to answer"
until podman exec "$broker_ctr" zchat ping --broker tcp://127.0.0.1:5555 --timeout 2 >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "the broker did not answer within ${TIMEOUT}s"
    podman container exists "$broker_ctr" || die "the broker container is gone"
    sleep 1
done
say "broker answers; healthcheck: $(podman healthcheck run "$broker_ctr" >/dev/null 2>&1 && echo healthy || echo 'not run by this podman')"

# ---------------------------------------------------------------- the conversation

check_py=$(
    cat <<'EOF'
import json, sys
bots = set(sys.argv[1].split())
sides = dict(pair.split("=") for pair in sys.argv[3].split()) if len(sys.argv) > 3 and sys.argv[3] else {}
msgs = []
for line in open(sys.argv[2]):
    line = line.strip()
    if line.startswith("{"):
        msgs.append(json.loads(line))
texts = [m for m in msgs if m.get("kind") == "text"]
speakers = {m["sender"] for m in texts if m["sender"] in bots}
pairs = set()
for m in texts:
    t = m["text"]
    if m["sender"] in bots and t.startswith("re @"):
        target = t[4:].split(":", 1)[0]
        if target in bots and target != m["sender"]:
            pairs.add((m["sender"], target))
repliers = {a for a, _ in pairs}
targets = {b for _, b in pairs}
ok = len(speakers) >= 2 and len(repliers) >= 2 and len(targets) >= 2
across = sorted((a, b) for a, b in pairs if sides and sides.get(a) != sides.get(b))
if sides:  # bots on different brokers must have heard each other, both ways
    ok = ok and len({sides[a] for a, _ in across}) >= 2
print(f"{len(msgs)} messages in history, {len(texts)} lines; bots that spoke: {sorted(speakers)}; "
      f"replies across containers (replier -> original sender): {sorted(pairs)}"
      + (f"; across brokers: {across}" if sides else ""))
sys.exit(0 if ok else 1)
EOF
)

history="$WORK/history.jsonl"
say "waiting until bots in different containers have answered each other"
while :; do
    podman exec "$broker_ctr" zchat tail --broker tcp://127.0.0.1:5555 --name smoke --room general \
        --history 1000 --json --timeout 1 >"$history" 2>"$WORK/tail.err" || true
    if summary=$(python3 -c "$check_py" "${BOTS[*]}" "$history" "$SIDES"); then
        say "$summary"
        break
    fi
    if ((SECONDS >= deadline)); then
        say "last look: $summary"
        cat "$WORK/tail.err" >&2 || true
        die "no conversation between containers within ${TIMEOUT}s"
    fi
    for bot in "${BOTS[@]}"; do
        state=$(podman inspect -f '{{.State.Status}}' "${PROJECT}_${bot}_1" 2>/dev/null || echo missing)
        [[ $state == running ]] || say "note: $bot container is $state"
    done
    sleep 2
done

# The same history, read from a fresh one-off container on the compose network by
# service name, the way `docker compose run --rm talk` reaches the broker.
READER=${ZCHAT_SMOKE_READER:-$BROKER}
say "reading the history from a one-off container via tcp://$READER:5555"
read_history() {  # NAME (a new one each try: a claim the first try made may stand)
    podman run --rm --network "${PROJECT}_default" "$IMAGE" tail --broker "tcp://$READER:5555" --trust-new-broker --name "$1" \
        --room general --history 1000 --json --timeout 1 >"$WORK/history2.jsonl" 2>"$WORK/tail2.err"
}
# Once more if the first try timed out: the CLI's hello waits 5 s, and a new name's
# claim takes two handshakes, which a loaded 2-core CI machine running seven containers
# has missed (2026-12-02: "no answer from the broker ... within 5s", then fine alone).
read_history reader || { cat "$WORK/tail2.err"; say "the one-off reader failed; once more"; read_history reader2; } \
    || { cat "$WORK/tail2.err"; die "a one-off container could not read the history"; }
summary2=$(python3 -c "$check_py" "${BOTS[*]}" "$WORK/history2.jsonl" "$SIDES") || die "one-off reader saw: $summary2"
say "one-off reader: $summary2"

say "the conversation so far:"
python3 - "$history" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        m = json.loads(line)
        if m["kind"] == "text":
            print(f"  #{m['room']} {m['seq']:>3} {m['sender']:>6}: {m['text']}")
        else:
            print(f"  #{m['room']} {m['seq']:>3} -- {m['sender']} {m['kind']}s")
EOF
say "what alice's container printed (live fan-out it received):"
podman logs --tail 8 "${PROJECT}_${BOTS[0]}_1" 2>&1 | sed 's/^/  /'
if [[ ${#WEB[@]} == 1 ]]; then
    say "checking that the web service's page answers on the host's port $ZCHAT_WEB_PORT"
    page_py='import sys, urllib.request; page = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=3).read().decode(); sys.exit(0 if "id=\"signin-form\"" in page else 1)'
    until python3 -c "$page_py" "$ZCHAT_WEB_PORT" 2>/dev/null; do
        ((SECONDS < deadline)) || die "the web page did not answer on 127.0.0.1:$ZCHAT_WEB_PORT within ${TIMEOUT}s"
        sleep 1
    done
    say "web: the page answers on http://127.0.0.1:$ZCHAT_WEB_PORT/"
fi
say "OK: ${#BOTS[@]} bots in separate containers chatted through the broker${SIDES:+s (across brokers)}; history holds it"
