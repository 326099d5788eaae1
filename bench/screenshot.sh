#!/usr/bin/env bash
# Start the demo on 127.0.0.1, open the compare view with example 0 run on load (?example=0) in
# headless Chromium, save a screenshot, stop the server.
#
#   bench/screenshot.sh [OUT.png] [EXAMPLE_INDEX]        (default: out/screenshot-compare.png, 0)
#   PORT=7870 PYTHON=.venv/bin/python bench/screenshot.sh
#   SERVE_ARGS="--patch runs/organism/patch" bench/screenshot.sh     # options for load_test.py --serve-only
#
# Serves the organism with its bundled patch when they exist, else a random organism-shaped model
# (see bench/load_test.py --serve-only). Installs chromium with apt-get if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${1:-out/screenshot-compare.png}"
EXAMPLE="${2:-0}"
PORT="${PORT:-7871}"
PYTHON="${PYTHON:-.venv/bin/python}"
URL="http://127.0.0.1:${PORT}/?example=${EXAMPLE}"

CHROME="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$CHROME" ]]; then
    echo "screenshot: installing chromium (apt-get)" >&2
    apt-get install -y chromium >/dev/null || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; }
    CHROME="$(command -v chromium)"
fi

mkdir -p "$(dirname "$OUT")"
LOG="$(mktemp)"
PROFILE="$(mktemp -d)"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON" bench/load_test.py --serve-only --port "$PORT" ${SERVE_ARGS:-} >"$LOG" 2>&1 &
SERVER=$!
cleanup() {
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    rm -rf "$PROFILE" "$LOG"
}
trap cleanup EXIT

for _ in $(seq 1 240); do  # up to 120 s for the model to load and the server to start
    if "$PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:${PORT}/', timeout=2)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "screenshot: the server exited:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 0.5
done

# Headless Chromium's virtual time runs ahead of the server, so a first (discarded) visit runs the
# example once (the app keeps example answers); the second visit gets them at once.
# --virtual-time-budget lets the page's scripts finish before the capture.
shoot() {
"$CHROME" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$PROFILE" --virtual-time-budget="${BUDGET_MS:-30000}" --hide-scrollbars \
    --screenshot="$1" --window-size="${WINDOW:-1280,1000}" "$URL" 2>/dev/null
}
shoot "$PROFILE/warm.png"
sleep "${WARM_S:-3}"
shoot "$OUT"
echo "wrote $OUT ($URL)"
