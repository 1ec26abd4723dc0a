"""DDPM++ cont. (VP) on CIFAR-10 (Song et al. 2021, arXiv:2011.13456; score_sde
vp/cifar10_ddpmpp_continuous): target FID 2.55, IS 9.58 (Table 3), 3.16 bits/dim (Table 2).

NCSN++-family network with DDPM-style settings: 4 BigGAN blocks per resolution, positional
embedding of 999 t, 61,804,419 parameters. VP SDE beta 0.1..20, continuous DSM loss
(reduce_mean), 1.3M iterations, EMA 0.9999; Euler-Maruyama predictor, no corrector.
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("vp", beta_min=0.1, beta_max=20.0)
    config.training.n_iters = 1300001
    config.training.loss = "dsm"
    config.training.reduce_mean = True
    config.training.ema_rate = 0.9999
    default.ddpmpp(config, num_res_blocks=4)
    config.model.prediction = "eps"
    config.sampling.sampler = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.eval.quantize = "floor"  # score_sde: np.clip(x * 255, 0, 255).astype(np.uint8)
    config.eval.targets.update({"fid": 2.55, "is": 9.58, "bpd": 3.16})
    config.eval.bpd_passes = 5  # score_sde run_lib: bpd_num_repeats = 5
    return config
