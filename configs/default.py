"""Shared defaults for every diffjax config (the score_sde CIFAR-10 defaults), in one place.

Reproduction configs start from `get_default_configs()` and change what their paper changes;
`ddpmpp(config)` / `ncsnpp(config)` set the score_sde architectures of Song et al. 2021
(arXiv:2011.13456, App. H), `model_block(config, name)` gives another network's block and
`process(...)` replaces the noise process block. A model block holds exactly the keyword arguments
of its network (defaults: the network's signature, diffjax.models.default_config) plus name and
prediction.

Schema (the trainer reads these keys):
  seed
  process:  name ('ddpm' | 'vp' | 'subvp' | 've' | 'edm' | 'vdm' | 'flow') and only that process's parameters
            (flow: eps (t_min), shift (SD3's sampling-grid time shift, > 0; 1 = none), time_distribution
            ('uniform' | 'logit_normal': training t), logit_mean, logit_std)
  training: batch_size, n_iters, snapshot_freq, log_freq, eval_freq, n_jitted_steps,
            loss ('eps' | 'dsm' | 'v' | 'edm' | 'hybrid' | 'flow'), likelihood_weighting, reduce_mean, label_dropout,
            vlb_weight (the hybrid loss's lambda; needs model.learn_sigma),
            ema_rate, ema_rates (further EMA rates kept beside ema_rate), grad_accum_steps, fsdp,
            dcn_data (data parallelism across slices / processes; the mesh: trainer.make_mesh),
            model_parallel (the tensor-parallel "model" mesh axis size within a slice)
  model:    name ('ddpm_unet' | 'ncsnpp' | 'mlp'), prediction ('eps' | 'score' | 'x0' | 'v' | 'flow') and the
            network's keyword arguments (dtype, num_classes, augment_dim, learn_sigma: the network also
            outputs its reverse variance, for sampling.variance 'learned', architecture fields); the
            image networks' image_size / num_channels / centered are references to the data fields
  data:     dataset, image_size, num_channels, centered, random_flip, uniform_dequantization, augment_p,
            data_dir (TFDS data dir), cache_dir (a local copy of a TFDS dataset's shards: diffjax.data_prepare)
  optim:    optimizer, lr, beta1, eps, weight_decay, warmup (linear lr ramp steps),
            grad_clip (max global norm; 0 disables clipping)
  sampling: sampler, num_steps, predictor, corrector, snr, n_steps_each, clip_x0, variance,
            ode_solver (sampler 'ode': 'tsit5' | 'dopri5')
  eval:     batch_size, num_samples, metrics, reference, quantize, seed, fid_freq, fid_num,
            bpd_passes, targets
"""

import ml_collections

from diffjax import models

SHARED_MODEL_KEYS = ("prediction", "dtype", "num_classes", "augment_dim")  # kept when the network changes
DATA_REFERENCES = ("image_size", "num_channels", "centered")


def model_block(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The model block of network `name` at its defaults, with config.model's SHARED_MODEL_KEYS
    (prediction 'eps' if there is none) and references to config.data's shape and range."""
    block = models.default_config(name)
    block.prediction = "eps"
    for key in SHARED_MODEL_KEYS:
        if key in config.get("model", {}):
            block[key] = config.model[key]
    for key in DATA_REFERENCES:
        if key in block:
            block[key] = config.data.get_ref(key)
    return block


def process(name: str, **params) -> ml_collections.ConfigDict:
    """A process block: the name plus that process's parameters."""
    return ml_collections.ConfigDict(dict(name=name, **params))


def get_default_configs() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.process = process("vp", beta_min=0.1, beta_max=20.0)

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    training.n_jitted_steps = 5
    training.loss = "dsm"
    training.likelihood_weighting = False
    training.reduce_mean = True
    training.label_dropout = 0.0
    training.vlb_weight = 0.001  # loss 'hybrid': L_simple + vlb_weight L_vlb (Nichol & Dhariwal 2021's lambda)
    training.ema_rate = 0.9999
    training.ema_rates = ()  # further EMA rates tracked beside ema_rate, e.g. (0.999,); `--ema RATE` picks one
    training.grad_accum_steps = 1
    training.fsdp = False  # shard params / optimiser state over the "fsdp" axis (the devices of a slice)
    training.dcn_data = 0  # data-parallel groups across slices (DCN); 0: the TPU slice count (1 without multislice)
    # tensor parallelism: the "model" mesh axis size within a slice (ICI), splitting the kernels a network
    # annotates with 'model' (dit: Megatron layout; must divide model.num_heads); the batch is not split over it
    training.model_parallel = 1

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar10"
    data.image_size = 32
    data.num_channels = 3
    data.centered = True
    data.random_flip = True
    data.uniform_dequantization = False
    data.augment_p = 0.0  # EDM's geometric augmentation probability (diffjax.augment); needs model.augment_dim=9
    # TFDS datasets: a local folder to which each host copies the ArrayRecord shards of the split it reads
    # (from the data dir, e.g. gs://) once, then reads them there; None reads the data dir directly
    data.cache_dir = ml_collections.FieldReference(None, field_type=str)
    # TFDS data dir (local or gs://); None: $TFDS_DATA_DIR or TFDS's default (~/tensorflow_datasets)
    data.data_dir = ml_collections.FieldReference(None, field_type=str)

    config.model = model_block(config, "ddpm_unet")  # Ho et al.'s CIFAR-10 UNet: the network's defaults

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.sampler = "pc"
    sampling.num_steps = 1000
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"
    sampling.snr = 0.16
    sampling.n_steps_each = 1
    sampling.clip_x0 = False  # ancestral / ddim: clip each step's x0 estimate to the data range (DDPM)
    # ancestral / ELBO: fixed_small (beta-tilde) | fixed_large (beta) | learned (needs model.learn_sigma)
    sampling.variance = "fixed_small"
    sampling.ode_solver = "tsit5"  # sampler 'ode': diffrax's tsit5 or dopri5 (Dormand-Prince RK45, scipy's 'RK45')

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 1024
    evaluate.num_samples = 50000  # `diffjax eval --workdir`: the papers' 50k samples
    evaluate.metrics = "fid,is"  # comma-separated, from diffjax.evaluation.evaluate.METRICS
    evaluate.reference = ""  # statistics .npz of the reference split (`diffjax eval stats`)
    evaluate.quantize = "round"  # uint8 rounding of samples: round (DDPM/EDM/diffusers) or floor (score_sde)
    evaluate.seed = 0
    evaluate.fid_freq = 0  # during training: fid@fid_num every fid_freq steps (0: off), logged as fid@n
    evaluate.fid_num = 1000
    evaluate.bpd_passes = 1  # `diffjax eval bpd` passes over the split (score_sde: 5)
    evaluate.targets = ml_collections.ConfigDict()  # the paper's numbers: fid, is, bpd (README's table)
    return config


def ncsnpp(config, num_res_blocks: int = 4) -> ml_collections.ConfigDict:
    """NCSN++ (score_sde ve/cifar10_ncsnpp_*): BigGAN blocks, skip rescaling, FIR resampling, residual
    input pyramid, Gaussian Fourier embedding of log(sigma), output scaled by 1/sigma: the ncsnpp
    network's defaults."""
    config.model = model_block(config, "ncsnpp")
    config.model.num_res_blocks = num_res_blocks
    return config


def ddpmpp(config, num_res_blocks: int = 4) -> ml_collections.ConfigDict:
    """DDPM++ (score_sde vp/cifar10_ddpmpp_*): NCSN++ without FIR or the input pyramid, with the
    positional embedding and no output scaling."""
    ncsnpp(config, num_res_blocks)
    m = config.model
    m.fir = False
    m.progressive_input = "none"
    m.embedding_type = "positional"
    m.scale_by_sigma = False
    return config


def get_config() -> ml_collections.ConfigDict:
    return get_default_configs()
