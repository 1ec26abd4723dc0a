"""The global example order of an input split: a pure function of (seed, global position), the
same on every topology, and cheap to name without reading data.

Position p of a repeated, shuffled split of n examples is example perm_e[p mod n] with e = p // n
and perm_e a permutation of range(n) drawn from (seed, e) (numpy's Generator, seeded through a
SeedSequence): every epoch is a new permutation. A permutation is computed once per epoch (n log n,
milliseconds for 50k examples) and cached, so naming the examples of many global batches is numpy
indexing: `GlobalOrder.indices` costs O(ms) at a global batch of 4096 x 100 steps, where looking
each position up through a grain shuffle cost ~160 us per example (a minute per such log line).
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any, Sequence

import numpy as np

EPOCHS_CACHED = 4


class Order:
    """Source index of every global position: shuffled per epoch (or not), repeated (or one epoch)."""

    def __init__(self, n: int, seed: int, shuffle: bool, repeat: bool):
        self.n, self.seed, self.shuffle, self.repeat = int(n), int(seed), bool(shuffle), bool(repeat)
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize if self.repeat else self.n

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._permutations.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch]))).permutation(self.n)
            else:
                perm = np.arange(self.n)
            if len(self._permutations) >= EPOCHS_CACHED:  # grain threads may race here: harmless, values are pure
                self._permutations.pop(next(iter(self._permutations), epoch), None)
            self._permutations[epoch] = perm
        return perm

    def __getitem__(self, position: int) -> int:
        epoch, i = divmod(int(position), self.n)
        return int(self.permutation(epoch)[i])

    def positions(self, start: int, stop: int) -> np.ndarray:
        """int64 source indices of positions start, ..., stop - 1 (vectorised per epoch)."""
        if not self.repeat and stop > self.n:
            raise IndexError(f"positions up to {stop} of a single epoch of {self.n}")
        parts, p = [], start
        while p < stop:
            epoch, i = divmod(p, self.n)
            take = min(self.n - i, stop - p)
            parts.append(self.permutation(epoch)[i : i + take])
            p += take
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def __getstate__(self) -> dict[str, Any]:  # grain worker processes: no cache in the pickle
        return dict(self.__dict__, _permutations={})


class Ordered:
    """A random-access source read in `order`: position p is source[order[p]] (what grain reads)."""

    def __init__(self, source, order: Order, length: int):
        self.source, self.order, self.length = source, order, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int):
        return self.source[self.order[position]]


def local_rows(global_batch: int, shard_index: int, shard_count: int) -> list[int]:
    """The rows of every global batch that process `shard_index` of `shard_count` reads: a
    contiguous block (the rows a data-parallel mesh puts on its devices)."""
    size = global_batch // shard_count
    return list(range(shard_index * size, (shard_index + 1) * size))


class Rows:
    """Local example m = global position (m // R) * G + rows[m % R] of the ordered dataset (R rows
    of each global batch of G): a process reads its rows of every global batch, nothing else."""

    def __init__(self, ds, rows: list[int], global_batch: int):
        self.ds, self.rows, self.global_batch = ds, rows, global_batch

    def __len__(self) -> int:
        return (len(self.ds) // self.global_batch) * len(self.rows)

    def __getitem__(self, m: int):
        k, j = divmod(m, len(self.rows))
        return self.ds[k * self.global_batch + self.rows[j]]


class GlobalOrder:
    """Which source examples form each global batch: `indices(first, num)` -> (num, global batch)
    int64 source indices of global batches first, ..., first + num - 1 (no data read)."""

    def __init__(self, order: Order, global_batch: int):
        self.order, self.global_batch = order, int(global_batch)

    def indices(self, first_batch: int, num_batches: int) -> np.ndarray:
        start = first_batch * self.global_batch
        return self.order.positions(start, start + num_batches * self.global_batch).reshape(num_batches, self.global_batch)

    def check(self, batch: int, read: np.ndarray, rows: Sequence[int], process: int = 0) -> None:
        """Raise if `read` (a batch's "index", from make_iterator(with_index=True)) is not `rows`
        of global batch `batch`: the order the fingerprints describe is the one read."""
        want = self.indices(batch, 1)[0][np.asarray(rows)]
        if not np.array_equal(np.asarray(read), want):
            raise RuntimeError(
                f"input order mismatch at global batch {batch} on process {process}: read examples "
                f"{np.asarray(read)[:8].tolist()}..., the order says {want[:8].tolist()}..."
            )


def fingerprint(indices: np.ndarray) -> str:
    """A short hash of example indices (e.g. example_indices of the steps since the last log line)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()[:16]
