"""Every path on gs://, against a real GCS API server on 127.0.0.1 (fake-gcs-server): training with
2 processes on a bucket workdir through kill -9 and resume, sample / eval / serve / import reading
and writing the bucket, folder: datasets, statistics and Inception weights in the bucket, and the
bad-input lines. Clients find the server through STORAGE_EMULATOR_HOST alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from gcs_emulator import GcsEmulator, run_watched
from tiny_configs import DIGITS, TOY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launch.local import free_port, process_env  # noqa: E402

BUCKET = "bkt"
# In `make test`; `make test-gcs` runs only these. Every diffjax process runs watched (run_watched):
# one that outlives its timeout fails the test with its threads' stacks, TensorStore's GCS request
# log and whether the emulator still answers.
pytestmark = pytest.mark.gcs


@pytest.fixture(scope="module")
def gcs():
    """The emulator, its bucket, and this process pointed at it (restored afterwards)."""
    names = ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")
    bridged = ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "EPATH_USE_TF")
    saved = {k: os.environ.get(k) for k in (*names, *bridged)}
    with GcsEmulator() as emulator:
        emulator.create_bucket(BUCKET)
        os.environ.update({k: v for k, v in emulator.env({}).items()})
        from diffjax import storage

        storage.configure()
        yield emulator
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _env(gcs, devices=1, trace=False):
    """The emulator's environment. trace: TensorStore logs each GCS request and response on stderr,
    so that a training run that hangs (run_watched) shows the last ones before its threads' stacks."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return gcs.env(dict(env, TENSORSTORE_VERBOSE_LOGGING="gcs_http=1") if trace else env)


def _diffjax(gcs, *args, cwd, timeout=600, devices=1, trace=False):
    env = _env(gcs, devices, trace)
    return run_watched([sys.executable, "-m", "diffjax", *args], cwd=cwd, env=env, timeout=timeout, gcs=gcs)


def _steps(gcs, prefix):
    """Finished checkpoint steps under gs://bkt/<prefix>/checkpoints (orbax's commit marker)."""
    found = set()
    for name in gcs.objects(BUCKET, f"{prefix}/checkpoints/"):
        m = re.match(rf"{prefix}/checkpoints/(\d+)/commit_success.txt$", name)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def _params(workdir):
    import jax

    from diffjax.workdir import load_workdir

    *_, state, step = load_workdir(workdir)
    return step, [np.asarray(x) for x in jax.tree.leaves(state["params"])], np.asarray(state["rng"])


def test_two_processes_train_on_a_bucket_through_kill9_and_resume_bit_identical(gcs, tmp_path):
    """2 processes (gloo) train the toy MLP into gs://bkt/killed; both are killed with kill -9 after a
    checkpoint is in the bucket; the relaunch resumes and ends bit-identical to an uninterrupted
    2-process run into gs://bkt/ref. metrics.jsonl in the bucket holds each step once; nothing is
    written to a local folder named gs:."""
    flags = [*TOY, "--config.training.n_iters=16", "--config.training.snapshot_freq=4", "--log_upload_s=1"]
    launch = [sys.executable, f"{ROOT}/launch/local.py", "--num-processes=2", "--devices-per-process=1", "--"]

    def train(name):
        return [sys.executable, "-m", "diffjax", "train", f"--workdir=gs://{BUCKET}/{name}", *flags]

    res = run_watched([*launch, *train("ref")], cwd=tmp_path, env=_env(gcs, trace=True), timeout=600, gcs=gcs)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _steps(gcs, "ref")[-1] == 16

    port = free_port()  # the two processes started by hand, so that both can be killed with kill -9
    procs = [
        subprocess.Popen(
            train("killed"),
            cwd=tmp_path,
            env=process_env(_env(gcs), i, 2, 1, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 4 for s in _steps(gcs, "killed")):
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert 0 < max(_steps(gcs, "killed")) < 16, "the kill must land mid-run"
    res = run_watched([*launch, *train("killed")], cwd=tmp_path, env=_env(gcs, trace=True), timeout=600, gcs=gcs)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from step" in res.stdout, res.stdout[-3000:]
    assert "Python is likely shutting down" not in res.stdout + res.stderr

    step_a, params_a, rng_a = _params(f"gs://{BUCKET}/ref")
    step_b, params_b, rng_b = _params(f"gs://{BUCKET}/killed")
    assert step_a == step_b == 16
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rng_a, rng_b)
    from diffjax import storage

    for name in ("ref", "killed"):
        lines = [json.loads(x) for x in storage.path(f"gs://{BUCKET}/{name}/metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines if "loss" in m] == list(range(2, 17, 2))  # once each, despite the kill
        assert any(n.startswith(f"{name}/tensorboard/events.out.tfevents.") for n in gcs.objects(BUCKET, name))
        assert f"{name}/samples/step_00000016.png" in gcs.objects(BUCKET, name)
    assert not (tmp_path / "gs:").exists() and not os.path.exists(os.path.join(ROOT, "gs:"))


@pytest.fixture(scope="module")
def digits_bucket(gcs, tmp_path_factory):
    """A tiny digits UNet trained into gs://bkt/digits by one process."""
    cwd = tmp_path_factory.mktemp("digits")
    res = _diffjax(gcs, "train", f"--workdir=gs://{BUCKET}/digits", *DIGITS, cwd=cwd, trace=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return f"gs://{BUCKET}/digits", cwd


def test_sample_and_eval_read_and_write_the_bucket(gcs, digits_bucket):
    from diffjax import storage

    workdir, cwd = digits_bucket
    res = _diffjax(gcs, "sample", f"--workdir={workdir}", "--num=4", f"--out={workdir}/grid.png", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    from PIL import Image

    with storage.path(f"{workdir}/grid.png").open("rb") as f:
        assert Image.open(f).size[0] > 8
    with storage.open_npz(f"{workdir}/grid.npz") as f:
        assert f["samples"].shape == (4, 8, 8, 1)

    res = _diffjax(
        gcs, "eval", f"--workdir={workdir}", "--num=24", "--shard_size=16", "--metrics=digits", "--no_progress", cwd=cwd
    )
    assert res.returncode == 0, res.stderr[-3000:]
    written = res.stdout.strip().splitlines()[-1].removeprefix("wrote ")
    assert written.startswith(f"{workdir}/eval/step_2_") and written.endswith(".json")
    record = json.loads(storage.path(written).read_text())
    assert record["step"] == 2 and np.isfinite(record["metrics"]["digits_fid"])
    shards = [n for n in gcs.objects(BUCKET, "digits/eval/") if re.search(r"/samples_\d{6}\.npz$", n)]
    assert len(shards) == 2  # 24 samples in shards of 16
    assert not (cwd / "gs:").exists()


def test_serve_loads_and_reloads_from_the_bucket(gcs, digits_bucket, tmp_path):
    """`diffjax serve --workdir gs://...` answers from the bucket's checkpoint and picks up a newer
    one trained into the bucket while it runs."""
    from diffjax.serving import Client, subprocess_server

    workdir, cwd = digits_bucket
    served = f"gs://{BUCKET}/served"
    res = _diffjax(gcs, "train", f"--workdir={served}", *DIGITS, cwd=cwd, trace=True)
    assert res.returncode == 0, res.stderr[-3000:]
    server = subprocess_server.ServerProcess(served, "--batch_slots=4", "--reload_s=0.5", env=_env(gcs), cwd=str(cwd))
    try:
        with Client(server.addr, timeout=120) as client:
            assert client.model_info().checkpoint_step == 2
            assert client.sample(2, num_steps=4, seed=1).shape == (2, 8, 8, 1)
            res = _diffjax(gcs, "train", f"--workdir={served}", *DIGITS, "--config.training.n_iters=4", cwd=cwd, trace=True)
            assert res.returncode == 0, res.stderr[-3000:]
            deadline = time.time() + 120
            while time.time() < deadline and client.status().checkpoint_step != 4:
                time.sleep(0.2)
            assert client.status().checkpoint_step == 4, "".join(server.lines)[-3000:]
    finally:
        server.stop()


def test_statistics_weights_and_folder_datasets_in_the_bucket(gcs, tmp_path):
    """convert-inception -> gs://, eval stats of a folder:gs:// dataset with gs:// weights -> gs://,
    then eval compare of the same images (an .npz in the bucket) against those statistics: FID ~ 0."""
    torch = pytest.importorskip("torch")
    from PIL import Image
    from torch_peers import fid_inception_peer

    from diffjax import storage
    from diffjax.evaluation import inception_weights, stats

    _, inner = fid_inception_peer(seed=1)
    torch.save(inner.state_dict(), tmp_path / "random.pth")
    weights = f"gs://{BUCKET}/inception/random.npz"
    res = _diffjax(gcs, "eval", "convert-inception", str(tmp_path / "random.pth"), weights, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    images = np.clip(np.random.default_rng(0).normal(128, 40, (6, 32, 32, 3)), 0, 255).astype(np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        storage.path(tmp_path / f"{i}.png").copy(storage.path(f"gs://{BUCKET}/pngs/{i:02d}.png"))
    storage.save_npz(f"gs://{BUCKET}/sets/same.npz", images=images)
    ref = f"gs://{BUCKET}/stats/ref.npz"
    res = _diffjax(
        gcs,
        "eval",
        "stats",
        f"--data=folder:gs://{BUCKET}/pngs",
        "--image_size=32",
        f"--out={ref}",
        f"--inception_weights={weights}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = stats.load_stats(ref, expect_extractor=inception_weights.file_sha256(weights))
    assert loaded.meta["num_images"] == 6 and loaded.mu.shape == (2048,)
    res = _diffjax(
        gcs,
        "eval",
        "compare",
        f"gs://{BUCKET}/sets/same.npz",
        ref,
        "--metrics=fid",
        f"--inception_weights={weights}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    fid = float(next(line for line in res.stdout.splitlines() if line.startswith("| FID |")).split("|")[2])
    assert abs(fid) < 1e-2
    assert not (tmp_path / "gs:").exists()


def test_bad_storage_input_is_one_line_and_writes_nothing(gcs, tmp_path):
    """A bucket that does not exist, and gs:// with neither credentials nor an emulator: one line
    each, exit 2, before anything is built or written."""
    res = _diffjax(gcs, "train", "--workdir=gs://no-such-bucket/run", *TOY, "--config.training.n_iters=2", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert "--workdir gs://no-such-bucket/run" in line and "bucket" in line
    assert "no-such-bucket/" not in " ".join(gcs.objects(BUCKET))

    emulator = (
        "STORAGE_EMULATOR_HOST",
        "TENSORSTORE_GCS_HTTP_URL",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    )
    bare = {k: v for k, v in _env(gcs).items() if k not in (*emulator, "GOOGLE_APPLICATION_CREDENTIALS")}
    bare.update(NO_GCE_CHECK="true", HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    for args in (
        ["train", f"--workdir=gs://{BUCKET}/nocreds", *TOY],
        ["sample", f"--workdir=gs://{BUCKET}/nocreds"],
        ["eval", "stats", "--data=digits", f"--out=gs://{BUCKET}/nocreds/ref.npz"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "diffjax", *args], cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 2, (args, res.stderr[-2000:])
        (line,) = res.stderr.strip().splitlines()
        assert "no Google credentials found" in line and "gcloud auth application-default login" in line, line
    assert not [n for n in gcs.objects(BUCKET) if n.startswith("nocreds/")]
