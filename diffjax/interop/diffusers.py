"""Released diffusers checkpoints as diffjax models: ``load_diffusers`` and ``import_diffusers``.

SRC is a diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors``, or
the older ``.bin``) with an optional ``scheduler_config.json`` beside it, or a pipeline directory
(``unet/`` + ``scheduler/``). The weights are read without torch (safetensors' numpy API; a .bin
through diffjax's restricted torch-zip reader), the network config is translated by
``diffusers_unet.model_config`` and the process from the scheduler:

- DDPM-family schedulers (DDPM, DDIM, PNDM, DPM-Solver, Euler, ...): ``ddpm`` process with the
  same betas ('linear' or 'squaredcos_cap_v2' = our 'cosine') and T = num_train_timesteps; our time
  t = diffusers' timestep + 1; data in [-1, 1]; prediction from ``prediction_type``; the
  scheduler's ``clip_sample`` -> ``sampling.clip_x0``, DDPMScheduler's ``variance_type`` ->
  ``sampling.variance`` (fixed_small / fixed_large; 'learned_range' -> 'learned' for a UNet with
  out_channels = 2 in_channels (model.learn_sigma); 'learned', a network outputting the variance
  itself, is refused).
- ``ScoreSdeVeScheduler``: ``ve`` process (sigma_min, sigma_max, sampling_eps); the network
  conditions on sigma and returns the score; data in [0, 1] (ScoreSdeVePipeline clamps to [0, 1]).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from diffjax import storage
from diffjax.interop import diffusers_dit
from diffjax.interop.diffusers_unet import UnsupportedModel, WeightsError, map_weights, model_config

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
BETA_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DDPMParallelScheduler",
    "DDIMParallelScheduler",
)
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# DDPMScheduler's variance_type -> sampling.variance (the _log forms are the same variance in log space)
VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
}
DEFAULT_SCHEDULERS = {  # diffusers' own defaults, used when SRC has no scheduler config
    "positional": {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
    },
    "fourier": {
        "_class_name": "ScoreSdeVeScheduler",
        "num_train_timesteps": 2000,
        "snr": 0.15,
        "sigma_min": 0.01,
        "sigma_max": 1348.0,
        "sampling_eps": 1e-5,
    },
}

__all__ = [
    "Source",
    "find_source",
    "read_weights",
    "translate",
    "load_diffusers",
    "import_diffusers",
    "UnsupportedModel",
    "WeightsError",
]


@dataclasses.dataclass(frozen=True)
class Source:
    """The files of one diffusers model: its config, weights and (optional) scheduler config."""

    config_path: str
    weights_path: str
    scheduler_path: str | None


def _read_json(path: str) -> dict:
    try:
        return json.loads(storage.path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WeightsError(f"cannot read {path}: {err}") from None


def find_source(src: str) -> Source:
    """Locate config.json, the weights file and the scheduler config of SRC (model or pipeline dir)."""
    root = storage.path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{src}: no such directory (give a diffusers model or pipeline directory)")
    model_dir = root if (root / "config.json").exists() else root / "unet"
    if not (model_dir / "config.json").exists() and (root / "transformer" / "config.json").exists():
        model_dir = root / "transformer"  # a DiTPipeline
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(
            f"{src}: none of {src}/config.json, {src}/unet/config.json, {src}/transformer/config.json exists "
            "(is it a diffusers model directory?)"
        )
    weights = [model_dir / w for w in WEIGHT_FILES if (model_dir / w).exists()]
    if not weights:
        raise FileNotFoundError(
            f"{model_dir}: no weights file ({' or '.join(WEIGHT_FILES)}); sharded checkpoints are not read"
        )
    candidates = [
        model_dir / "scheduler_config.json",
        root / "scheduler" / "scheduler_config.json",
        root / "scheduler_config.json",
    ]
    scheduler = next((str(c) for c in candidates if c.exists()), None)
    return Source(str(model_dir / "config.json"), str(weights[0]), scheduler)


def read_weights(path: str) -> dict[str, np.ndarray]:
    """{tensor name: numpy array} of a .safetensors or torch .bin file; WeightsError if unreadable."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(storage.local_copy(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise WeightsError(
                f"cannot read {path}: {type(err).__name__}: {err} (truncated or not a safetensors file?)"
            ) from None
    from diffjax.evaluation.inception_weights import InceptionWeightsError, load_pytorch_fid_weights

    try:
        return load_pytorch_fid_weights(path)
    except (InceptionWeightsError, OSError) as err:
        raise WeightsError(f"cannot read {path}: {err}") from None


def _process_block(scheduler: dict, embedding: str) -> tuple[dict, dict, bool, str]:
    """(process block, sampling block, data centered, prediction) from a diffusers scheduler config."""
    name = scheduler.get("_class_name", "?")
    if name == "ScoreSdeVeScheduler":
        if embedding != "fourier":
            raise UnsupportedModel(
                f"{name} conditions on sigma: the model needs time_embedding_type 'fourier', got {embedding!r}"
            )
        process = dict(
            name="ve",
            sigma_min=float(scheduler.get("sigma_min", 0.01)),
            sigma_max=float(scheduler.get("sigma_max", 1348.0)),
            eps=float(scheduler.get("sampling_eps", 1e-5)),
        )
        sampling = dict(
            sampler="pc",
            num_steps=int(scheduler.get("num_train_timesteps", 2000)),
            predictor="reverse_diffusion",
            corrector="langevin",
            snr=float(scheduler.get("snr", 0.15)),
            n_steps_each=1,
            variance="fixed_small",
        )
        return process, sampling, False, "score"
    if name not in BETA_SCHEDULERS:
        raise UnsupportedModel(
            f"unsupported diffusers scheduler {name!r}: diffjax reads ScoreSdeVeScheduler and "
            f"the beta schedulers {', '.join(BETA_SCHEDULERS)}"
        )
    if embedding != "positional":
        raise UnsupportedModel(
            f"{name} feeds integer timesteps: the model needs time_embedding_type 'positional', got {embedding!r}"
        )
    if scheduler.get("trained_betas") is not None:
        raise UnsupportedModel(f"{name}: trained_betas are not supported (beta_schedule linear or squaredcos_cap_v2)")
    schedule = scheduler.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise UnsupportedModel(f"{name}: beta_schedule={schedule!r} is not supported; diffjax has {sorted(BETA_SCHEDULES)}")
    pred = scheduler.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise UnsupportedModel(f"{name}: prediction_type={pred!r} is not supported; choose one of {sorted(PREDICTIONS)}")
    T = int(scheduler.get("num_train_timesteps", 1000))
    process = dict(name="ddpm", num_scales=T, schedule=BETA_SCHEDULES[schedule])
    if schedule == "linear":
        process.update(beta_start=float(scheduler.get("beta_start", 1e-4)), beta_end=float(scheduler.get("beta_end", 0.02)))
    clip = bool(scheduler.get("clip_sample", name in ("DDPMScheduler", "DDIMScheduler")))  # their defaults
    if clip and float(scheduler.get("clip_sample_range", 1.0)) != 1.0:
        raise UnsupportedModel(
            f"{name}: clip_sample_range={scheduler['clip_sample_range']} is not supported (the data range [-1, 1]: 1.0)"
        )
    if scheduler.get("thresholding", False):
        raise UnsupportedModel(f"{name}: thresholding=True (dynamic thresholding) is not supported")
    sampling = dict(sampler="ancestral", num_steps=T, clip_x0=clip, variance=_variance(name, scheduler))
    return process, sampling, True, PREDICTIONS[pred]  # DDPM's own sampler: T ancestral steps


def _variance(name: str, scheduler: dict) -> str:
    """sampling.variance from DDPMScheduler's variance_type (the other schedulers have none)."""
    kind = scheduler.get("variance_type") or "fixed_small"
    if kind in VARIANCE_TYPES:
        return VARIANCE_TYPES[kind]
    if kind == "learned_range":  # iDDPM's interpolation of log beta-tilde and log beta (diffjax.denoiser)
        return "learned"
    if kind == "learned":
        raise UnsupportedModel(
            f"{name}: variance_type='learned' (the network outputs the variance itself) is not supported; "
            "diffjax learns iDDPM's interpolation between beta-tilde and beta: 'learned_range'"
        )
    raise UnsupportedModel(f"{name}: variance_type={kind!r} is not supported; choose one of {', '.join(VARIANCE_TYPES)}")


def translate(src: Source, base: ml_collections.ConfigDict | None = None) -> tuple[ml_collections.ConfigDict, dict]:
    """(diffjax config, {'family', 'flip_sin_to_cos', 'scheduler'}) for a diffusers model.

    base (default: configs/default's) gives the blocks the model does not decide: data set,
    training, optimiser and evaluation protocol; model, process, sampling and the data's shape
    and range come from the import; of the base's model block only keys the imported network
    takes are kept."""
    from diffjax import models
    from diffjax.interop import default_config

    cfg = _read_json(src.config_path)
    model, family = diffusers_dit.model_config(cfg) if diffusers_dit.is_dit(cfg) else model_config(cfg)
    notes = {
        "family": family,
        "flip_sin_to_cos": bool(cfg.get("flip_sin_to_cos", True)) and model["embedding_type"] == "positional",
    }
    if src.scheduler_path is None:
        scheduler = DEFAULT_SCHEDULERS[model["embedding_type"]]
        notes["scheduler"] = f"no scheduler config; assumed diffusers' default {scheduler['_class_name']}"
    else:
        scheduler = _read_json(src.scheduler_path)
        notes["scheduler"] = src.scheduler_path
    process, sampling, centered, prediction = _process_block(scheduler, model["embedding_type"])
    if sampling["variance"] == "learned" and not model.get("learn_sigma"):
        raise UnsupportedModel(
            f"{scheduler.get('_class_name')}: variance_type='learned_range' needs a network that also outputs its "
            "variance (learn_sigma): out_channels = 2 x in_channels"
        )

    config = ml_collections.ConfigDict((base if base is not None else default_config()).to_dict())
    config.unlock()
    data = config.data
    if int(data.image_size) != model["image_size"] or int(data.num_channels) != model["num_channels"]:
        if base is not None:
            print(
                f"note: the base config's data is {data.image_size}x{data.image_size}x{data.num_channels}; the "
                f"imported model's {model['image_size']}x{model['image_size']}x{model['num_channels']} is used"
            )
    data.image_size, data.num_channels, data.centered = model["image_size"], model["num_channels"], centered
    data.uniform_dequantization = False
    config.process = ml_collections.ConfigDict(process)
    # The base's model keys that the imported network also takes (dtype, say); none of another network's.
    keys = models.parameters(model["name"])
    merged = {"name": model["name"], **{k: v for k, v in config.model.to_dict().items() if k in keys}}
    merged.update(model, prediction=prediction)
    config.model = ml_collections.ConfigDict(merged)
    config.sampling.update(sampling)
    return config, notes


def load_params(src: str, base: ml_collections.ConfigDict | None = None) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params as a nested dict of float32 numpy arrays); nothing is written."""
    from diffjax import network
    from diffjax.evaluation.inception_weights import file_sha256

    source = find_source(src)
    config, notes = translate(source, base)
    _, abstract, _ = network.abstract_model(config)
    state_dict = read_weights(source.weights_path)
    dtypes = sorted({str(v.dtype) for v in state_dict.values()})
    if notes["family"] == "dit":
        params = diffusers_dit.map_weights(state_dict, config.model.to_dict(), abstract.to_pure_dict())
    else:
        params = map_weights(
            state_dict, config.model.to_dict(), notes["family"], notes["flip_sin_to_cos"], abstract.to_pure_dict()
        )
    config.source = ml_collections.ConfigDict(
        dict(
            format="diffusers",
            path=storage.display(src),
            weights=storage.path(source.weights_path).name,
            weights_sha256=file_sha256(source.weights_path),
            weights_dtypes=",".join(dtypes),
            scheduler=notes["scheduler"],
            family=notes["family"],
        )
    )
    return config, params


def load_diffusers(src: str, base: ml_collections.ConfigDict | None = None):
    """(config, denoiser) of a diffusers model directory, for use in a script.

    ``denoiser(x, t, cond)``: NHWC images in the process's data range, t in the process's time
    units (ddpm: diffusers' timestep + 1; ve: the SDE time, sigma = sigma_min (sigma_max /
    sigma_min)^t), the prediction kind of ``denoiser.prediction``."""
    import jax

    from diffjax import network

    config, params = load_params(src, base)
    graphdef, _, _ = network.abstract_model(config)
    weights = jax.tree.map(jax.numpy.asarray, params)
    den = network.network_denoiser(graphdef, network.inference_rest(config), network.build_process(config), config, weights)
    return config, den


def import_diffusers(src: str, workdir: str, base: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """Write a diffjax workdir (config.json + an orbax checkpoint at step 0 whose params and EMA hold
    the weights, optimiser state fresh) for SRC. The workdir must not exist; it appears whole or not
    at all (built in a temporary directory beside it, then renamed)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from diffjax import models, trainer

    target = storage.absolute(workdir)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{workdir} exists and is not empty; import into a new directory")
    config, params = load_params(src, base)
    mesh = trainer.make_mesh(config)
    _, shardings, _, _ = trainer.state_layout(config, mesh)
    weights = jax.device_put(params, shardings["params"])
    tx = trainer.make_optimizer(config)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": weights,
        "ema": jax.tree.map(jnp.copy, weights),
        "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(weights),
        "rng": jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 1),
    }
    # Local: built in a temporary directory beside the workdir, then renamed. An object store has no
    # directory rename: the checkpoint is written in place and config.json last (readers look for
    # it first), and everything written is removed if the import fails.
    remote = storage.is_remote(workdir)
    build = target if remote else target.parent / f".{target.name}.import-{os.getpid()}"
    try:
        build.mkdir(parents=True, exist_ok=True)
        manager = trainer.checkpoint_manager(str(build), async_save=False)
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
        manager.wait_until_finished()
        manager.close()
        storage.write_text(build / "config.json", config.to_json_best_effort(indent=2))
        if not remote:
            if target.exists():
                target.rmdir()  # empty (checked above)
            build.rename(target)
    except BaseException:
        if build.exists():
            build.rmtree()
        raise
    workdir = str(target)
    return {
        "workdir": workdir,
        "params": models.param_count(params),
        "family": config.source.family,
        "process": config.process.name,
        "sampler": config.sampling.sampler,
        "steps": int(config.sampling.num_steps),
        "scheduler": config.source.scheduler,
        "config": config,
    }
