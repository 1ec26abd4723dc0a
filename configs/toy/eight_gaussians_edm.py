"""8 Gaussians in 2-D, the time-conditioned MLP trained with EDM's preconditioning and noise levels
(diffjax toy problem; no paper number).

The mixture and network of eight_gaussians.py (there: VP SDE, eps-prediction), trained the EDM way:
log-normal training noise levels centred lower than EDM's for images (P_mean = -2: median sigma
0.14, the scale on which the modes' widths are decided) and the preconditioning with sigma_data =
1.4 (the mixture's per-axis std). 5,000 steps of 1,024 recover every mode's weight (1/8 +- 0.025)
and its std along each axis to 10%, drawn by the `ancestral` sampler on the log-SNR grid
(tests/test_toy.py; measured: worst axis 5-9% over the seeds tried, 2,000 steps: 9-15%). The VP
config, with nf 64-128 and 4,000-6,000 steps of 256, misses the widths by 10-60%.
`diffjax train` reads its batches through the grain pipeline (~5,000 examples/s on a 2-core CPU,
so about 15 minutes); the test draws fresh batches from the mixture in-process.
"""

from configs import default
from configs.toy import eight_gaussians


def get_config():
    config = eight_gaussians.get_config()
    config.process = default.process("edm", sigma_data=1.4, sigma_max=20.0, p_mean=-2.0, p_std=1.2)

    training = config.training
    training.batch_size = 1024
    training.n_iters = 5000
    training.snapshot_freq = 2500
    training.n_jitted_steps = 50
    training.scan_unroll = False  # no convolutions: the rolled scan of 50 steps compiles in seconds
    training.loss = "edm"
    training.ema_rate = 0.995

    model = config.model
    model.prediction = "x0"  # EDMPrecond's D(x; sigma); the network is its F
    model.nf = 48

    config.optim.lr = 5e-3

    sampling = config.sampling
    sampling.sampler = "ancestral"
    sampling.num_steps = 200
    return config
