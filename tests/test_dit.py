"""DiT (diffjax.models.dit, diffjax.interop.diffusers_dit): diffusers' DiTTransformer2DModel is the oracle.

Random-weight DiTs in diffusers' layout are saved with save_pretrained, imported (load_diffusers, and
`diffjax import` into a workdir) and evaluated on the same inputs; the parameter counts of DiT-S/B/L/XL
are diffusers' on torch's meta device less its per-block copies of the embedders.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_peers  # noqa: E402 (tests/ is on sys.path under pytest)
from flax import nnx

torch = pytest.importorskip("torch")
torch_peers.bare_torchvision()  # diffusers imports torchvision whenever it is installed
diffusers = pytest.importorskip("diffusers")

from diffjax import models  # noqa: E402
from diffjax.interop import WeightsError, load_diffusers, load_params  # noqa: E402
from diffjax.interop import cli as import_cli  # noqa: E402
from diffjax.models.dit import SIZES  # noqa: E402
from diffjax.workdir import load_workdir  # noqa: E402

LEARNED = dict(  # learned sigma, diffusers' defaults otherwise (gelu-approximate, norm_eps 1e-5)
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
    patch_size=2, num_embeds_ada_norm=5,
)  # fmt: skip
CLASSES = dict(  # no learned sigma, patch 4, exact GELU, the paper's epsilon
    num_attention_heads=4, attention_head_dim=4, in_channels=3, out_channels=3, num_layers=3, sample_size=16,
    patch_size=4, num_embeds_ada_norm=7, activation_fn="gelu", norm_eps=1e-6,
)  # fmt: skip


def _diffusers_dit(seed: int, **kw):
    """A diffusers DiT with every tensor perturbed (zero-initialised ones would hide a wrong mapping) and
    block 0's timestep / class embedders copied into every block, as the releases hold them."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return model


def _torch_forward(model, x_nhwc: np.ndarray, steps: np.ndarray, labels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        args = (torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), torch.from_numpy(steps), torch.from_numpy(labels))
        return model(*args).sample.numpy().transpose(0, 2, 3, 1)


def _assert_close(ours, ref) -> None:
    """Max abs difference <= 1e-4 of the output scale, per example."""
    for o, r in zip(np.asarray(ours), np.asarray(ref)):
        assert np.abs(o - r).max() <= 1e-4 * float(np.abs(r).max()), (np.abs(o - r).max(), np.abs(r).max())


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    model = _diffusers_dit(0, **LEARNED)
    src = str(tmp_path_factory.mktemp("dit_learned"))
    model.save_pretrained(src)
    with open(os.path.join(src, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "variance_type": "learned_range"}, f)
    return model, src


def test_learned_sigma_dit_matches_diffusers(learned):
    """Prediction and variance channels (diffusers' learned_range v' -> our v = (v' + 1) / 2), class labels
    and the null class (diffusers' row num_classes = our label -1 = labels=None)."""
    model, src = learned
    config, den = load_diffusers(src)
    m = config.model
    assert (m.name, m.hidden_size, m.num_res_blocks, m.num_heads, m.patch_size, m.num_classes) == ("dit", 16, 2, 2, 2, 5)
    assert m.learn_sigma and m.norm_eps == pytest.approx(1e-5) and m.nonlinearity == "gelu_tanh"
    assert config.sampling.variance == "learned" and den.learned_variance
    x = np.random.RandomState(0).randn(4, 8, 8, 4).astype(np.float32)
    steps, labels = np.array([0, 17, 500, 999]), np.array([0, 3, 5, 5])
    ref = _torch_forward(model, x, steps, labels)
    fwd = jax.jit(lambda x, t, y: den.with_variance(x, t, y))
    pred, v = fwd(jnp.asarray(x), jnp.asarray(steps + 1.0), jnp.asarray(np.where(labels == 5, -1, labels)))
    _assert_close(pred, ref[..., :4])
    _assert_close(v, (ref[..., 4:] + 1) / 2)
    null_pred, null_v = fwd(jnp.asarray(x), jnp.asarray(steps + 1.0), None)  # labels=None: the null class
    _assert_close(null_pred[2:], ref[2:, ..., :4])
    assert not np.allclose(null_pred[:2], ref[:2, ..., :4], atol=1e-3)
    n_theirs = sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    assert models.param_count(den.params[0]) == n_theirs - (LEARNED["num_layers"] - 1) * shared


def test_class_conditional_pipeline_imports_into_a_workdir(tmp_path, capsys):
    """`diffjax import diffusers` of a DiTPipeline directory (transformer/ + scheduler/), its config under the
    legacy class name Transformer2DModel as in facebook/DiT-XL-2-256: the workdir's EMA forward is diffusers'."""
    model = _diffusers_dit(1, **CLASSES)
    src = tmp_path / "pipeline"
    model.save_pretrained(src / "transformer")
    cfg_path = src / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"}))
    (src / "scheduler").mkdir()
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "clip_sample": False}
    (src / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    workdir = tmp_path / "imported"
    assert import_cli.main(["diffusers", str(src), "--workdir", str(workdir)]) == 0
    assert "imported dit" in capsys.readouterr().out
    config, graphdef, rest, process, state, step = load_workdir(str(workdir), only=("ema",))
    m = config.model
    assert (m.name, m.patch_size, m.num_classes, m.learn_sigma, m.nonlinearity, step) == ("dit", 4, 7, False, "gelu", 0)
    assert (config.process.name, config.sampling.sampler, config.sampling.clip_x0) == ("ddpm", "ancestral", False)
    x = np.random.RandomState(1).randn(3, 16, 16, 3).astype(np.float32)
    steps, labels = np.array([5, 250, 998]), np.array([6, 0, 7])  # 7: the null class
    net = nnx.merge(graphdef, nnx.State(state["ema"]), rest)
    ours = jax.jit(lambda x, nc, y: net(x, nc, y))(jnp.asarray(x), process.noise_cond(jnp.asarray(steps + 1.0)),
                                                    jnp.asarray([6, 0, -1]))  # fmt: skip
    _assert_close(ours, _torch_forward(model, x, steps, labels))


def test_blocks_with_different_embedders_are_refused(learned, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = shutil.copytree(learned[1], tmp_path / "src")
    path = os.path.join(src, "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    name = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    sd[name] = sd[name] + 1.0
    save_file(sd, path)
    with pytest.raises(WeightsError, match=r"differs from block 0") as err:
        load_params(str(src))
    assert name in str(err.value) and len(str(err.value).splitlines()) == 1


def test_parameter_counts_are_the_papers():
    """DiT-S/2, B/2, L/2, XL/2 on the paper's latents (32x32x4, 1000 classes, learned sigma) have diffusers'
    count less its depth - 1 extra copies of the embedders; XL/2 plus the frozen 256 x 1152 position table
    (a parameter of the DiT repository) is its printed 675,129,632 (Table 4: 675M)."""
    for size, (depth, hidden, heads) in SIZES.items():
        with torch.device("meta"):
            theirs = diffusers.DiTTransformer2DModel(
                num_attention_heads=heads,
                attention_head_dim=hidden // heads,
                in_channels=4,
                out_channels=8,
                num_layers=depth,
                sample_size=32,
                patch_size=2,
                num_embeds_ada_norm=1000,
            )
        shared = sum(p.numel() for p in theirs.transformer_blocks[0].norm1.emb.parameters())
        expected = sum(p.numel() for p in theirs.parameters()) - (depth - 1) * shared
        block = dict(name="dit", size=size, num_classes=1000, learn_sigma=True, image_size=32, num_channels=4)
        assert models.abstract_param_count(block) == expected, size
        if size == "XL":
            assert expected + 256 * hidden == 675_129_632


TINY = dict(name="dit", size="S", hidden_size=32, num_heads=2, num_res_blocks=2, nf=16, image_size=8, num_channels=3)


def test_remat_gives_the_same_loss_and_gradients():
    """model.remat 'block' / 'dots' against 'none' in training mode with dropout (the same keys): one set
    of weights, the graph of each remat mode, the three in one compiled program."""
    block = {**TINY, "num_classes": 3, "learn_sigma": True, "dropout": 0.2}
    params, rest = jax.jit(lambda: nnx.split(models.create(block, 0), nnx.Param, ...)[1:])()
    rng = np.random.default_rng(0)  # perturbed: the zero-initialised adaLN would hide the blocks
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    graphdefs = [
        nnx.split(models.abstract_model({**block, "remat": r}), nnx.Param, ...)[0] for r in ("none", "block", "dots")
    ]

    def loss(params, graphdef):
        net = nnx.merge(graphdef, params, rest)
        out = net(x, jnp.array([3.0, 500.0]), jnp.array([1, -1]), train=True, rngs=nnx.Rngs(dropout=7))
        return jnp.mean(out**2)

    (l0, g0), *others = jax.jit(lambda p: [jax.value_and_grad(loss)(p, g) for g in graphdefs])(params)
    for value, grads in others:
        np.testing.assert_allclose(value, l0, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, g0)
    assert float(jnp.abs(g0["blocks"][0]["fc2"]["kernel"]).max()) > 0


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(size="XXL"), r"config\.model\.size='XXL' is not a DiT size; choose one of '', 'S', 'B', 'L', 'XL'"),
        (dict(size="", hidden_size=0), r"config\.model\.hidden_size must be > 0"),
        (dict(patch_size=3), r"config\.model\.patch_size=3 does not divide config\.model\.image_size=8"),
        (dict(num_heads=3, hidden_size=32), r"config\.model\.hidden_size=32 is not divisible by config\.model\.num_heads=3"),
        (dict(remat="all"), r"config\.model\.remat must be one of none, block, dots"),
    ],
)
def test_bad_configs_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        models.abstract_param_count({**TINY, **override})


def test_megatron_sharding_annotations():
    """Column-parallel q, k, v, fc1; row-parallel out-projection and fc2; fsdp elsewhere (the adaLN
    modulation too: see dit.py)."""
    _, params = models.abstract_shapes({**TINY, "num_classes": 3})
    specs = nnx.get_partition_spec(params)
    block = specs["blocks"][0]
    spec = lambda v: tuple(v.get_value() if isinstance(v, nnx.Variable) else v)  # noqa: E731
    for name in ("q", "k", "v", "fc1"):
        assert spec(block[name]["kernel"]) == ("fsdp", "model"), name
    assert spec(block["modulation"]["kernel"]) == (None, "fsdp")
    for name in ("proj", "fc2"):
        assert spec(block[name]["kernel"]) == ("model", "fsdp"), name
    assert spec(specs["patch_embed"]["kernel"]) == (None, None, None, "fsdp")
    assert spec(specs["final"]["linear"]["kernel"]) == (None, "fsdp")
    assert spec(specs["embed"]["label_emb"]["embedding"]) == (None, "fsdp")


def test_tiny_dit_trains_with_the_hybrid_loss(tmp_path):
    """configs/dit/cifar10_b2.py cut to a one-block DiT on the 8x8 digits: `diffjax train` runs 2 steps of the
    hybrid loss with class dropout, writes a checkpoint and logs finite losses."""
    from tiny_configs import DIT_DIGITS

    from diffjax import train

    workdir = tmp_path / "w"
    assert train.main([f"--workdir={workdir}", *DIT_DIGITS, "--config.training.log_freq=1"]) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses))
    config, _, _, _, state, step = load_workdir(str(workdir), only=("ema",))
    assert step == 2 and config.model.name == "dit" and config.training.loss == "hybrid"
    assert (workdir / "samples" / "step_00000002.png").exists()  # snapshot samples: the learned variance


def test_engine_serves_a_tiny_flow_dit_as_the_offline_sampler():
    """The server's engine takes a DiT on the flow process unchanged: class-conditional requests
    co-batched in the slots (Euler = ddim, DPM-Solver++ with classifier-free guidance, Heun) equal
    samplers.sample with the same key."""
    import ml_collections

    from diffjax import network, processes, samplers
    from diffjax.serving.engine import Engine, served_steppers
    from diffjax.serving.scheduler import Job, Scheduler, wait_events

    cfg = {**TINY, "num_classes": 3, "image_size": 8, "num_channels": 3}
    model = models.create(cfg, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)  # adaLN-Zero starts as the zero function: perturb every weight
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    config = ml_collections.ConfigDict({"model": {"prediction": "flow", "learn_sigma": False}})
    process = processes.get("flow")
    den = network.network_denoiser(graphdef, rest, process, config, params)
    shape = (8, 8, 3)
    engine = Engine(
        den, process, shape, batch_slots=8, num_classes=3, served=served_steppers(process=process), devices=jax.devices()[:1]
    )
    scheduler = Scheduler(engine, checkpoint_step=0)
    labels = np.array([0, 1, 2], np.int32)
    scheduler.start()
    try:
        cases = (("ddim", None), ("dpm_solver++", 2.0), ("heun", None))  # co-batched in the slots
        jobs = [scheduler.submit(Job(3, name, 6, 7, labels, scale)) for name, scale in cases]
        for (name, scale), job in zip(cases, jobs):
            got = np.zeros((3, *shape), np.float32)
            for event in wait_events(job, lambda: True):
                if event[0] == "batch":
                    got[event[1]] = event[2]
            key, cond = jax.random.PRNGKey(7), jnp.asarray(labels)
            want, _ = samplers.sample(name, den, process, key, (3, *shape), 6, cond=cond, guidance_scale=scale)
            np.testing.assert_allclose(got, want, atol=2e-4, err_msg=f"{name} guidance {scale}")
            assert np.isfinite(got).all() and got.std() > 0.1
    finally:
        scheduler.shutdown()
