"""EDM on CIFAR-10, unconditional, DDPM++ network (Karras et al. 2022, arXiv:2206.00364):
target FID 1.97 with 35 NFE (18-step Heun, Table 2, "VP" column).

Settings of EDM's Table 7 (config F): batch 512, Adam lr 1e-3 with a 10 Mimg linear ramp-up
(19,531 steps at batch 512), no gradient clipping (grad_clip 0 = off), 200 Mimg (390,625
steps), EMA half-life 0.5 Mimg (= 0.5 ** (512 / 5e5) ~ 0.999 per step), dropout 0.13,
ln sigma ~ N(-1.2, 1.2^2), sigma_data 0.5, preconditioned x0 ("D") output, c_noise = ln(sigma)/4
fed to a positional embedding. Network: EDM's DDPM++ (128 channels, ch_mult 2,2,2, 4 blocks,
attention at 16x16) built with our ncsnpp model; EDM's own SongUNet differs in small details
(noise-embedding and attention layout): 55,733,891 parameters here against the ~56M EDM
reports for DDPM++. EDM's non-leaking geometric augmentation (p = 0.12: x/y flips, scaling,
rotation, anisotropy, fractional translation; diffjax.augment) with the network conditioned on
the 9 augmentation labels (augment_dim = 9; zeros when sampling).
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, p_mean=-1.2, p_std=1.2)
    training = config.training
    training.batch_size = 512
    training.n_iters = 390625
    training.loss = "edm"
    training.reduce_mean = True
    training.ema_rate = 0.999

    config.data.augment_p = 0.12
    config.data.random_flip = False  # EDM's augmentation pipeline includes the x-flip

    default.ddpmpp(config, num_res_blocks=4)
    model = config.model
    model.ch_mult = (2, 2, 2)
    model.dropout = 0.13
    model.prediction = "x0"
    model.augment_dim = 9  # EDM's map_augment: the network is told which augmentation was applied

    optim = config.optim
    optim.lr = 1e-3
    optim.warmup = 19531
    optim.grad_clip = 0.0
    optim.beta1 = 0.9

    sampling = config.sampling
    sampling.sampler = "heun"
    sampling.num_steps = 18
    config.eval.targets.update({"fid": 1.97})
    return config
