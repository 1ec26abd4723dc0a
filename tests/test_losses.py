"""Each loss is minimised by the exact denoiser, whatever the denoiser's parametrisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import denoiser as dn
from diffjax import losses, processes, toy

MIXTURE = toy.eight_gaussians()


def _scaled(exact: dn.Denoiser) -> callable:
    """A family of denoisers c * exact; c = 1 is the exact conditional expectation."""
    return lambda c: dn.Denoiser(
        lambda params, x, t, cond: params[0] * exact.apply(params[1], x, t, cond), (c, exact.params), exact.prediction
    )


@pytest.mark.parametrize(
    "loss_name,process_name,prediction,kw",
    [
        ("eps", "ddpm", "eps", {}),
        ("eps", "vp", "x0", {}),
        ("dsm", "ve", "score", {}),
        ("dsm", "vp", "eps", {"likelihood_weighting": True}),
        ("v", "vp", "v", {}),
        ("v", "subvp", "eps", {}),
        ("edm", "edm", "x0", {}),
        ("edm", "edm", "eps", {}),
    ],
)
def test_exact_denoiser_is_the_minimiser(loss_name, process_name, prediction, kw):
    p = processes.get(process_name)
    family = _scaled(MIXTURE.denoiser(p, prediction))
    batch = {"x": MIXTURE.sample(jax.random.key(0), 50000)}
    f = jax.jit(lambda c: losses.loss(loss_name, family(c), p, batch, jax.random.key(1), **kw))
    grad_at = lambda c: float(jax.grad(f)(jnp.float32(c)))
    g1, g_off = grad_at(1.0), grad_at(1.1)
    assert abs(g1) < 0.05 * abs(g_off), (g1, g_off)  # stationary at c = 1, clearly not at c = 1.1
    assert g_off > 0 and f(1.1) > f(1.0)


def test_label_dropout_rate():
    labels = jnp.arange(100000) % 10
    dropped = losses.drop_labels(jax.random.key(0), labels, 0.2)
    rate = float(jnp.mean(dropped == dn.NULL_LABEL))
    assert rate == pytest.approx(0.2, abs=0.01)
    kept = np.asarray(dropped) != -1
    np.testing.assert_array_equal(np.asarray(dropped)[kept], np.asarray(labels)[kept])


def test_labels_reach_the_denoiser():
    seen = []
    d = dn.Denoiser(lambda _, x, t, cond: (seen.append(cond), jnp.zeros_like(x))[1], None, "eps")
    batch = {"x": jnp.zeros((8, 2)), "label": jnp.arange(8)}
    losses.loss("eps", d, processes.get("vp"), batch, jax.random.key(0), label_dropout=0.5)
    assert seen[0] is not None and seen[0].shape == (8,)


def test_bad_input_errors():
    d = MIXTURE.denoiser(processes.get("vp"))
    batch = {"x": jnp.zeros((4, 2))}
    with pytest.raises(ValueError, match=r"unknown loss 'l1'; choose one of"):
        losses.loss("l1", d, processes.get("vp"), batch, jax.random.key(0))
    with pytest.raises(ValueError, match="loss 'edm' needs the 'edm' process"):
        losses.loss("edm", d, processes.get("vp"), batch, jax.random.key(0))
    with pytest.raises(ValueError, match="likelihood_weighting applies to the 'dsm' loss only"):
        losses.loss("eps", d, processes.get("vp"), batch, jax.random.key(0), likelihood_weighting=True)


def test_reduce_mean_false_is_half_the_sum_over_dimensions():
    """training.reduce_mean=False (score_sde's VE configs): 0.5 * sum over dimensions per example,
    i.e. 0.5 D times the mean; the same draws otherwise."""
    p = processes.get("ve")
    den = MIXTURE.denoiser(p, "score")
    family = _scaled(den)(1.2)
    batch = {"x": MIXTURE.sample(jax.random.key(0), 256)}
    mean = losses.loss("dsm", family, p, batch, jax.random.key(3))
    summed = losses.loss("dsm", family, p, batch, jax.random.key(3), reduce_mean=False)
    np.testing.assert_allclose(float(summed), 0.5 * MIXTURE.dim * float(mean), rtol=1e-5)
