"""The pieces of training, as pure functions over a state pytree (big_vision style).

- `build_process`, `network_denoiser`, `abstract_model`, `data_shape`, `inference_rest`: from
  `diffjax.network` (the config's process and its network as a `Denoiser`), re-exported.
- `make_mesh`, `state_shardings`: a Mesh ("data", "fsdp", "model") over all devices of all
  processes; the batch is split over ("data", "fsdp") and replicated over "model"; params are
  replicated, FSDP-sharded (`config.training.fsdp`) and tensor-parallel over "model"
  (`config.training.model_parallel`) by their `out_sharding` annotations.
- `init_state`, `make_train_step`: state = {step, params, ema, opt_state, rng} (+ ema_extra:
  {ema_key(r): EMA at rate r} for each of `training.ema_rates`, only when there are any); one
  jitted program runs `n` fused steps with lax.scan (loss, grad, optax chain, EMAs), buffers donated.
- `ema_rates`, `ema_key`: the EMA rates a config tracks and their keys in state["ema_extra"].
- `checkpoint_manager`, `save`, `restore`: orbax CheckpointManager in workdir/checkpoints with
  the train state (the input position is the step: diffjax.data); restore falls back to the
  previous good step.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import learned_schedule, losses, models, storage, vlb
from diffjax.augment import AUGMENT_DIM
from diffjax.network import NetworkApply, abstract_model, build_process, data_shape, inference_rest, network_denoiser  # noqa: F401
from diffjax.processes import Process
from diffjax.sample import data_range as sample_data_range

Array = jax.Array
__all__ = [
    "NetworkApply",
    "abstract_model",
    "build_process",
    "data_shape",
    "inference_rest",
    "network_denoiser",
    "make_mesh",
    "check_model_parallel",
    "batch_sharding",
    "check_batch_size",
    "check_augmentation",
    "param_shardings",
    "make_optimizer",
    "state_layout",
    "init_state",
    "make_train_step",
    "checkpoint_manager",
    "save",
    "restore",
]
BATCH_AXES = ("data", "fsdp")
MESH_AXES = (*BATCH_AXES, "model")


# ---- process and network: diffjax.network (re-exported here for the training code) ---------------
# ---- sharding ---------------------------------------------------------------------------------
def model_parallel(config) -> int:
    """training.model_parallel: the "model" (tensor-parallel) axis size within a slice; 1 if unset."""
    return int(config.training.get("model_parallel", 1) or 1)


def mesh_layout(config, devices: list) -> tuple[int, tuple[int, int, int], bool]:
    """(data-parallel groups across DCN, the (data, fsdp, model) shape within a group, whether the
    groups are TPU slices (else processes)) for make_mesh; a ValueError for a bad training.dcn_data
    or training.model_parallel."""
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    processes = len({d.process_index for d in devices})
    dcn = int(config.training.get("dcn_data", 0) or 0) or slices
    if dcn not in (1, slices, processes):
        raise ValueError(
            f"training.dcn_data={dcn} must be 1, the number of TPU slices ({slices}) or the number of processes "
            f"({processes}) (0: the number of slices)"
        )
    per_group = len(devices) // dcn
    m = model_parallel(config)
    if m < 1:
        raise ValueError(f"training.model_parallel={m} must be >= 1 (the model axis size; 1: no tensor parallelism)")
    if per_group % m:
        where = f"the device count {per_group}"
        if dcn > 1:  # the model axis lies within one data-parallel group
            where = f"the {per_group} devices of each {'TPU slice' if dcn == slices else 'process'}"
        raise ValueError(f"training.model_parallel={m} must divide {where}")
    rest = per_group // m
    return dcn, ((1, rest, m) if config.training.fsdp else (rest, 1, m)), dcn == slices


def make_mesh(config, devices: list | None = None) -> Mesh:
    """The ("data", "fsdp", "model") Mesh over all devices of all processes, built by jax's mesh_utils.

    Within a slice (ICI) the devices form (data, fsdp, model): model = training.model_parallel
    (the innermost axis: the physically closest devices), fsdp = the rest of the slice when
    training.fsdp, else 1 and data the rest (create_device_mesh: the physical topology's order
    on TPUs). Across groups (DCN) the mesh is data-parallel only (create_hybrid_device_mesh): the
    groups are the TPU slices of a multislice run (device.slice_index; the default), or the
    processes when training.dcn_data is the process count (GPU nodes; the CPU tests). The batch
    is split over ("data", "fsdp") and replicated over "model".
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    dcn, ici, slices = mesh_layout(config, devices)
    if dcn == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, (dcn, 1, 1), devices, process_is_granule=not slices, allow_split_physical_axes=True
        )
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Examples split over ("data", "fsdp") (replicated over "model"); `leading` unsharded axes
    in front (fused steps)."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def batch_rows(config, mesh: Mesh) -> list[int]:
    """The rows of the global training batch held by this process's devices (in global order):
    the rows diffjax.data reads here, so the assembled global batch is the same on any topology."""
    global_batch = int(config.training.batch_size)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows: set[int] = set()
    for index in index_map.values():
        if index is not None:  # (slice of the batch axis,)
            rows.update(range(global_batch)[index[0]])
    return sorted(rows)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: the data x fsdp devices (the devices / the model axis)."""
    return mesh.devices.size // mesh.shape.get("model", 1)


def check_batch_size(config, mesh: Mesh) -> None:
    b, n = int(config.training.batch_size), batch_shards(mesh)
    if b % n or b % jax.process_count():
        what = f"the device count {n}" if n == mesh.devices.size else f"the data x fsdp device count {n}"
        raise ValueError(
            f"training.batch_size={b} must be divisible by {what} "
            f"(and the process count {jax.process_count()}); e.g. {max(n, b - b % n)}"
        )


def check_augmentation(config) -> None:
    """EDM's augmentation (data.augment_p > 0) needs a network conditioned on its labels."""
    p, dim = float(config.data.get("augment_p", 0.0)), int(config.model.get("augment_dim", 0))
    if p > 0 and dim != AUGMENT_DIM:
        raise ValueError(
            f"data.augment_p={p} needs model.augment_dim={AUGMENT_DIM} (the network is told "
            f"which augmentation was applied), got model.augment_dim={dim}"
        )


def _num_heads(module) -> list[int]:
    """The attention head counts of a network: every int `num_heads` or `heads` attribute of its
    modules (the built network: a named size is resolved)."""
    found = {getattr(node, name, None) for _, node in nnx.iter_graph(module) for name in ("num_heads", "heads")}
    return sorted(h for h in found if isinstance(h, int) and not isinstance(h, bool))


def check_model_parallel(config, mesh: Mesh) -> None:
    """ValueError unless the mesh's "model" axis fits the network: a network with no kernel
    annotated 'model' has no tensor-parallel layout, and the axis must divide the attention heads.
    Shapes only (the abstract network): nothing is allocated or compiled."""
    m = int(mesh.shape.get("model", 1))
    if m == 1:
        return
    module = models.abstract_model(config.model, (1, *data_shape(config)))
    specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(module, nnx.Param)), is_leaf=lambda s: isinstance(s, P))
    if not any(isinstance(s, P) and "model" in tuple(s) for s in specs):
        raise ValueError(
            f"training.model_parallel={m}: model.name={config.model.name!r} has no tensor-parallel layout "
            f"(no kernel is annotated with the 'model' axis); use training.model_parallel=1"
        )
    for heads in _num_heads(module):
        if heads % m:
            raise ValueError(f"training.model_parallel={m} must divide model.num_heads={heads}")


def param_shardings(config, mesh: Mesh, params_state) -> Any:
    """Shardings for the params pure dict from the kernels' annotations: 'fsdp' names when
    training.fsdp, 'model' names on the mesh's model axis; replicated otherwise."""
    model_size = int(mesh.shape.get("model", 1))
    if not config.training.fsdp and model_size == 1:
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), params_state.to_pure_dict())
    check_model_parallel(config, mesh)
    fsdp = int(mesh.shape["fsdp"]) if config.training.fsdp else None
    specs = models.fsdp_partition_specs(params_state, fsdp, model_size=model_size if model_size > 1 else None)
    specs = nnx.State(specs).to_pure_dict() if not isinstance(specs, dict) else specs
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s if isinstance(s, P) else P()), specs, is_leaf=lambda s: isinstance(s, P) or s is None
    )


# ---- optimiser and state ------------------------------------------------------------------------
def ema_key(rate: float) -> str:
    """The canonical key of an extra EMA rate in state["ema_extra"]: the float's repr ("0.999")."""
    return repr(float(rate))


def extra_ema_rates(config) -> tuple[float, ...]:
    """`training.ema_rates`: the EMAs kept in state["ema_extra"] beside state["ema"] (training.ema_rate)."""
    return tuple(float(r) for r in config.training.get("ema_rates", ()) or ())


def ema_rates(config) -> tuple[float, ...]:
    """Every EMA rate the config tracks: training.ema_rate (state["ema"]) first, then training.ema_rates."""
    return (float(config.training.ema_rate), *extra_ema_rates(config))


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    if o.optimizer not in ("adam", "adamw"):
        raise ValueError(f"optim.optimizer must be 'adam' or 'adamw', got {o.optimizer!r}")
    warmup = int(o.warmup)
    lr = optax.linear_schedule(0.0, o.lr, warmup) if warmup > 0 else o.lr  # score_sde: lr * min(step/warmup, 1)
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    chain.append(optax.adamw(lr, b1=o.beta1, eps=o.eps, weight_decay=o.weight_decay))
    tx = optax.chain(*chain)
    accum = int(config.training.get("grad_accum_steps", 1))
    return optax.MultiSteps(tx, accum) if accum > 1 else tx


def state_layout(config, mesh: Mesh):
    """(abstract state, shardings, graphdef, create): the train state's shapes and shardings,
    traced abstractly (nothing allocated or compiled); create(key) -> (state, rest) builds it."""
    graphdef, abstract_params, _ = abstract_model(config)
    p_shard = param_shardings(config, mesh, abstract_params)
    tx = make_optimizer(config)
    replicated = NamedSharding(mesh, P())
    extra = extra_ema_rates(config)
    process = build_process(config)

    def create(seed_key):
        model = models.create(config.model, nnx.Rngs(seed_key))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        pure = params.to_pure_dict()
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": pure,
            "ema": jax.tree.map(jnp.copy, pure),
            "opt_state": tx.init(pure),
            "rng": jax.random.fold_in(seed_key, 1),
        }
        if extra:
            state["ema_extra"] = {ema_key(r): jax.tree.map(jnp.copy, pure) for r in extra}
        if learned_schedule.is_learned(process):  # VDM: the schedule's own params, EMA, optimiser
            state[learned_schedule.KEY] = learned_schedule.init_state(process, seed_key, tx)
        return state, rest

    abstract_state, _ = jax.eval_shape(create, jax.random.PRNGKey(0))
    return abstract_state, _state_shardings(abstract_state, p_shard, replicated), graphdef, create


def init_state(config, mesh: Mesh):
    """(state, shardings, graphdef, rest): the state is created directly sharded (jit out_shardings)."""
    _, shardings, graphdef, create = state_layout(config, mesh)
    replicated = NamedSharding(mesh, P())
    state, rest = jax.jit(create, out_shardings=(shardings, replicated))(jax.random.PRNGKey(int(config.seed)))
    return state, shardings, graphdef, rest


def _state_shardings(abstract_state, p_shard, replicated):
    """params, the EMAs and the param-shaped optimiser moments (matched by path suffix) follow
    the params' shardings; everything else is replicated."""
    flat_p = [(tuple(path), s) for path, s in jax.tree_util.tree_flatten_with_path(p_shard)[0]]

    def match(path, leaf):
        for keys, sharding in flat_p:
            if leaf.ndim > 0 and tuple(path[-len(keys) :]) == keys:
                return sharding
        return replicated

    opt = jax.tree_util.tree_map_with_path(match, abstract_state["opt_state"])
    shardings = {"step": replicated, "params": p_shard, "ema": p_shard, "opt_state": opt, "rng": replicated}
    if "ema_extra" in abstract_state:
        shardings["ema_extra"] = {k: p_shard for k in abstract_state["ema_extra"]}
    if learned_schedule.KEY in abstract_state:
        shardings[learned_schedule.KEY] = jax.tree.map(lambda _: replicated, abstract_state[learned_schedule.KEY])
    return shardings


def make_train_step(config, graphdef, rest, process: Process, shardings, mesh: Mesh):
    """A jitted fn(state, batches) -> (state, losses (n,)) running n = batches' leading axis steps."""
    tx = make_optimizer(config)
    t = config.training
    ema_rate = float(t.ema_rate)
    extra = {ema_key(r): r for r in extra_ema_rates(config)}

    def one_step(state, batch):
        rng, k_loss, k_drop = jax.random.split(state["rng"], 3)

        def loss_fn(weights):
            if t.loss == "classifier":  # a noise-conditional classifier for guidance: cross-entropy on x_t
                from diffjax import guidance

                clf = guidance.network_classifier(graphdef, rest, process, weights, train=True, dropout_key=k_drop)
                return guidance.classifier_loss(clf, process, batch, k_loss)[0]
            den = network_denoiser(
                graphdef, rest, process, config, weights, train=True, dropout_key=k_drop, augment_labels=batch.get("augment")
            )
            return losses.loss(
                t.loss,
                den,
                process,
                batch,
                k_loss,
                likelihood_weighting=bool(t.likelihood_weighting),
                label_dropout=float(t.label_dropout),
                reduce_mean=bool(t.get("reduce_mean", True)),
                vlb_weight=float(t.get("vlb_weight", 0.001)),
                data_range=sample_data_range(config),
            )

        if learned_schedule.KEY in state:  # VDM: the ELBO, the schedule's variance-minimising gradient
            make = lambda w: network_denoiser(graphdef, rest, process, config, w, train=True, dropout_key=k_drop)  # noqa: E731
            entry = state[learned_schedule.KEY]
            loss, (grads, g_sched) = vlb.vdm_value_and_grad(
                make, state["params"], entry["params"], process, batch, k_loss, **vlb.training_decoder(config)
            )
            schedule = learned_schedule.update(tx, entry, g_sched, ema_rate)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        applied = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else None

        def move(old, rate):
            ema = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, old, params)
            if applied is not None:  # grad accumulation: the EMAs move only when params do
                ema = jax.tree.map(lambda new, prev: jnp.where(applied, new, prev), ema, old)
            return ema

        new = {
            "step": state["step"] + 1,
            "params": params,
            "ema": move(state["ema"], ema_rate),
            "opt_state": opt_state,
            "rng": rng,
        }
        if extra:
            new["ema_extra"] = {k: move(state["ema_extra"][k], r) for k, r in extra.items()}
        if learned_schedule.KEY in state:
            new[learned_schedule.KEY] = schedule
        return new, loss

    # XLA:CPU runs conv gradients inside a while loop ~20x slower than the same ops unrolled
    # (measured here: 6.5 s vs 0.28 s per digits step), so fused steps are unrolled by default.
    unroll = bool(t.get("scan_unroll", True))

    def steps(state, batches):
        return jax.lax.scan(one_step, state, batches, unroll=unroll)

    replicated = NamedSharding(mesh, P())
    return jax.jit(steps, in_shardings=(shardings, None), out_shardings=(shardings, replicated), donate_argnums=(0,))


# ---- checkpoints --------------------------------------------------------------------------------
def checkpoint_manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(
        storage.absolute(workdir) / "checkpoints",
        options=options,
        item_names=("state",),  # checkpoints written before positions came from the step also hold "data"
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    )


def save(manager: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
    """Save the train state at `step` (all processes). The input position needs no saving: step k
    reads global batch k (diffjax.data), whatever the topology."""
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)


def restore(manager: ocp.CheckpointManager, shardings, abstract_state, *, only: tuple[str, ...] | None = None):
    """Restore the newest readable step onto `shardings`; (state, step) or (None, None).

    A step that fails to restore (truncated or corrupted files) is reported and skipped, and the
    previous one is tried. With several processes the step is agreed: the newest step that every
    process sees and every process can read (each reads its shards alone, without orbax's
    cross-process barriers, so one process's failure cannot leave the others waiting), so all
    hosts always resume from the same step. `only` restores just those entries of the state (e.g.
    ("ema",) to serve: the optimiser state is neither read nor required to match).
    """
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    handler: Any = ocp.StandardCheckpointHandler()
    if only is not None:  # read just these entries, through the PyTree handler's partial restore
        target = {k: target[k] for k in only}
        handler = ocp.PyTreeCheckpointHandler()
        args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
    else:
        args = ocp.args.StandardRestore(target)
    reader = manager
    if only is not None or jax.process_count() > 1:
        reader = ocp.CheckpointManager(
            manager.directory,
            options=ocp.CheckpointManagerOptions(create=False, multiprocessing_options=_this_process_alone()),
            item_names=("state",),
            item_handlers={"state": handler},
        )
    for step in _agreed_steps(manager.all_steps()):
        try:
            state, error = reader.restore(step, args=ocp.args.Composite(state=args))["state"], ""
        except Exception as err:  # noqa: BLE001 - any unreadable step falls back to the previous one
            state, error = None, f"{type(err).__name__}: {str(err)[:200]}"
            logging.error("checkpoint step %d in %s is unreadable: %s", step, manager.directory, err)
        failed = _processes_where(bool(error))
        if not failed:
            return state, step
        where = "" if jax.process_count() == 1 else f" on process(es) {', '.join(map(str, failed))}"
        detail = f" ({error})" if error else ""
        print(
            f"warning: checkpoint step {step} in {manager.directory} is unreadable{where}{detail}; trying the previous step",
            flush=True,
        )
    return None, None


def _this_process_alone():
    """orbax options for a reader that only this process uses (no cross-process barriers)."""
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(
        primary_host=index, active_processes={index}, barrier_sync_key_prefix=f"diffjax_restore_{index}"
    )


def _agreed_steps(steps) -> list[int]:
    """The steps every process sees, newest first."""
    mine = sorted((int(s) for s in steps), reverse=True)
    if jax.process_count() == 1:
        return mine
    import numpy as np
    from jax.experimental import multihost_utils

    longest = int(np.max(multihost_utils.process_allgather(np.int64(len(mine)))))
    padded = np.full(max(longest, 1), -1, np.int64)
    padded[: len(mine)] = mine
    seen = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
    common = set.intersection(*(set(int(s) for s in row if s >= 0) for row in seen))
    return sorted(common, reverse=True)


def _processes_where(flag: bool) -> list[int]:
    """The processes on which `flag` is true (every process calls this at the same point)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    import numpy as np
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(flag))).reshape(-1)
    return [i for i, f in enumerate(flags) if f]
