"""Sample sets at evaluation scale: `diffjax sample --workdir W --num 50000 --out_dir DIR`.

DIR holds uint8 shards `samples_000000.npz`, ... ({"images": (n, H, W, C) uint8, "indices": (n,)
and "labels" for class-conditional models}) and `protocol.json` (what the set is: checkpoint step,
sampler, steps, NFE, seed, quantisation). Sample i's noise (and its class label) is keyed by its
global index i, so the set does not depend on the number of devices or processes or on the shard
size; each call's batch is sharded over every device of every process. A shard is written under a
temporary name and renamed, so a kill -9 leaves only finished shards, and a restart skips them. A
restart whose settings differ from DIR's protocol.json is refused (a set is never mixed).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffjax import samplers

QUANTIZE = ("round", "floor")  # round: EDM, diffusers (x*127.5 + 128, truncated); floor: score_sde (x*255 truncated)
PROTOCOL_FILE = "protocol.json"
LABEL_STREAM = 0x5EED  # fold-in of the seed key for the class labels (independent of the noise)


def quantize(x: np.ndarray, data_range: tuple[float, float], rule: str = "round") -> np.ndarray:
    """Images in `data_range` -> uint8 0..255 by the protocol's rounding `rule` (see QUANTIZE)."""
    if rule not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {rule!r}")
    lo, hi = map(float, data_range)
    u = (np.asarray(x, np.float64) - lo) / (hi - lo) * 255.0
    v = np.floor(u + 0.5) if rule == "round" else np.floor(u)
    return np.clip(v, 0, 255).astype(np.uint8)


def shard_path(out_dir: str, shard: int) -> epath.Path:
    return epath.Path(out_dir) / f"samples_{shard:06d}.npz"


def read_set(out_dir: str) -> tuple[np.ndarray, dict]:
    """(images uint8 (N, H, W, C) in index order, protocol) of a finished set; clear errors otherwise."""
    path = epath.Path(out_dir)
    if not (path / PROTOCOL_FILE).exists():
        raise FileNotFoundError(f"{path / PROTOCOL_FILE} not found: {out_dir!r} is not a `diffjax sample --out_dir` set")
    protocol = json.loads((path / PROTOCOL_FILE).read_text())
    n_shards = math.ceil(protocol["num"] / protocol["shard_size"])
    missing = [s for s in range(n_shards) if not shard_path(out_dir, s).exists()]
    if missing:
        raise ValueError(
            f"{out_dir}: {len(missing)} of {n_shards} shards are missing (first: "
            f"{shard_path(out_dir, missing[0]).name}); re-run the same `diffjax sample` command to finish"
        )
    images = [np.load(io.BytesIO(shard_path(out_dir, s).read_bytes()))["images"] for s in range(n_shards)]
    return np.concatenate(images), protocol


def _agree_protocol(out_dir: str, protocol: dict) -> None:
    """Write DIR/protocol.json, or check that an existing one describes the same set."""
    path = epath.Path(out_dir) / PROTOCOL_FILE
    if path.exists():
        old = json.loads(path.read_text())
        ours = json.loads(json.dumps(protocol))  # as written: tuples (clip_x0's range) read back as lists
        diff = {k: (old.get(k), v) for k, v in ours.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"{out_dir} already holds a different sample set; differing settings (theirs, yours): "
                f"{diff}. Use another --out_dir (or remove it) to start a new set"
            )
        return
    if jax.process_index() == 0:
        _write_protocol(out_dir, protocol)


def _write_protocol(out_dir: str, protocol: dict) -> None:
    path = epath.Path(out_dir) / PROTOCOL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{PROTOCOL_FILE}.tmp"
    tmp.write_text(json.dumps(protocol, indent=1))
    tmp.replace(path)


def _write_shard(out_dir: str, shard: int, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub: a **dict might also fill allow_pickle
    final = shard_path(out_dir, shard)
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    tmp.write_bytes(buf.getvalue())
    tmp.rename(final)  # atomic on a local filesystem: a shard is there whole or not at all


def write_samples(
    workdir,
    state,
    step: int,
    out_dir: str,
    num: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    shard_size: int = 1000,
    quantize_rule: str = "round",
    label: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    guide: Any = None,
    **opts: Any,
) -> dict:
    """Draw `num` samples of the EMA weights in `state` into `out_dir` (see the module docstring).

    `workdir` is a diffjax.workdir.Workdir; returns the protocol dict (also DIR/protocol.json).
    guide: classifier guidance (diffjax.guidance.Guide): labels are drawn from its classes."""
    from diffjax import network, trainer
    from diffjax.sample import config_sampler, host_array
    from diffjax.sample import data_range as config_data_range

    if num <= 0 or shard_size <= 0:
        raise ValueError(f"num and shard_size must be positive, got num={num}, shard_size={shard_size}")
    if quantize_rule not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize_rule!r}")
    config, process = workdir.config, workdir.process
    sampler, steps, opts = config_sampler(config, sampler, steps, opts)
    num_classes = int(guide.num_classes if guide is not None else config.model.get("num_classes", 0))
    shape = tuple(network.data_shape(config))
    if len(shape) != 3:
        raise ValueError(f"--out_dir writes uint8 image shards; this workdir's data has shape {shape}")
    mesh = trainer.make_mesh(config)
    n_dev = mesh.devices.size
    batch = math.ceil(shard_size / n_dev) * n_dev  # one sampler call per shard, padded to the device count
    data_range = config_data_range(config)
    protocol = dict(
        workdir=str(workdir.path),
        checkpoint_step=int(step),
        weights="ema",
        ema_rate=float(workdir.ema_rate),  # the EMA chosen with --ema (default training.ema_rate)
        sampler=sampler,
        steps=steps,
        options={k: v for k, v in sorted(opts.items())},
        seed=int(seed),
        num=int(num),
        shard_size=int(shard_size),
        quantize=quantize_rule,
        data_range=list(data_range),
        label=label,
        guidance_scale=guidance_scale,
        noise="fold_in(key(seed), global index)",
        **({} if guide is None else guide.protocol),
    )
    _agree_protocol(out_dir, protocol)

    den = network.network_denoiser(workdir.graphdef, workdir.rest, process, config, state["ema"])
    den = den if guide is None else guide(den)
    key = jax.random.PRNGKey(seed)
    sharding = trainer.batch_sharding(mesh)
    n_shards = math.ceil(num / shard_size)
    todo = [s for s in range(n_shards) if not shard_path(out_dir, s).exists()]
    done = num - sum(min(shard_size, num - s * shard_size) for s in todo)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=num, initial=done, unit="img", dynamic_ncols=True, mininterval=1.0, desc=f"{sampler} {steps} steps")

    if done and jax.process_index() == 0:
        print(f"{out_dir}: {n_shards - len(todo)} of {n_shards} shards already written; resuming", flush=True)
    nfe, start = None, time.perf_counter()
    for s in todo:
        first, n = s * shard_size, min(shard_size, num - s * shard_size)
        host_idx = np.arange(first, first + batch, dtype=np.int32)  # padded indices: drawn, then dropped
        indices = jax.make_array_from_callback((batch,), sharding, lambda i: host_idx[i])
        labels = None
        if num_classes:
            labels = (
                jnp.full((batch,), label, jnp.int32)
                if label is not None
                else jax.vmap(
                    lambda i: jax.random.randint(
                        jax.random.fold_in(jax.random.fold_in(key, LABEL_STREAM), i), (), 0, num_classes
                    )
                )(indices)
            )
        x, info = samplers.sample(
            sampler,
            den,
            process,
            key,
            (batch, *shape),
            steps,
            indices=indices,
            cond=labels,
            guidance_scale=guidance_scale,
            **opts,
        )
        nfe = info["nfe"]
        arrays = {"images": quantize(host_array(x)[:n], data_range, quantize_rule), "indices": host_idx[:n]}
        if labels is not None:
            arrays["labels"] = host_array(labels)[:n]
        if jax.process_index() == 0:
            _write_shard(out_dir, s, arrays)
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    path = epath.Path(out_dir) / PROTOCOL_FILE
    written = json.loads(path.read_text()) if path.exists() else {}  # only process 0 writes it
    if nfe is None:  # every shard was there already: the NFE the set was drawn with
        nfe = written.get("nfe")
    elif jax.process_index() == 0 and written.get("nfe") != nfe:
        _write_protocol(out_dir, dict(written, nfe=nfe))
    protocol["nfe"] = nfe
    protocol["seconds_this_run"] = round(time.perf_counter() - start, 3)
    return protocol
