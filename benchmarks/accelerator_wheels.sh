#!/usr/bin/env bash
# Wheels for an offline GPU machine that already has JAX (CUDA), flax, optax, orbax, diffrax and
# PyTorch for Python 3.12 but no registry: run this on a machine with network, carry the folder
# over, then on the GPU machine (from the repository root):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 benchmarks/accelerator.py --out accel.json
#
#   bash benchmarks/accelerator_wheels.sh [DIR (default .whl)] [PYTHON_VERSION (default 3.12)]
#
# Only our dependencies that such images lack (and their own needs), pinned to what was run on an
# H100 on 2026-11-22; --no-deps keeps pip from pulling a second JAX or torch.
set -euo pipefail
dest="${1:-.whl}"
pyver="${2:-3.12}"
pip="${PIP:-python3 -m pip}"
wheels=(
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0      # input pipeline (trainer, digits server model)
  ml-collections==1.1.0 tensorboardX==2.6.5                 # configs, training logs
  grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2  # the server
  prometheus-client==0.26.0                                 # the server's metrics (imported at start)
  diffusers==0.42.1 importlib-metadata==10.2.0              # the PyTorch peer
)
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  platforms+=(--platform "${tag}_x86_64")
done
mkdir -p "$dest"
$pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" --platform any -d "$dest" "${wheels[@]}"
ls -1 "$dest"
