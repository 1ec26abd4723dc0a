"""ADM-style noise-conditional classifier of CIFAR-10, for classifier guidance of configs/ddpm_cifar10.py
(Dhariwal & Nichol 2021, arXiv:2105.05233, sec. 4 and App. C: the UNet's encoder, attention pooling).

The DDPM UNet's encoder (nf 128, ch_mult 1,2,2,2, 2 res blocks, attention at 16 and 8) and middle
block, GroupNorm-swish, ADM's attention pooling (64-channel heads) -> 10 logits: 14,143,882 params.
Cross-entropy on x_t of DDPM's process (T = 1000 linear betas, as ddpm_cifar10.py: the same t
and noise conditioning), AdamW 3e-4 with weight decay 0.05 (ADM's classifier settings), batch
256, 150k steps, random flips, EMA 0.9999.
"""

import ml_collections

from configs import ddpm_cifar10, default


def get_config():
    config = ddpm_cifar10.get_config()
    config.model = model = default.model_block(config, "classifier_unet")
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16, 8)
    model.pool = "attention"
    model.head_channels = 64
    model.dropout = 0.0
    model.num_classes = 10

    training = config.training
    training.loss = "classifier"
    training.batch_size = 256
    training.n_iters = 150000
    training.snapshot_freq = 10000
    training.eval_freq = 1000
    training.ema_rate = 0.9999

    optim = config.optim
    optim.optimizer = "adamw"
    optim.lr = 3e-4
    optim.weight_decay = 0.05
    optim.warmup = 1000
    config.eval.metrics = ""
    config.eval.targets = ml_collections.ConfigDict()  # the diffusion model's numbers are not a classifier's
    return config
