"""DiT-XL/4 (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748) on
class-conditional ImageNet 64 x 64, in pixel space.

What it reproduces: DiT's recipe on pixels, not a published number. DiT is published on latents only
(its best, XL/2 on 256 x 256 ImageNet latents, FID 2.27 with guidance); no pixel-space DiT ImageNet-64
result exists, so eval.targets is empty. Patch 4 on 64 x 64 x 3 gives 16 x 16 = 256 tokens, the sequence
length and per-image FLOPs of DiT-XL/2 on 32 x 32 latents: 28 adaLN-Zero blocks, width 1152, 16 heads,
learned sigma (out channels 2 x 3), 674,945,376 parameters here. Training as DiT: the hybrid loss
(L_simple + 0.001 L_vlb), AdamW lr 1e-4 without weight decay, warm-up or clipping, batch 256,
EMA 0.9999, random flips, class dropout 0.1, 250 ancestral sampling steps with the learned variance.
One change: the cosine schedule of Nichol & Dhariwal 2021 (T = 1000), which they found better than
the linear one for 64 x 64 pixels (DiT's latents use linear).

Data: TFDS `imagenet_resized/64x64` (Chrabaszcz et al.'s box-resized ImageNet with its 1000 labels,
1.28M train / 50k validation images), prepared once with `diffjax data prepare imagenet_resized/64x64`.
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("ddpm", num_scales=1000, schedule="cosine")

    data = config.data
    data.dataset = "imagenet_resized/64x64"
    data.image_size = 64
    data.num_channels = 3
    data.random_flip = True

    training = config.training
    training.batch_size = 256
    training.n_iters = 400_000
    training.loss = "hybrid"
    training.vlb_weight = 0.001
    training.label_dropout = 0.1
    training.ema_rate = 0.9999
    training.snapshot_freq = 10_000

    config.model = model = default.model_block(config, "dit")
    model.size = "XL"
    model.patch_size = 4
    model.num_classes = 1000
    model.learn_sigma = True
    model.prediction = "eps"

    config.optim.update(dict(optimizer="adamw", lr=1e-4, weight_decay=0.0, warmup=0, grad_clip=0.0))

    sampling = config.sampling
    sampling.sampler = "ancestral"
    sampling.num_steps = 250
    sampling.variance = "learned"
    sampling.clip_x0 = False
    config.eval.batch_size = 256
    config.eval.targets = ml_collections.ConfigDict()  # no published pixel-space DiT number
    return config
