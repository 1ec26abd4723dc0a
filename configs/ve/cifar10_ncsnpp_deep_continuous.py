"""NCSN++ cont. (deep, VE) on CIFAR-10 (Song et al. 2021, arXiv:2011.13456; score_sde
ve/cifar10_ncsnpp_deep_continuous): target FID 2.20, IS 9.89 (Table 3, the paper's best).

As ve/cifar10_ncsnpp_continuous with 8 residual blocks per resolution (107,587,075
parameters) and 950k iterations.
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("ve", sigma_min=0.01, sigma_max=50.0)
    config.training.n_iters = 950001
    config.training.loss = "dsm"
    config.training.reduce_mean = False
    config.training.ema_rate = 0.999
    config.data.centered = False
    default.ncsnpp(config, num_res_blocks=8)
    config.model.prediction = "score"
    config.sampling.sampler = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.sampling.snr = 0.16
    config.eval.quantize = "floor"  # score_sde: np.clip(x * 255, 0, 255).astype(np.uint8)
    config.eval.targets.update({"fid": 2.20, "is": 9.89})
    config.eval.bpd_passes = 5  # score_sde run_lib: bpd_num_repeats = 5
    return config
