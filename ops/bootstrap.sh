#!/usr/bin/env bash
# Installs everything Meridian needs on a fresh machine, idempotently, then returns.
# Sourced by ops/run and ops/test; safe to run by hand.  Needs: python3.11+ with venv.
# OS packages (PostgreSQL server binaries, redis-server) are installed with apt when missing
# and we are root; otherwise we say what to install and stop.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MERIDIAN_VENV:-$ROOT/.venv}"

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; }
have_redis() { command -v redis-server >/dev/null 2>&1; }
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_updated=0
apt_install() {  # best effort; the callers check what they need afterwards
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq >/dev/null || say "warning: apt-get update failed"
    apt_updated=1
  fi
  # --no-install-recommends: we run our own servers; never enable the distro services here
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need_apt=()
have_pg || need_apt+=(postgresql)
have_redis || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  if can_apt; then
    say "installing OS packages: ${need_apt[*]}"
    apt_install "${need_apt[@]}" || say "warning: apt-get install ${need_apt[*]} failed"
  else
    say "missing OS packages: ${need_apt[*]} (install them, e.g. 'sudo apt-get install ${need_apt[*]}')"
  fi
fi
# optional (metrics server + promtool rule checks): apart, so that its absence from the
# distribution never stops the required packages from installing
if [ "${MERIDIAN_WITH_PROMETHEUS:-1}" = 1 ] && ! command -v promtool >/dev/null 2>&1 && can_apt; then
  say "installing OS package: prometheus (optional)"
  apt_install prometheus || say "warning: prometheus not installed (optional: metrics still served)"
fi
# the suite and the mesh cannot run without these: stop here, not far later
if ! have_pg; then
  say "error: PostgreSQL server binaries (initdb) not found; install the 'postgresql' package (e.g. 'sudo apt-get install postgresql') and run this again"
  exit 1
fi
if ! have_redis; then
  say "error: redis-server not found; install the 'redis-server' package (e.g. 'sudo apt-get install redis-server') and run this again"
  exit 1
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

# a venv made while python3-venv was missing has bin/python but no pip: make it again
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  if [ -e "$VENV" ]; then say "recreating virtualenv $VENV (no working pip in it)"; else say "creating virtualenv $VENV"; fi
  if ! "$PY" -m venv --clear "$VENV"; then
    pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if can_apt; then
      say "installing OS packages: python$pyver-venv python3-venv"
      apt_install "python$pyver-venv" || apt_install python3-venv || true
    fi
    "$PY" -m venv --clear "$VENV" || {
      say "error: cannot create $VENV with $PY (install python$pyver-venv, e.g. 'sudo apt-get install python$pyver-venv')"
      exit 1
    }
  fi
fi
stamp="$VENV/.meridian-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c 'import ops.cli' >/dev/null 2>&1; then
  say "installing Python dependencies into $VENV (pip install -e .[dev])"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  echo "$want" > "$stamp"
fi
