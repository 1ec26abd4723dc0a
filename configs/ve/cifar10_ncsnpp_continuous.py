"""NCSN++ cont. (VE) on CIFAR-10 (Song et al. 2021, arXiv:2011.13456; score_sde
ve/cifar10_ncsnpp_continuous): target FID 2.38, IS 9.83 (Table 3).

NCSN++: 4 BigGAN blocks per resolution, FIR (1,3,3,1) resampling, residual input pyramid,
skip rescaling, Gaussian Fourier embedding of log sigma, output divided by sigma;
62,758,915 parameters. VE SDE sigma 0.01..50, data in [0, 1] (the network maps to [-1, 1]),
DSM loss summed over pixels (reduce_mean False), EMA 0.999 (as score_sde's VE configs),
1.3M iterations; PC sampling: reverse-diffusion predictor + Langevin corrector, snr 0.16.
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("ve", sigma_min=0.01, sigma_max=50.0)
    config.training.n_iters = 1300001
    config.training.loss = "dsm"
    config.training.reduce_mean = False
    config.training.ema_rate = 0.999
    config.data.centered = False
    default.ncsnpp(config, num_res_blocks=4)
    config.model.prediction = "score"
    config.sampling.sampler = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.sampling.snr = 0.16
    config.eval.quantize = "floor"  # score_sde: np.clip(x * 255, 0, 255).astype(np.uint8)
    config.eval.targets.update({"fid": 2.38, "is": 9.83})
    config.eval.bpd_passes = 5  # score_sde run_lib: bpd_num_repeats = 5
    return config
