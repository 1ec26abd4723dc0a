#!/usr/bin/env bash
# Regenerate requirements.lock: the exact version of every package `make install` (the README's
# commands) puts in .venv, resolved in a fresh virtualenv from pyproject.toml's dependencies and
# its test + bench extras. `make install` then installs with `-c requirements.lock`, so every run
# of the README's commands, CI's included, gets the same environment, and a reproduction can name
# it. Local version labels (torch's +cpu) are dropped: `torch==2.13.0` matches the CPU build.
#   usage: bash tools/lock.sh   (or: make lock)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q '.[test,bench]'
{
    echo "# requirements.lock: written by tools/lock.sh (make lock); do not edit by hand."
    echo "# $("$tmp/venv/bin/python" --version), $(uname -s) $(uname -m), $(date -u +%Y-%m-%d)"
    "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable |
        grep -v -i -E '^(diffjax|pip|setuptools|wheel)( @|==)' |
        sed -E 's/\+[A-Za-z0-9_.]+$//' |
        LC_ALL=C sort -f
} >requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
