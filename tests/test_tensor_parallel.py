"""Tensor parallelism: the "model" mesh axis (training.model_parallel) on a tiny DiT.

The oracle is the same training run on one device: 8 CPU devices as (data 2, fsdp 2, model 2)
must train the same losses and parameters to float tolerance, with the Megatron-layout kernels
really split over the model axis."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import trainer
from diffjax.info import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, LR = 3, 8, 1e-3


def tiny_dit(**model):
    """A DiT of 2 blocks, 64 wide, 4 heads, patch 2 on 8x8x3 images of 10 classes (DDPM, eps loss)."""
    from configs import default

    config = default.get_default_configs()
    config.process = default.process("ddpm", num_scales=1000, schedule="linear", beta_start=1e-4, beta_end=0.02)
    config.data.image_size, config.data.num_channels = 8, 3
    config.model = default.model_block(config, "dit")
    config.model.update(dict(size="", hidden_size=64, num_res_blocks=2, num_heads=4, patch_size=2, num_classes=10))
    config.model.update(model)
    config.training.update(dict(loss="eps", batch_size=BATCH, fsdp=True, model_parallel=2, ema_rate=0.9))
    config.training.scan_unroll = False  # one compiled step body: a third of the unrolled compile time
    config.optim.update(dict(lr=LR, warmup=0))
    return config


def perturbed(state):
    """The state (on the host) with every parameter moved by N(0, 0.05^2) noise: DiT's
    zero-initialised gates and output layer would otherwise leave q/k/v without a gradient for
    the first steps."""
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda p: (p + 0.05 * rng.standard_normal(p.shape)).astype(p.dtype), state["params"])
    return dict(state, params=params, ema=jax.tree.map(np.copy, params))


def train(config, mesh, start, rest):
    """(params after STEPS fused steps, the state, losses) on `mesh` from the host state `start`."""
    _, shardings, graphdef, _ = trainer.state_layout(config, mesh)
    state = jax.device_put(start, shardings)
    rest = jax.device_put(rest, NamedSharding(mesh, P()))
    step = trainer.make_train_step(config, graphdef, rest, trainer.build_process(config), shardings, mesh)
    rng = np.random.default_rng(0)
    batches = {
        "x": rng.uniform(-1, 1, (STEPS, BATCH, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, (STEPS, BATCH)).astype(np.int32),
    }
    batches = jax.device_put(batches, trainer.batch_sharding(mesh, leading=1))
    state, losses = step(state, batches)
    return jax.tree.map(np.asarray, state["params"]), state, np.asarray(losses)


@pytest.fixture(scope="module")
def runs():
    """(the start, the (data 2, fsdp 2, model 2) run, the one-device run) from one initialisation."""
    config = tiny_dit()
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), trainer.MESH_AXES)
    one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), trainer.MESH_AXES)
    state, _, _, rest = trainer.init_state(config, one)
    start = perturbed(jax.tree.map(np.asarray, state))
    return start["params"], train(config, mesh, start, rest), train(config, one, start, rest)


def test_data_fsdp_model_mesh_trains_as_one_device(runs):
    """(data 2, fsdp 2, model 2) vs one device after 3 Adam steps at lr 1e-3: the same losses (rtol
    1e-5) and the same parameter updates to 1e-2 of the largest (~3 lr), so a wrong collective (a
    missing all-reduce of the row-parallel partial sums) cannot pass. The loosest leaf is the key
    bias (6.4e-6 measured): softmax ignores it, so Adam moves it on reduction-order noise alone."""
    init_1, (final_tp, _, losses_tp), (final_1, _, losses_1) = runs
    np.testing.assert_allclose(losses_tp, losses_1, rtol=1e-5)
    assert losses_1.shape == (STEPS,) and np.all(np.isfinite(losses_1))
    biggest = max(float(np.max(np.abs(f - i))) for f, i in zip(jax.tree.leaves(final_1), jax.tree.leaves(init_1)))
    assert biggest > LR  # the parameters moved
    for path, f_tp, f_1, i_1 in zip(
        jax.tree_util.tree_flatten_with_path(final_tp)[0],
        jax.tree.leaves(final_tp),
        jax.tree.leaves(final_1),
        jax.tree.leaves(init_1),
    ):
        err = float(np.max(np.abs((f_tp - i_1) - (f_1 - i_1))))
        assert err <= 1e-2 * biggest, (jax.tree_util.keystr(path[0]), err, biggest)


def test_megatron_kernels_are_split_over_the_model_axis(runs):
    """q / k / v and fc1 column-parallel ('fsdp', 'model'), proj and fc2 row-parallel ('model', 'fsdp'):
    each device holds a (in / 2, out / 2) block; the Adam moments follow; biases are replicated."""
    _, (_, state, _), _ = runs
    block = state["params"]["blocks"][0]
    for name, spec in (("q", P("fsdp", "model")), ("fc1", P("fsdp", "model")), ("fc2", P("model", "fsdp"))):
        kernel = block[name]["kernel"]
        assert kernel.sharding.spec == spec, (name, kernel.sharding.spec)
        assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
    assert block["q"]["bias"].sharding.spec == P()
    moments = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
        if jax.tree_util.keystr(path).endswith("['blocks'][0]['q']['kernel']")
    ]
    assert len(moments) == 2 and all(m.sharding.spec == P("fsdp", "model") for m in moments)  # Adam's mu, nu


def test_make_mesh_and_refusals():
    """make_mesh puts training.model_parallel innermost; refusals name the field before anything compiles."""
    config = tiny_dit()
    mesh = trainer.make_mesh(config)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "model": 2}
    config.training.fsdp = False
    assert dict(trainer.make_mesh(config).shape) == {"data": 4, "fsdp": 1, "model": 2}
    config.training.model_parallel = 3
    with pytest.raises(ValueError, match=r"^training.model_parallel=3 must divide the device count 8$"):
        trainer.make_mesh(config)
    config.training.model_parallel = 8  # divides the devices, not the 4 heads
    with pytest.raises(ValueError, match=r"^training.model_parallel=8 must divide model.num_heads=4$"):
        trainer.state_layout(config, trainer.make_mesh(config))
    named = tiny_dit(size="B", hidden_size=0, num_heads=0, num_res_blocks=1)  # 12 heads from the named size
    named.training.model_parallel = 8
    with pytest.raises(ValueError, match=r"^training.model_parallel=8 must divide model.num_heads=12$"):
        trainer.check_model_parallel(named, trainer.make_mesh(named))
    config.training.batch_size = 6
    config.training.model_parallel = 2
    with pytest.raises(ValueError, match="training.batch_size=6 must be divisible by the data x fsdp device count 4"):
        trainer.check_batch_size(config, trainer.make_mesh(config))
    # the command line's override, on a network without a tensor-parallel layout
    unet = load_config(f"{ROOT}/configs/ddpm_cifar10.py", ["--config.training.model_parallel=2"])
    with pytest.raises(ValueError, match="model.name='ddpm_unet' has no tensor-parallel layout"):
        trainer.check_model_parallel(unet, trainer.make_mesh(unet))
    plain = tiny_dit()
    plain.training.update(dict(fsdp=False, model_parallel=1))
    mesh = trainer.make_mesh(plain)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
    replicated = trainer.state_layout(plain, mesh)[1]["params"]
    assert all(s.spec == P() for s in jax.tree.leaves(replicated))  # model_parallel 1: as before
