#!/usr/bin/env bash
# The main job on a fresh machine: venv + install, then a broker on 127.0.0.1:5555
# (embedded defaults, state in $P2PCHAT_HOME or ~/.p2pchat) and a desktop client.
# Extra arguments go to the client, e.g.: scripts/run.sh --user alice
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import tkinter' >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-tk >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .

PORT="${P2PCHAT_PORT:-5555}"
.venv/bin/p2pchat broker --host 127.0.0.1 --port "$PORT" &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null || true' EXIT INT TERM

if [ -n "${DISPLAY:-}" ]; then
  .venv/bin/p2pchat gui --server "127.0.0.1:$PORT" "$@"
else
  echo "No DISPLAY: running the terminal listener instead of the window (Ctrl+C to stop)."
  echo "Send it a message from another terminal: .venv/bin/p2pchat send --user bob --to ${P2PCHAT_USER:-$(id -un)} hello"
  .venv/bin/p2pchat listen --server "127.0.0.1:$PORT" "$@"
fi
