# Two entry points of the README quick start: `make demo` and `make test`.
# Each creates .venv if missing and installs the package (editable) into it, every dependency at
# the exact version in requirements.lock (`make lock` regenerates it: tools/lock.sh).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LINT_PATHS := diffjax tests benchmarks tools launch configs

.PHONY: demo test test-gcs lint format lock bench bench-accel accel-wheels install clean bazel-build bazel-test bazel-test-all

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The digits demo: train configs/digits.py (resumes if workdir/digits has checkpoints), then
# write samples.png + samples.npz (64 digits), then score 1,024 samples of the config's sampler
# (digits-FID and classifier score beside real digits; workdir/digits/eval/step_N.json).
demo: $(VENV)/.installed
	$(VENV)/bin/diffjax train --config configs/digits.py --workdir workdir/digits
	$(VENV)/bin/diffjax sample --workdir workdir/digits --num 64 --sampler ancestral --steps 1000 --out samples.png
	$(VENV)/bin/diffjax eval --workdir workdir/digits

# make test: lint (ruff check: pyflakes, pycodestyle, import order; ruff format --check; pyproject
# [tool.ruff]), then the suite in TEST_WORKERS pytest-xdist workers (one test file per worker at a
# time: a file's module fixtures, e.g. its trained workdir, are built once; TEST_WORKERS=0 runs in
# one process). Most tests are compile- or start-up-bound on one core: 2 workers on the 2-core CI
# machine ran the suite in 17 min instead of 28. `make format` rewrites the files ruff format would change.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# Only the gs:// tests against fake-gcs-server on 127.0.0.1 (pytest marker gcs; also part of make test).
test-gcs: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 -m gcs tests

lint: $(VENV)/.installed
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

format: $(VENV)/.installed
	$(PY) -m ruff format $(LINT_PATHS)
	$(PY) -m ruff check --fix $(LINT_PATHS)

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -c requirements.lock -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/trainer.py
	$(PY) benchmarks/train_step.py

# The accelerator table (train / sample / server / PyTorch peer) on whatever backend JAX sees;
# BENCH_ACCEL_FLAGS=--quick for a CPU smoke run. accel-wheels: wheels for an offline GPU machine.
BENCH_ACCEL_FLAGS ?=
bench-accel: $(VENV)/.bench
	$(PY) benchmarks/accelerator.py --out bench_out/accelerator.json $(BENCH_ACCEL_FLAGS)

accel-wheels:
	bash benchmarks/accelerator_wheels.sh .whl 3.12

# Bazel (4.2+; Debian: apt-get install bazel-bootstrap). The tests run on the virtualenv's
# Python (tools/bazel/BUILD); --config=offline uses the local stand-ins in tools/bazel/ for the
# repositories Bazel 4 would download. With network: make bazel-test BAZEL_FLAGS=
BAZEL ?= bazel
BAZEL_FLAGS ?= --config=offline

# Every target built (library, CLI, launchers, benchmarks, each test's runfiles), no test run:
# CI runs it before bazel-test, so a dependency missing from a BUILD file shows at once.
bazel-build: $(VENV)/.installed
	$(BAZEL) build $(BAZEL_FLAGS) //...

# The fast subset CI runs: core math, configs and the launchers (//tests:core).
bazel-test: $(VENV)/.installed
	$(BAZEL) test $(BAZEL_FLAGS) //tests:core

# Every test file as a Bazel py_test, plus a build of every target (the CLI, the launchers).
bazel-test-all: $(VENV)/.installed
	$(BAZEL) build $(BAZEL_FLAGS) //...
	$(BAZEL) test $(BAZEL_FLAGS) //tests:all

lock:
	bash tools/lock.sh

clean:
	rm -rf $(VENV) *.egg-info
