"""Score networks: reference parameter counts, shapes, determinism, dropout, class conditioning."""

from __future__ import annotations

import glob
import inspect
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from diffjax import models
from diffjax.info import load_config
from diffjax.models import layers as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if not p.endswith("__init__.py")
)


def cfg(path, *overrides):
    return load_config(os.path.join(ROOT, path), list(overrides))


TINY = (
    "--config.model.nf=16",
    "--config.model.num_res_blocks=1",
    "--config.model.ch_mult=(1,2)",
    "--config.data.image_size=8",
    "--config.model.attn_resolutions=(4,)",
)


# DiT: 2 x 2 tokens of width 32 (a named size's other fields are overridden by the non-zero ones)
TINY_DIT = (
    "--config.model.nf=16",
    "--config.model.num_res_blocks=1",
    "--config.model.hidden_size=32",
    "--config.model.num_heads=2",
    "--config.data.image_size=8",
)


def tiny(path, *extra):
    c = cfg(path)
    overrides = {"mlp": ("--config.model.nf=16",), "dit": TINY_DIT}.get(c.model.name, TINY)
    return cfg(path, *overrides, *extra)


def x_for(config, batch=2, seed=0):
    shape = (
        (batch, config.model.data_dim)
        if config.model.name == "mlp"
        else (batch, config.data.image_size, config.data.image_size, config.data.num_channels)
    )
    return jax.random.normal(jax.random.key(seed), shape)


def noise_cond_for(config, batch=2):
    # positional nets see a timestep-like value, Fourier nets a sigma
    return jnp.linspace(0.5, 20.0, batch) if config.model.embedding_type == "fourier" else jnp.linspace(3.0, 700.0, batch)


def perturbed(model, scale=0.05, seed=123):
    """Add noise to every parameter so that 'zero'-initialised output layers do not hide differences.

    (Host-side numpy noise: drawing with jax.random would compile one RNG program per shape.)"""
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params))
    return model


def run(model, x, noise_cond, labels=None, train=False, rngs=None):
    """Eager call: the tiny test networks share layer shapes, so op-by-op compiles are reused
    across tests, which is cheaper here than compiling each network with jit."""
    return model(x, noise_cond, labels, train=train, rngs=rngs)


# ---- exact parameter counts (abstract: nothing is allocated) -----------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("configs/ddpm_cifar10.py", 35_746_307),  # = diffusers UNet2DModel(128, 256, 256, 256), Ho et al.
        ("configs/vp/cifar10_ddpmpp_continuous.py", 61_804_419),
        ("configs/vp/cifar10_ddpmpp_deep_continuous.py", 106_632_579),
        ("configs/subvp/cifar10_ddpmpp_deep_continuous.py", 106_632_579),
        ("configs/ve/cifar10_ncsnpp_continuous.py", 62_758_915),
        ("configs/ve/cifar10_ncsnpp_deep_continuous.py", 107_587_075),
        # ours (no published count to match): VDM's network approximated by the one-level DDPM UNet,
        # an ADM-style classifier (the digits one: tests/test_guidance.py)
        ("configs/vdm/cifar10.py", 30_572_419),
        ("configs/classifier/cifar10.py", 14_143_882),
    ],
)
def test_reference_parameter_counts(path, expected):
    assert models.abstract_param_count(cfg(path).model, (1, 32, 32, 3)) == expected


def test_abstract_count_allocates_nothing():
    _, params = models.abstract_shapes(cfg("configs/ve/cifar10_ncsnpp_deep_continuous.py").model)
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


# ---- shapes --------------------------------------------------------------------------------


def output_shape(c, x) -> tuple[int, ...]:
    """A diffusion network's output has the input's shape; a noise-conditional classifier's is
    (B, num_classes) logits; with model.learn_sigma the channels are doubled (prediction, variance)."""
    if c.training.loss == "classifier":
        return (x.shape[0], c.model.num_classes)
    return x.shape[:-1] + (2 * x.shape[-1],) if c.model.get("learn_sigma") else x.shape


@pytest.mark.parametrize("path", CONFIGS)
def test_reference_size_output_shape_abstract(path):
    """Every config at its real size traces to an output of the input's shape, or a classifier's to
    its logits (eval_shape: no FLOPs)."""
    c = cfg(path)
    x = x_for(c, batch=2)

    graphdef, params, rest = nnx.split(models.abstract_model(c.model), nnx.Param, ...)

    def fwd(params, rest, x, nc):
        return nnx.merge(graphdef, params, rest)(x, nc)

    out = jax.eval_shape(fwd, params, rest, x, noise_cond_for(c))
    assert out.shape == output_shape(c, x) and out.dtype == jnp.float32


@pytest.mark.parametrize("path", CONFIGS)
def test_tiny_forward_every_config(path):
    c = tiny(path)
    model = models.create(c.model, nnx.Rngs(0))
    x = x_for(c)
    out = run(model, x, noise_cond_for(c))
    assert out.shape == output_shape(c, x) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize(
    "overrides",
    [
        ("--config.model.progressive=output_skip", "--config.model.progressive_input=input_skip"),
        ("--config.model.progressive=residual", "--config.model.progressive_input=residual"),
        (
            "--config.model.progressive=output_skip",
            "--config.model.progressive_input=input_skip",
            "--config.model.progressive_combine=cat",
            "--config.model.fir=False",
        ),
        ("--config.model.resblock_type=ddpm", "--config.model.progressive=residual"),
        (
            "--config.model.skip_rescale=False",
            "--config.model.embedding_type=positional",
            "--config.model.scale_by_sigma=False",
            "--config.model.conditional=False",
        ),
    ],
)
def test_ncsnpp_variants(overrides):
    c = tiny("configs/ve/cifar10_ncsnpp_continuous.py", *overrides)
    model = models.create(c.model, nnx.Rngs(0))
    x = x_for(c)
    out = run(model, x, noise_cond_for(c))
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


def test_mlp_shape():
    c = tiny("configs/toy/eight_gaussians.py")
    model = models.create(c.model, nnx.Rngs(0))
    out = run(model, jnp.ones((5, 2)), jnp.arange(5.0))
    assert out.shape == (5, 2) and out.dtype == jnp.float32


# ---- determinism, dropout, dtype -----------------------------------------------------------


def test_same_key_same_params():
    c = tiny("configs/ddpm_cifar10.py")
    p1 = nnx.state(models.create(c.model, nnx.Rngs(7)), nnx.Param)
    p2 = nnx.state(models.create(c.model, nnx.Rngs(7)), nnx.Param)
    p3 = nnx.state(models.create(c.model, nnx.Rngs(8)), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    diff = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), p1, p3))
    assert any(diff)


@pytest.mark.parametrize(
    "path", ["configs/ddpm_cifar10.py", "configs/vp/cifar10_ddpmpp_continuous.py", "configs/toy/eight_gaussians.py"]
)
def test_dropout_only_in_train(path):
    c = tiny(path, "--config.model.dropout=0.5")
    model = perturbed(models.create(c.model, nnx.Rngs(0)))
    x, nc = x_for(c), noise_cond_for(c)
    e1, e2 = run(model, x, nc), run(model, x, nc, train=False)
    np.testing.assert_array_equal(e1, e2)  # eval is deterministic
    t1 = run(model, x, nc, train=True)
    t2 = run(model, x, nc, train=True)  # the module's dropout stream advances
    t3 = run(model, x, nc, train=True, rngs=nnx.Rngs(dropout=1))
    t4 = run(model, x, nc, train=True, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(t1, e1, atol=1e-4)
    assert not np.allclose(t1, t2, atol=1e-4)
    np.testing.assert_array_equal(t3, t4)  # explicit rngs: reproducible


def test_bfloat16_compute_float32_params_and_output():
    c32 = tiny("configs/ddpm_cifar10.py")
    c16 = tiny("configs/ddpm_cifar10.py", "--config.model.dtype=bfloat16")
    m32 = perturbed(models.create(c32.model, nnx.Rngs(0)), scale=0.02)
    m16 = perturbed(models.create(c16.model, nnx.Rngs(0)), scale=0.02)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    x, nc = x_for(c32), noise_cond_for(c32)
    o32, o16 = run(m32, x, nc), run(m16, x, nc)
    assert o16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(o16 - o32) / jnp.linalg.norm(o32))
    assert rel < 0.1, rel


def test_scale_by_sigma_divides_output():
    c = tiny("configs/ve/cifar10_ncsnpp_continuous.py")
    c_off = tiny("configs/ve/cifar10_ncsnpp_continuous.py", "--config.model.scale_by_sigma=False")
    m_on = perturbed(models.create(c.model, nnx.Rngs(0)))
    m_off = perturbed(models.create(c_off.model, nnx.Rngs(0)))
    x, sigma = x_for(c), jnp.array([0.5, 4.0])
    np.testing.assert_allclose(run(m_on, x, sigma) * sigma[:, None, None, None], run(m_off, x, sigma), rtol=1e-4, atol=1e-5)


# ---- class conditioning --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["configs/ddpm_cifar10.py", "configs/ve/cifar10_ncsnpp_continuous.py", "configs/toy/eight_gaussians.py"]
)
def test_class_conditional(path):
    c = tiny(path, "--config.model.num_classes=10")
    model = perturbed(models.create(c.model, nnx.Rngs(0)))
    assert model.embed.label_emb.embedding.shape[0] == 11  # num_classes + 1 (null) rows
    x, nc = x_for(c), noise_cond_for(c)
    a = run(model, x, nc, jnp.array([0, 1]))
    b = run(model, x, nc, jnp.array([2, 3]))
    null = run(model, x, nc, jnp.array([-1, -1]))
    assert not np.allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(null, run(model, x, nc), rtol=1e-6)  # labels=None -> null label
    np.testing.assert_allclose(null, run(model, x, nc, jnp.array([10, 10])), rtol=1e-6)  # -1 -> row num_classes
    mixed = run(model, x, nc, jnp.array([0, -1]))
    np.testing.assert_allclose(mixed[0], a[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed[1], null[1], rtol=1e-5, atol=1e-6)


def test_unconditional_model_has_no_label_table():
    c = tiny("configs/ddpm_cifar10.py")
    model = models.create(c.model, nnx.Rngs(0))
    assert model.embed.label_emb is None


# ---- registry, sharding, checkpoints -------------------------------------------------------


def test_unknown_model_name():
    c = tiny("configs/ddpm_cifar10.py")
    c.model.unlock()
    c.model.name = "resnet9000"
    with pytest.raises(ValueError, match="resnet9000.*ddpm_unet, dit, mlp, ncsnpp"):
        models.create(c.model, nnx.Rngs(0))
    with pytest.raises(ValueError, match="available models"):
        models.get("nope")
    assert models.get(cfg("configs/ddpm_cifar10.py").model) is models.DDPMUNet


TINY_DICT = dict(name="ddpm_unet", nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)


def test_model_keys_the_network_does_not_read_are_errors():
    with pytest.raises(
        ValueError, match=r"config\.model\.nff is not read by model 'ddpm_unet'; its keys are: name, prediction, nf"
    ):
        models.create({**TINY_DICT, "nff": 8}, 0)  # a typo
    with pytest.raises(
        ValueError, match=r"config\.model\.fir, config\.model\.skip_rescale are not read by model 'ddpm_unet'"
    ):
        models.abstract_model(ml_collections.ConfigDict({**TINY_DICT, "fir": False, "skip_rescale": True}))  # ncsnpp's
    with pytest.raises(ValueError, match=r"config\.model\.num_groups is not read by model 'ncsnpp'"):
        models.abstract_param_count(dict(name="ncsnpp", num_groups=32))  # ddpm_unet's
    with pytest.raises(ValueError, match=r"config\.model\.image_size is not read by model 'mlp'"):
        models.create(dict(name="mlp", image_size=32), 0)
    with pytest.raises(ValueError, match="data_dim"):
        models.network_kwargs(dict(name="ddpm_unet", data_dim=2))


def test_score_sde_fixed_keys_pass_only_at_the_implemented_value():
    score_sde = {**TINY_DICT, "normalization": "GroupNorm", "attention_type": "ddpm", "conv_size": 3}
    assert models.network_kwargs(score_sde) == models.network_kwargs(TINY_DICT)
    assert models.abstract_param_count(score_sde) == models.abstract_param_count(TINY_DICT)
    for key, value in [("normalization", "BatchNorm"), ("attention_type", "legacy"), ("conv_size", 5)]:
        match = re.escape(f"config.model.{key}={value!r} is not implemented; diffjax supports {models.FIXED_VALUES[key]!r}")
        with pytest.raises(ValueError, match=match):
            models.create({**TINY_DICT, key: value}, 0)


def test_none_takes_the_default_and_plain_dicts_work():
    kwargs = models.network_kwargs({**TINY_DICT, "dropout": None, "prediction": "eps"})
    assert "dropout" not in kwargs and "name" not in kwargs and "prediction" not in kwargs
    assert models.abstract_param_count(dict(name="mlp", nf=16)) == models.abstract_param_count(
        ml_collections.ConfigDict(dict(name="mlp", nf=16, data_dim=2))
    )


@pytest.mark.parametrize("name", models.available())
def test_default_config_is_the_signature(name):
    config = models.default_config(name)
    signature = inspect.signature(models.get(name).__init__).parameters
    assert config.name == name and set(config) == {"name", *models.parameters(name)}
    assert set(signature) == {"self", "rngs", *models.parameters(name)}
    for key, value in config.items():
        if key != "name":
            default = signature[key].default
            assert value == default and type(value) is type(default), (key, value, default)
    model = models.abstract_model(config)  # create(default_config(name)) builds the network
    assert isinstance(model, models.get(name))


def test_default_configs_are_the_papers_networks():
    """The image networks' defaults are their CIFAR-10 networks: Ho et al.'s UNet, NCSN++ cont. (VE)."""
    assert models.abstract_param_count(models.default_config("ddpm_unet")) == 35_746_307
    assert models.abstract_param_count(models.default_config("ncsnpp")) == 62_758_915
    model = models.create(models.default_config("mlp"), 0)
    assert model(jnp.ones((3, 2)), jnp.ones((3,))).shape == (3, 2)


def test_sharding_annotations():
    c = tiny("configs/ddpm_cifar10.py")
    _, params = models.abstract_shapes(c.model)
    specs = models.fsdp_partition_specs(params, fsdp_size=2)
    assert tuple(specs["conv_in"]["kernel"]) == (None, None, None, "fsdp")
    assert tuple(specs["conv_out"]["kernel"]) == (None, None, None, None)  # 1 output channel: not divisible
    assert tuple(specs["conv_in"]["bias"]) == ()


def test_params_checkpoint_roundtrip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    c = tiny("configs/digits.py")
    model = models.create(c.model, nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "params", params)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "params", params)
    jax.tree.map(np.testing.assert_array_equal, params, restored)


# ---- FIR resampling ------------------------------------------------------------------------


def test_fir_resampling_matches_upfirdn_definition():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
    # StyleGAN2 upsample_2d: zero-insert, pad (2, 1), 2-D convolution with 4 * outer(k, k) / sum
    k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]).astype(np.float32)
    k = 4 * k / k.sum()
    up = np.zeros((1, 16, 16, 3), np.float32)
    up[:, ::2, ::2] = np.asarray(x)
    up = np.pad(up, ((0, 0), (2, 1), (2, 1), (0, 0)))
    ref = np.zeros((1, 16, 16, 3), np.float32)
    for i in range(4):
        for j in range(4):
            ref += k[3 - i, 3 - j] * up[:, i : i + 16, j : j + 16]
    np.testing.assert_allclose(L.upsample_2d(x), ref, rtol=1e-5, atol=1e-5)
    ones = jnp.ones((1, 8, 8, 1))
    np.testing.assert_allclose(L.downsample_2d(ones)[0, 1:-1, 1:-1], 1.0, rtol=1e-6)
    # fused conv variants agree with resample-then-conv away from the borders
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
    conv = lambda a: jax.lax.conv_general_dilated(
        a,
        w,
        (1, 1),
        "SAME",  # noqa: E731
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        L.upsample_conv_2d(x, w)[:, 3:-3, 3:-3], conv(L.upsample_2d(x))[:, 3:-3, 3:-3], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        L.conv_downsample_2d(x, w)[:, 1:-1, 1:-1], L.downsample_2d(conv(x))[:, 1:-1, 1:-1], rtol=1e-4, atol=1e-4
    )


def test_group_norm_matches_flax():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64)) * 3.0 + 1.0
    gn = L.GroupNorm(64)
    assert gn.groups == 16  # score_sde: min(C // 4, 32)
    gn.scale[...] = jnp.linspace(0.5, 2.0, 64)
    gn.bias[...] = jnp.linspace(-1.0, 1.0, 64)
    ref = nnx.GroupNorm(64, num_groups=16, epsilon=1e-6, rngs=nnx.Rngs(0))
    ref.scale[...], ref.bias[...] = gn.scale[...], gn.bias[...]
    np.testing.assert_allclose(gn(x), ref(x), rtol=1e-5, atol=1e-5)


def test_inference_groupnorm_matches_the_grouped_reduction():
    """The server's reduction order (spatial sums first) gives GroupNorm's numbers, and its
    statistics are per example and per group: a shifted, scaled group normalises the same."""
    from diffjax.models import layers

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 32)) * 3.0 + 1.5
    norm = layers.GroupNorm(32)
    grouped = jax.jit(lambda x: norm(x))(x)

    def spatial(x):
        with layers.inference_groupnorm():
            return norm(x)

    np.testing.assert_allclose(jax.jit(spatial)(x), grouped, atol=2e-5)
    g = np.asarray(grouped).reshape(3, 64, norm.groups, 32 // norm.groups)
    np.testing.assert_allclose(g.mean(axis=(1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(g.std(axis=(1, 3)), 1.0, atol=1e-3)


def test_network_denoiser_wraps_edm_preconditioning():
    """diffjax.network: on the edm process the Denoiser is EDMPrecond around the network,
    D(x; s) = c_skip x + c_out F(c_in x; c_noise), of kind x0; elsewhere the network's own output."""
    from diffjax import network

    config = tiny("configs/edm/cifar10_ddpmpp.py")
    graphdef, params, rest = nnx.split(models.create(config.model, 0), nnx.Param, ...)
    process = network.build_process(config)
    den = network.network_denoiser(graphdef, rest, process, config, params)
    assert isinstance(den.apply, network.EDMPrecond) and den.prediction == "x0"
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    t = jnp.asarray([0.5, 20.0])
    c_skip, c_out, c_in = (c[:, None, None, None] for c in process.precondition(t))
    model = nnx.merge(graphdef, params, rest)
    want = c_skip * x + c_out * model(c_in * x, process.noise_cond(t))
    np.testing.assert_allclose(np.asarray(den(x, t)), np.asarray(want), rtol=1e-5, atol=1e-5)
    vp_config = tiny("configs/vp/cifar10_ddpmpp_continuous.py")
    g2, p2, r2 = nnx.split(models.create(vp_config.model, 0), nnx.Param, ...)
    assert isinstance(
        network.network_denoiser(g2, r2, network.build_process(vp_config), vp_config, p2).apply, network.NetworkApply
    )
