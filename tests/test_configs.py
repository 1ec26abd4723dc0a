"""Reproduction configs: schema, overrides, `diffjax info`."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest

from diffjax import info, models, processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if not p.endswith("__init__.py")
)
REPRODUCTIONS = {  # config -> a number of the paper it targets, quoted in its docstring
    "configs/ddpm_cifar10.py": "3.17",
    "configs/vp/cifar10_ddpmpp_continuous.py": "2.55",
    "configs/vp/cifar10_ddpmpp_deep_continuous.py": "2.41",
    "configs/subvp/cifar10_ddpmpp_deep_continuous.py": "2.99",
    "configs/ve/cifar10_ncsnpp_continuous.py": "2.38",
    "configs/ve/cifar10_ncsnpp_deep_continuous.py": "2.20",
    "configs/edm/cifar10_ddpmpp.py": "1.97",
    "configs/vdm/cifar10.py": "2.65",
    "configs/flow/cifar10_ddpmpp.py": "2.58",
}
SCHEMA = {
    "": ["seed", "process", "training", "model", "data", "optim", "sampling", "eval"],
    "process": ["name"],
    "training": [
        "batch_size",
        "n_iters",
        "snapshot_freq",
        "log_freq",
        "eval_freq",
        "n_jitted_steps",
        "loss",
        "likelihood_weighting",
        "label_dropout",
        "ema_rate",
        "grad_accum_steps",
        "fsdp",
        "dcn_data",
    ],
    "model": [  # the keys every network takes; the rest is the network's (test_model_block_is_the_networks)
        "name",
        "prediction",
        "dtype",
        "num_classes",
        "augment_dim",
        "nf",
        "num_res_blocks",
        "dropout",
        "conditional",
        "nonlinearity",
        "embedding_type",
        "fourier_scale",
        "scale_by_sigma",
    ],
    "data": ["dataset", "image_size", "num_channels", "centered", "random_flip", "uniform_dequantization"],
    "optim": ["optimizer", "lr", "beta1", "eps", "weight_decay", "warmup", "grad_clip"],
    "sampling": ["sampler", "num_steps", "snr", "n_steps_each", "clip_x0"],
    "eval": [
        "batch_size",
        "num_samples",
        "metrics",
        "reference",
        "quantize",
        "seed",
        "fid_freq",
        "fid_num",
        "bpd_passes",
        "targets",
    ],
}


def load(path, *overrides):
    return info.load_config(os.path.join(ROOT, path), list(overrides))


def test_all_reproductions_present():
    assert set(REPRODUCTIONS) | {"configs/default.py", "configs/digits.py", "configs/toy/eight_gaussians.py"} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_schema(path):
    c = load(path)
    for section, keys in SCHEMA.items():
        node = c if not section else c[section]
        missing = [k for k in keys if k not in node]
        assert not missing, f"{path}: {section or 'config'} lacks {missing}"
    # the process block is exactly the keyword arguments of its process
    params = {k: v for k, v in c.process.items() if k != "name"}
    process = processes.get(c.process.name, **params)
    assert process.name == c.process.name
    # classifier: guidance; elbo: configs/vdm; hybrid: learned variances (configs/dit)
    assert c.training.loss in ("eps", "dsm", "v", "edm", "hybrid", "classifier", "elbo", "flow")  # flow: configs/flow
    assert c.model.prediction in ("eps", "score", "x0", "v", "flow")
    assert c.model.dtype in ("float32", "bfloat16")
    assert c.model.name in models.available()
    assert c.training.batch_size > 0 and 0 < c.training.ema_rate < 1


@pytest.mark.parametrize("path", CONFIGS)
def test_model_block_is_the_networks(path):
    """config.model holds name, prediction and keyword arguments of its network only (no dead keys),
    and the image networks' shape and range follow config.data."""
    c = load(path)
    params = models.parameters(c.model.name)
    dead = [k for k in c.model if k not in ("name", "prediction") and k not in params]
    assert not dead, f"{path}: config.model.{dead} not read by {c.model.name}"
    assert set(c.model) == {"name", "prediction", *params}, f"{path}: the block is models.default_config's"
    if "image_size" in params:
        moved = load(path, "--config.data.image_size=16", "--config.data.num_channels=1", "--config.data.centered=False")
        assert (moved.model.image_size, moved.model.num_channels, moved.model.centered) == (16, 1, False)


def test_network_defaults_are_not_repeated():
    """configs/default.py's model block is models.default_config('ddpm_unet'): Ho et al.'s CIFAR-10 UNet."""
    c = load("configs/default.py").model.to_dict()
    assert {k: v for k, v in c.items() if k != "prediction"} == models.default_config("ddpm_unet").to_dict()
    ve, vp = load("configs/ve/cifar10_ncsnpp_continuous.py").model, load("configs/vp/cifar10_ddpmpp_continuous.py").model
    assert (ve.fir, ve.progressive_input, ve.embedding_type, ve.scale_by_sigma) == (True, "residual", "fourier", True)
    assert (vp.fir, vp.progressive_input, vp.embedding_type, vp.scale_by_sigma) == (False, "none", "positional", False)
    edm = load("configs/edm/cifar10_ddpmpp.py").model
    assert (edm.prediction, edm.augment_dim, edm.ch_mult, edm.dropout) == ("x0", 9, (2, 2, 2), 0.13)


def test_config_file_with_a_dead_model_key_is_refused(tmp_path):
    path = tmp_path / "dead_key.py"
    path.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'model': {'name': 'ddpm_unet', 'nf': 16, 'fir': True}})\n"
    )
    with pytest.raises(ValueError, match=r"config\.model\.fir is not read by model 'ddpm_unet'; its keys are: .*nf"):
        info.load_config(str(path))
    path.write_text(path.read_text().replace("'fir': True", "'normalization': 'BatchNorm'"))
    with pytest.raises(
        ValueError, match=r"config\.model\.normalization='BatchNorm' is not implemented; diffjax supports 'GroupNorm'"
    ):
        info.load_config(str(path))


@pytest.mark.parametrize("path, number", sorted(REPRODUCTIONS.items()))
def test_docstring_cites_target(path, number):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
    source = open(spec.origin).read()
    doc = source.split('"""')[1]
    assert number in doc and "arXiv" in doc, path


def test_paper_hyperparameters():
    ddpm = load("configs/ddpm_cifar10.py")
    assert (ddpm.process.name, ddpm.process.num_scales, ddpm.process.schedule) == ("ddpm", 1000, "linear")
    assert (ddpm.process.beta_start, ddpm.process.beta_end) == (1e-4, 0.02)
    assert (ddpm.training.batch_size, ddpm.optim.lr, ddpm.optim.warmup, ddpm.optim.grad_clip) == (128, 2e-4, 5000, 1.0)
    assert ddpm.training.ema_rate == 0.9999 and ddpm.model.dropout == 0.1 and ddpm.training.loss == "eps"
    vp = load("configs/vp/cifar10_ddpmpp_continuous.py")
    assert (vp.process.beta_min, vp.process.beta_max, vp.training.ema_rate) == (0.1, 20.0, 0.9999)
    ve = load("configs/ve/cifar10_ncsnpp_deep_continuous.py")
    assert (ve.process.sigma_min, ve.process.sigma_max, ve.model.num_res_blocks) == (0.01, 50.0, 8)
    assert ve.model.fir and ve.model.scale_by_sigma and ve.model.embedding_type == "fourier"
    edm = load("configs/edm/cifar10_ddpmpp.py")
    assert (edm.process.sigma_min, edm.process.sigma_max, edm.process.sigma_data, edm.process.rho) == (0.002, 80.0, 0.5, 7.0)
    assert edm.training.ema_rate == 0.999 and edm.sampling.num_steps == 18


def test_overrides():
    c = load(
        "configs/ddpm_cifar10.py",
        "--config.model.nf=32",
        "--config.model.ch_mult=(1,2)",
        "--config.training.batch_size=8",
        "--config.model.dtype=bfloat16",
        "--config.data.image_size=16",
    )
    assert c.model.nf == 32 and tuple(c.model.ch_mult) == (1, 2) and c.training.batch_size == 8
    assert c.model.dtype == "bfloat16"
    assert c.model.image_size == 16  # the model's image_size references data.image_size


@pytest.mark.parametrize(
    "override, match",
    [
        ("--config.model.nff=32", "nff"),
        ("--config.modle.nf=32", "modle"),
        ("--config.model.nf=abc", "abc"),
        ("--model.nf=32", "--config"),
        # score_sde's keys stay (users' configs carry them) but only the implemented value passes
        ("--config.sampling.probability_flow=True", "probability_flow"),
        ("--config.sampling.noise_removal=False", "noise_removal"),
        ("--config.model.attention_type=legacy", "attention_type"),
        ("--config.model.conv_size=5", "conv_size"),
        ("--config.model.fir=True", "fir"),  # an ncsnpp key: ddpm_cifar10's ddpm_unet does not take it
    ],
)
def test_bad_override(override, match):
    with pytest.raises(ValueError, match=match):
        load("configs/ddpm_cifar10.py", override)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError):
        info.load_config("configs/nope.py")


def test_info_cli(capsys):
    path = os.path.join(ROOT, "configs", "digits.py")
    assert info.main(["--config", path, "--config.model.nf=16"]) == 0
    out = capsys.readouterr().out
    expected = models.abstract_param_count(load("configs/digits.py", "--config.model.nf=16").model)
    assert "ddpm_unet" in out and f"{expected:,}" in out and "GFLOP" in out
    with pytest.raises(SystemExit) as exc:
        info.main(["--config", path, "--config.model.bogus=1"])
    assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_training_flops_scale_with_width():
    small = load("configs/digits.py", "--config.model.nf=16")
    big = load("configs/digits.py", "--config.model.nf=32")
    f_small = info.training_flops(small.model, (1, 8, 8, 1))
    f_big = info.training_flops(big.model, (1, 8, 8, 1))
    assert f_small > 0 and 2.5 < f_big / f_small < 4.5  # conv FLOPs ~ width^2


@pytest.mark.parametrize("path", sorted(REPRODUCTIONS))
def test_eval_targets_are_the_docstrings_and_the_readme_table(path):
    """Each reproduction's eval.targets (what `diffjax eval` results are compared with) are numbers its
    docstring cites, and README's configs table shows them in that config's row."""
    c = load(path)
    targets = dict(c.eval.targets)
    assert targets and set(targets) <= {"fid", "is", "bpd"}, path
    doc = open(os.path.join(ROOT, path)).read().split('"""')[1]
    row = next(
        line
        for line in open(os.path.join(ROOT, "README.md")).read().splitlines()
        if line.startswith(f"| `{os.path.relpath(path, 'configs')}` |")
    )
    for name, value in targets.items():
        assert f"{value:.2f}" in doc and f"{value:.2f}" in row, (path, name, value)
    assert c.eval.quantize in ("round", "floor") and c.eval.bpd_passes >= 1


def test_workdirs_written_before_explicit_network_arguments_still_load():
    """An old config.json carries the whole shared model block (keys its network never read):
    workdir.written_config drops them, giving the same network; config files get no such pass."""
    from diffjax.workdir import written_config

    config = load("configs/digits.py").to_dict()
    old = dict(config, model=dict(config["model"], fir=False, skip_rescale=False, data_dim=2, normalization="GroupNorm"))
    with pytest.raises(ValueError, match="fir"):
        models.abstract_param_count(old["model"])
    read = written_config(old)
    assert read["model"] == dict(config["model"], normalization="GroupNorm")
    assert models.abstract_param_count(read["model"]) == models.abstract_param_count(config["model"])
