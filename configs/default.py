"""Shared defaults for every diffjax config (the score_sde CIFAR-10 defaults), in one place.

Reproduction configs start from `get_default_configs()` and change what their paper changes;
`ddpmpp(config)` / `ncsnpp(config)` set the score_sde architectures of Song et al. 2021
(arXiv:2011.13456, App. H) and `process(...)` replaces the noise process block.

Schema (the trainer reads these keys):
  seed
  process:  name ('ddpm' | 'vp' | 'subvp' | 've' | 'edm') and only that process's parameters
  training: batch_size, n_iters, snapshot_freq, log_freq, eval_freq, n_jitted_steps,
            loss ('eps' | 'dsm' | 'v' | 'edm'), likelihood_weighting, reduce_mean, label_dropout,
            ema_rate, grad_accum_steps, fsdp
  model:    name, prediction ('eps' | 'score' | 'x0' | 'v'), dtype, num_classes, augment_dim, architecture
            fields; image_size / num_channels / centered are references to the data fields
  data:     dataset, image_size, num_channels, centered, random_flip, uniform_dequantization, augment_p
  optim:    optimizer, lr, beta1, eps, weight_decay, warmup (linear lr ramp steps),
            grad_clip (max global norm; 0 disables clipping)
  sampling: sampler, num_steps, predictor, corrector, snr, n_steps_each, clip_x0, noise_removal,
            probability_flow
  eval:     batch_size, num_samples, metrics, reference, quantize, seed, fid_freq, fid_num,
            bpd_passes, targets
"""

import ml_collections


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
    training.ema_rate = 0.9999
    training.grad_accum_steps = 1
    training.fsdp = False

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar10"
    data.image_size = 32
    data.num_channels = 3
    data.centered = True
    data.random_flip = True
    data.uniform_dequantization = False
    data.augment_p = 0.0  # EDM's geometric augmentation probability (diffjax.augment); needs model.augment_dim=9

    config.model = model = ml_collections.ConfigDict()
    model.name = "ddpm_unet"
    model.prediction = "eps"
    model.dtype = "float32"
    model.num_classes = 0
    model.augment_dim = 0  # 9 to condition on EDM's augmentation labels
    model.image_size = data.get_ref("image_size")
    model.num_channels = data.get_ref("num_channels")
    model.centered = data.get_ref("centered")
    model.data_dim = 2  # mlp only
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.conditional = True  # noise-conditional (time embedding on)
    model.nonlinearity = "swish"
    model.normalization = "GroupNorm"
    model.num_groups = 0  # GroupNorm groups (ddpm_unet): 0 = score_sde's min(C // 4, 32); diffusers: fixed 32
    model.fir = False
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = False
    model.resblock_type = "ddpm"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.fourier_scale = 16.0
    model.embedding_type = "positional"
    model.scale_by_sigma = False
    model.conv_size = 3

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
    sampling.noise_removal = True
    sampling.probability_flow = False

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


def ddpmpp(config, num_res_blocks: int = 4) -> ml_collections.ConfigDict:
    """DDPM++ (score_sde vp/cifar10_ddpmpp_*): BigGAN blocks, skip rescaling, positional embedding."""
    model = config.model
    model.name = "ncsnpp"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16.0
    model.scale_by_sigma = False
    return config


def ncsnpp(config, num_res_blocks: int = 4) -> ml_collections.ConfigDict:
    """NCSN++ (score_sde ve/cifar10_ncsnpp_*): DDPM++ plus FIR resampling, residual input pyramid,
    Gaussian Fourier embedding of log(sigma) and output scaling by 1/sigma."""
    ddpmpp(config, num_res_blocks)
    model = config.model
    model.fir = True
    model.progressive_input = "residual"
    model.embedding_type = "fourier"
    model.scale_by_sigma = True
    return config


def get_config() -> ml_collections.ConfigDict:
    return get_default_configs()
