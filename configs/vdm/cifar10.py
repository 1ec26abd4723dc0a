"""VDM on CIFAR-10 (Kingma et al. 2021, arXiv:2107.00630): target 2.65 bits/dim (Table 1, no data
augmentation), the continuous-time ELBO with a learned noise schedule.

Protocol (google-research/vdm configs/cifar10.py and the paper): gamma_min -13.3, gamma_max 5,
continuous time (T = infinity), antithetic time sampling, batch 128, AdamW lr 2e-4 (b1 0.9, b2 0.99,
eps 1e-8, weight decay 0.01; optim has no beta2 option here, so b2 is optax's 0.999), 100 warm-up steps,
10M steps, EMA 0.9999, no augmentation, no flips.

Schedule: VDM's monotone network (1024 sigmoid units) with learned end points, trained by the
variance-minimising gradient (process.hidden = 0 gives VDM's 'learnable_scalar' schedule, a linear
gamma with learned end points, the default of their public config).

Network: VDM's score network is a UNet without downsampling: 32 residual blocks of 128 channels at
32x32 down, a middle attention block, 33 up, dropout 0.1, with Fourier features of the input
concatenated to it and conditioned on the normalised gamma(t). The closest existing network is
used: diffjax's DDPM UNet at one resolution (ch_mult (1,), 32 res blocks, nf 128, attention only
in the middle), which has the same block structure but no input Fourier features and conditions
on 999 t (positional) instead of gamma(t): not VDM's exact network.
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("vdm", gamma_min=-13.3, gamma_max=5.0, eps=1e-3, hidden=1024, learned=True)

    training = config.training
    training.loss = "elbo"
    training.batch_size = 128
    training.n_iters = 10_000_000
    training.ema_rate = 0.9999

    config.data.random_flip = False  # VDM's 2.65 is without augmentation

    model = config.model
    model.name = "ddpm_unet"
    model.prediction = "eps"
    model.nf = 128
    model.ch_mult = (1,)
    model.num_res_blocks = 32
    model.attn_resolutions = ()
    model.dropout = 0.1
    model.embedding_type = "positional"

    # the default's Adam lr 2e-4, b1 0.9, eps 1e-8; VDM: AdamW, weight decay 0.01, 100 warm-up steps, no clipping
    config.optim.update(dict(optimizer="adamw", weight_decay=0.01, warmup=100, grad_clip=0.0))

    config.sampling.sampler = "ancestral"
    config.sampling.num_steps = 1000
    config.eval.targets.update({"bpd": 2.65})
    return config
