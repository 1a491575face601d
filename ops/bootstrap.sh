#!/usr/bin/env bash
# Installs everything Meridian needs on a fresh machine, idempotently, then returns.
# Sourced by ops/run and ops/test; safe to run by hand.  Needs: python3.11+ with venv.
# OS packages (PostgreSQL server binaries, redis-server) are installed with apt when missing
# and we are root; otherwise we say what to install and stop.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MERIDIAN_VENV:-$ROOT/.venv}"

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

need_apt=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ "${MERIDIAN_WITH_PROMETHEUS:-1}" = 1 ] && ! command -v promtool >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  need_apt+=(prometheus)   # optional: metrics server + promtool rule checks
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing OS packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # --no-install-recommends: we run our own servers; never enable the distro services here
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null \
      || say "warning: apt-get install ${need_apt[*]} failed"
  else
    say "missing OS packages: ${need_apt[*]} (install them, e.g. 'sudo apt-get install ${need_apt[*]}')"
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v redis-server >/dev/null || exit 1
  fi
fi

PY="${MERIDIAN_PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(not (3,11) <= sys.version_info[:2] < (3,14))'; then
      PY="$c"; break
    fi
  done
fi
[ -n "$PY" ] || { say "need Python 3.11-3.13 on PATH"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.meridian-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c 'import ops.cli' >/dev/null 2>&1; then
  say "installing Python dependencies into $VENV (pip install -e .[dev])"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  echo "$want" > "$stamp"
fi
