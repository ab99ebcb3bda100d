#!/bin/sh
# Install smtp-gateway into ./.venv with this machine's python3 (3.11+), so it works where the system Python
# refuses pip installs (PEP 668: Debian 12, Ubuntu 24.04) and where venv/ensurepip is a separate package.
#
#   ./install.sh            the gateway:            .venv/bin/smtp-gateway
#   ./install.sh --test     and the test tools:     .venv/bin/python -m pytest -q
#
# Environment: PYTHON (default python3), VENV (default .venv; a relative path is taken from this tree, where
# install.sh is); pip's own PIP_* variables apply (CI installs the minimum versions with PIP_CONSTRAINT).
set -eu
start=$(pwd -P)
cd "$(dirname "$0")"
tree=$(pwd -P)

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
target=.
case "${1:-}" in
  "") ;;
  --test) target=".[test]" ;;
  *) echo "usage: ./install.sh [--test]" >&2; exit 2 ;;
esac

say() { echo "install.sh: $*" >&2; }

# A path as the user can paste it where they started install.sh: relative to this tree only when that is
# where they are (the README's `.venv/bin/smtp-gateway`), else absolute; quoted when the shell would split it.
shown() {
  case $1 in
    /*) p=$1 ;;
    *) if [ "$start" = "$tree" ]; then p=$1; else p=$tree/${1#./}; fi ;;
  esac
  case $p in
    *[!A-Za-z0-9_./+:@%=,-]*) printf "'%s'" "$(printf '%s' "$p" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$p" ;;
  esac
}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  say "no $PYTHON found: install Python 3.11 or newer (Debian/Ubuntu: apt-get install python3 python3-venv)"
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); smtp-gateway needs 3.11 or newer (set PYTHON=python3.11)"
  exit 1
fi

# Debian and Ubuntu ship venv's ensurepip in a separate package (python3.X-venv).
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  pkg=python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "$PYTHON cannot create virtual environments: installing $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  else
    say "$PYTHON cannot create virtual environments; install its venv package first, then run ./install.sh again:"
    say "  sudo apt-get install $pkg        (Debian/Ubuntu; elsewhere the package that provides venv/ensurepip)"
    exit 1
  fi
fi

# A venv made by another Python than $PYTHON (or too old, or half-made) is made anew: PYTHON=python3.12
# after a first install with python3 must not keep the old one. Half made: an install interrupted while
# `python -m venv` ran (Ctrl-C, a full disk, a dropped session) leaves its interpreter without pip, and every
# re-run would fail at pip.
base='import sys; print(sys.base_prefix, sys.version)'
if [ -x "$VENV/bin/python" ]; then
  if [ "$("$VENV/bin/python" -c "$base" 2>/dev/null)" != "$("$PYTHON" -c "$base")" ]; then
    say "$VENV was made with another Python: making it anew with $PYTHON"
    rm -rf "$VENV"
  elif ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    say "$VENV is half made (no pip: an interrupted install?): making it anew"
    rm -rf "$VENV"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi

# pip's lines are shown as they come and kept, to tell a missing network from other failures: pip's own last
# line is then "No matching distribution found", which reads like a version problem.
log=$(mktemp)
trap 'rm -f "$log" "$log.rc"' EXIT
status=0
{ "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --editable "$target" 2>&1 || echo "$?" >"$log.rc"; } | tee "$log" >&2
if [ -e "$log.rc" ]; then
  status=$(cat "$log.rc")
  rm -f "$log.rc"
fi
again="run $(shown ./install.sh)${1:+ $1} again"
if [ "$status" != 0 ]; then
  if grep -Eq 'NewConnectionError|ConnectTimeoutError|ReadTimeoutError|ProxyError|Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|Network is unreachable|Connection refused|Could not fetch URL' "$log"; then
    say "pip could not reach the package index (no network, or a proxy needed? https_proxy, PIP_INDEX_URL and PIP_FIND_LINKS apply): $again once it is reachable"
  else
    say "pip failed: see the lines above; $again once it is fixed"
  fi
  exit 1
fi
run=$(shown "$VENV/bin/smtp-gateway")
say "installed into $(shown "$VENV"): run $run (e.g. $run quickstart)"
