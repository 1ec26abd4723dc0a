"""CPU demo of VDM (Kingma et al. 2021) on the 8x8 digits: the digits UNet trained with the
continuous-time ELBO and a learned monotone noise schedule (gamma_min -13.3, gamma_max 5, as VDM's
CIFAR-10); no paper number, a smoke-scale check of the learned-schedule machinery.
"""

from configs import default, digits


def get_config():
    config = digits.get_config()
    config.process = default.process("vdm", gamma_min=-13.3, gamma_max=5.0, eps=1e-3, hidden=1024, learned=True)
    config.training.loss = "elbo"
    config.model.dropout = 0.0
    config.sampling.sampler = "ancestral"
    config.sampling.num_steps = 100
    return config
