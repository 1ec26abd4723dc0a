"""DDPM on CIFAR-10 (Ho et al. 2020, arXiv:2006.11239): target FID 3.17, IS 9.46 (Table 1).

35.7M-parameter UNet (nf 128, ch_mult 1,2,2,2, 2 res blocks, attention at 16x16, dropout 0.1),
T = 1000 linear betas 1e-4..0.02, eps-prediction MSE, Adam 2e-4
with 5000 warmup steps, grad clip 1, batch 128, EMA 0.9999, 800k steps, random flips,
1000-step ancestral sampling with the x0 estimate clipped to [-1, 1] and variance beta_t (fixed_large).
Its bound (`diffjax eval bpd`, the ELBO over all T terms, beta-tilde decoder variance as Ho's code):
<= 3.75 bits/dim on the test set for this L_simple model (Table 1; 3.70 for the model trained on L).
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("ddpm", num_scales=1000, schedule="linear", beta_start=1e-4, beta_end=0.02)

    training = config.training
    training.n_iters = 800000
    training.loss = "eps"
    training.ema_rate = 0.9999

    model = config.model
    model.name = "ddpm_unet"
    model.prediction = "eps"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.embedding_type = "positional"

    sampling = config.sampling
    sampling.sampler = "ancestral"
    sampling.num_steps = 1000
    sampling.clip_x0 = True  # Ho et al.'s sampler clips the x0 estimate to [-1, 1] (clip_denoised)
    sampling.variance = "fixed_large"  # sigma_t^2 = beta_t: Ho et al.'s run_cifar.py (model_var_type='fixedlarge')
    config.eval.targets.update({"fid": 3.17, "is": 9.46, "bpd": 3.75})
    return config
