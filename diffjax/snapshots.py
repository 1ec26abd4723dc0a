"""What the trainer does at snapshots and evals: sample grids of the EMA weights and the eval loss.

All functions run on every process (the arrays span all devices); only process 0 writes files.
Sampling itself (and `diffjax sample`) is diffjax.sample; opening a workdir is diffjax.workdir.
"""

from __future__ import annotations

import jax

from diffjax import learned_schedule, losses, storage
from diffjax.sample import data_range, generate, host_array, save_samples

__all__ = ["sample_grid", "EvalLoss"]


def sample_grid(config, graphdef, rest, process, state, workdir: str, step: int, num: int = 64) -> str | None:
    """EMA samples at a snapshot -> workdir/samples/step_<step>.png (process 0 writes)."""
    x = generate(config, graphdef, rest, process, state["ema"], num, seed=step)
    if jax.process_index() != 0:
        return None
    return save_samples(x, str(storage.path(workdir) / "samples" / f"step_{step:08d}.png"), data_range(config))[0]


class EvalLoss:
    """eval_loss(state): the training loss of the state's EMA params on one held-out batch (fixed noise).

    The batch is read and the loss compiled once, at construction; later calls only run it
    (building both per evaluation cost ~2.5 s each time even for the digits model).
    """

    def __init__(self, config, graphdef, rest, process):
        from diffjax import data, network, trainer, vlb

        mesh = trainer.make_mesh(config)
        it = data.make_iterator(config, "eval", seed=0)
        sharding = trainer.batch_sharding(mesh)
        self.batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in next(it).items()}
        if not config.model.get("num_classes", 0):
            self.batch.pop("label")
        t = config.training
        self.learned = learned_schedule.is_learned(process)

        def loss(weights, schedule, batch):
            if self.learned:  # VDM: the bound under the state's EMA schedule (traced: no recompiles)
                make = lambda w: network.network_denoiser(graphdef, rest, process, config, w)  # noqa: E731
                opts = vlb.training_decoder(config)
                return vlb.vdm_loss(make, weights, schedule, process, batch, jax.random.PRNGKey(0), **opts)
            den = network.network_denoiser(graphdef, rest, process, config, weights)
            return losses.loss(
                t.loss,
                den,
                process,
                batch,
                jax.random.PRNGKey(0),
                likelihood_weighting=bool(t.likelihood_weighting),
                reduce_mean=bool(t.get("reduce_mean", True)),
                vlb_weight=float(t.get("vlb_weight", 0.001)),
                data_range=data_range(config),
            )

        self.loss = jax.jit(loss)

    def __call__(self, state) -> float:
        schedule = state[learned_schedule.KEY]["ema"] if self.learned else None
        return float(host_array(self.loss(state["ema"], schedule, self.batch)))
