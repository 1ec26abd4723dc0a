"""8 Gaussians in 2-D with the time-conditioned MLP (diffjax toy problem; no paper number).

Mixture of 8 isotropic Gaussians on a circle (the exact score is known, so samples and
likelihoods can be checked against the oracle). VP SDE, eps-prediction, ~1 minute on a CPU.
"""

from configs import default


def get_config():
    config = default.get_default_configs()
    config.process = default.process("vp", beta_min=0.1, beta_max=20.0)

    training = config.training
    training.batch_size = 512
    training.n_iters = 20000
    training.snapshot_freq = 5000
    training.log_freq = 500
    training.eval_freq = 1000
    training.n_jitted_steps = 10
    training.loss = "eps"
    training.ema_rate = 0.999

    data = config.data
    data.dataset = "eight_gaussians"
    data.image_size = 0
    data.num_channels = 0
    data.random_flip = False

    config.model = model = default.model_block(config, "mlp")
    model.prediction = "eps"
    model.data_dim = 2
    model.nf = 128
    model.num_res_blocks = 3
    model.dropout = 0.0
    model.embedding_type = "positional"

    config.optim.lr = 1e-3
    config.optim.warmup = 100

    sampling = config.sampling
    sampling.sampler = "ode"
    sampling.num_steps = 100
    config.eval.batch_size = 2048
    config.eval.num_samples = 10000
    return config
