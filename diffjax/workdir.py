"""A training (or imported) workdir opened for reading: config, network definition, process and
checkpoints. Used by `diffjax sample`, `serve`, `eval` and the import's tests; training writes
workdirs through diffjax.trainer's checkpoint functions.

Which EMA a reader uses is chosen here, once: `Workdir(..., ema=RATE)` (the commands' `--ema RATE`;
default training.ema_rate) and `restore` hands that EMA back as state["ema"], reading only it.
"""

from __future__ import annotations

import json

import jax

from diffjax import commandline, learned_schedule, storage


def written_config(config: dict) -> dict:
    """A workdir's config.json as today's loader reads it: workdirs written before the networks took
    explicit keyword arguments carry the whole shared model block, whose keys the network did not
    read; they are dropped here (the same network, the same weights), not in config files."""
    from diffjax import models

    model = dict(config.get("model", {}))
    if model.get("name") in models.available():
        keep = set(models.parameters(model["name"])) | set(models.READ_ELSEWHERE) | set(models.FIXED_VALUES)
        config = dict(config, model={k: v for k, v in model.items() if k in keep})
    return config


class Workdir:
    """A training workdir opened for reading: config, network definition, process and its checkpoints."""

    def __init__(self, workdir: str, *, command: str = "diffjax sample", inference: bool = False, ema: float | None = None):
        """inference=True: for eval-mode use of restore(only=("ema",)) (sample, serve); the
        network's dropout RNG state is a placeholder instead of the trained run's.

        ema: the EMA rate whose weights restore() returns as state["ema"] (None: training.ema_rate);
        a rate the run did not track (training.ema_rate, training.ema_rates) is a usage error."""
        import ml_collections
        from etils import epath

        from diffjax import network, trainer

        storage.require_credentials(workdir, command, "--workdir")
        path = epath.Path(workdir) / "config.json"  # local or gs://
        if not path.exists():
            commandline.usage_error(command, f"{path} not found; is {workdir!r} a diffjax train workdir?")
        self.config = ml_collections.ConfigDict(written_config(json.loads(path.read_text())))
        if "dcn_data" in self.config.training:  # how training spread over slices; a reader lays out its own devices
            self.config.training.dcn_data = 0
        if "model_parallel" in self.config.training:  # so is the tensor-parallel split: readers replicate
            self.config.training.model_parallel = 1
        self.path, self.command = workdir, command
        tracked = trainer.ema_rates(self.config)
        self.ema_rate = tracked[0] if ema is None else float(ema)
        if self.ema_rate not in tracked:
            commandline.usage_error(
                command,
                f"--ema {ema}: {workdir} tracked no EMA at rate {ema}; its EMA rates: "
                f"{', '.join(map(repr, tracked))} (training.ema_rate, training.ema_rates)",
            )
        # None: the selected EMA is state["ema"]; else its key in state["ema_extra"]
        self._ema_key = None if self.ema_rate == tracked[0] else trainer.ema_key(self.ema_rate)
        mesh = trainer.make_mesh(self.config)
        if inference:  # shapes and shardings only: nothing is initialised or compiled
            self.abstract_state, self.shardings, self.graphdef, _ = trainer.state_layout(self.config, mesh)
            self.rest = network.inference_rest(self.config)
        else:
            state, self.shardings, self.graphdef, self.rest = trainer.init_state(self.config, mesh)
            self.abstract_state = jax.eval_shape(lambda s: s, state)
            del state
        self.process = network.build_process(self.config)
        self.manager = trainer.checkpoint_manager(workdir, async_save=False)
        if learned_schedule.is_learned(self.process) and self.latest_step() is not None:
            self._load_schedule()  # VDM: the static process of the newest checkpoint's learned schedule

    def latest_step(self) -> int | None:
        """The newest finished checkpoint step on disk now (re-reads the directory)."""
        storage.refresh(self.path)
        self.manager.reload()
        return self.manager.latest_step()

    @property
    def ema_suffix(self) -> str:
        """'' for training.ema_rate's EMA, else '_ema<RATE>': results of another EMA get other file names."""
        return "" if self._ema_key is None else f"_ema{self.ema_rate!r}"

    def _load_schedule(self, entry: dict | None = None) -> None:
        """self.process <- the config's process with a learned schedule (read from the newest checkpoint
        unless given): samplers, the ELBO and the ODE likelihood then see a static process."""
        from diffjax import network

        k = learned_schedule.KEY
        if entry is None:
            entry = self._restore({k: self.abstract_state[k]}, {k: self.shardings[k]}, (k,))[0][k]
        self.process = learned_schedule.restored_process(network.build_process(self.config), entry)

    def restore(self, only: tuple[str, ...] | None = None):
        """(state, step) of the newest readable checkpoint (just the `only` entries if given);
        exits with a message if there is none. state["ema"] is the selected EMA (see __init__'s
        `ema`); with only=("ema",) just that EMA is read. A learned schedule (VDM) is read too and
        self.process rebuilt from it."""
        state, step = self._restore_selected(only)
        if learned_schedule.is_learned(self.process):
            self._load_schedule(state.get(learned_schedule.KEY))
        return state, step

    def _restore_selected(self, only: tuple[str, ...] | None):
        key = self._ema_key
        if key is None or (only is not None and "ema" not in only):
            return self._restore(self.abstract_state, self.shardings, only)
        if only is None:  # the whole state (every EMA), with the selected one as "ema"
            state, step = self._restore(self.abstract_state, self.shardings, None)
            return dict(state, ema=state["ema_extra"][key]), step
        # read ema_extra[key] (alone of the extra EMAs) in place of ema
        keys = [k for k in only if k != "ema"]
        abstract = {k: self.abstract_state[k] for k in keys}
        shardings = {k: self.shardings[k] for k in keys}
        abstract["ema_extra"] = {key: self.abstract_state["ema_extra"][key]}
        shardings["ema_extra"] = {key: self.shardings["ema_extra"][key]}
        state, step = self._restore(abstract, shardings, (*keys, "ema_extra"))
        return dict({k: state[k] for k in keys}, ema=state["ema_extra"][key]), step

    def _restore(self, abstract, shardings, only):
        from diffjax import trainer

        storage.refresh(self.path)
        self.manager.reload()
        restored, step = trainer.restore(self.manager, shardings, abstract, only=only)
        if restored is None:
            commandline.usage_error(self.command, f"no readable checkpoint in {self.path}/checkpoints")
        return restored, step


def load_workdir(workdir: str, only: tuple[str, ...] | None = None, *, ema: float | None = None):
    """(config, graphdef, rest, process, state, step) from the latest readable checkpoint
    (just the `only` entries of the state if given, e.g. ("ema",)); state["ema"] is the EMA at
    rate `ema` (default training.ema_rate)."""
    w = Workdir(workdir, inference=only == ("ema",), ema=ema)
    state, step = w.restore(only=only)
    return w.config, w.graphdef, w.rest, w.process, state, step
