"""DiT-B/2 (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748) on
class-conditional CIFAR-10, in pixel space.

What it reproduces: DiT's training recipe, not a published number. The paper trains on ImageNet
latents only; no DiT CIFAR-10 result is published, so eval.targets is empty. The network is DiT-B/2
(12 adaLN-Zero blocks, width 768, 12 heads, patch 2: 16 x 16 = 256 tokens, as DiT-B/2 on 256 x 256
ImageNet latents), 129,546,264 parameters here (3 channels, 10 classes + the null class), with a learned
sigma (out channels 2 x 3) trained by the hybrid loss L_simple + 0.001 L_vlb as DiT (after Nichol &
Dhariwal 2021): DiT's own objective, and the learned variances keep 250-step ancestral sampling close
to the 1000-step chain. DiT's protocol: T = 1000 linear betas 1e-4..0.02, AdamW lr 1e-4 without weight
decay, warm-up or clipping, batch 256, EMA 0.9999, random flips, class dropout 0.1 (the null class
for classifier-free guidance: `diffjax sample --guidance_scale`), 400k steps (the paper's ablation
length), 250 ancestral steps with the learned variance.
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("ddpm", num_scales=1000, schedule="linear", beta_start=1e-4, beta_end=0.02)

    training = config.training
    training.batch_size = 256
    training.n_iters = 400_000
    training.loss = "hybrid"
    training.vlb_weight = 0.001
    training.label_dropout = 0.1
    training.ema_rate = 0.9999

    config.model = model = default.model_block(config, "dit")
    model.size = "B"
    model.patch_size = 2
    model.num_classes = 10
    model.learn_sigma = True
    model.prediction = "eps"

    config.optim.update(dict(optimizer="adamw", lr=1e-4, weight_decay=0.0, warmup=0, grad_clip=0.0))

    sampling = config.sampling
    sampling.sampler = "ancestral"
    sampling.num_steps = 250
    sampling.variance = "learned"
    sampling.clip_x0 = False  # DiT samples without clipping the x0 estimate
    config.eval.targets = ml_collections.ConfigDict()  # no published DiT CIFAR-10 number
    return config
