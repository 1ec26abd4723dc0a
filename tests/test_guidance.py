"""Classifier guidance: the exact oracle on the 8-Gaussians mixture, the classifier networks and
loss, and the `diffjax train` / `diffjax sample` command lines with a classifier."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import guidance, models, processes, samplers, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIX = toy.eight_gaussians()
VP = processes.get("vp")


def exact_logits(process, mixture=MIX):
    """log p(y = k | x_t) + const: each component's log-density in the diffused mixture, weighted."""

    def logits(x, t):
        def one(xi, a, s):
            q = mixture.diffused(a, s)
            d = xi.shape[-1]
            log_n = (
                -0.5 * jnp.sum((xi - q.means) ** 2, -1) / q.stds**2 - d * jnp.log(q.stds) - 0.5 * d * math.log(2 * math.pi)
            )
            return jnp.log(q.weights) + log_n

        return jax.vmap(one)(x, process.alpha(t), process.sigma(t))

    return logits


def component(k, mixture=MIX):
    return toy.GaussianMixture(mixture.means[k : k + 1], mixture.stds[k : k + 1], jnp.ones((1,)))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guided_score_is_score_plus_scaled_classifier_gradient(prediction):
    den = MIX.denoiser(VP, prediction)
    clf = exact_logits(VP)
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 2)) * 1.5
    t = jax.random.uniform(jax.random.PRNGKey(1), (64,), minval=0.05, maxval=1.0)
    labels = jnp.arange(64) % 8
    grad = jax.grad(lambda z: jnp.sum(jax.nn.log_softmax(clf(z, t))[jnp.arange(64), labels]))(x)
    score = MIX.diffused_score(x, VP.alpha(t), VP.sigma(t))
    for scale in (0.0, 1.0, 3.0):
        guided = guidance.classifier_guided(den, clf, scale, VP)
        assert guided.prediction == prediction
        got = VP.convert(prediction, "score", guided(x, t, labels), x, t)
        np.testing.assert_allclose(got, score + scale * grad, rtol=2e-4, atol=2e-3)
    # at scale 1 the exact classifier turns the mixture's score into the chosen component's
    guided = guidance.classifier_guided(den, clf, 1.0, VP)
    for k in (0, 3):
        lab = jnp.full((64,), k)
        want = component(k).diffused_score(x, VP.alpha(t), VP.sigma(t))
        np.testing.assert_allclose(VP.convert(prediction, "score", guided(x, t, lab), x, t), want, rtol=1e-3, atol=1e-2)


def test_scale_is_traced_no_recompile():
    den, clf = MIX.denoiser(VP, "eps"), exact_logits(VP)
    x, t, y = jnp.ones((4, 2)), jnp.full((4,), 0.5), jnp.zeros((4,), jnp.int32)
    f = jax.jit(lambda d: d(x, t, y))
    f(guidance.classifier_guided(den, clf, 1.0, VP))
    f(guidance.classifier_guided(den, clf, 2.5, VP))
    assert f._cache_size() == 1


def test_guidance_errors():
    den, clf = MIX.denoiser(VP, "eps"), exact_logits(VP)
    with pytest.raises(ValueError, match="needs class labels"):
        guidance.classifier_guided(den, clf, 1.0, VP)(jnp.ones((2, 2)), jnp.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"labels in \[0, 8\).*got \[-1\]"):
        guidance.check_labels(np.array([0, -1]), 8)
    with pytest.raises(ValueError, match=r"got \[8\]"):
        guidance.check_labels(np.array([8]), 8)
    with pytest.raises(ValueError, match="needs class labels"):
        guidance.check_labels(None, 8)


@pytest.mark.parametrize("sampler, steps", [("ddim", 150), ("ancestral", 200)])
def test_guided_sampling_draws_the_chosen_component(sampler, steps):
    """Scale 1 with the exact classifier and the exact unconditional denoiser samples p(x | y):
    >= 97% of the samples in mode y, with the mode's width (0.1) within 10%, and the same samples as
    the component's own exact denoiser from the same noise. The grid is uniform in log-SNR: on the
    default (uniform t) grid the samplers themselves narrow the mode (0.086 ancestral 200, 0.091
    DDIM 150, with the component's exact denoiser too)."""
    den = guidance.classifier_guided(MIX.denoiser(VP, "eps"), exact_logits(VP), 1.0, VP)
    n = 3000
    for k in (0, 3, 6):
        cond = jnp.full((n,), k, jnp.int32)
        x, _ = samplers.sample(sampler, den, VP, jax.random.PRNGKey(k), (n, 2), steps, cond=cond, spacing="logsnr")
        stats = toy.mode_statistics(MIX, x)
        assert stats["weights"][k] >= 0.97, (k, stats["weights"])
        assert abs(stats["stds"][k] / float(MIX.stds[k]) - 1) < 0.10, (k, stats["stds"][k])
        np.testing.assert_allclose(stats["means"][k], MIX.means[k], atol=0.03)
        alone, _ = samplers.sample(
            sampler, component(k).denoiser(VP, "eps"), VP, jax.random.PRNGKey(k), (n, 2), steps, cond=cond, spacing="logsnr"
        )
        np.testing.assert_allclose(x, alone, atol=2e-3)


@pytest.mark.parametrize(
    "name, shape, pool",
    [
        ("classifier_mlp", (5, 2), None),
        ("classifier_unet", (5, 8, 8, 1), "attention"),
        ("classifier_unet", (5, 8, 8, 1), "mean"),
    ],
)
def test_classifier_networks_give_logits(name, shape, pool):
    cfg = models.default_config(name)
    cfg.num_classes, cfg.nf = 4, 16
    if pool is not None:
        cfg.update(pool=pool, image_size=8, num_channels=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
        cfg.head_channels = 8
    model = models.create(cfg, 0)
    logits = model(jnp.ones(shape), jnp.full((5,), 10.0))
    assert logits.shape == (5, 4) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="num_classes >= 2"):
        models.create({**cfg.to_dict(), "num_classes": 0}, 0)


def test_classifier_loss_learns_the_mixture_modes():
    """The MLP classifier trained with `classifier_loss` on mixture samples labelled by mode
    approaches the exact classifier's accuracy at small noise."""
    import optax

    cfg = models.default_config("classifier_mlp")
    cfg.nf, cfg.num_res_blocks = 32, 1
    model = models.create(cfg, 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    weights = params.to_pure_dict()
    opt = tx.init(weights)

    def batch(key, n=256):
        k1, k2 = jax.random.split(key)
        y = jax.random.randint(k1, (n,), 0, 8)
        return {"x": MIX.means[y] + MIX.stds[y, None] * jax.random.normal(k2, (n, 2)), "label": y}

    def step(i, carry):
        weights, opt = carry
        key = jax.random.PRNGKey(i)

        def loss(w):
            return guidance.classifier_loss(guidance.network_classifier(graphdef, rest, VP, w), VP, batch(key), key)[0]

        updates, opt = tx.update(jax.grad(loss)(weights), opt)
        return optax.apply_updates(weights, updates), opt

    weights, _ = jax.jit(lambda carry: jax.lax.fori_loop(0, 200, step, carry))((weights, opt))
    clf = guidance.network_classifier(graphdef, rest, VP, weights)
    test = batch(jax.random.PRNGKey(10_000), 2000)
    t = jnp.full((2000,), 0.1)
    x_t = VP.marginal(test["x"], t, jax.random.normal(jax.random.PRNGKey(3), (2000, 2)))
    learnt = float(jnp.mean(jnp.argmax(clf(x_t, t), -1) == test["label"]))
    exact = float(jnp.mean(jnp.argmax(exact_logits(VP)(x_t, t), -1) == test["label"]))
    assert exact > 0.95 and learnt > exact - 0.05, (learnt, exact)


@pytest.mark.parametrize("path", ["configs/classifier/digits.py", "configs/classifier/cifar10.py"])
def test_classifier_configs_parameter_counts_are_their_docstrings(path):
    from diffjax import info

    config = info.load_config(os.path.join(ROOT, path))
    assert config.training.loss == guidance.LOSS and config.model.name == "classifier_unet"
    count = models.abstract_param_count(config.model)
    assert f"{count:,} params" in open(os.path.join(ROOT, path)).read().split('"""')[1], count
    if "digits" in path:  # `diffjax info`'s training FLOPs of a network that returns logits
        assert info.training_flops(config.model, (1, 8, 8, 1)) > 0


# ---- command lines ------------------------------------------------------------------------------
def diffjax(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "diffjax", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


# The digits classifier cut to one level of one block at width 8, mean pooling: 2 steps.
TINY_CLASSIFIER = [
    "--config=configs/classifier/digits.py",
    "--config.training.n_iters=2",
    "--config.training.snapshot_freq=2",
    "--config.training.eval_freq=2",
    "--config.training.log_freq=2",
    "--config.training.batch_size=16",
    "--config.training.n_jitted_steps=1",
    "--config.model.nf=8",
    "--config.model.ch_mult=(1,)",
    "--config.model.attn_resolutions=()",
    "--config.model.pool=mean",
    "--no_progress",
]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """(a tiny conditional digits diffusion workdir, a tiny digits classifier workdir), by `diffjax train`."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_configs import DIGITS

    root = tmp_path_factory.mktemp("guidance")
    model, clf = str(root / "model"), str(root / "classifier")
    runs = [  # side by side: each is mostly single-threaded start-up and compilation
        subprocess.Popen(
            [sys.executable, "-m", "diffjax", "train", *flags, "--workdir", workdir],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flags, workdir in ((TINY_CLASSIFIER, clf), ([*DIGITS, "--config.model.num_classes=10"], model))
    ]
    for run in runs:
        _, err = run.communicate(timeout=400)
        assert run.returncode == 0, err
    return model, clf


def test_train_classifier_logs_loss_and_accuracy_and_writes_no_samples(workdirs):
    import json

    _, clf = workdirs
    lines = [json.loads(line) for line in open(os.path.join(clf, "metrics.jsonl"))]
    train = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_accuracy" in m]
    assert train and abs(train[-1]["loss"] - math.log(10)) < 0.5  # cross-entropy of 10 classes near chance
    assert evals and 0 <= evals[-1]["eval_accuracy"] <= 1 and evals[-1]["eval_loss"] > 0
    assert not os.path.exists(os.path.join(clf, "samples"))


def test_sample_with_classifier_guidance(workdirs, tmp_path):
    model, clf = workdirs
    out = tmp_path / "grid.png"
    args = ["sample", "--workdir", model, "--num", "4", "--sampler", "ddim", "--steps", "3", "--out", str(out)]
    res = diffjax(*args, "--classifier", clf, "--classifier_scale", "2", "--label", "3")
    assert res.returncode == 0, res.stderr
    x = np.load(tmp_path / "grid.npz")["samples"]
    assert x.shape == (4, 8, 8, 1) and np.isfinite(x).all()


def test_classifier_mistakes_are_one_line_exit_2(workdirs, tmp_path, capsys):
    """Not a classifier, guidance without labels or with labels outside its classes, a classifier
    whose class count differs from the model's: one line, exit 2."""
    import json
    import shutil

    from diffjax import cli

    model, clf = workdirs
    other = tmp_path / "five_classes"  # the check reads config.json before any weights
    shutil.copytree(clf, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["num_classes"] = 5
    (other / "config.json").write_text(json.dumps(config))
    base = ["sample", "--workdir", model, "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]
    cases = [
        (["--classifier", model, "--label", "1"], "is not a classifier workdir (training.loss is 'eps'"),
        (["--classifier", clf], "classifier guidance needs class labels"),
        (["--classifier", clf, "--label", "-1"], "needs labels in [0, 10)"),
        (["--classifier", str(other), "--label", "1"], "has 5 classes, the model 10"),
        (["--classifier_scale", "2", "--label", "1"], "--classifier_scale needs --classifier"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(base + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_eval_with_classifier_guidance_records_it(workdirs):
    import glob
    import json

    model, clf = workdirs
    args = ["eval", "--workdir", model, "--num", "8", "--steps", "2", "--sampler", "ddim", "--shard_size", "8"]
    res = diffjax(*args, "--classifier", clf, "--classifier_scale", "2", "--no_progress")
    assert res.returncode == 0, res.stderr
    record = json.load(open(os.path.join(model, "eval", "step_2_ddim2_n8_classifier2.json")))
    assert record["protocol"]["classifier"] == clf and record["protocol"]["classifier_scale"] == 2.0
    (shard,) = glob.glob(os.path.join(record["protocol"]["samples"], "*.npz"))
    labels = np.load(shard)["labels"]
    assert labels.shape == (8,) and labels.min() >= 0 and labels.max() < 10


def test_serve_with_classifier_guidance_matches_the_offline_sampler(workdirs):
    import grpc

    from diffjax import sample
    from diffjax.serving import Client, subprocess_server
    from diffjax.serving.client import tensor_to_numpy

    model, clf = workdirs
    config, graphdef, rest, process, state, _ = sample.load_workdir(model)
    spec = guidance.load_classifier(clf, config)
    labels = np.array([3, 7, 1], np.int32)
    offline = dict(sampler="ddim", steps=4, seed=5, labels=jnp.asarray(labels), wrap=lambda den: spec.wrap(den, 2.0))
    want = sample.generate(config, graphdef, rest, process, state["ema"], 3, **offline)
    server = subprocess_server.ServerProcess(
        model, "--batch_slots=4", "--reload_s=0", "--classifier", clf, "--classifier_scale", "2", cwd=ROOT, timeout=240
    )
    try:
        with Client(server.addr, timeout=120) as client:
            got = client.sample_response(3, sampler="ddim", num_steps=4, seed=5, labels=labels.tolist())
            np.testing.assert_allclose(tensor_to_numpy(got.samples), want, atol=2e-4)
            with pytest.raises(grpc.RpcError) as err:
                client.sample_response(1, sampler="ddim", num_steps=2)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "labels in [0, 10)" in err.value.details()
    finally:
        server.stop()
