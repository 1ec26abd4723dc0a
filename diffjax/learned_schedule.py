"""A learned noise schedule in the train state (VDM: process 'vdm' with learned=True).

state["schedule"] = {"params", "ema", "opt_state"}: the schedule's weights (`processes.vdm.gamma`'s
params, end points included), their EMA at training.ema_rate and their own optimiser state (the
config's optimiser); replicated. The network's entries (params, ema, ...) are untouched, so every
reader of network weights works unchanged. Readers of a workdir (`diffjax.workdir`) rebuild the
static process from the EMA schedule: `restored_process`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from diffjax.processes import Process
from diffjax.processes.vdm import VDM, init_schedule

KEY = "schedule"


def is_learned(process: Process) -> bool:
    """Whether training updates this process's schedule."""
    return isinstance(process, VDM) and process.learned


def check_loss(process: Process, loss: str) -> None:
    """A learned schedule trains with the ELBO only (its gradient is VDM's, diffjax.vlb)."""
    if is_learned(process) and loss != "elbo":
        raise ValueError(
            f"process 'vdm' with learned=True trains its schedule with training.loss='elbo', got {loss!r} "
            "(or set process.learned=False for a fixed schedule)"
        )


def init_state(process: VDM, key: jax.Array, tx: optax.GradientTransformation) -> dict[str, Any]:
    """The schedule's entry of a fresh train state (VDM's initialisation at the process's end points)."""
    params = init_schedule(jax.random.fold_in(key, 0x5C4ED), process.gamma_min, process.gamma_max, process.hidden)
    return {"params": params, "ema": jax.tree.map(lambda v: v.copy(), params), "opt_state": tx.init(params)}


def update(tx: optax.GradientTransformation, entry: dict, grads: dict, ema_rate: float) -> dict[str, Any]:
    """One optimiser step and EMA update of the schedule's entry."""
    updates, opt_state = tx.update(grads, entry["opt_state"], entry["params"])
    params = optax.apply_updates(entry["params"], updates)
    ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, entry["ema"], params)
    return {"params": params, "ema": ema, "opt_state": opt_state}


def restored_process(process: Process, entry: dict | None) -> Process:
    """The static process of a checkpoint: `process` with the entry's EMA schedule (if any)."""
    if entry is None or not is_learned(process):
        return process
    assert isinstance(process, VDM)
    return process.with_schedule(jax.device_get(entry["ema"]))
