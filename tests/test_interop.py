"""diffusers UNet2DModel import: the imported network computes diffusers' forward pass.

The oracle is diffusers itself: UNet2DModel instances with random weights in the reference
layouts (DDPM CIFAR-10 at reduced width, a 256-style DDPM layout at tiny width, the NCSN++ VE
port at tiny width) are saved with save_pretrained, imported, and evaluated on the same inputs.
"""

from __future__ import annotations

import json
import math
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_peers  # noqa: E402 (tests/ is on sys.path under pytest)

torch = pytest.importorskip("torch")
torch_peers.bare_torchvision()  # diffusers imports torchvision whenever it is installed
diffusers = pytest.importorskip("diffusers")

from diffjax import models  # noqa: E402
from diffjax.interop import cli as import_cli  # noqa: E402
from diffjax.interop import load_diffusers, load_params  # noqa: E402
from diffjax.workdir import Workdir  # noqa: E402

DDPM_RELEASE = dict(
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    time_embedding_type="positional",
)  # google/ddpm-cifar10-32's fixed fields
CIFAR_LAYOUT = dict(
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    sample_size=32,
    in_channels=3,
    out_channels=3,
)
NCSNPP_PORT = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    norm_num_groups=None,
    norm_eps=1e-6,
    time_embedding_type="fourier",
    mid_block_scale_factor=math.sqrt(2.0),
    attention_head_dim=None,
    center_input_sample=False,
    down_block_types=("SkipDownBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D"),
    up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D", "SkipUpBlock2D"),
)  # diffusers' port of score_sde's NCSN++ (VE) at tiny width
DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "clip_sample": True,
    "variance_type": "fixed_large",
}


def _unet(seed: int, **kw):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**kw).eval()
    with torch.no_grad():  # perturb every tensor: zero-initialised ones would hide a wrong mapping
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _save(model, directory, scheduler=None, **save_kw) -> str:
    model.save_pretrained(directory, **save_kw)
    if scheduler is not None:
        with open(os.path.join(directory, "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f)
    return str(directory)


def _torch_forward(model, x_nhwc: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """Max abs difference <= 1e-4 of the output scale, per example (the scale differs with sigma)."""
    for o, r in zip(ours, ref):
        scale = float(np.abs(r).max())
        assert np.abs(o - r).max() <= 1e-4 * scale, (np.abs(o - r).max(), scale)


@pytest.fixture(scope="module")
def cifar_ddpm(tmp_path_factory):
    model = _unet(0, block_out_channels=(32, 64, 64, 64), norm_num_groups=8, dropout=0.1, **CIFAR_LAYOUT, **DDPM_RELEASE)
    return model, _save(model, tmp_path_factory.mktemp("ddpm_cifar"), DDPM_SCHEDULER)


def test_ddpm_cifar10_layout_matches_diffusers(cifar_ddpm):
    model, src = cifar_ddpm
    config, den = load_diffusers(src)
    assert (config.model.name, config.model.ch_mult, config.model.attn_resolutions) == ("ddpm_unet", (1, 2, 2, 2), (16,))
    assert (config.process.name, config.process.num_scales, config.model.prediction) == ("ddpm", 1000, "eps")
    assert (config.sampling.sampler, config.sampling.num_steps, config.sampling.clip_x0) == ("ancestral", 1000, True)
    assert config.model.num_groups == 8 and config.model.dropout == pytest.approx(0.1)
    x = np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)
    steps = np.array([0, 17, 500, 999])
    _assert_close(np.asarray(den(jnp.asarray(x), jnp.asarray(steps + 1.0))), _torch_forward(model, x, steps))
    n_theirs = sum(p.numel() for p in model.parameters())
    assert models.param_count(den.params[0]) == n_theirs


def test_ddpm_256_style_bin_with_old_attention_names(tmp_path):
    """The 256x256 DDPM releases' layout (6 levels, attention at 16x16 of 256 -> here 4x4 of 64),
    from a torch .bin whose attention tensors use the old names (query/key/value/proj_attn),
    with [cos, sin] embedding order and a cosine schedule."""
    model = _unet(
        1,
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        **{**DDPM_RELEASE, "flip_sin_to_cos": True},
    )
    model.save_config(tmp_path)
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    sd = {}
    for k, v in model.state_dict().items():
        for new, was in old.items():
            k = k.replace(new, was)
        sd[k] = v
    assert any(".proj_attn." in k for k in sd)
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    with open(tmp_path / "scheduler_config.json", "w") as f:
        json.dump(
            {
                **DDPM_SCHEDULER,
                "_class_name": "DDIMScheduler",
                "beta_schedule": "squaredcos_cap_v2",
                "prediction_type": "v_prediction",
            },
            f,
        )
    config, den = load_diffusers(str(tmp_path))
    assert config.model.attn_resolutions == (4,) and config.process.schedule == "cosine"
    assert den.prediction == "v" and config.source.weights == "diffusion_pytorch_model.bin"
    x = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
    steps = np.array([3, 998])
    _assert_close(np.asarray(den(jnp.asarray(x), jnp.asarray(steps + 1.0))), _torch_forward(model, x, steps))


# UNet2DModel as its own defaults build it (train_unconditional.py and most community checkpoints):
# norm_eps 1e-5, attention_head_dim 8 (multi-head), downsample_padding 1, freq_shift 0, flip_sin_to_cos.
DIFFUSERS_DEFAULT_LAYOUT = dict(sample_size=32, block_out_channels=(32, 64, 64, 64))
NONDEFAULT_LAYOUTS = {
    "attn_down_up_scale_shift_mish": dict(  # the middle attention has no GroupNorm (scale_shift, no attn groups)
        sample_size=8,
        block_out_channels=(16, 48),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=16,
        resnet_time_scale_shift="scale_shift",
        act_fn="mish",
        flip_sin_to_cos=False,
        freq_shift=2,
    ),
    "gelu_scale_shift_attn_groups": dict(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=8,
        act_fn="gelu",
        downsample_padding=0,
        norm_eps=1e-4,
    ),
    "no_mid_attention_relu": dict(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        act_fn="relu",
    ),
}


@pytest.mark.parametrize("layout", ["diffusers_defaults", *NONDEFAULT_LAYOUTS])
def test_unet2dmodel_options_match_diffusers(tmp_path, layout):
    """UNet2DModel with diffusers' defaults (and layouts setting its other options) imports as
    ddpm_unet and computes diffusers' forward pass (random weights, f32)."""
    kw = DIFFUSERS_DEFAULT_LAYOUT if layout == "diffusers_defaults" else NONDEFAULT_LAYOUTS[layout]
    model = _unet(6, **kw)
    config, den = load_diffusers(_save(model, tmp_path, DDPM_SCHEDULER))
    m, size = config.model, kw["sample_size"]
    assert m.name == "ddpm_unet" and m.norm_eps == pytest.approx(kw.get("norm_eps", 1e-5))
    assert m.attention_head_dim == kw.get("attention_head_dim", 8)
    assert m.downsample_padding == kw.get("downsample_padding", 1)
    x = np.random.RandomState(6).randn(2, size, size, 3).astype(np.float32)
    steps = np.array([5, 900])
    _assert_close(np.asarray(den(jnp.asarray(x), jnp.asarray(steps + 1.0))), _torch_forward(model, x, steps))
    assert models.param_count(den.params[0]) == sum(p.numel() for p in model.parameters())


def test_ncsnpp_port_with_diffusers_default_eps_and_heads(tmp_path):
    """The NCSN++ port built with UNet2DModel's norm_eps 1e-5 and multi-head attention (32 channels per head)."""
    model = _unet(7, **{**NCSNPP_PORT, "layers_per_block": 1, "norm_eps": 1e-5, "attention_head_dim": 32})
    config, den = load_diffusers(_save(model, tmp_path))  # diffusers' default scheduler for 'fourier': VE
    assert (config.model.name, config.model.norm_eps, config.model.attention_head_dim) == ("ncsnpp", 1e-5, 32)
    x = np.random.RandomState(7).rand(2, 16, 16, 3).astype(np.float32)
    t = np.array([0.05, 0.8], np.float32)
    sigma = config.process.sigma_min * (config.process.sigma_max / config.process.sigma_min) ** t
    _assert_close(np.asarray(den(jnp.asarray(x), jnp.asarray(t))), _torch_forward(model, x, sigma.astype(np.float32)))


def test_ncsnpp_ve_port_matches_diffusers(tmp_path):
    """diffusers' NCSN++ port (skip blocks, FIR, Fourier features, output / sigma) at tiny width."""
    model = _unet(2, **NCSNPP_PORT)
    src = _save(
        model,
        tmp_path,
        {
            "_class_name": "ScoreSdeVeScheduler",
            "sigma_min": 0.01,
            "sigma_max": 348.0,
            "num_train_timesteps": 2000,
            "snr": 0.16,
            "sampling_eps": 1e-5,
        },
    )
    config, den = load_diffusers(src)
    m, p = config.model, config.process
    assert (m.name, m.progressive, m.progressive_input, m.fir, m.scale_by_sigma) == (
        "ncsnpp",
        "output_skip",
        "input_skip",
        True,
        True,
    )
    assert (p.name, p.sigma_max, den.prediction, config.data.centered) == ("ve", 348.0, "score", False)
    assert (config.sampling.sampler, config.sampling.snr) == ("pc", pytest.approx(0.16))
    x = np.random.RandomState(2).rand(4, 16, 16, 3).astype(np.float32)
    t = np.array([1e-5, 0.1, 0.5, 1.0], np.float32)
    sigma = 0.01 * (348.0 / 0.01) ** t
    _assert_close(np.asarray(den(jnp.asarray(x), jnp.asarray(t))), _torch_forward(model, x, sigma.astype(np.float32)))


@pytest.mark.parametrize("base_path", ["configs/default.py", "configs/ve/cifar10_ncsnpp_continuous.py"])
@pytest.mark.parametrize(
    "unet, name",
    [({**CIFAR_LAYOUT, **DDPM_RELEASE, "block_out_channels": (32, 64, 64, 64)}, "ddpm_unet"), (NCSNPP_PORT, "ncsnpp")],
)
def test_imported_model_block_holds_only_the_networks_keys(tmp_path, base_path, unet, name):
    """Merged with a base config of either network, the model block is name, prediction and keyword
    arguments of the imported network: no key of the base's network leaks in."""
    from diffjax import configuration
    from diffjax.interop import diffusers as interop_diffusers

    with open(tmp_path / "config.json", "w") as f:
        json.dump({"_class_name": "UNet2DModel", **unet}, f)
    base = configuration.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), base_path))
    source = interop_diffusers.Source(str(tmp_path / "config.json"), "", None)
    config, _ = interop_diffusers.translate(source, base)
    assert config.model.name == name
    assert set(config.model) == {"name", "prediction", *models.parameters(name)}
    models.network_kwargs(config.model)


def test_full_size_ddpm_cifar10_has_the_reference_parameter_count(tmp_path):
    model = diffusers.UNet2DModel(block_out_channels=(128, 256, 256, 256), **CIFAR_LAYOUT, **DDPM_RELEASE)
    src = _save(model, tmp_path, DDPM_SCHEDULER)
    config, params = load_params(src)
    assert models.param_count(params) == sum(p.numel() for p in model.parameters()) == 35_746_307
    assert models.abstract_param_count(config.model) == 35_746_307


def test_import_then_ddim_matches_diffusers_ddim_pipeline(cifar_ddpm, tmp_path, capsys):
    """`diffjax import` + `diffjax sample --sampler ddim --spacing leading` vs diffusers' DDIMPipeline
    (timestep_spacing 'leading', eta 0, x0 clipped) from the same initial noise."""
    from diffjax import sample, samplers

    model, src = cifar_ddpm
    workdir = tmp_path / "imported"
    assert import_cli.main(["diffusers", src, "--workdir", str(workdir)]) == 0
    assert "35," not in capsys.readouterr().out  # the reduced-width model's own count is printed
    num, steps, seed = 3, 10, 7
    out = tmp_path / "grid.png"
    assert (
        sample.main(
            [
                "--workdir",
                str(workdir),
                "--num",
                str(num),
                "--sampler",
                "ddim",
                "--steps",
                str(steps),
                "--spacing",
                "leading",
                "--seed",
                str(seed),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ours = np.load(tmp_path / "grid.npz")["samples"]

    keys = samplers.example_keys(jax.random.PRNGKey(seed), num)
    x_T = np.asarray(samplers.example_noise(keys, (32, 32, 3), samplers.INIT_NOISE)).transpose(0, 3, 1, 2)
    # The scheduler config's clip_sample=True became sampling.clip_x0: DDIM with the clipped x0 and
    # the eps it implies, diffusers' clip_sample + use_clipped_model_output.
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    pipe = diffusers.DDIMPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with mock.patch("diffusers.pipelines.ddim.pipeline_ddim.randn_tensor", return_value=torch.from_numpy(x_T)):
        theirs = pipe(
            batch_size=num, num_inference_steps=steps, eta=0.0, output_type="np", use_clipped_model_output=True
        ).images
    np.testing.assert_allclose((ours + 1) / 2, theirs, atol=2e-4)

    # The workdir is a whole training workdir: the full state restores (fine-tuning resumes from it).
    # inference=True: the state's shapes and shardings traced abstractly from the same create() the
    # trainer compiles (identical abstract state), not compiled: jit(create) of this UNet over the
    # 8 devices took ~70 s of this test's ~150 s. restore() with no `only` still reads every entry.
    w = Workdir(str(workdir), inference=True)
    state, step = w.restore()
    assert step == 0 and set(state) == {"step", "params", "ema", "opt_state", "rng"}
    jax.tree.map(np.testing.assert_array_equal, state["params"], state["ema"])


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------
def _copy_source(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _run_import(src: str, workdir, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:  # a usage mistake: one line, exit status 2
        import_cli.main(["diffusers", src, "--workdir", str(workdir)])
    code = exc.value.code
    err = capsys.readouterr().err.strip()
    return code, err


def _nothing_written(workdir) -> bool:
    parent = os.path.dirname(str(workdir))
    return not os.path.exists(workdir) and not [n for n in os.listdir(parent) if ".import-" in n]


def test_missing_weights_file(cifar_ddpm, tmp_path, capsys):
    src = _copy_source(cifar_ddpm[1], tmp_path / "src")
    os.remove(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    code, err = _run_import(src, tmp_path / "w", capsys)
    assert code == 2 and "no weights file" in err and len(err.splitlines()) == 1
    assert _nothing_written(tmp_path / "w")


def test_truncated_weights_file(cifar_ddpm, tmp_path, capsys):
    src = _copy_source(cifar_ddpm[1], tmp_path / "src")
    path = os.path.join(src, "diffusion_pytorch_model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    code, err = _run_import(src, tmp_path / "w", capsys)
    assert code == 2 and "cannot read" in err and "truncated" in err and len(err.splitlines()) == 1
    assert _nothing_written(tmp_path / "w")


def test_tensor_of_the_wrong_shape(cifar_ddpm, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    src = _copy_source(cifar_ddpm[1], tmp_path / "src")
    path = os.path.join(src, "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    name = "down_blocks.1.resnets.0.conv1.weight"
    sd[name] = sd[name][:, :16]
    save_file(sd, path)
    code, err = _run_import(src, tmp_path / "w", capsys)
    assert code == 2 and name in err and "shape" in err and len(err.splitlines()) == 1
    assert _nothing_written(tmp_path / "w")


@pytest.mark.parametrize(
    "field,value,named",
    [
        (
            "down_block_types",
            ["CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "CrossAttnDownBlock2D",
        ),
        ("attention_head_dim", 24, "attention_head_dim=24"),  # divides no attention layer's 64 channels
        ("resnet_time_scale_shift", "spatial", "resnet_time_scale_shift='spatial'"),
        ("downsample_type", "resnet", "downsample_type='resnet'"),
        ("act_fn", "tanh", "act_fn='tanh'"),
        ("attn_norm_num_groups", 4, "attn_norm_num_groups=4"),
    ],
)
def test_unsupported_option(cifar_ddpm, tmp_path, capsys, field, value, named):
    src = _copy_source(cifar_ddpm[1], tmp_path / "src")
    cfg_path = os.path.join(src, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg[field] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    code, err = _run_import(src, tmp_path / "w", capsys)
    assert code == 2 and named in err and "unsupported" in err and len(err.splitlines()) == 1
    assert _nothing_written(tmp_path / "w")


def test_existing_workdir_is_left_alone(cifar_ddpm, tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("mine")
    code, err = _run_import(cifar_ddpm[1], workdir, capsys)
    assert code == 2 and "not empty" in err
    assert os.listdir(workdir) == ["keep.txt"]


@pytest.mark.gcs  # with tests/test_gcs.py: `make test-gcs` runs only these
def test_import_from_and_into_a_bucket(cifar_ddpm, capsys, monkeypatch):
    """SRC and --workdir on gs:// (fake-gcs-server on loopback): the imported workdir reads back
    from the bucket with the weights read from the local SRC; an import that fails (truncated
    weights) leaves no object behind."""
    import jax
    from gcs_emulator import GcsEmulator

    from diffjax import storage

    with GcsEmulator() as gcs:
        gcs.create_bucket("bkt")
        for name, value in gcs.env({}).items():
            monkeypatch.setenv(name, value)
        bridged = ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "EPATH_USE_TF")
        for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", *bridged):
            monkeypatch.delenv(name, raising=False)
        storage.configure()
        for name in os.listdir(cifar_ddpm[1]):
            storage.path(cifar_ddpm[1], name).copy(storage.path("gs://bkt/src", name))
        import_cli.main(["diffusers", "gs://bkt/src", "--workdir", "gs://bkt/imported"])
        assert "gs://bkt/imported" in capsys.readouterr().out
        remote, step = Workdir("gs://bkt/imported", inference=True).restore(only=("ema",))
        _, params = load_params(cifar_ddpm[1])  # the weights read from the local SRC
        assert step == 0
        for a, b in zip(jax.tree.leaves(remote["ema"]), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert "imported/config.json" in gcs.objects("bkt", "imported/")

        data = storage.path("gs://bkt/src/diffusion_pytorch_model.safetensors").read_bytes()
        storage.path("gs://bkt/bad/diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
        storage.path("gs://bkt/bad/config.json").write_bytes(storage.path("gs://bkt/src/config.json").read_bytes())
        code, err = _run_import("gs://bkt/bad", "gs://bkt/bad_workdir", capsys)
        assert code == 2 and "truncated" in err and len(err.splitlines()) == 1
        assert gcs.objects("bkt", "bad_workdir/") == []


@pytest.mark.parametrize(
    "variance_type, expected",
    [(None, "fixed_small"), ("fixed_small_log", "fixed_small"), ("fixed_large", "fixed_large"), ("learned_range", None)],
)
def test_scheduler_variance_type_becomes_sampling_variance(tmp_path, variance_type, expected):
    """DDPMScheduler's variance_type is sampling.variance (a base config's own, e.g. ddpm_cifar10's
    fixed_large, never leaks through); learned variances are refused with one line naming them."""
    from diffjax import configuration
    from diffjax.interop import diffusers as interop_diffusers

    with open(tmp_path / "config.json", "w") as f:
        json.dump({"_class_name": "UNet2DModel", **CIFAR_LAYOUT, **DDPM_RELEASE, "block_out_channels": (32, 64, 64, 64)}, f)
    scheduler = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
    if variance_type is not None:
        scheduler["variance_type"] = variance_type
    with open(tmp_path / "scheduler_config.json", "w") as f:
        json.dump(scheduler, f)
    base = configuration.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs/ddpm_cifar10.py"))
    assert base.sampling.variance == "fixed_large"
    source = interop_diffusers.Source(str(tmp_path / "config.json"), "", str(tmp_path / "scheduler_config.json"))
    if expected is None:
        with pytest.raises(interop_diffusers.UnsupportedModel, match=r"variance_type='learned_range' needs a network"):
            interop_diffusers.translate(source, base)
        return
    config, _ = interop_diffusers.translate(source, base)
    assert config.sampling.variance == expected


def test_variance_type_learned_is_refused_in_one_line(tmp_path):
    """diffusers' variance_type='learned' is a network outputting the variance itself, which diffjax's
    learned variance (iDDPM's interpolation of log beta-tilde and log beta) cannot represent."""
    from diffjax.interop import diffusers as interop_diffusers

    with open(tmp_path / "config.json", "w") as f:
        json.dump({"_class_name": "UNet2DModel", **CIFAR_LAYOUT, **DDPM_RELEASE, "block_out_channels": (32, 64, 64, 64)}, f)
    with open(tmp_path / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "DDPMScheduler", "variance_type": "learned"}, f)
    source = interop_diffusers.Source(str(tmp_path / "config.json"), "", str(tmp_path / "scheduler_config.json"))
    with pytest.raises(
        interop_diffusers.UnsupportedModel, match=r"variance_type='learned' \(the network outputs the variance"
    ):
        interop_diffusers.translate(source)


def test_learned_range_unet_ancestral_trajectory_matches_diffusers(tmp_path):
    """A random-weight UNet with out_channels = 2 in_channels and DDPMScheduler(variance_type='learned_range')
    imports with model.learn_sigma and sampling.variance 'learned'; the whole T = 20 ancestral trajectory
    equals diffusers' DDPM loop (its UNet, its scheduler.step) fed the same x_T and per-step noise."""
    from unittest import mock as _mock

    from diffjax import network, samplers

    T = 20
    model = _unet(
        5,
        sample_size=8,
        in_channels=3,
        out_channels=6,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        **DDPM_RELEASE,
    )
    scheduler = {**DDPM_SCHEDULER, "num_train_timesteps": T, "clip_sample": False, "variance_type": "learned_range"}
    config, den = load_diffusers(_save(model, tmp_path / "m", scheduler))
    assert config.model.learn_sigma and config.sampling.variance == "learned" and den.learned_variance
    process = network.build_process(config)
    key, shape = jax.random.key(3), (2, 8, 8, 3)
    x_T = np.random.RandomState(4).randn(*shape).astype(np.float32)
    ours, _ = samplers.sample("ancestral", den, process, key, shape, T, x_T=jnp.asarray(x_T), variance="learned")

    sched = diffusers.DDPMScheduler(**{k: v for k, v in scheduler.items() if k != "_class_name"})
    sched.set_timesteps(T)
    keys, x = samplers.example_keys(key, shape[0]), torch.from_numpy(x_T.transpose(0, 3, 1, 2))
    for i, t in enumerate(sched.timesteps):
        z = np.array(samplers.example_noise_coded(keys, shape[1:], i, 0)).transpose(0, 3, 1, 2).copy()
        with (
            torch.no_grad(),
            _mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", return_value=torch.from_numpy(z)),
        ):
            x = sched.step(model(x, t).sample, t, x).prev_sample
    theirs = x.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * float(np.abs(theirs).max()))
