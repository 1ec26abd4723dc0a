"""EDM's geometric augmentation: exact transforms, EDM's probabilities and labels, the data and
network plumbing, and the gradient reaching the network's augmentation embedding."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import augment, data, models, trainer
from diffjax.augment import Geometric
from diffjax.info import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(h=32, w=32, c=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (h, w, c)).astype(np.float32)


def test_identity_and_flips_are_exact():
    x = _image()
    np.testing.assert_array_equal(augment.apply(x, Geometric()), x)
    np.testing.assert_array_equal(augment.apply(x, Geometric(xflip=True)), x[:, ::-1])
    np.testing.assert_array_equal(augment.apply(x, Geometric(yflip=True)), x[::-1])


def test_quarter_turn_and_whole_pixel_shift_land_on_the_pixel_grid():
    x = _image()
    # A quarter turn maps pixel centres onto pixel centres: the spline reproduces them exactly.
    # EDM's image frame has y pointing down, so +pi/2 turns the content counter-clockwise.
    np.testing.assert_allclose(augment.apply(x, Geometric(rotate=np.pi / 2)), np.rot90(x, 1), atol=1e-5)
    np.testing.assert_allclose(augment.apply(x, Geometric(rotate=-np.pi / 2)), np.rot90(x, -1), atol=1e-5)
    # translate x = 0.25 * 0.125 * 32 = 1 pixel to the right, mirror padding at the left edge.
    shifted = augment.apply(x, Geometric(translate=(0.25, 0.0)))
    np.testing.assert_allclose(shifted[:, 1:], x[:, :-1], atol=1e-5)
    np.testing.assert_allclose(shifted[:, 0], x[:, 1], atol=1e-5)


def test_zoom_of_a_linear_ramp():
    """scale label 5 -> s = 2 ** (0.2 * 5) = 2: the output at centred q shows the input at q / 2."""
    h = w = 32
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (0.03 * cols - 0.02 * rows)[..., None]
    out = augment.apply(ramp, Geometric(scale=5.0))
    c = (w - 1) / 2
    want = 0.03 * (c + (cols - c) / 2) - 0.02 * (c + (rows - c) / 2)
    np.testing.assert_allclose(out[..., 0], want, atol=2e-4)
    # Anisotropic scaling keeps areas: the mean of a ramp about the centre is unchanged.
    squeezed = augment.apply(ramp, Geometric(aniso=2.0, aniso_angle=0.3))
    assert abs(squeezed[8:24, 8:24].mean() - ramp[8:24, 8:24].mean()) < 1e-3


def test_labels_follow_edms_layout():
    g = Geometric(
        xflip=True, yflip=False, scale=0.5, rotate=np.pi / 3, aniso=-1.0, aniso_angle=np.pi / 2, translate=(0.1, -0.2)
    )
    want = [1, 0, 0.5, np.cos(np.pi / 3) - 1, np.sin(np.pi / 3), -1.0 * np.cos(np.pi / 2), -1.0, 0.1, -0.2]
    np.testing.assert_allclose(g.labels(), want, atol=1e-6)
    assert g.labels().shape == (augment.AUGMENT_DIM,)
    np.testing.assert_array_equal(Geometric().labels(), np.zeros(9))


def test_draw_frequencies_match_edms_pipe():
    """p = 0.12 (EDM CIFAR-10): x-flip half the time; each other transform with prob p (the y-flip
    itself then flips half of those); draws of N(0, 1) / U(-pi, pi) when on."""
    rng, n, p = np.random.default_rng(0), 20000, 0.12
    draws = [augment.draw(rng, p) for _ in range(n)]

    def close(frac, want):
        assert abs(frac - want) < 4 * np.sqrt(want * (1 - want) / n), (frac, want)

    close(np.mean([g.xflip for g in draws]), 0.5)
    close(np.mean([g.yflip for g in draws]), p / 2)
    for field in ("scale", "rotate", "aniso"):
        close(np.mean([getattr(g, field) != 0 for g in draws]), p)
    close(np.mean([g.translate != (0.0, 0.0) for g in draws]), p)
    scales = np.array([g.scale for g in draws if g.scale != 0])
    assert abs(scales.std() - 1) < 0.08 and abs(scales.mean()) < 0.08
    rotations = np.array([g.rotate for g in draws if g.rotate != 0])
    assert rotations.min() > -np.pi and rotations.max() < np.pi and abs(rotations.std() - np.pi / np.sqrt(3)) < 0.1
    assert all(g == Geometric(xflip=g.xflip) for g in (augment.draw(rng, 0.0) for _ in range(200)))


def _digits(*extra):
    return load_config(
        f"{ROOT}/configs/digits.py", ["--config.training.batch_size=16", "--config.eval.batch_size=16", *extra]
    )


def test_data_pipeline_adds_labels_to_training_batches_only():
    config = _digits("--config.data.augment_p=0.5")
    batch = next(data.make_iterator(config, "train", seed=0))
    assert batch["augment"].shape == (16, 9) and batch["augment"].dtype == np.float32
    assert np.any(batch["augment"][:, 2:] != 0)  # p = 0.5: some geometric transforms happened
    assert np.all(np.isin(batch["augment"][:, :2], (0.0, 1.0)))
    assert "augment" not in next(data.make_iterator(config, "eval", seed=0))
    plain = next(data.make_iterator(_digits(), "train", seed=0))
    assert "augment" not in plain
    with pytest.raises(ValueError, match=r"data.augment_p must be in \[0, 1\]"):
        data.make_iterator(_digits("--config.data.augment_p=1.5"), "train")
    with pytest.raises(ValueError, match="needs model.augment_dim=9"):
        trainer.check_augmentation(_digits("--config.data.augment_p=0.12"))


def test_network_augment_embedding():
    config = _digits("--config.model.augment_dim=9")
    base = models.param_count(nnx.state(models.create(_digits().model, 0), nnx.Param))
    model = models.create(config.model, 0)
    assert models.param_count(nnx.state(model, nnx.Param)) == base + 9 * config.model.nf  # bias-free 9 -> nf
    x, t = jnp.ones((2, 8, 8, 1)), jnp.array([10.0, 500.0])
    plain = model(x, t)
    np.testing.assert_allclose(model(x, t, augment_labels=jnp.zeros((2, 9))), plain, atol=1e-6)
    # (the output conv starts at zero, so compare the time embedding the labels enter)
    moved = model.embed(t, None, jnp.ones((2, 9))) - model.embed(t)
    assert float(jnp.abs(moved).max()) > 1e-2 * float(jnp.abs(model.embed(t)).max())
    with pytest.raises(ValueError, match="augment_dim"):
        models.create(_digits().model, 0)(x, t, augment_labels=jnp.zeros((2, 9)))


def test_train_step_feeds_the_labels_to_the_network():
    """With augmentation on, the loss depends on the labels: the augment embedding gets gradient."""
    config = _digits(
        "--config.data.augment_p=0.5",
        "--config.model.augment_dim=9",
        "--config.training.n_jitted_steps=1",
        "--config.optim.warmup=0",
        "--config.model.nf=8",
    )
    trainer.check_augmentation(config)
    mesh = trainer.make_mesh(config)
    state, shardings, graphdef, rest = trainer.init_state(config, mesh)
    step = trainer.make_train_step(config, graphdef, rest, trainer.build_process(config), shardings, mesh)
    batch = next(data.make_iterator(config, "train", seed=0))
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items() if k != "label"}
    kernel = lambda s: np.asarray(s["params"]["embed"]["augment"]["kernel"])
    before = kernel(state).copy()
    fresh = jax.tree.map(jnp.copy, state)  # the step donates its input state
    new, losses = step(state, batch)
    assert np.isfinite(np.asarray(losses)).all()
    assert not np.allclose(kernel(new), before)  # Adam moved it: its gradient was non-zero
    zero = dict(batch, augment=jnp.zeros_like(batch["augment"]))
    new, _ = step(fresh, zero)
    np.testing.assert_array_equal(kernel(new), before)  # zero labels: no gradient, Adam leaves it
