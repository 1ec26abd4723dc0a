"""The evaluation recipes behind `diffjax eval`: reference statistics, set-vs-set comparison and a
workdir's checkpoint evaluated at its config's protocol, each number stored with its protocol."""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any

import numpy as np

from diffjax import storage

METRICS = ("fid", "is", "kid", "pr", "digits")


def parse_metrics(spec: str | tuple | list) -> tuple[str, ...]:
    names = tuple(m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip())
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or [spec]}; choose from {','.join(METRICS)}")
    return names


def is_stats_file(path: str) -> bool:
    """True for an .npz of statistics (mu + sigma, or score_sde's pool_3) rather than images."""
    if not (str(path).endswith(".npz") and storage.path(path).is_file()):
        return False
    with storage.open_npz(path) as f:
        return ("mu" in f.files and "sigma" in f.files) or "pool_3" in f.files


class Extractor:
    """The FID Inception with its weights file's path and sha256 (stored beside every number)."""

    def __init__(self, weights: str | None = None, batch_size: int | None = None):
        import jax

        from diffjax.evaluation import inception, inception_weights

        if batch_size is None:  # XLA:CPU runs the Inception fastest at small batches (cache): 9.7 img/s at 10, 8.3 at 32
            batch_size = 200 if jax.default_backend() != "cpu" else 10 * jax.device_count()

        self.path = inception_weights.weights_path(weights)
        self.sha256 = inception_weights.file_sha256(self.path)
        self.model = inception.create(inception_weights.load_pytorch_fid_weights(self.path))
        self.batch_size = batch_size

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 1 or 3) -> (pool3 (N, 2048), logits (N, 1008)) float64; 1 channel is
        repeated to RGB (as pytorch-fid's PIL convert('RGB') does for grayscale files). In a
        multi-process run every process must call it, with the same images."""
        import jax

        from diffjax.evaluation import inception

        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 1 or 3), got {images.dtype}{images.shape}")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if jax.process_count() == 1:
            pool3, logits = inception.features(self.model, images, self.batch_size)
            return pool3.astype(np.float64), logits.astype(np.float64)
        return self._features_across_processes(images)

    def _features_across_processes(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every process holds the same `images` and calls this together: each runs the Inception on
        its contiguous 1/P of them (zero-padded to equal counts) on its own devices, and the
        features are all-gathered, so a pod's hosts share the work instead of each doing all of it."""
        import jax
        from jax.experimental import multihost_utils

        from diffjax.evaluation import inception

        n, count, index = len(images), jax.process_count(), jax.process_index()
        per = -(-n // count)
        mine = images[index * per : (index + 1) * per]
        padded = np.concatenate([mine, np.zeros((per - len(mine), *images.shape[1:]), images.dtype)])
        pool3, logits = inception.features(self.model, padded, self.batch_size)
        pool3, logits = multihost_utils.process_allgather((pool3, logits))  # (P, per, D) each
        return (
            np.asarray(pool3).reshape(count * per, -1)[:n].astype(np.float64),
            np.asarray(logits).reshape(count * per, -1)[:n].astype(np.float64),
        )

    def describe(self) -> dict[str, str]:
        return {"inception_weights": self.path, "inception_sha256": self.sha256}


def reference_images(
    config_path: str | None, data: str | None, split: str, image_size: int | None, data_dir: str | None
) -> tuple[np.ndarray, str]:
    """Every image of a split the trainer reads, as uint8 (N, H, W, C), and its name."""
    from diffjax.configuration import load_config

    if not config_path and not data:
        raise ValueError("give --config (a config's data block) or --data (a dataset name)")
    overrides = []
    if data:
        overrides.append(f"--config.data.dataset={data}")
    if image_size:
        overrides.append(f"--config.data.image_size={image_size}")
    config = load_config(config_path or f"{_configs_dir()}/ddpm_cifar10.py", overrides)
    if data == "digits" and not config_path:
        config.unlock()
        config.data.image_size, config.data.num_channels = 8, 1
    if data_dir:
        config.unlock()
        config.data.data_dir = data_dir
    return split_images(config, split), str(config.data.dataset)


def split_images(config, split: str) -> np.ndarray:
    """Every image of the config's dataset split, preprocessed as the trainer does, as uint8."""
    from diffjax import data as data_lib
    from diffjax.evaluation.generate import quantize

    source, kind = data_lib._source(config, split)
    if kind == "toy":
        raise ValueError(f"data.dataset={config.data.dataset!r} is 2-D points, not images")
    pre = data_lib._Preprocess(kind, int(config.data.image_size), int(config.data.num_channels), config.data.dataset)
    return np.stack([quantize(pre(source[i])["x"], (0.0, 1.0)) for i in range(len(source))])


def _configs_dir() -> str:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # local: the package's own files
    return os.path.join(os.path.dirname(package), "configs")  # local: the checkout's configs


def write_reference_stats(
    images: np.ndarray, out: str, source: str, split: str, weights: str | None, batch_size: int | None = None
) -> dict[str, Any]:
    from diffjax.evaluation import stats

    extractor = Extractor(weights, batch_size)
    pool3, _ = extractor.features(images)
    mu, sigma = stats.feature_statistics(pool3)
    meta = dict(
        extractor=extractor.sha256,
        num_images=int(len(images)),
        source=source,
        split=split,
        image_shape=np.asarray(images.shape[1:]),
    )
    stats.save_stats(out, mu, sigma, meta)
    return meta


def compare(
    a: np.ndarray,
    b: np.ndarray | str,
    metrics: tuple[str, ...],
    weights: str | None = None,
    batch_size: int | None = None,
    extractor: Extractor | None = None,
) -> dict[str, Any]:
    """Metrics of set `a` (uint8 images) against `b` (uint8 images, or a statistics file: FID only)."""
    from diffjax.evaluation import metrics as m
    from diffjax.evaluation import stats
    from diffjax.evaluation.inception_weights import file_sha256

    result: dict[str, Any] = {"num": int(len(a))}
    if "digits" in metrics:
        from diffjax.evaluation import digits

        result.update(digits.digits_report(a))
    inception = [k for k in metrics if k != "digits"]
    if not inception:
        return result
    extractor = extractor or Extractor(weights, batch_size)
    result.update(extractor.describe())
    ref = None
    if isinstance(b, str):  # read (and check) the reference before the expensive features
        if set(inception) - {"fid", "is"}:
            raise ValueError(
                f"{b} holds statistics only: it supports fid (and is of the first set), not "
                f"{sorted(set(inception) - {'fid', 'is'})}"
            )
        ref = stats.load_stats(b, expect_extractor=extractor.sha256)
        result["reference"] = {
            "path": storage.display(b),
            "sha256": file_sha256(b),
            "num_images": ref.meta.get("num_images"),
        }
    pool_a, logits_a = extractor.features(a)
    if "is" in metrics:
        result["is"], result["is_std"] = m.inception_score(logits_a)
    if not set(inception) - {"is"}:
        return result
    if ref is not None:
        if "fid" in metrics:
            mu, sigma = stats.feature_statistics(pool_a)
            result["fid"] = m.frechet_distance(mu, sigma, ref.mu, ref.sigma)
        return result
    assert not isinstance(b, str)  # a statistics file returned above
    pool_b, _ = extractor.features(b)
    result["num_reference"] = int(len(b))
    if "fid" in metrics:
        result["fid"] = m.frechet_distance(*stats.feature_statistics(pool_a), *stats.feature_statistics(pool_b))
    if "kid" in metrics:
        result["kid"], result["kid_std"] = m.kernel_inception_distance(pool_a, pool_b)
    if "pr" in metrics:
        result["precision"], result["recall"] = m.precision_recall(pool_b, pool_a)
    return result


def format_result(result: dict[str, Any]) -> str:
    names = [
        ("fid", "FID"),
        ("is", "IS"),
        ("kid", "KID"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("digits_fid", "digits-FID"),
        ("classifier_score", "classifier score"),
    ]
    rows = [
        f"| {label} | {result[k]:.4f}" + (f" +- {result[k + '_std']:.4f}" if k + "_std" in result else "") + " |"
        for k, label in names
        if k in result
    ]
    return "| metric | value |\n|---|---:|\n" + "\n".join(rows) + f"\n\n{result.get('num', '?')} samples"


def evaluate_workdir(args) -> tuple[dict[str, Any], str]:
    """Sample (or reuse) the newest checkpoint's set, compute the metrics, write W/eval/step_N.json."""
    from diffjax import guidance
    from diffjax.evaluation import generate
    from diffjax.workdir import Workdir

    start = time.perf_counter()
    w = Workdir(args.workdir, command="diffjax eval", inference=True, ema=args.ema)
    ev = w.config.get("eval", {})
    num = int(args.num or ev.get("num_samples", 50000))
    metrics = parse_metrics(args.metrics or ev.get("metrics", "fid,is"))
    ref = args.ref or ev.get("reference", "") or None
    if set(metrics) & {"kid", "pr"}:
        raise ValueError("kid and pr need reference images, not statistics: use `diffjax eval compare SET REF_SET`")
    if "fid" in metrics and not ref:
        raise ValueError(
            "fid needs reference statistics: pass --ref REF.npz (make one with `diffjax eval stats "
            "--config CONFIG.py --split train --out REF.npz`) or set eval.reference in the config"
        )
    if ref and not storage.path(ref).exists():
        raise ValueError(f"--ref {ref}: no such file")
    extractor = Extractor(args.inception_weights, args.batch_size) if set(metrics) - {"digits"} else None
    state, step = w.restore(only=("ema",))
    guide = guidance.from_flags(args, w.config, "diffjax eval", need_labels=False)  # --classifier: labels drawn
    sampler = args.sampler or w.config.sampling.sampler
    steps = int(args.steps or w.config.sampling.num_steps)
    seed = int(args.seed if args.seed is not None else ev.get("seed", 0))
    rule = ev.get("quantize", "round")
    ema = w.ema_suffix + ("" if guide is None else f"_classifier{guide.scale:g}")  # --ema, --classifier: another set
    out_dir = str(storage.path(args.workdir) / "eval" / f"samples_step{step}_{sampler}{steps}_seed{seed}_n{num}_{rule}{ema}")
    protocol = generate.write_samples(
        w,
        state,
        step,
        out_dir,
        num,
        sampler=sampler,
        steps=steps,
        seed=seed,
        shard_size=args.shard_size,
        quantize_rule=rule,
        progress=not args.no_progress,
        guide=guide,
    )
    images, _ = generate.read_set(out_dir)
    result = compare(images, ref or images, metrics, extractor=extractor)
    protocol.update(samples=out_dir, metrics=list(metrics), wall_s=round(time.perf_counter() - start, 2))
    default = (sampler, steps, num, ema) == (
        w.config.sampling.sampler,
        int(w.config.sampling.num_steps),
        int(ev.get("num_samples", 50000)),
        "",
    )
    name = (
        f"step_{step}.json" if default else f"step_{step}_{sampler}{steps}_n{num}{ema}.json"
    )  # the config's protocol or not
    return _write_record(str(storage.path(args.workdir) / "eval" / name), step, result, protocol)


def _write_record(path: str, step: int, metrics: dict, protocol: dict) -> tuple[dict[str, Any], str]:
    """{step, date, metrics, protocol} -> `path` (process 0, written to a temporary name and renamed)."""
    import jax

    record = dict(
        step=int(step), date=datetime.datetime.now().isoformat(timespec="seconds"), metrics=metrics, protocol=protocol
    )
    if jax.process_index() == 0:
        storage.write_text(path, json.dumps(record, indent=1, default=_jsonable))
    return record, path


def _jsonable(v):
    return v.tolist() if isinstance(v, np.ndarray) else (v.item() if isinstance(v, np.generic) else str(v))


def bits_per_dim_split(args) -> tuple[dict[str, Any], str]:
    """Bits/dim of a workdir's newest EMA weights on a data split, sharded over all devices; mean and
    standard error over examples; writes W/eval/bpd_step_N.json (_elboK for K < T terms). Methods:
    ode (continuous processes): score_sde's, uniform dequantisation, fresh Hutchinson noise per pass;
    elbo (ddpm): Ho et al.'s bound, discretised decoder, the config's sampling.variance and clip_x0;
    elbo (continuous processes): VDM's continuous-time bound (diffjax.vlb), discretised decoder at t_min."""
    import jax

    from diffjax import likelihood, network, trainer
    from diffjax.data import TOY_DATASETS
    from diffjax.sample import data_range, host_array
    from diffjax.workdir import Workdir

    start = time.perf_counter()
    w = Workdir(args.workdir, command="diffjax eval bpd", inference=True, ema=args.ema)
    args.passes = int(args.passes or w.config.get("eval", {}).get("bpd_passes", 1))
    if args.passes < 1 or args.batch_size < 1:
        raise ValueError(f"--passes and --batch_size must be positive, got {args.passes}, {args.batch_size}")
    method, terms = _bpd_method(args, w.process)
    if method == "elbo" and w.config.data.dataset in TOY_DATASETS:
        raise ValueError(
            f"--method elbo: the discretised 8-bit decoder needs image data, but data.dataset="
            f"{w.config.data.dataset!r} is continuous 2-D points (no 8-bit data range)"
        )
    images = split_images(w.config, args.split)[: args.num or None]
    state, step = w.restore(only=("ema",))
    mesh = trainer.make_mesh(w.config)
    batch = -(-args.batch_size // mesh.devices.size) * mesh.devices.size
    lo, hi = data_range(w.config)
    den = network.network_denoiser(w.graphdef, w.rest, w.process, w.config, state["ema"])
    clip = (lo, hi) if w.config.sampling.get("clip_x0", False) else None  # the model the sampler draws from
    elbo_opts = dict(variance=w.config.sampling.get("variance", "fixed_small"), clip_x0=clip)
    per_pass, nfe = np.zeros((args.passes, len(images))), []
    bar = _progress(args.passes * len(images), not args.no_progress, f"bits/dim ({args.split})")
    for p in range(args.passes):
        for b0 in range(0, len(images), batch):
            chunk, n = images[b0 : b0 + batch], min(batch, len(images) - b0)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)]) if n < batch else chunk
            x = jax.device_put(lo + (hi - lo) * padded.astype(np.float32) / 255.0, trainer.batch_sharding(mesh))
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(args.seed), p), b0)
            if method == "elbo":
                _, info = likelihood.elbo(den, w.process, key, x, num_terms=terms, data_range=(lo, hi), **elbo_opts)
                bpd = info["bpd"]
            else:
                bpd, info = likelihood.bits_per_dim(den, w.process, key, x, data_range=(lo, hi))
            per_pass[p, b0 : b0 + n] = host_array(bpd)[:n]
            nfe.append(info["nfe"])
            if bar is not None:
                bar.update(n)
    if bar is not None:
        bar.close()
    per_example = per_pass.mean(0)
    stderr = float(per_example.std(ddof=1) / np.sqrt(len(per_example))) if len(per_example) > 1 else None
    result = dict(bpd=float(per_example.mean()), bpd_stderr=stderr, num=int(len(images)), passes=int(args.passes))
    protocol: dict[str, Any] = dict(workdir=str(args.workdir), checkpoint_step=int(step), weights="ema")
    protocol.update(ema_rate=float(w.ema_rate), split=args.split, seed=int(args.seed), method=method, num_bins=256)
    if method == "elbo" and not w.process.discrete:
        estimator = f"continuous time (VDM), {terms} antithetic times per example"
        protocol.update(num_terms=terms, estimator=estimator, decoder="discretized", decoder_time=float(w.process.t_min))
    elif method == "elbo":
        estimator = "all T terms" if terms is None else f"{terms} of T terms, t uniform, each scaled by T/K"
        protocol.update(num_terms=terms or int(w.process.t_max), estimator=estimator, decoder="discretized", **elbo_opts)
    else:
        protocol.update(dequantization="uniform", trace="hutchinson", probe="rademacher", solver="tsit5 rtol=atol=1e-5")
    protocol.update(mean_nfe=float(np.mean(nfe)), data_range=[lo, hi], wall_s=round(time.perf_counter() - start, 2))
    name = f"bpd_step_{step}{'' if terms is None else f'_elbo{terms}'}{w.ema_suffix}.json"
    return _write_record(str(storage.path(args.workdir) / "eval" / name), step, result, protocol)


CONTINUOUS_ELBO_TERMS = 16  # --method elbo on a continuous process: diffusion-loss times per example


def _bpd_method(args, process) -> tuple[str, int | None]:
    """(method, K or None for all T terms) from --method / --elbo_terms, checked against the process
    (continuous processes: K antithetic times of the diffusion loss, default CONTINUOUS_ELBO_TERMS)."""
    method = getattr(args, "method", None) or ("elbo" if process.discrete else "ode")
    terms, T, name = getattr(args, "elbo_terms", None), int(process.t_max), process.name
    if method == "ode" and terms is not None:
        raise ValueError("--elbo_terms is for --method elbo")
    if method == "ode" and process.discrete:
        raise ValueError(f"--method ode: process {name!r} is a discrete chain (no probability-flow ODE); use --method elbo")
    if method == "elbo" and not process.discrete:  # VDM's continuous-time bound: K antithetic times per example
        return method, int(terms or CONTINUOUS_ELBO_TERMS)
    if method == "elbo" and terms is not None and terms > T:
        raise ValueError(f"--elbo_terms must be at most T = {T} (leave it out for all T terms), got {terms}")
    return method, None if method == "ode" or terms in (None, T) else int(terms)


def _progress(total: int, enabled: bool, desc: str):
    import jax

    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True, mininterval=1.0, desc=desc)


class TrainingFID:
    """fid@n during training (eval.fid_freq > 0): eval.fid_num samples of the EMA weights with the
    config's sampler, rounded as eval.quantize, against eval.reference through the Inception, or
    against the held-out digits through the digits classifier when eval.metrics is "digits". The
    reference and the extractor are loaded once, here, so a missing file stops before training.
    Logged as "fid@n" / "digits_fid@n": never to be confused with the 50k protocol number."""

    def __init__(self, config, graphdef, rest, process):
        from diffjax.evaluation import stats

        self.config, self.graphdef, self.rest, self.process = config, graphdef, rest, process
        self.num = int(config.eval.fid_num)
        if self.num < 2:
            raise ValueError(f"eval.fid_num must be >= 2 (a covariance), got {self.num}")
        if "digits" in parse_metrics(config.eval.metrics):
            from diffjax.evaluation import digits

            self.name, self.extractor = f"digits_fid@{self.num}", None
            self.params = digits.load()
            self.ref = digits.held_out_statistics(self.params)
            return
        if not config.eval.reference:
            raise ValueError("eval.fid_freq > 0 needs eval.reference (statistics from `diffjax eval stats`)")
        self.name, self.extractor = f"fid@{self.num}", Extractor()
        ref = stats.load_stats(config.eval.reference, expect_extractor=self.extractor.sha256)
        self.ref = (ref.mu, ref.sigma)

    def __call__(self, state, step: int) -> dict[str, float]:
        from diffjax.evaluation import metrics, stats
        from diffjax.evaluation.generate import quantize
        from diffjax.sample import data_range, generate

        x = generate(self.config, self.graphdef, self.rest, self.process, state["ema"], self.num, seed=step)
        images = quantize(x, data_range(self.config), self.config.eval.quantize)
        if self.extractor is None:
            from diffjax.evaluation import digits

            feats = digits.features(images, self.params)[0]
        else:
            feats = self.extractor.features(images)[0]
        return {self.name: metrics.frechet_distance(*stats.feature_statistics(feats), *self.ref)}
