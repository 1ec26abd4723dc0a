"""Classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233, sec. 4.1-4.2).

A noise-conditional classifier p(y | x_t, t) (diffjax.models.classifier) tilts any denoiser:
score'(x_t) = score(x_t) + s grad_x log p(y | x_t, t). `classifier_guided` applies it in the
denoiser's own parametrisation (via the score and process.convert), so every sampler accepts it.

- `Classifier`: a pytree like `Denoiser`: logits = apply(params, x, t), params traced.
- `network_classifier(graphdef, rest, process, weights)`: a classifier network as a Classifier
  (`ClassifierApply`: the network at the process's noise conditioning, input x_t / sqrt(a^2 + s^2)).
- `classifier_loss`: cross-entropy on x_t at t ~ the process's training times (`training.loss =
  'classifier'`); `ClassifierEval`: held-out loss and accuracy during training.
- `load_classifier(workdir, config, ...)`: a classifier workdir (EMA weights), checked against the
  diffusion model it is to guide; `check_labels`: labels a classifier can guide towards.
- `add_flags`, `from_flags` -> `Guide`: `--classifier WORKDIR --classifier_scale S` of `diffjax
  sample`, `eval` and `serve`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffjax import commandline
from diffjax.denoiser import Denoiser
from diffjax.processes import Process, bcast

Array = jax.Array
LOSS = "classifier"  # config.training.loss of a classifier workdir


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Classifier:
    """logits (B, K) = apply(params, x, t); `apply` static, `params` traced (new weights never recompile)."""

    apply: Callable[[Any, Array, Array], Array] = dataclasses.field(metadata=dict(static=True))
    params: Any

    def __call__(self, x: Array, t: Array) -> Array:
        return self.apply(self.params, x, jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1]))


@dataclasses.dataclass(frozen=True)
class ClassifierApply:
    """apply(params=(weights, rest, dropout_key), x, t): the network at process.noise_cond(t) on
    x_t / sqrt(alpha^2 + sigma^2) (unit scale for VP; EDM's c_in with sigma_data 1 for VE / EDM)."""

    graphdef: Any
    process: Process
    train: bool = False

    def __call__(self, params, x, t):
        from flax import nnx

        weights, rest, dropout_key = params
        model = nnx.merge(self.graphdef, nnx.State(weights), rest)
        scale = jax.lax.rsqrt(self.process.alpha(t) ** 2 + self.process.sigma(t) ** 2)
        rngs = nnx.Rngs(dropout=dropout_key) if self.train else None
        return model(bcast(scale, x) * x, self.process.noise_cond(t), None, train=self.train, rngs=rngs)


def network_classifier(
    graphdef, rest, process: Process, weights, *, train: bool = False, dropout_key: Array | None = None
) -> Classifier:
    """A classifier network with `weights` as a Classifier."""
    key = jax.random.PRNGKey(0) if dropout_key is None else dropout_key
    return Classifier(ClassifierApply(graphdef, process, train), (weights, rest, key))


def classifier_loss(classifier: Classifier, process: Process, batch: dict, key: Array) -> tuple[Array, Array]:
    """(mean cross-entropy, accuracy) of `classifier` on x_t = alpha x0 + sigma eps, t ~ the process's
    training times, for batch {"x": (B, ...), "label": (B,)}."""
    if batch.get("label") is None:
        raise ValueError("the classifier loss needs class labels: set model.num_classes for a labelled dataset")
    x0, labels = batch["x"], batch["label"]
    k_t, k_eps = jax.random.split(key)
    t = process.sample_train_time(k_t, x0.shape[0])
    x_t = process.marginal(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype))
    logits = classifier(x_t, t)
    if logits.ndim != 2:
        raise ValueError(f"the classifier loss needs a classifier network (logits (B, K)), got outputs {logits.shape}")
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    return jnp.mean(nll), jnp.mean(jnp.argmax(logits, -1) == labels)


@dataclasses.dataclass(frozen=True)
class _FnApply:
    """apply of a plain fn(x, t) -> logits; equal (one jit cache entry) for the same fn."""

    fn: Callable[[Array, Array], Array]

    def __call__(self, params, x, t):
        return self.fn(x, t)


@dataclasses.dataclass(frozen=True)
class _ClassifierGuidedApply:
    """apply of a classifier-guided denoiser; equal (one jit cache entry) when its parts are equal."""

    inner: Callable
    classifier: Callable
    prediction: str
    process: Process

    def __call__(self, params, x, t, cond):
        scale, inner_params, classifier_params = params
        if cond is None:
            raise ValueError("classifier guidance needs class labels (cond)")
        out = self.inner(inner_params, x, t, cond)

        labels = cond.astype(jnp.int32)

        def log_p(x_):
            log_probs = jax.nn.log_softmax(self.classifier(classifier_params, x_, t).astype(jnp.float32))
            return jnp.sum(jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=1))

        # the null label (-1: e.g. the unconditional branch of classifier-free guidance) gets no gradient
        grad = jnp.where(bcast(labels >= 0, x), jax.grad(log_p)(x), 0.0)
        score = self.process.convert(self.prediction, "score", out, x, t)
        score = score + bcast(scale, x) * grad.astype(score.dtype)
        return self.process.convert("score", self.prediction, score, x, t)


def classifier_guided(
    denoiser: Denoiser, classifier_fn: Classifier | Callable[[Array, Array], Array], scale: float | Array, process: Process
) -> Denoiser:
    """Classifier guidance: score + s grad_x log p(y | x_t, t), y = cond, in the denoiser's own
    parametrisation. s = 1 samples p(x | y) for an exact classifier; s = 0 is the denoiser itself.

    classifier_fn: a `Classifier` (weights traced) or any fn(x, t) -> logits (B, K) (a jit constant).
    `scale` is traced, so changing it never recompiles. Labels must lie in [0, K): `check_labels`.
    """
    if not isinstance(classifier_fn, Classifier):
        classifier_fn = Classifier(_FnApply(classifier_fn), None)
    apply = _ClassifierGuidedApply(denoiser.apply, classifier_fn.apply, denoiser.prediction, process)
    return Denoiser(apply, (jnp.asarray(scale, jnp.float32), denoiser.params, classifier_fn.params), denoiser.prediction)


def check_labels(labels, num_classes: int) -> None:
    """ValueError unless every label is a class of the classifier ([0, num_classes)); None is an error."""
    import numpy as np

    if labels is None:
        raise ValueError("classifier guidance needs class labels (e.g. --label N)")
    given = np.asarray(labels).reshape(-1)
    if given.size and (given.min() < 0 or given.max() >= num_classes):
        bad = sorted({int(v) for v in given if v < 0 or v >= num_classes})[:8]
        raise ValueError(
            f"classifier guidance needs labels in [0, {num_classes}) (the classifier's classes; -1, unconditional, "
            f"has no classifier gradient), got {bad}"
        )


@dataclasses.dataclass(frozen=True)
class GuidanceSpec:
    """A loaded classifier: `wrap(denoiser, scale)` guides a denoiser of the checked process."""

    classifier: Classifier
    process: Process
    num_classes: int

    def wrap(self, denoiser: Denoiser, scale: float | Array) -> Denoiser:
        return classifier_guided(denoiser, self.classifier, scale, self.process)


def load_classifier(workdir: str, config, *, command: str = "diffjax sample", ema: float | None = None) -> GuidanceSpec:
    """The classifier of a `diffjax train` workdir (loss 'classifier'; EMA weights) for guiding the
    diffusion model of `config`; a one-line usage error (exit 2) unless it is a classifier of the
    same process, data shape and (for a conditional model) number of classes."""
    from diffjax import network
    from diffjax.workdir import Workdir

    w = Workdir(workdir, command=command, inference=True, ema=ema)
    c = w.config
    where = f"--classifier {workdir}"
    if c.training.get("loss") != LOSS:
        commandline.usage_error(
            command, f"{where} is not a classifier workdir (training.loss is {c.training.get('loss')!r}, not {LOSS!r})"
        )
    mine, theirs = network.data_shape(c), network.data_shape(config)
    if mine != theirs:
        commandline.usage_error(command, f"{where} classifies data of shape {mine}, the model draws {theirs}")
    if w.process != network.build_process(config):
        commandline.usage_error(
            command, f"{where} was trained on process {w.process}, the model uses {network.build_process(config)}"
        )
    k, model_k = int(c.model.num_classes), int(config.model.get("num_classes", 0) or 0)
    if model_k and k != model_k:
        commandline.usage_error(command, f"{where} has {k} classes, the model {model_k}")
    state, _ = w.restore(only=("ema",))
    return GuidanceSpec(network_classifier(w.graphdef, w.rest, w.process, state["ema"]), w.process, k)


class ClassifierEval:
    """eval(state) -> {"eval_loss", "eval_accuracy"}: the EMA classifier on one held-out batch, fixed noise."""

    def __init__(self, config, graphdef, rest, process: Process):
        from diffjax import data, trainer

        mesh = trainer.make_mesh(config)
        sharding = trainer.batch_sharding(mesh)
        self.batch = {
            k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in next(data.make_iterator(config, "eval", seed=0)).items()
        }

        def evaluate(weights, batch):
            return classifier_loss(
                network_classifier(graphdef, rest, process, weights), process, batch, jax.random.PRNGKey(0)
            )

        self.evaluate = jax.jit(evaluate)

    def __call__(self, state) -> dict[str, float]:
        from diffjax.sample import host_array

        loss, accuracy = self.evaluate(state["ema"], self.batch)
        return {"eval_loss": float(host_array(loss)), "eval_accuracy": float(host_array(accuracy))}


def add_flags(parser) -> None:
    """--classifier WORKDIR and --classifier_scale S (sample, eval, serve)."""
    parser.add_argument(
        "--classifier",
        default=None,
        help="a classifier workdir (diffjax train with training.loss='classifier', e.g. configs/classifier/): "
        "classifier guidance towards the labels",
    )
    parser.add_argument(
        "--classifier_scale", type=float, default=None, help="classifier guidance scale s (default 1 with --classifier)"
    )


@dataclasses.dataclass(frozen=True)
class Guide:
    """What --classifier / --classifier_scale ask for: guide(denoiser) -> the guided denoiser;
    `num_classes` the classifier's; `protocol` the settings a sample set records."""

    spec: GuidanceSpec
    scale: float
    workdir: str

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return self.spec.wrap(denoiser, self.scale)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def protocol(self) -> dict[str, Any]:
        return {"classifier": self.workdir, "classifier_scale": self.scale}


def from_flags(args, config, command: str, labels=None, *, need_labels: bool = True) -> Guide | None:
    """The guidance that `--classifier` / `--classifier_scale` ask for (None without them); a
    one-line usage error (exit 2) for a bad classifier, scale or labels (`labels` checked when given,
    or required when need_labels)."""
    import math

    if args.classifier is None:
        if args.classifier_scale is not None:
            commandline.usage_error(command, "--classifier_scale needs --classifier WORKDIR")
        return None
    scale = 1.0 if args.classifier_scale is None else float(args.classifier_scale)
    if not math.isfinite(scale):
        commandline.usage_error(command, f"--classifier_scale must be finite, got {scale}")
    spec = load_classifier(args.classifier, config, command=command)
    if labels is not None or need_labels:
        try:
            check_labels(labels, spec.num_classes)
        except ValueError as err:
            commandline.usage_error(command, str(err))
    return Guide(spec, scale, str(args.classifier))
