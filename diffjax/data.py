"""Input pipeline of the trainer: random-access sources + a grain pipeline with exact resume.

Sources (`config.data.dataset`):
  digits                          scikit-learn's 8x8 digits (1797 images, 0..16 -> [0, 1]); 'train' is
                                  the first 1500 images, 'eval' / 'test' the remaining 297; 10 classes.
  eight_gaussians | swiss_roll | two_moons
                                  2-D toy points from `diffjax.toy.sample_dataset` with fixed keys
                                  (65536 train / 4096 eval points); x is (2,), label 0, no scaling.
  folder:/path/to/dir             every .png/.jpg/.jpeg under the dir (recursive, sorted), label 0;
                                  every split is the whole folder.
  any other name                  a TFDS dataset read through `tfds.data_source` (random access over
                                  ArrayRecord files, no TensorFlow needed): cifar10, mnist, celeb_a,
                                  lsun/church_outdoor, ...; `config.data.data_dir` is the TFDS data dir.
                                  Split 'eval' maps to the dataset's 'test' (or 'validation') split.
                                  Prepared once by `diffjax data prepare NAME` (diffjax.data_prepare);
                                  `data.cache_dir` copies the split's shards to local disk first.

Images are center-cropped to a square and resized to `data.image_size` (Pillow, only when the size
differs), checked against `data.num_channels`, scaled to [0, 1], optionally flipped horizontally
(`data.random_flip`) and dequantized ((255 x + U(0, 1)) / 256, `data.uniform_dequantization`, as
score_sde), then mapped to [-1, 1] when `data.centered`.

Pipeline (per process): source in the global order (diffjax.data_order: a new permutation each
epoch for train) -> per-example random_map (flip,
dequantization; randomness is a function of (seed, global position), so it does not depend on the
sharding or the worker count) -> this process's rows of every global batch (default: block i of
shard_count; the trainer passes the rows its devices hold) -> batch(local batch, drop_remainder) ->
iterator (thread prefetch; `worker_count > 0` adds multiprocessing prefetch). Row r of global
batch k is global position k * global_batch + r on every topology, so the processes together
see exactly the global shuffled order, their parts of every epoch are disjoint, and the global
array the trainer assembles is the same array whatever the number of processes.

Resuming. The order is a pure function of (seed, global position), so the trainer needs no iterator
state: step k reads global batch k (`make_iterator(..., start_batch=k)`), on any number of processes,
devices or workers, and `GlobalOrder` names the source examples of any global batch without reading
data (the trainer logs their `fingerprint` in metrics.jsonl). The iterator is also a
`grain.DatasetIterator` with exact `get_state()` / `set_state()` (`iterator_state` /
`restore_iterator`; `checkpoint_save_args` / `checkpoint_restore_args` wrap grain's orbax handler,
one `process_<i>-of-<n>.json` per process) for pipelines that are not positioned by a step.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np

from diffjax import augment, data_order, storage

TOY_DATASETS = ("eight_gaussians", "swiss_roll", "two_moons")
TOY_SIZES = {"train": 65536, "eval": 4096, "test": 4096}
DIGITS_TRAIN = 1500
FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
KNOWN_DATASETS = (
    ("digits",)
    + TOY_DATASETS
    + ("folder:<dir>", "cifar10", "mnist", "fashion_mnist", "celeb_a", "lsun/<category>", "<any TFDS name>")
)
SPLITS = ("train", "eval", "test")


# ---- sources ----------------------------------------------------------------------------------------
class ArraySource:
    """Random-access source over in-memory arrays: element i is {"x": x[i], "label": labels[i]}."""

    def __init__(self, x: np.ndarray, labels: np.ndarray):
        if len(x) != len(labels):
            raise ValueError(f"ArraySource needs as many labels as examples, got {len(labels)} and {len(x)}")
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"ArraySource(n={len(self)}, x={self.x.shape[1:]} {self.x.dtype})"


class IndexedSource:
    """A source whose elements also carry their source index, as "index"."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return dict(self.source[i], index=i)

    def __repr__(self) -> str:
        return f"IndexedSource({self.source!r})"


class TfdsSource:
    """A TFDS data source re-keyed to {"x": image, "label": label or 0}."""

    def __init__(self, source, has_label: bool):
        self.source, self.has_label = source, has_label

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        example = self.source[i]
        return {"x": example["image"], "label": example["label"] if self.has_label else 0}

    def __repr__(self) -> str:
        return f"TfdsSource({self.source!r})"


class FolderSource:
    """Image files loaded with Pillow, converted to 'L' (1 channel) or 'RGB' (3 channels), label 0."""

    def __init__(self, files: list[str], num_channels: int):
        self.files, self.mode = files, {1: "L", 3: "RGB"}[num_channels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with storage.path(self.files[i]).open("rb") as f, Image.open(f) as img:  # local or gs://
            x = np.asarray(img.convert(self.mode), np.uint8)
        return {"x": x[..., None] if x.ndim == 2 else x, "label": 0}

    def __repr__(self) -> str:
        return f"FolderSource(n={len(self)}, mode={self.mode})"


def _dataset_kind(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"data.dataset must be a non-empty string; choose one of {', '.join(KNOWN_DATASETS)}")
    if name == "digits":
        return "digits"
    if name in TOY_DATASETS:
        return "toy"
    if name.startswith(FOLDER_PREFIX):
        return "folder"
    return "tfds"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]  # (1797, 8, 8, 1) in [0, 1]
    return x, d.target.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _toy(name: str, split: str) -> np.ndarray:
    from diffjax import toy

    key = jax.random.PRNGKey(0 if split == "train" else 1)
    return np.asarray(toy.sample_dataset(name, key, TOY_SIZES[split]), np.float32)


def _images_under(folder):
    """Image files under an epath folder, recursively (not rglob: epath refuses recursive globs on gs://)."""
    for entry in folder.iterdir():
        if entry.suffix.lower() in IMAGE_EXTENSIONS:
            yield entry
        elif entry.is_dir():
            yield from _images_under(entry)


def _folder_files(name: str) -> list[str]:
    root = storage.path(name[len(FOLDER_PREFIX) :]).expanduser()
    if not root.is_dir():
        raise ValueError(f"data.dataset={name!r}: {str(root)!r} is not a directory")
    files = sorted(str(p) for p in _images_under(root))
    if not files:
        raise ValueError(f"data.dataset={name!r}: no {'/'.join(IMAGE_EXTENSIONS)} files under {str(root)!r}")
    return files


def _tfds_builder(name: str, data_dir):
    """tfds.builder; an unknown name becomes a ValueError naming data.dataset and the choices."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"unknown data.dataset {name!r} ({first}); choose one of {', '.join(KNOWN_DATASETS)}") from None


def _tfds_split(builder, split: str) -> str:
    """Our split name -> the dataset's: 'train' stays, 'eval'/'test' -> the first held-out split it has."""
    if split == "train":
        return "train"
    available = list(builder.info.splits.keys())
    candidates = (split, "test", "validation", "eval") if split == "eval" else (split, "validation", "eval")
    for cand in candidates:
        if cand in available:
            return cand
    return "test"  # no split metadata (e.g. under tfds.testing.mock_data): the usual held-out name


def _tfds_image_feature(builder):
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"TFDS dataset {builder.name!r} has no 'image' feature (features: {list(features)})")
    return features["image"], ("label" in features)


def _source(config, split: str):
    """(random-access source, kind) for `split`."""
    _check_split(split)
    name = config.data.dataset
    kind = _dataset_kind(name)
    if kind == "digits":
        x, y = _digits()
        sl = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
        return ArraySource(x[sl], y[sl]), kind
    if kind == "toy":
        x = _toy(name, split)
        return ArraySource(x, np.zeros(len(x), np.int32)), kind
    if kind == "folder":
        return FolderSource(_folder_files(name), _num_channels(config)), kind
    import tensorflow_datasets as tfds

    data_dir = config.data.get("data_dir")
    builder = _tfds_builder(name, data_dir)
    image, has_label = _tfds_image_feature(builder)
    channels = image.shape[-1] if image.shape and image.shape[-1] is not None else None
    if channels is not None and channels != _num_channels(config):
        raise ValueError(
            f"TFDS dataset {name!r} has {channels}-channel images but data.num_channels is {config.data.num_channels}"
        )
    tfds_split = _tfds_split(builder, split)
    if config.data.get("cache_dir"):  # read a local copy of the split's shards (diffjax.data_prepare)
        from diffjax import data_prepare

        check_array_record(builder, name)
        data_dir = data_prepare.cached_data_dir(builder, tfds_split, config.data.cache_dir)
    try:  # download=False: a worker never downloads (every host of a pod would start the same download)
        source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
    except (AssertionError, NotImplementedError, FileNotFoundError):
        check_array_record(builder, name)  # says what to run
        raise
    return TfdsSource(source, has_label), kind


def check_array_record(builder, name: str) -> None:
    """A ValueError saying what to run unless the dataset is prepared in ArrayRecord, the only
    format tfds.data_source (random access) reads."""
    root = builder._data_dir_root
    if not builder.is_prepared():
        tfds_build = f"`tfds build {name} --data_dir={root} --file_format=array_record`, whose CLI needs Apache Beam"
        raise ValueError(
            f"data.dataset={name!r} is not prepared in {builder.data_dir}; prepare it once, on one host, with "
            f"`diffjax data prepare {name} --data_dir {root}`"
            + ("" if storage.is_remote(root) else f" (or {tfds_build})")  # ArrayRecord's writer writes no gs://
            + "; workers never download"
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise ValueError(
            f"data.dataset={name!r} in {builder.data_dir} is prepared as {'/'.join(sorted(formats))}, but random "
            f"access needs ArrayRecord: convert it once, on one host, with `diffjax data prepare {name} --data_dir "
            f"{root}` (not `tfds convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record`: TFDS's own builders ignore the alternative format it adds)"
        )


def _num_channels(config) -> int:
    c = config.data.num_channels
    if c not in (1, 3):
        raise ValueError(f"data.num_channels must be 1 or 3, got {c}")
    return c


# ---- per-example processing -------------------------------------------------------------------------
def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crop an HWC image to a square and resize it to (size, size) with Pillow (bicubic,
    antialiased when shrinking); returns the input unchanged when it already is (size, size)."""
    from PIL import Image

    h, w = image.shape[:2]
    if h == w == size:
        return image
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[top : top + s, left : left + s]
    if s == size:
        return image
    resample = Image.Resampling.BICUBIC
    if image.dtype == np.uint8:
        img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out = np.asarray(img.resize((size, size), resample))
        return out[..., None] if out.ndim == 2 else out
    # float images (digits): resize each channel in Pillow's 32-bit float mode 'F'
    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F").resize((size, size), resample))
        for c in range(image.shape[-1])
    ]
    return np.clip(np.stack(chans, -1), 0.0, 1.0)


def _image_to_unit(image: np.ndarray, size: int, channels: int, name: str) -> np.ndarray:
    """HWC (or HW) image -> float32 (size, size, channels) in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != channels:
        raise ValueError(f"data.dataset={name!r} gives images of shape {image.shape} but data.num_channels is {channels}")
    image = center_crop_resize(image, size)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32)


class _Preprocess:
    """Deterministic part: decode/crop/resize/check, to float32 in [0, 1]; label to int32."""

    def __init__(self, kind: str, size: int, channels: int, name: str):
        self.kind, self.size, self.channels, self.name = kind, size, channels, name

    def __call__(self, example):
        if self.kind == "toy":
            x = np.asarray(example["x"], np.float32)
        else:
            x = _image_to_unit(example["x"], self.size, self.channels, self.name)
        out = {"x": x, "label": np.int32(example["label"])}
        if "index" in example:
            out["index"] = np.int64(example["index"])
        return out


class _Augment:
    """Random part (rng is grain's per-position generator): flip, dequantization, centering, then
    EDM's geometric augmentation with its labels under "augment" when edm_p > 0 (diffjax.augment)."""

    def __init__(self, image: bool, random_flip: bool, dequantize: bool, centered: bool, edm_p: float = 0.0):
        self.image, self.random_flip, self.dequantize, self.centered = image, random_flip, dequantize, centered
        self.edm_p = edm_p

    def __call__(self, example, rng: np.random.Generator):
        x = example["x"]
        if self.image:
            if self.random_flip and rng.random() < 0.5:
                x = x[:, ::-1]
            if self.dequantize:
                x = (x * 255.0 + rng.random(x.shape, dtype=np.float32)) / 256.0
            if self.centered:
                x = x * 2.0 - 1.0
        out = {k: example[k] for k in ("label", "index") if k in example}
        if self.edm_p > 0:
            x, out["augment"] = augment.augment(np.asarray(x, np.float32), rng, self.edm_p)
        return {"x": np.ascontiguousarray(x, np.float32), **out}


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream]).generate_state(1)[0] >> 1)


# ---- pipeline ---------------------------------------------------------------------------------------
def make_dataset(
    config,
    split: str = "train",
    *,
    seed: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    shuffle: bool | None = None,
    repeat: bool | None = None,
    start_batch: int = 0,
    with_index: bool = False,
    rows: Sequence[int] | None = None,
) -> grain.MapDataset:
    """The batched per-process grain MapDataset behind `make_iterator` (same arguments)."""
    _check_split(split)
    batch_field = "training.batch_size" if split == "train" else "eval.batch_size"
    global_batch = int(config.training.batch_size if split == "train" else config.eval.batch_size)
    if shard_index is None:
        shard_index = jax.process_index()
    if shard_count is None:
        shard_count = jax.process_count()
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")
    if global_batch < 1 or global_batch % shard_count:
        raise ValueError(
            f"{batch_field} ({global_batch}) must be a positive multiple of the process count "
            f"({shard_count}); it is the global batch, split evenly over processes"
        )
    local_batch = global_batch // shard_count
    seed = int(config.seed if seed is None else seed)
    shuffle = (split == "train") if shuffle is None else bool(shuffle)
    repeat = (split == "train") if repeat is None else bool(repeat)

    name = config.data.dataset
    source, kind = _source(config, split)
    size, channels = (0, 0) if kind == "toy" else (int(config.data.image_size), _num_channels(config))
    if kind == "digits" and channels != 1:
        raise ValueError(f"data.dataset='digits' has 1-channel images but data.num_channels is {channels}")
    n = len(source)
    if not repeat and n < global_batch:
        raise ValueError(
            f"{batch_field} ({global_batch}) exceeds the {n} examples of data.dataset={name!r} "
            f"split {split!r}; no full batch could be formed"
        )

    ds = _global_order(IndexedSource(source) if with_index else source, seed, shuffle, repeat, global_batch)
    ds = ds.map(_Preprocess(kind, size, channels, name))
    data = config.data
    edm_p = float(data.get("augment_p", 0.0))
    if not 0.0 <= edm_p <= 1.0:
        raise ValueError(f"data.augment_p must be in [0, 1] (EDM's augmentation probability), got {edm_p}")
    if edm_p > 0 and kind == "toy":
        raise ValueError(f"data.augment_p > 0 needs image data; data.dataset={name!r} is a 2-D toy set")
    randomise = _Augment(
        kind != "toy",
        bool(data.random_flip),
        bool(data.uniform_dequantization),
        bool(data.centered),
        edm_p if split == "train" else 0.0,
    )
    ds = ds.random_map(randomise, seed=_derived_seed(seed, 1))
    rows = data_order.local_rows(global_batch, shard_index, shard_count) if rows is None else [int(r) for r in rows]
    if len(rows) != local_batch or not all(0 <= r < global_batch for r in rows):
        raise ValueError(f"rows must be {local_batch} rows of the global batch of {global_batch}, got {rows[:8]}...")
    if rows != list(range(global_batch)):
        ds = grain.MapDataset.source(data_order.Rows(ds, rows, global_batch))
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds[start_batch:] if start_batch else ds


def _global_order(source, seed: int, shuffle: bool, repeat: bool, global_batch: int) -> grain.MapDataset:
    """The source in the global example order (diffjax.data_order): a pure function of (seed,
    position), whatever the topology; one epoch is cut to whole global batches."""
    order = _order(len(source), seed, shuffle, repeat)
    length = len(order) if repeat else (len(source) // global_batch) * global_batch  # same batch count everywhere
    return grain.MapDataset.source(data_order.Ordered(source, order, length))


def _order(n: int, seed: int, shuffle: bool, repeat: bool) -> data_order.Order:
    return data_order.Order(n, _derived_seed(seed, 0), shuffle, repeat)


def GlobalOrder(config, split: str = "train", seed: int | None = None) -> data_order.GlobalOrder:
    """Which source examples form each global batch of `split` (data_order.GlobalOrder)."""
    global_batch = int(config.training.batch_size if split == "train" else config.eval.batch_size)
    n = len(_source(config, split)[0])
    order = _order(n, int(config.seed if seed is None else seed), shuffle=split == "train", repeat=split == "train")
    return data_order.GlobalOrder(order, global_batch)


fingerprint = data_order.fingerprint
local_rows = data_order.local_rows


def make_iterator(
    config,
    split: str = "train",
    *,
    seed: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    shuffle: bool | None = None,
    repeat: bool | None = None,
    num_threads: int | None = None,
    prefetch_batches: int | None = None,
    start_batch: int = 0,
    with_index: bool = False,
    rows: Sequence[int] | None = None,
) -> grain.DatasetIterator:
    """Iterator over this process's batches {"x": float32 (B, H, W, C) or (B, 2), "label": int32 (B,)},
    plus "augment": float32 (B, 9), EDM's augmentation labels, for 'train' when data.augment_p > 0.

    B = global batch / shard_count (training.batch_size for 'train', eval.batch_size otherwise);
    shard_index / shard_count default to jax.process_index() / jax.process_count(). 'train' is shuffled
    with `seed` (default config.seed) and repeats forever; other splits are one ordered pass unless asked.
    `worker_count > 0` reads in that many worker processes (same batches, same order).
    `start_batch` = k starts at global batch k: the trainer resumes step k there, on any topology.
    `with_index` adds "index": int64 (B,), each example's source index (see GlobalOrder).
    `rows`: which rows of every global batch this process reads (default: block shard_index of
    shard_count, `local_rows`); the trainer passes the rows its devices hold in the batch sharding.
    The iterator supports exact `get_state()` / `set_state()`.
    """
    ds = make_dataset(
        config,
        split,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        shuffle=shuffle,
        repeat=repeat,
        start_batch=start_batch,
        with_index=with_index,
        rows=rows,
    )
    if num_threads is None:
        num_threads = max(1, min(8, os.cpu_count() or 1))
    if prefetch_batches is None:
        prefetch_batches = 2 * num_threads
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        _absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
    return iter(it_ds)


def _absl_flags_parsed() -> None:
    """grain 0.2.18's multiprocess prefetch reads an absl flag (worker profiling) and raises
    UnparsedFlagAccessError in programs that do not parse absl flags (google/grain#1355); the
    documented workaround is to mark the flags parsed, which leaves every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ---- checkpointing ----------------------------------------------------------------------------------
def iterator_state(it) -> dict:
    """The iterator's exact position (a JSON-serializable dict; `json.dumps` it for bytes)."""
    return json.loads(json.dumps(it.get_state()))


def restore_iterator(it, state) -> Any:
    """Put `it` back at `state` (a dict from `iterator_state`, or its JSON as str/bytes); returns `it`."""
    if isinstance(state, (bytes, bytearray)):
        state = state.decode()
    if isinstance(state, str):
        state = json.loads(state)
    it.set_state(state)
    return it


def checkpoint_save_args(it):
    """orbax args saving `it` with grain's handler (one process_<i>-of-<n>.json per process)."""
    return grain.checkpoint.CheckpointSave(it)


def checkpoint_restore_args(it):
    """orbax args restoring `it` in place from this process's process_<i>-of-<n>.json."""
    return grain.checkpoint.CheckpointRestore(it)


# ---- info -------------------------------------------------------------------------------------------
def dataset_info(config) -> dict:
    """dict(shape=(H, W, C) or (2,), num_classes=int, num_examples={split: n}) for `config.data`."""
    name = config.data.dataset
    kind = _dataset_kind(name)
    size = int(config.data.image_size)
    if kind == "toy":
        return dict(shape=(2,), num_classes=0, num_examples=dict(TOY_SIZES))
    channels = _num_channels(config)
    shape = (size, size, channels)
    if kind == "digits":
        n = len(_digits()[0])
        return dict(
            shape=shape,
            num_classes=10,
            num_examples={"train": DIGITS_TRAIN, "eval": n - DIGITS_TRAIN, "test": n - DIGITS_TRAIN},
        )
    if kind == "folder":
        n = len(_folder_files(name))
        return dict(shape=shape, num_classes=0, num_examples={s: n for s in SPLITS})
    data_dir = config.data.get("data_dir")
    builder = _tfds_builder(name, data_dir)
    features = builder.info.features
    label = features["label"] if "label" in features else None
    num_classes = int(getattr(label, "num_classes", 0) or 0)
    splits = builder.info.splits
    num_examples = {}
    for split in SPLITS:
        tfds_split = _tfds_split(builder, split)
        if tfds_split in splits:
            num_examples[split] = int(splits[tfds_split].num_examples)
        else:  # no split metadata: open the data source (cheap: reads only the file index)
            try:
                import tensorflow_datasets as tfds

                num_examples[split] = len(tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False))
            except Exception:  # split absent or data not prepared
                pass
    return dict(shape=shape, num_classes=num_classes, num_examples=num_examples)
