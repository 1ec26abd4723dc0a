"""A noise-conditional classifier of sklearn's 8x8 digits, for classifier guidance of configs/digits.py
(Dhariwal & Nichol 2021, arXiv:2105.05233, sec. 4); no paper number, a CPU-scale classifier.

The DDPM UNet's encoder at the digits model's width (nf 16, ch_mult 1,2, 1 res block, attention at
4x4) with ADM's attention pooling -> 10 logits (84,170 params), trained by cross-entropy on x_t of the digits
config's process (T = 1000 linear betas: the same t and noise conditioning as the model it
guides), AdamW 1e-3, batch 128, EMA 0.999. No sample grids: a classifier has no samples.
"""

from configs import default
from configs import digits as diffusion


def get_config():
    config = diffusion.get_config()
    config.model = model = default.model_block(config, "classifier_unet")
    model.nf = 16
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.head_channels = 16
    model.dropout = 0.0
    model.num_classes = 10

    training = config.training
    training.loss = "classifier"
    training.n_iters = 2000
    training.snapshot_freq = 1000
    training.eval_freq = 250

    config.optim.optimizer = "adamw"
    config.optim.weight_decay = 0.01
    config.eval.metrics = ""  # nothing to sample
    return config
