"""Evaluation-scale sample sets (`diffjax sample --out_dir`): real processes, real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_configs import DIGITS

from diffjax.evaluation import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny class-conditional digits UNet trained for 2 steps: a real checkpoint, fast to sample.
TINY = [*DIGITS, "--config.model.num_classes=10"]
SAMPLE = ["--sampler=ancestral", "--steps=4", "--seed=3", "--no_progress"]


def _env(devices=1):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _sample(workdir, out_dir, num, shard_size, devices=1, *extra):
    cmd = [
        sys.executable,
        "-m",
        "diffjax",
        "sample",
        f"--workdir={workdir}",
        f"--num={num}",
        f"--out_dir={out_dir}",
        f"--shard_size={shard_size}",
        *SAMPLE,
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "w"
    res = subprocess.run(
        [sys.executable, "-m", "diffjax", "train", f"--workdir={path}", *TINY],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def reference(workdir, tmp_path_factory):
    """200 samples on 1 device in shards of 8."""
    out = tmp_path_factory.mktemp("ref") / "set"
    res = _sample(workdir, out, 200, 8)
    assert res.returncode == 0, res.stderr[-3000:]
    return generate.read_set(str(out))


def test_set_is_the_same_on_8_devices_and_any_shard_size(workdir, reference, tmp_path):
    images, protocol = reference
    assert images.shape == (200, 8, 8, 1) and images.dtype == np.uint8
    assert protocol["num"] == 200 and protocol["sampler"] == "ancestral" and protocol["quantize"] == "round"
    assert images.std() > 10  # not a constant image
    res = _sample(workdir, tmp_path / "eight", 200, 48, 8)  # 6 per device per call, last shard padded
    assert res.returncode == 0, res.stderr[-3000:]
    images8, _ = generate.read_set(str(tmp_path / "eight"))
    np.testing.assert_array_equal(images8, images)
    labels = [np.load(p)["labels"] for p in sorted((tmp_path / "eight").glob("samples_*.npz"))]
    labels = np.concatenate(labels)
    assert labels.shape == (200,) and set(np.unique(labels)) == set(range(10))  # each index its own label


def test_kill9_then_restart_skips_finished_shards(workdir, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "diffjax",
        "sample",
        f"--workdir={workdir}",
        "--num=200",
        f"--out_dir={out}",
        "--shard_size=2",
        *SAMPLE,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("samples_*.npz"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("samples_*.npz")))
    assert 3 <= written < 100, "the kill must land mid-run"
    for p in out.glob("samples_*.npz"):  # every shard under its final name is whole
        assert np.load(p)["images"].shape == (2, 8, 8, 1)
    res = _sample(workdir, out, 200, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{written} of 100 shards already written; resuming" in res.stdout
    np.testing.assert_array_equal(generate.read_set(str(out))[0], reference[0])


def test_tail_shard_reuses_the_compiled_sampler(workdir, reference, tmp_path, monkeypatch):
    """num not a multiple of shard_size: the last shard (4 of 16) is drawn at the full shard's batch
    and cut, so every sampler call has one shape and the sampler compiles once; the kept rows are
    the set's (the reference's first 20). In process, on the 8 devices of tests/conftest.py."""
    from diffjax import samplers
    from diffjax.workdir import Workdir

    w = Workdir(str(workdir), inference=True)
    state, step = w.restore(only=("ema",))
    shapes, sample = [], samplers.sample
    monkeypatch.setattr(samplers, "sample", lambda *a, **k: shapes.append(a[4]) or sample(*a, **k))
    compiled = samplers._run._cache_size()
    generate.write_samples(
        w, state, step, str(tmp_path / "set"), 20, sampler="ancestral", steps=4, seed=3, shard_size=16, progress=False
    )
    assert shapes == [(16, 8, 8, 1)] * 2
    assert samplers._run._cache_size() - compiled <= 1  # one compile (none if this process had it already)
    images, protocol = generate.read_set(str(tmp_path / "set"))
    assert protocol["num"] == 20 and images.shape == (20, 8, 8, 1)
    np.testing.assert_array_equal(images, reference[0][:20])


def test_restart_with_other_settings_is_refused(workdir, reference, tmp_path):
    out = tmp_path / "set"
    assert _sample(workdir, out, 8, 4).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = _sample(workdir, out, 8, 4, 1, "--seed=4")
    assert res.returncode == 2 and "already holds a different sample set" in res.stderr and "seed" in res.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_same_settings_with_tuples_resume(tmp_path):
    """Options such as clip_x0=(-1, 1) come back from protocol.json as lists: still the same set
    (`diffjax eval` re-run on a ddpm_cifar10 workdir was refused before)."""
    protocol = dict(num=8, sampler="ancestral", options={"clip_x0": (-1.0, 1.0)}, data_range=(-1.0, 1.0))
    generate._agree_protocol(str(tmp_path), protocol)
    generate._agree_protocol(str(tmp_path), dict(protocol))  # the same set: accepted
    with pytest.raises(ValueError, match="clip_x0"):
        generate._agree_protocol(str(tmp_path), dict(protocol, options={"clip_x0": (0.0, 1.0)}))


def test_read_set_reports_missing_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="protocol.json"):
        generate.read_set(str(tmp_path))
    (tmp_path / "protocol.json").write_text('{"num": 10, "shard_size": 4}')
    with pytest.raises(ValueError, match="3 of 3 shards are missing"):
        generate.read_set(str(tmp_path))


def test_quantize_matches_edm_and_score_sde_rules():
    x = np.random.default_rng(0).uniform(-1.1, 1.1, 10_000)
    x[:4] = [-1.0, 1.0, 0.0, 1.0 / 255]
    edm = np.clip(np.floor(x * 127.5 + 128), 0, 255)  # EDM: (x * 127.5 + 128).clip(0, 255).to(uint8)
    np.testing.assert_array_equal(generate.quantize(x, (-1, 1), "round"), edm)
    score_sde = np.floor(np.clip((x + 1) / 2 * 255, 0, 255))  # score_sde: clip(x01 * 255).astype(uint8)
    np.testing.assert_array_equal(generate.quantize(x, (-1, 1), "floor"), score_sde)
    assert list(generate.quantize(np.array([0.0, 1.0]), (0, 1))) == [0, 255]
    with pytest.raises(ValueError, match="quantize must be one of"):
        generate.quantize(x, (-1, 1), "nearest")


def test_grid_samples_are_split_over_the_devices_and_equal_one_unsharded_call(workdir):
    """diffjax.sample.generate (grids, training-time FID) splits the batch over the 8 devices (5
    samples padded to 8): the samples equal one unsharded sampler call on the same noise."""
    import jax

    from diffjax import network, samplers
    from diffjax.sample import config_sampler, generate
    from diffjax.workdir import Workdir

    w = Workdir(str(workdir), inference=True)
    state, _ = w.restore(only=("ema",))
    calls, sample = [], samplers.sample
    spy = lambda *a, **k: calls.append((a[4], k["indices"].sharding.num_devices)) or sample(*a, **k)  # noqa: E731
    samplers.sample = spy
    try:
        got = generate(w.config, w.graphdef, w.rest, w.process, state["ema"], 5, sampler="ddim", steps=4, seed=7)
    finally:
        samplers.sample = sample
    assert calls == [((8, 8, 8, 1), 8)]
    den = network.network_denoiser(w.graphdef, w.rest, w.process, w.config, state["ema"])
    name, steps, opts = config_sampler(w.config, "ddim", 4, {})
    whole, _ = sample(name, den, w.process, jax.random.PRNGKey(7), (5, 8, 8, 1), steps, **opts)
    np.testing.assert_allclose(got, np.clip(np.asarray(whole), -1, 1), atol=1e-5)
