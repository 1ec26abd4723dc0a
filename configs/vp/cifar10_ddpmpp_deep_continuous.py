"""DDPM++ cont. (deep, VP) on CIFAR-10 (Song et al. 2021, arXiv:2011.13456; score_sde
vp/cifar10_ddpmpp_deep_continuous): target FID 2.41, IS 9.68 (Table 3), 3.13 bits/dim (Table 2).

As vp/cifar10_ddpmpp_continuous with 8 residual blocks per resolution (106,632,579 parameters)
and 950k iterations.
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("vp", beta_min=0.1, beta_max=20.0)
    config.training.n_iters = 950001
    config.training.loss = "dsm"
    config.training.reduce_mean = True
    config.training.ema_rate = 0.9999
    default.ddpmpp(config, num_res_blocks=8)
    config.model.prediction = "eps"
    config.sampling.sampler = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.eval.quantize = "floor"  # score_sde: np.clip(x * 255, 0, 255).astype(np.uint8)
    config.eval.targets.update({"fid": 2.41, "is": 9.68, "bpd": 3.13})
    config.eval.bpd_passes = 5  # score_sde run_lib: bpd_num_repeats = 5
    return config
