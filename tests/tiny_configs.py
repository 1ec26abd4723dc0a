"""The tiny training configs the tests train real workdirs with (seconds, not minutes), as
`diffjax train` flags. A test file adds what it needs (classes, label dropout, ...) after them."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The digits UNet cut to one level of one block at width 8: a real image checkpoint in 2 steps.
DIGITS = [
    f"--config={ROOT}/configs/digits.py",
    "--config.training.n_iters=2",
    "--config.training.snapshot_freq=2",
    "--config.training.eval_freq=0",
    "--config.training.batch_size=16",
    "--config.training.n_jitted_steps=1",
    "--config.model.nf=8",
    "--config.model.ch_mult=(1,)",
    "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=()",
    "--config.sampling.sampler=ddim",
    "--config.sampling.num_steps=4",
    "--no_progress",
]

# The MLP on the 8-Gaussians mixture with cheap snapshots (n_iters is the test's).
TOY = [
    f"--config={ROOT}/configs/toy/eight_gaussians.py",
    "--config.training.batch_size=32",
    "--config.training.n_jitted_steps=2",
    "--config.training.log_freq=2",
    "--config.training.eval_freq=0",
    "--config.sampling.sampler=ddim",
    "--config.sampling.num_steps=4",
    "--config.model.nf=32",
    "--config.optim.warmup=0",
    "--no_progress",
]

# configs/dit/cifar10_b2.py (class-conditional DiT, learned sigma, hybrid loss) cut to one block of width 32
# on the 8x8 digits: 4 tokens of 4x4 patches, 2 steps.
DIT_DIGITS = [
    f"--config={ROOT}/configs/dit/cifar10_b2.py",
    "--config.data.dataset=digits",
    "--config.data.image_size=8",
    "--config.data.num_channels=1",
    "--config.data.random_flip=False",
    "--config.model.num_res_blocks=1",
    "--config.model.hidden_size=32",
    "--config.model.num_heads=2",
    "--config.model.patch_size=4",
    "--config.model.nf=16",
    "--config.training.n_iters=2",
    "--config.training.snapshot_freq=2",
    "--config.training.eval_freq=0",
    "--config.training.batch_size=16",
    "--config.training.n_jitted_steps=1",
    "--config.sampling.num_steps=4",
    "--no_progress",
]


def config_file_and_overrides(flags: list[str]) -> tuple[str, list[str]]:
    """(the --config file, the --config.a.b=value overrides) of such a flag list."""
    path = next(f.split("=", 1)[1] for f in flags if f.startswith("--config="))
    return path, [f for f in flags if f.startswith("--config.")]


def one_device_env() -> dict[str, str]:
    """The environment of a command a test starts: the CPU, one device."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def train_workdir(workdir, *flags: str, timeout: float = 300) -> None:
    """`diffjax train --workdir=workdir *flags` in a subprocess on one CPU device; asserts it exits 0."""
    res = subprocess.run(
        [sys.executable, "-m", "diffjax", "train", f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=one_device_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
