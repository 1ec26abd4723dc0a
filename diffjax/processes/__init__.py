"""Noise processes: the forward corruption x_t = alpha(t) x_0 + sigma(t) eps, written once.

Every process is a frozen (hashable) dataclass, so it can be a static argument of `jax.jit`.
Samplers, losses and likelihood only use the interface of `Process`:

- `alpha(t)`, `sigma(t)`: the marginal q(x_t | x_0) = N(alpha x_0, sigma^2 I).
- `sde(t)`: drift coefficient f(t) and squared diffusion g(t)^2 of the linear SDE
  dx = f(t) x dt + g(t) dW (Song et al. 2021, eq. 5); by construction f = d log alpha / dt and
  g^2 = d sigma^2 / dt - 2 f sigma^2, which the tests check against autodiff.
- `prior_sample`, `prior_logp`: p_T.
- `time_grid(num_steps)`: the times a sampler evaluates the network at, then a final clean time.
- `sample_train_time`: t for the training loss.
- `transition(t, s)`, `posterior(t, s)`, `step_variance(t, s, variance)`: q(x_t | x_s),
  q(x_s | x_t, x0) and a fixed reverse-step variance (the ancestral sampler, the ELBO).
- `to_x0`, `to_eps`, `to_score`, `to_v`, `convert`: change of prediction parametrisation, among
  `PREDICTIONS` (eps, x0, v, score and the velocity 'flow'); `predictions` / `require_prediction`: the
  kinds a process's network may output.
- `noise_cond(t)`: what the network is conditioned on (score_sde's conventions).

Processes: `ddpm` (Ho et al. 2020, discrete T-step chain, linear or cosine betas), `vp`, `subvp`,
`ve` (Song et al. 2021, score_sde defaults), `edm` (Karras et al. 2022), `vdm` (Kingma et al. 2021:
a learned monotone log-SNR; diffjax.processes.vdm) and `flow` (rectified flow / flow matching,
x_t = (1 - t) x0 + t eps; diffjax.processes.flow).
"""

from __future__ import annotations

import dataclasses

from diffjax.processes.base import (
    PREDICTIONS,
    SPACINGS,
    VARIANCES,
    Array,
    Process,
    bcast,
    check_prediction,
    check_steps,
    check_variance,
)
from diffjax.processes.discrete import DDPM
from diffjax.processes.flow import Flow
from diffjax.processes.sdes import EDM, VE, VP, SubVP
from diffjax.processes.vdm import VDM

__all__ = [
    "PREDICTIONS",
    "SPACINGS",
    "VARIANCES",
    "Array",
    "Process",
    "bcast",
    "check_prediction",
    "check_steps",
    "check_variance",
    "DDPM",
    "EDM",
    "VE",
    "VP",
    "SubVP",
    "VDM",
    "Flow",
    "REGISTRY",
    "get",
]

REGISTRY: dict[str, type[Process]] = {p.name: p for p in (DDPM, VP, SubVP, VE, EDM, VDM, Flow)}


def get(name: str, **overrides) -> Process:
    """The process `name` with field overrides, e.g. get('vp', beta_max=20.0)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown process {name!r}; choose one of {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"process {name!r} has no field(s) {unknown}; its fields are {sorted(fields)}")
    return cls(**overrides)
