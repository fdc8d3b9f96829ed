#!/usr/bin/env bash
# The two set-up commands of the README: `bash ./dev.sh demo` and `bash ./dev.sh test`.
# Each creates .venv (installing python3-venv with apt-get if this Debian lacks it)
# and installs raftsync with what it needs, then runs the demo or the tests.
set -euo pipefail
cd "$(dirname "$0")"

python_bin() {
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$candidate"; return 0
    fi
  done
  echo "raftsync needs Python >= 3.11" >&2; return 1
}

ensure_venv() {
  local py; py=$(python_bin)
  if [ ! -x .venv/bin/python ]; then
    if ! "$py" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      fi
      "$py" -m venv .venv
    fi
  fi
  if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[test]"
    touch .venv/.installed
  fi
}

ensure_fault_tools() {
  # The namespace fault tests (tests/integration/test_netns_*.py) need ip, nft and
  # libfaketime. As root, install what is missing; elsewhere those tests skip saying why.
  local missing=()
  command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)
  command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
  compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || missing+=(faketime)
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
      echo "dev.sh: could not install ${missing[*]}; the namespace fault tests will say why they cannot run" >&2
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    ensure_venv
    exec .venv/bin/raftsync demo "$@"
    ;;
  test)
    ensure_venv
    ensure_fault_tools
    # Slow fault-injection runs are opt-in: `bash ./dev.sh test -m slow`.
    if [ $# -eq 0 ]; then set -- -m "not slow"; fi
    exec .venv/bin/python -m pytest "$@"
    ;;
  bench)
    ensure_venv
    exec .venv/bin/python -m bench.run "$@"
    ;;
  *)
    echo "usage: bash ./dev.sh demo | test [pytest args] | bench" >&2
    exit 2
    ;;
esac
