"""`diffjax eval` as users run it: real workdirs, real sample sets, every number stored with its protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tiny_configs import DIGITS

from diffjax.evaluation import digits, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = DIGITS


def _env(devices=1):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _diffjax(*args, devices=1, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "diffjax", *args],
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "w"
    res = _diffjax("train", f"--workdir={path}", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    return path


def test_workdir_eval_writes_numbers_with_protocol_and_reuses_the_set(workdir):
    res = _diffjax("eval", f"--workdir={workdir}", "--num=300", "--shard_size=100", "--no_progress")
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((workdir / "eval" / "step_2_ddim4_n300.json").read_text())
    m, p = record["metrics"], record["protocol"]
    assert record["step"] == 2 and m["num"] == 300
    assert p["checkpoint_step"] == 2 and p["sampler"] == "ddim" and p["steps"] == 4 and p["nfe"] == 4
    assert p["seed"] == 0 and p["quantize"] == "round" and p["metrics"] == ["digits"] and p["weights"] == "ema"
    assert p["ema_rate"] == 0.999 and p["wall_s"] > 0
    # a 2-step model draws noise-like digits: far from real ones by both figures
    images = np.concatenate(
        [np.load(f)["images"] for f in sorted((workdir / "eval" / os.path.basename(p["samples"])).glob("samples_*.npz"))]
    )
    direct = digits.digits_report(images)
    assert m["digits_fid"] == pytest.approx(direct["digits_fid"]) and m["digits_fid"] > 100
    assert images.shape == (300, 8, 8, 1)
    res2 = _diffjax("eval", f"--workdir={workdir}", "--num=300", "--shard_size=100", "--no_progress")
    assert res2.returncode == 0 and "3 of 3 shards already written" in res2.stdout
    again = json.loads((workdir / "eval" / "step_2_ddim4_n300.json").read_text())
    assert again["metrics"] == m and again["protocol"]["nfe"] == 4  # the reused set's NFE, from its protocol.json


def test_digits_command_scores_real_digits_near_the_floor(tmp_path):
    real, _ = digits.real_digits("train")
    np.savez(tmp_path / "real.npz", samples=real[:500] * 2 - 1)  # float in [-1, 1], as `diffjax sample` writes
    res = _diffjax("eval", "digits", str(tmp_path / "real.npz"))
    assert res.returncode == 0, res.stderr
    sample_row = next(line for line in res.stdout.splitlines() if line.startswith("| samples:"))
    fid, score = (float(v) for v in sample_row.split("|")[3:5])
    assert fid < 60 and score > 9.0  # real training digits: close to the held-out split, confidently classified
    assert "| real digits, held-out split (297) | 297 | 0.00 |" in res.stdout


def test_digits_classifier_weights_are_accurate_on_held_out_digits():
    x, y = digits.real_digits("eval")
    _, logits = digits.features(x)
    assert np.mean(np.argmax(logits, -1) == y) > 0.93


@pytest.mark.parametrize(
    "args, message",
    [
        (["digits", "missing.npz"], "no such file"),
        (["compare", "a.npz", "b.npz", "--metrics", "fid,sharpness"], "unknown metric(s) ['sharpness']"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "diffjax", "eval", *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_float_images_outside_the_range_are_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", samples=np.full((4, 8, 8, 1), 3.0, np.float32))
    res = _diffjax("eval", "digits", str(tmp_path / "bad.npz"))
    assert res.returncode == 2 and "must lie in --data_range -1.0 1.0" in res.stderr


def test_parse_metrics():
    assert evaluate.parse_metrics("fid, is") == ("fid", "is")
    with pytest.raises(ValueError, match="choose from fid,is,kid,pr,digits"):
        evaluate.parse_metrics("fid,lpips")


VP_DIGITS = """from configs import default, digits


def get_config():
    config = digits.get_config()
    config.process = default.process("vp", beta_min=0.1, beta_max=20.0)
    return config
"""


def test_bits_per_dim_on_a_split_is_the_same_sharded_and_reports_its_stderr(tmp_path):
    (tmp_path / "vp_digits.py").write_text(VP_DIGITS)
    wd = tmp_path / "vp"
    args = [a for a in TINY if not a.startswith("--config=")]
    res = _diffjax("train", f"--workdir={wd}", f"--config={tmp_path / 'vp_digits.py'}", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    records = []
    for devices in (1, 8):
        res = _diffjax(
            "eval", "bpd", f"--workdir={wd}", "--num=12", "--passes=2", "--batch_size=8", "--no_progress", devices=devices
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "bits/dim on eval:" in res.stdout
        records.append(json.loads((wd / "eval" / "bpd_step_2.json").read_text()))
    m, p = records[0]["metrics"], records[0]["protocol"]
    assert m["num"] == 12 and m["passes"] == 2 and 0 < m["bpd_stderr"] < m["bpd"] < 50
    assert p["dequantization"] == "uniform" and p["split"] == "eval" and p["mean_nfe"] > 10
    assert records[1]["metrics"]["bpd"] == pytest.approx(m["bpd"], rel=1e-4)  # padding + sharding change nothing


def test_ode_bits_per_dim_of_a_discrete_chain_is_refused(workdir):
    res = _diffjax("eval", "bpd", f"--workdir={workdir}", "--num=4", "--method=ode")
    assert res.returncode == 2 and "discrete chain" in res.stderr


# ---- Inception-based commands, with pytorch-fid's network at random weights ---------------------
@pytest.fixture(scope="module")
def inception_npz(tmp_path_factory):
    """A random-weights FID Inception saved as pytorch-fid's .pth, converted by the CLI to .npz."""
    torch = pytest.importorskip("torch")
    from torch_peers import fid_inception_peer

    tmp = tmp_path_factory.mktemp("inception")
    _, inner = fid_inception_peer(seed=1)
    torch.save(inner.state_dict(), tmp / "random.pth")
    res = _diffjax("eval", "convert-inception", str(tmp / "random.pth"), str(tmp / "random.npz"))
    assert res.returncode == 0 and "wrote" in res.stdout, res.stderr
    return tmp / "random.npz"


def _png_folder(path, n, seed, shift=0):
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(rng.normal(128 + shift, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / f"{i:03d}.png")
    return path


def _exact_frechet_distance(features, mu, sigma):
    """The Frechet distance between the Gaussian of `features` (n x d, n << d) and (mu, sigma),
    computed without a d x d square root: with S = X X^T (X the centered features / sqrt(n - 1)),
    S sigma has the nonzero eigenvalues of the n x n matrix X^T sigma X, so Tr sqrt(S sigma) is
    the sum of their square roots. An oracle independent of metrics.frechet_distance (checked
    against pytorch-fid's in test_metrics.py), and ~0.2 s where its scipy sqrtm of 2048 x 2048
    takes ~80 s of CPU here."""
    from diffjax.evaluation import stats

    mean, cov = stats.feature_statistics(features)
    x = (features - mean).T / np.sqrt(len(features) - 1)
    eigenvalues = np.linalg.eigvalsh(x.T @ sigma @ x)
    diff = mean - mu
    return float(diff @ diff + np.trace(cov) + np.trace(sigma) - 2 * np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def test_exact_frechet_distance_oracle():
    from diffjax.evaluation import metrics, stats

    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(10, 64)), 0)  # ReLU-like features, fewer than dimensions
    mu, sigma = stats.feature_statistics(np.maximum(rng.normal(0.3, 1.0, size=(12, 64)), 0))
    want = metrics.frechet_distance(*stats.feature_statistics(a), mu, sigma)
    assert _exact_frechet_distance(a, mu, sigma) == pytest.approx(want, rel=1e-6)


def test_stats_then_compare_fid_and_the_extractor_check(inception_npz, tmp_path):
    from diffjax.evaluation import inception, inception_weights, stats

    ref_dir = _png_folder(tmp_path / "ref", 12, 0)
    res = _diffjax(
        "eval",
        "stats",
        f"--data=folder:{ref_dir}",
        "--image_size=32",
        f"--out={tmp_path / 'ref.npz'}",
        f"--inception_weights={inception_npz}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    ref = stats.load_stats(tmp_path / "ref.npz", expect_extractor=inception_weights.file_sha256(inception_npz))
    assert ref.meta["num_images"] == 12 and ref.mu.shape == (2048,)
    fake = np.clip(np.random.default_rng(5).normal(150, 40, (10, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "fake.npz", images=fake)
    res = _diffjax(
        "eval",
        "compare",
        str(tmp_path / "fake.npz"),
        str(tmp_path / "ref.npz"),
        "--metrics=fid,is",
        f"--inception_weights={inception_npz}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    fid = float(next(line for line in res.stdout.splitlines() if line.startswith("| FID |")).split("|")[2])
    model = inception.create(inception_weights.load_pytorch_fid_weights(inception_npz))
    pool, _ = inception.features(model, fake)
    assert fid == pytest.approx(_exact_frechet_distance(pool, ref.mu, ref.sigma), rel=1e-3)
    # the same statistics read with other Inception weights (the .pth: another file hash) are refused
    res = _diffjax(
        "eval",
        "compare",
        str(tmp_path / "fake.npz"),
        str(tmp_path / "ref.npz"),
        "--metrics=fid",
        f"--inception_weights={inception_npz.with_suffix('.pth')}",
    )
    assert res.returncode == 2 and "not comparable" in res.stderr


def test_compare_a_set_with_itself(inception_npz, tmp_path):
    folder = _png_folder(tmp_path / "set", 12, 3)
    res = _diffjax(
        "eval", "compare", str(folder), str(folder), "--metrics=fid,kid,pr", f"--inception_weights={inception_npz}"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    values = {
        line.split("|")[1].strip(): float(line.split("|")[2].split("+-")[0])
        for line in res.stdout.splitlines()
        if line.startswith("| ") and "metric" not in line
    }
    assert abs(values["FID"]) < 1e-2 and values["precision"] == 1.0 and values["recall"] == 1.0


def test_missing_inception_weights_offline_says_where_to_put_them(tmp_path):
    env = dict(_env(), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("DIFFJAX_INCEPTION_WEIGHTS", None)
    folder = _png_folder(tmp_path / "set", 2, 0)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffjax",
            "eval",
            "stats",
            f"--data=folder:{folder}",
            "--image_size=32",
            f"--out={tmp_path / 'ref.npz'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "pt_inception-2015-12-05-6726825d.pth" in res.stderr
    assert "DIFFJAX_INCEPTION_WEIGHTS" in res.stderr and not (tmp_path / "ref.npz").exists()


def test_images_of_the_wrong_shape_are_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 2), np.uint8))
    res = _diffjax("eval", "compare", str(tmp_path / "bad.npz"), str(tmp_path / "bad.npz"))
    assert res.returncode == 2 and "C = 1 or 3" in res.stderr


def test_training_logs_fid_at_n_and_refuses_to_start_without_a_reference(tmp_path):
    wd = tmp_path / "fid"
    res = _diffjax("train", f"--workdir={wd}", *TINY, "--config.eval.fid_freq=1", "--config.eval.fid_num=32")
    assert res.returncode == 0, res.stderr[-3000:]
    logged = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    fids = [(r["step"], r["digits_fid@32"]) for r in logged if "digits_fid@32" in r]
    assert [s for s, _ in fids] == [1, 2] and all(100 < f < 1e4 for _, f in fids)  # 1-2 steps: far from digits
    res = _diffjax(
        "train", f"--workdir={tmp_path / 'noref'}", *TINY, "--config.eval.fid_freq=1", "--config.eval.metrics=fid,is"
    )
    assert res.returncode == 2 and "needs eval.reference" in res.stderr
    assert not (tmp_path / "noref" / "checkpoints").exists() or not any((tmp_path / "noref" / "checkpoints").iterdir())
