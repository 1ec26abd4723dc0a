#!/bin/sh
# The interpreter of DiffJAX's Bazel Python toolchain (tools/bazel/BUILD): the project's
# virtualenv, so that jax, flax, orbax, ... are those `make install` put there.
# DIFFJAX_PYTHON (passed with --action_env / --test_env) selects another interpreter.
if [ -n "${DIFFJAX_PYTHON:-}" ]; then
    exec "$DIFFJAX_PYTHON" "$@"
fi
# This file reaches Bazel's runfiles as a symlink; its target lies in the source tree.
root=$(dirname "$(dirname "$(dirname "$(readlink -f "$0")")")")
if [ ! -x "$root/.venv/bin/python" ]; then
    echo "tools/bazel/venv_python.sh: $root/.venv/bin/python is missing: run 'make install' first" >&2
    exit 1
fi
exec "$root/.venv/bin/python" "$@"
