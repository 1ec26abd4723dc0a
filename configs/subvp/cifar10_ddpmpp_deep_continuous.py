"""DDPM++ cont. (deep, sub-VP) on CIFAR-10 (Song et al. 2021, arXiv:2011.13456; score_sde
subvp/cifar10_ddpmpp_deep_continuous): target 2.99 bits/dim on uniformly dequantized test
images with the probability-flow ODE (Table 2); FID 2.41, IS 9.57 (Table 3).

Deep DDPM++ (8 blocks, 106,632,579 parameters), sub-VP SDE beta 0.1..20, continuous DSM loss
without likelihood weighting (as the released config), 950k iterations, EMA 0.9999.
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("subvp", beta_min=0.1, beta_max=20.0)
    config.training.n_iters = 950001
    config.training.loss = "dsm"
    config.training.reduce_mean = True
    config.training.likelihood_weighting = False
    config.training.ema_rate = 0.9999
    default.ddpmpp(config, num_res_blocks=8)
    config.model.prediction = "eps"
    config.sampling.sampler = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.eval.quantize = "floor"  # score_sde: np.clip(x * 255, 0, 255).astype(np.uint8)
    config.eval.targets.update({"fid": 2.41, "is": 9.57, "bpd": 2.99})
    config.eval.bpd_passes = 5  # score_sde run_lib: bpd_num_repeats = 5
    return config
