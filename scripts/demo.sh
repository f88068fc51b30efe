#!/usr/bin/env bash
# The compose demo as local processes: a broker on a temporary database and free
# ports, three bots chatting in #general, then the conversation as `zchat tail` prints it.
#
#   scripts/demo.sh                 # about 15 seconds
#   DEMO_LINES=10 scripts/demo.sh   # longer
#
# Runs this checkout with `python3 -m zchat` (PYTHON=... picks the interpreter), or
# `zchat` from PATH when that Python lacks the dependencies. Settings and name
# secrets go to a temporary directory, never to your own config. Everything it starts
# is stopped by PID on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LINES=${DEMO_LINES:-5}
PY=${PYTHON:-python3}

# This checkout's code when its Python has the dependencies, else `zchat` from PATH.
if [[ -f $ROOT/zchat/__init__.py ]] && "$PY" -c "import zmq, msgspec, click, platformdirs" 2>/dev/null; then
    ZCHAT=("$PY" -m zchat)
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
elif command -v zchat >/dev/null 2>&1; then
    ZCHAT=(zchat)
else
    echo "demo: install zchat first (pip install .), or set PYTHON to a Python that has its dependencies" >&2
    exit 1
fi

WORK=$(mktemp -d -t zchat-demo.XXXXXX)
export ZCHAT_CONFIG_DIR="$WORK/config" ZCHAT_DATA_DIR="$WORK/data"
unset ZCHAT_CONFIG ZCHAT_NAME ZCHAT_BROKER ZCHAT_BIND ZCHAT_DB ZCHAT_STORAGE
PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A port P with P..P+3 free on 127.0.0.1 (the broker binds all four; P+3 answers its
# public key, which the clients on loopback pin without a question: all encrypted).
PORT=$("$PY" - <<'EOF'
import socket
for _ in range(200):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    if base + 3 >= 65535:
        continue
    try:
        socks = []
        for port in (base + 1, base + 2, base + 3):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(base)
    break
else:
    raise SystemExit("no four free ports in a row")
EOF
)
BROKER="tcp://127.0.0.1:$PORT"

echo "== broker on $BROKER, history in $WORK/data/history.db"
"${ZCHAT[@]}" broker --bind "$BROKER" --db "$WORK/data/history.db" --log-level WARNING 2>"$WORK/broker.log" &
PIDS+=($!)
BROKER_PID=$!

deadline=$((SECONDS + 20))
until "${ZCHAT[@]}" ping --broker "$BROKER" --name demo --timeout 1 >/dev/null 2>&1; do
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        cat "$WORK/broker.log" >&2
        echo "demo: the broker exited" >&2
        exit 1
    fi
    ((SECONDS < deadline)) || { echo "demo: the broker did not answer in 20s" >&2; exit 1; }
    sleep 0.2
done

echo "== bots alice, bob and carol say $LINES lines each in #general and answer mentions"
BOT_PIDS=()
for spec in alice:1.0 bob:1.3 carol:1.7; do
    name=${spec%%:*} every=${spec##*:}
    "${ZCHAT[@]}" bot --broker "$BROKER" --name "$name" --room general --every "$every" --count "$LINES" --reply \
        >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PIDS+=($!)
    BOT_PIDS+=($!)
done
status=0
for pid in "${BOT_PIDS[@]}"; do
    wait "$pid" || status=$?
done
if ((status != 0)); then
    for name in alice bob carol; do
        echo "-- $name" >&2
        cat "$WORK/$name.err" >&2
    done
    echo "demo: a bot failed (exit $status)" >&2
    exit 1
fi

echo "== the conversation, as \`zchat tail --history 100\` shows it"
"${ZCHAT[@]}" tail --broker "$BROKER" --name demo --room general --history 100 --timeout 1 2>/dev/null

echo "== the same as JSON lines (zchat tail --json), first three"
"${ZCHAT[@]}" tail --broker "$BROKER" --name demo --room general --history 100 --json --timeout 1 2>/dev/null | head -n 3 || true

echo "== what alice heard live"
tail -n 4 "$WORK/alice.out"
