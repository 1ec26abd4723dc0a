"""`diffjax eval ...`: metrics of sample sets at the papers' protocols.

  diffjax eval --workdir W [--num N] [--sampler S --steps K] [--ref STATS.npz] [--metrics fid,is]
      sample the newest checkpoint's EMA weights (or reuse the set) into W/eval/, compute the
      metrics and write W/eval/step_N.json with every number and the whole protocol.
  diffjax eval stats (--config C.py | --data NAME) [--split train] --out REF.npz
      reference Inception statistics (mu, sigma) of a dataset the trainer reads.
  diffjax eval compare A B [--metrics fid,kid,is,pr]
      metrics between two sample sets (`diffjax sample --out_dir` sets, PNG folders, .npz of images);
      B may be a statistics .npz (FID only).
  diffjax eval bpd --workdir W [--split eval] [--passes 5] [--method elbo|ode] [--elbo_terms K]
      bits/dim of the newest EMA weights on a data split, with its standard error: the ELBO (ddpm's
      default) or the probability-flow ODE on uniformly dequantised data (continuous processes).
  diffjax eval convert-inception SRC.pth DST.npz
      pytorch-fid's Inception weights -> a torch-free .npz.
  diffjax eval digits SET [--data_range LO HI]
      digits-FID and classifier score of an 8x8 digits set, beside the same figures for real digits.

Inception weights: --inception_weights PATH, else $DIFFJAX_INCEPTION_WEIGHTS, else
~/.cache/diffjax/pt_inception-2015-12-05-6726825d.pth (pytorch-fid's file or its converted .npz).
"""

from __future__ import annotations

import io

import numpy as np

from diffjax import commandline, distributed, storage

USAGE = __doc__


class EvalError(Exception):
    """A user-facing error: printed as one line, exit 2, nothing written."""


def load_images(path: str, data_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """A sample set as uint8 (N, H, W, C): a `diffjax sample --out_dir` folder, a folder of PNGs, or an
    .npz holding uint8 images or float images in `data_range` (key images, samples, arr_0 or x)."""
    from diffjax.evaluation import generate

    where = storage.path(path)
    if where.is_dir():
        if (where / generate.PROTOCOL_FILE).exists():
            return generate.read_set(path)[0]
        return _png_folder(path)
    if not where.exists():
        raise EvalError(f"{path}: no such file or folder")
    if not path.endswith(".npz"):
        raise EvalError(f"{path}: expected a folder (PNGs or a `diffjax sample --out_dir` set) or an .npz file")
    with storage.open_npz(path) as f:
        key = next((k for k in ("images", "samples", "arr_0", "x") if k in f.files), None)
        if key is None:
            raise EvalError(f"{path}: no image array; expected one of the keys images, samples, arr_0, x; found {f.files}")
        x = f[key]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise EvalError(f"{path}[{key!r}]: expected images (N, H, W, C) with C = 1 or 3, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    lo, hi = data_range
    if not np.isfinite(x).all() or x.min() < lo - 1e-3 or x.max() > hi + 1e-3:
        raise EvalError(
            f"{path}[{key!r}]: float images must lie in --data_range {lo} {hi}, got [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]"
        )
    from diffjax.evaluation.generate import quantize

    return quantize(x, data_range, "round")


def _png_folder(path: str) -> np.ndarray:
    from PIL import Image

    files = sorted((f for f in storage.path(path).iterdir() if f.name.lower().endswith(".png")), key=lambda f: f.name)
    if not files:
        raise EvalError(f"{path}: no .png files and no protocol.json (not a `diffjax sample --out_dir` set)")
    images = []
    for file in files:
        img = np.asarray(Image.open(io.BytesIO(file.read_bytes())))
        images.append(img[..., None] if img.ndim == 2 else img[..., :3])
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise EvalError(f"{path}: PNGs of different shapes {sorted(shapes)[:4]}")
    return np.stack(images).astype(np.uint8)


def cmd_digits(argv: list[str]) -> int:
    p = commandline.Parser("diffjax eval digits", "digits-FID and classifier score")
    p.add_argument("set", help="a `diffjax sample --out_dir` folder, PNG folder or .npz of digits")
    p.add_argument(
        "--data_range",
        type=float,
        nargs=2,
        default=(-1.0, 1.0),
        metavar=("LO", "HI"),
        help="the range of float images in an .npz (default -1 1, the digits config's)",
    )
    args = p.parse(argv)
    from diffjax.evaluation import digits

    images = load_images(args.set, tuple(args.data_range))
    try:
        _print_digits_table("samples: " + args.set, digits.digits_report(images))
    except ValueError as err:
        raise EvalError(str(err)) from err
    return 0


def _print_digits_table(name: str, report: dict) -> None:
    """The samples' digits-FID and classifier score beside the same figures for real digits."""
    from diffjax.evaluation import digits

    rows = [
        (name, report),
        ("real digits, train split (1,500)", digits.digits_report(digits.real_digits("train")[0])),
        ("real digits, held-out split (297)", digits.digits_report(digits.real_digits("eval")[0])),
    ]
    print("digits-FID: 64-d features of diffjax.evaluation.digits' classifier against the held-out split")
    print("\n| set | n | digits-FID | classifier score (max 10) |\n|---|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['num']} | {max(r['digits_fid'], 0.0):.2f} | {r['classifier_score']:.2f} |")


def _add_weights_flag(p: commandline.Parser) -> None:
    p.add_argument(
        "--inception_weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its converted .npz"
    )
    p.add_argument(
        "--batch_size",
        type=commandline.positive_int,
        default=None,
        help="Inception batch, sharded over all devices (default 200; 10 per device on CPUs)",
    )


def cmd_convert(argv: list[str]) -> int:
    p = commandline.Parser("diffjax eval convert-inception", "pytorch-fid weights -> .npz")
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse(argv)
    from diffjax.evaluation import inception_weights

    try:
        out = inception_weights.convert(args.src, args.dst)
    except (OSError, ValueError) as err:
        raise EvalError(str(err)) from err
    print(f"wrote {out} (sha256 {inception_weights.file_sha256(out)[:16]}...)")
    return 0


def cmd_stats(argv: list[str]) -> int:
    p = commandline.Parser("diffjax eval stats", "reference Inception statistics")
    p.add_argument("--config", default=None, help="a config file: its data block (dataset, size, channels)")
    p.add_argument("--data", default=None, help="dataset name as data.dataset (digits, cifar10, folder:/path, ...)")
    p.add_argument("--split", default="train")
    p.add_argument("--image_size", type=commandline.positive_int, default=None)
    p.add_argument("--data_dir", default=None, help="TFDS data dir")
    p.add_argument("--out", required=True)
    _add_weights_flag(p)
    args = distributed.parse(p, argv)  # --tpu / --coordinator_address: every host takes part
    from diffjax.evaluation import evaluate

    if not args.out.endswith(".npz"):
        raise EvalError(f"--out must end in .npz, got {args.out!r}")
    storage.check_writable(storage.path(args.out).parent, "diffjax eval stats", "--out", args.out)
    try:
        images, source = evaluate.reference_images(args.config, args.data, args.split, args.image_size, args.data_dir)
        meta = evaluate.write_reference_stats(images, args.out, source, args.split, args.inception_weights, args.batch_size)
    except (OSError, ValueError) as err:
        raise EvalError(str(err)) from err
    print(f"wrote {args.out}: {meta['num_images']} images of {source} ({args.split}), extractor {meta['extractor'][:16]}...")
    return 0


def cmd_compare(argv: list[str]) -> int:
    p = commandline.Parser("diffjax eval compare", "metrics between two sample sets")
    p.add_argument("a", help="generated set: a `diffjax sample --out_dir` set, PNG folder or .npz of images")
    p.add_argument("b", help="reference set (same kinds), or a statistics .npz with mu and sigma (FID only)")
    p.add_argument("--metrics", default="fid,is,kid,pr")
    p.add_argument("--data_range", type=float, nargs=2, default=(-1.0, 1.0), metavar=("LO", "HI"))
    _add_weights_flag(p)
    args = distributed.parse(p, argv)  # --tpu / --coordinator_address: every host takes part
    from diffjax.evaluation import evaluate

    try:
        metrics = evaluate.parse_metrics(args.metrics)
        a = load_images(args.a, tuple(args.data_range))
        b = args.b if evaluate.is_stats_file(args.b) else load_images(args.b, tuple(args.data_range))
        result = evaluate.compare(a, b, metrics, args.inception_weights, args.batch_size)
    except (OSError, ValueError) as err:
        raise EvalError(str(err)) from err
    print(evaluate.format_result(result))
    return 0


def cmd_workdir(argv: list[str]) -> int:
    p = commandline.Parser("diffjax eval", "evaluate a workdir's newest checkpoint")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--num", type=commandline.positive_int, default=None, help="samples (default: the config's eval.num_samples)"
    )
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=commandline.positive_int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--shard_size", type=commandline.positive_int, default=1000)
    p.add_argument("--ref", default=None, help="reference statistics .npz (default: the config's eval.reference)")
    p.add_argument("--metrics", default=None, help="comma-separated: fid,is,kid,pr,digits (default: the config's)")
    p.add_argument("--no_progress", action="store_true")
    _add_weights_flag(p)
    commandline.add_ema_flag(p)
    from diffjax import guidance

    guidance.add_flags(p)  # labels drawn uniformly from the classifier's classes
    args = distributed.parse(p, argv)  # --tpu / --coordinator_address: every host takes part
    from diffjax.evaluation import evaluate

    storage.check_writable(storage.path(args.workdir) / "eval", "diffjax eval", "--workdir")
    try:
        record, path = evaluate.evaluate_workdir(args)
    except (OSError, ValueError) as err:
        raise EvalError(str(err)) from err
    m, p = record["metrics"], record["protocol"]
    if "digits_fid" in m:
        _print_digits_table(f"samples: step {record['step']}, {p['sampler']} {p['steps']} steps", m)
    else:
        print(evaluate.format_result(m))
    print(f"wrote {path}")
    return 0


def cmd_bpd(argv: list[str]) -> int:
    p = commandline.Parser("diffjax eval bpd", "bits/dim of a workdir on a data split")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="eval", help="train, eval or test (eval = the dataset's test split)")
    p.add_argument(
        "--passes", type=commandline.positive_int, default=None, help="passes over the split (default: eval.bpd_passes)"
    )
    p.add_argument("--batch_size", type=commandline.positive_int, default=128)
    p.add_argument("--num", type=commandline.positive_int, default=None, help="only the first N examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--method",
        choices=("elbo", "ode"),
        default=None,
        help="elbo: the variational bound, discretised 8-bit decoder (Ho et al.; default for the discrete ddpm process; "
        "continuous processes: VDM's continuous-time bound); "
        "ode: the probability-flow ODE on dequantised data (Song et al.; default for continuous processes)",
    )
    p.add_argument(
        "--elbo_terms",
        type=commandline.positive_int,
        default=None,
        metavar="K",
        help="--method elbo: estimate the sum of the T terms from K uniformly drawn ones (default: all T terms); "
        "continuous processes: K antithetic times of the diffusion loss per example (default 16)",
    )
    p.add_argument("--no_progress", action="store_true")
    commandline.add_ema_flag(p)
    args = distributed.parse(p, argv)  # --tpu / --coordinator_address: every host takes part
    from diffjax.evaluation import evaluate

    storage.check_writable(storage.path(args.workdir) / "eval", "diffjax eval bpd", "--workdir")
    try:
        record, path = evaluate.bits_per_dim_split(args)
    except (OSError, ValueError) as err:
        raise EvalError(str(err)) from err
    m, pr = record["metrics"], record["protocol"]
    se = "" if m["bpd_stderr"] is None else f" +- {m['bpd_stderr']:.4f} (standard error)"
    how = "ELBO, " + pr["estimator"] if pr["method"] == "elbo" else "probability-flow ODE"
    print(f"bits/dim on {args.split}: {m['bpd']:.4f}{se} over {m['num']} examples x {m['passes']} pass(es) ({how})")
    print(f"wrote {path}")
    return 0


COMMANDS = {
    "stats": cmd_stats,
    "bpd": cmd_bpd,
    "compare": cmd_compare,
    "convert-inception": cmd_convert,
    "digits": cmd_digits,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from diffjax import compile_cache

    compile_cache.enable()
    if argv[0].startswith("--workdir"):
        try:
            return cmd_workdir(argv)
        except EvalError as err:
            commandline.usage_error("diffjax eval", str(err))
    if argv[0] not in COMMANDS:
        commandline.usage_error(
            "diffjax eval",
            f"unknown command {argv[0]!r}; choose --workdir or one of {', '.join(COMMANDS)} (diffjax eval --help)",
        )
    try:
        return COMMANDS[argv[0]](argv[1:])
    except EvalError as err:
        commandline.usage_error(f"diffjax eval {argv[0]}", str(err))
