"""Train the digits classifier behind digits-FID and the classifier score (diffjax.evaluation.digits).

Trains on the digits 'train' split (first 1,500 images) with Adam, small random shifts as
augmentation, and writes the weights (float32 .npz, ~150 KB) that ship in the package. Prints the
held-out accuracy. Deterministic on a given JAX version and CPU.

    python tools/train_digits_classifier.py [--out diffjax/evaluation/digits_classifier.npz] [--epochs 60]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from diffjax.evaluation import digits  # noqa: E402


def shift(key, x):
    """Each image moved by -1..1 pixels in each direction (zero fill)."""
    dy, dx = jax.random.randint(key, (2,), -1, 2)
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
    return jax.lax.dynamic_slice(padded, (1 + dy, 1 + dx, 0), x.shape)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=digits.WEIGHTS)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x, y = digits.real_digits("train")
    x_eval, y_eval = digits.real_digits("eval")
    tx = optax.adamw(2e-3, weight_decay=1e-4)
    params = digits.init(jax.random.key(args.seed))
    opt_state = tx.init(params)

    def loss_fn(params, xb, yb):
        _, logits = digits.apply(params, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def epoch(params, opt_state, key):
        k_perm, k_aug = jax.random.split(key)
        perm = jax.random.permutation(k_perm, len(x))[: len(x) // args.batch * args.batch]
        xs = jax.vmap(shift)(jax.random.split(k_aug, len(x)), jnp.asarray(x))[perm].reshape(-1, args.batch, 8, 8, 1)
        ys = jnp.asarray(y)[perm].reshape(-1, args.batch)

        def step(carry, batch):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (xs, ys))
        return params, opt_state, losses.mean()

    key = jax.random.key(args.seed + 1)
    for e in range(args.epochs):
        params, opt_state, loss = epoch(params, opt_state, jax.random.fold_in(key, e))
    acc = lambda xs, ys: float(np.mean(np.argmax(digits.features(xs, params)[1], -1) == ys))  # noqa: E731
    print(f"final train loss {float(loss):.4f}; accuracy: train {acc(x, y):.4f}, held-out {acc(x_eval, y_eval):.4f}")
    np.savez(args.out, **{k: np.asarray(v, np.float32) for k, v in params.items()})
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
