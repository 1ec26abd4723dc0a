"""The grain input pipeline: sources, batching, sharding, augmentation, exact resume, errors."""

import hashlib
import json

import numpy as np
import pytest

from configs import digits
from diffjax import data


def digits_config(batch_size=64, **data_fields):
    config = digits.get_config()
    config.training.batch_size = batch_size
    config.eval.batch_size = batch_size
    for k, v in data_fields.items():
        config.data[k] = v
    return config


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def row_hashes(x):
    return [hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest() for r in x]


# ---- digits -------------------------------------------------------------------------------------------
def test_digits_batches_shapes_range_labels():
    it = data.make_iterator(digits_config(64), "train")
    batches = take(it, 4)
    for b in batches:
        assert set(b) == {"x", "label"}
        assert b["x"].shape == (64, 8, 8, 1) and b["x"].dtype == np.float32
        assert b["label"].shape == (64,) and b["label"].dtype == np.int32
        assert b["label"].min() >= 0 and b["label"].max() <= 9
    x = np.concatenate([b["x"] for b in batches])
    assert x.min() == -1.0 and x.max() == 1.0  # centered, and the range is used
    labels = np.concatenate([b["label"] for b in batches])
    assert len(np.unique(labels)) == 10


def test_digits_uncentered_range_and_eval_split_is_ordered():
    config = digits_config(100, centered=False)
    batches = list(data.make_iterator(config, "eval"))  # one ordered pass, remainder dropped
    assert len(batches) == 297 // 100
    from sklearn.datasets import load_digits

    d = load_digits()
    np.testing.assert_array_equal(batches[0]["x"][..., 0], d.images[1500:1600].astype(np.float32) / 16)
    np.testing.assert_array_equal(batches[1]["label"], d.target[1600:1700])
    assert batches[0]["x"].min() == 0.0 and batches[0]["x"].max() == 1.0


def test_same_seed_same_batches_different_seed_differs():
    config = digits_config(32)
    a = take(data.make_iterator(config, "train"), 3)
    b = take(data.make_iterator(config, "train"), 3)
    assert_batches_equal(a, b)
    c = take(data.make_iterator(config, "train", seed=config.seed + 1), 3)
    assert not np.array_equal(a[0]["x"], c[0]["x"])


def test_epochs_are_reshuffled_permutations():
    config = digits_config(100)  # 1500 train images: 15 batches an epoch
    it = data.make_iterator(config, "train")
    e0 = np.concatenate([b["x"] for b in take(it, 15)])
    e1 = np.concatenate([b["x"] for b in take(it, 15)])
    assert sorted(row_hashes(e0)) == sorted(row_hashes(e1))  # each epoch sees every example once
    assert not np.array_equal(e0, e1)  # in a new order


# ---- sharding -----------------------------------------------------------------------------------------
def test_shards_partition_the_global_batches():
    config = digits_config(100)
    full = take(data.make_iterator(config, "train", shard_index=0, shard_count=1), 15)
    s0 = take(data.make_iterator(config, "train", shard_index=0, shard_count=2), 15)
    s1 = take(data.make_iterator(config, "train", shard_index=1, shard_count=2), 15)
    for f, a, b in zip(full, s0, s1):
        assert a["x"].shape == b["x"].shape == (50, 8, 8, 1)
        # process i's local batch is block i of the global batch (the rows its devices hold)
        np.testing.assert_array_equal(a["x"], f["x"][:50])
        np.testing.assert_array_equal(b["x"], f["x"][50:])
        np.testing.assert_array_equal(a["label"], f["label"][:50])
    # one epoch (15 global batches): the shards are disjoint and together cover the epoch
    h0 = set(row_hashes(np.concatenate([b["x"] for b in s0])))
    h1 = set(row_hashes(np.concatenate([b["x"] for b in s1])))
    epoch = set(row_hashes(np.concatenate([b["x"] for b in full])))
    n_distinct = len(set(row_hashes(data.make_dataset(digits_config(1500), "train", shard_count=1, shard_index=0)[0]["x"])))
    assert len(epoch) == n_distinct  # the global order is a permutation of the train images
    assert not h0 & h1 and h0 | h1 == epoch


def test_start_batch_and_indices_follow_the_global_order_on_any_shard_count():
    """Global batch k is the same examples, with the same augmentation draws, whether read from the
    start or from start_batch=k, by 1, 2 or 4 processes (across an epoch boundary: 15 batches of
    100 per epoch); "index" names them and GlobalOrder gives them without reading data."""
    config = digits_config(100, random_flip=True, uniform_dequantization=True)
    order = data.GlobalOrder(config)
    full = take(data.make_iterator(config, "train", shard_index=0, shard_count=1, with_index=True), 18)
    np.testing.assert_array_equal(np.stack([b["index"] for b in full]), order.indices(0, 18))
    assert sorted(order.indices(0, 15).ravel()) == list(range(1500))  # one epoch: a permutation
    for count in (1, 2, 4):
        for i in range(count):
            it = data.make_iterator(config, "train", shard_index=i, shard_count=count, start_batch=13, with_index=True)
            rows = data.local_rows(100, i, count)
            for k, b in zip(range(13, 18), take(it, 5)):
                order.check(k, b["index"], rows)
                np.testing.assert_array_equal(b["x"], full[k]["x"][rows])
    # any rows (a mesh whose devices interleave processes): row r is still global position k G + r
    rows = list(range(1, 100, 4)) + list(range(3, 100, 4))
    it = data.make_iterator(config, "train", start_batch=2, with_index=True, rows=rows, shard_index=0, shard_count=2)
    for k, b in zip(range(2, 4), take(it, 2)):
        order.check(k, b["index"], rows)
        np.testing.assert_array_equal(b["x"], full[k]["x"][rows])
    with pytest.raises(RuntimeError, match="input order mismatch at global batch 14"):
        order.check(14, full[13]["index"], range(100))
    assert data.fingerprint(order.indices(3, 2)) != data.fingerprint(order.indices(4, 2))


def test_default_shards_from_jax_process():
    it = data.make_iterator(digits_config(64), "train")  # single process: the whole global batch
    assert next(it)["x"].shape[0] == 64


# ---- exact resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("random_flip", [False, True])
def test_exact_resume_from_state(random_flip):
    config = digits_config(48, random_flip=random_flip, uniform_dequantization=True)
    it = data.make_iterator(config, "train")
    take(it, 5)
    state = data.iterator_state(it)
    json.dumps(state)  # JSON-serializable
    a = take(it, 3)
    it2 = data.make_iterator(config, "train")
    data.restore_iterator(it2, json.dumps(state).encode())  # bytes work too
    assert_batches_equal(a, take(it2, 3))


def test_exact_resume_through_orbax_checkpoint_manager(tmp_path):
    import orbax.checkpoint as ocp

    config = digits_config(32, random_flip=True)
    it = data.make_iterator(config, "train")
    take(it, 5)
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(params), data=data.checkpoint_save_args(it)))
        mngr.wait_until_finished()
    a = take(it, 3)
    assert (tmp_path / "ckpt" / "5" / "data" / "process_0-of-1.json").exists()

    it2 = data.make_iterator(config, "train")
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 5
        restored = mngr.restore(
            5, args=ocp.args.Composite(state=ocp.args.StandardRestore(params), data=data.checkpoint_restore_args(it2))
        )
    np.testing.assert_array_equal(restored.state["w"], params["w"])
    assert_batches_equal(a, take(it2, 3))


def test_worker_processes_give_the_same_batches_and_resume():
    config = digits_config(100)
    plain = take(data.make_iterator(config, "train"), 6)
    it = data.make_iterator(config, "train", worker_count=2)
    assert_batches_equal(plain, take(it, 6))
    state = data.iterator_state(it)
    a = take(it, 2)
    it2 = data.make_iterator(config, "train", worker_count=2)
    data.restore_iterator(it2, state)
    assert_batches_equal(a, take(it2, 2))


# ---- augmentation -------------------------------------------------------------------------------------
def test_random_flip_mirrors_some_images():
    plain = take(data.make_iterator(digits_config(100, random_flip=False), "train"), 3)
    flipped = take(data.make_iterator(digits_config(100, random_flip=True), "train"), 3)
    x0 = np.concatenate([b["x"] for b in plain])
    x1 = np.concatenate([b["x"] for b in flipped])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in plain]), np.concatenate([b["label"] for b in flipped]))
    same = np.array([np.array_equal(a, b) for a, b in zip(x0, x1)])
    mirrored = np.array([np.array_equal(a[:, ::-1], b) for a, b in zip(x0, x1)])
    assert (same | mirrored).all()
    assert (mirrored & ~same).sum() > 50 and (same & ~mirrored).sum() > 50


def test_uniform_dequantization_is_small_and_not_identity():
    base = digits_config(100, centered=False)
    dq = digits_config(100, centered=False, uniform_dequantization=True)
    x0 = np.concatenate([b["x"] for b in take(data.make_iterator(base, "train"), 2)])
    x1 = np.concatenate([b["x"] for b in take(data.make_iterator(dq, "train"), 2)])
    diff = np.abs(x1 - x0)
    assert diff.max() < 1 / 256 and (diff > 0).mean() > 0.9
    assert x1.min() >= 0.0 and x1.max() <= 1.0
    # centered: the same noise in [-1, 1] coordinates
    dqc = digits_config(100, centered=True, uniform_dequantization=True)
    x2 = np.concatenate([b["x"] for b in take(data.make_iterator(dqc, "train"), 2)])
    np.testing.assert_allclose(x2, 2 * x1 - 1, atol=1e-6)


# ---- other sources ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["eight_gaussians", "swiss_roll", "two_moons"])
def test_toy_datasets(name):
    config = digits_config(256, dataset=name)
    b = next(data.make_iterator(config, "train"))
    assert b["x"].shape == (256, 2) and b["x"].dtype == np.float32
    assert np.isfinite(b["x"]).all() and np.abs(b["x"]).max() > 1.0  # not rescaled
    assert (b["label"] == 0).all()
    info = data.dataset_info(config)
    assert info["shape"] == (2,) and info["num_classes"] == 0 and info["num_examples"]["train"] == 65536


def test_tfds_cifar10_through_data_source_without_tensorflow():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = digits_config(8, dataset="cifar10", image_size=32, num_channels=3, random_flip=True)
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        b = take(data.make_iterator(config, "train"), 4)  # wraps around the 24 examples
        ev = list(data.make_iterator(config, "eval"))  # eval -> cifar10 'test'
        info = data.dataset_info(config)
        config.data.image_size = 16  # resized
        small = next(data.make_iterator(config, "train"))
        config.data.num_channels = 1
        with pytest.raises(ValueError, match="num_channels"):
            data.make_iterator(config, "train")
    x = np.concatenate([t["x"] for t in b])
    assert x.shape == (32, 32, 32, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    labels = np.concatenate([t["label"] for t in b])
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() <= 9
    assert len(ev) == 3 and ev[0]["x"].shape == (8, 32, 32, 3)
    assert small["x"].shape == (8, 16, 16, 3)
    assert info["shape"] == (32, 32, 3) and info["num_classes"] == 10
    assert info["num_examples"]["train"] == 24 and info["num_examples"]["eval"] == 24


def test_folder_source_resizes_and_converts(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for i in range(6):
        img = Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8))
        img.save(tmp_path / ("sub" if i % 2 else ".") / f"img{i}.{'png' if i < 4 else 'jpg'}")
    (tmp_path / "notes.txt").write_text("not an image")
    config = digits_config(4, dataset=f"folder:{tmp_path}", image_size=8, num_channels=3, centered=False)
    b = next(data.make_iterator(config, "train"))
    assert b["x"].shape == (4, 8, 8, 3) and b["x"].dtype == np.float32
    assert 0.0 <= b["x"].min() and b["x"].max() <= 1.0 and (b["label"] == 0).all()
    assert data.dataset_info(config) == dict(shape=(8, 8, 3), num_classes=0, num_examples={"train": 6, "eval": 6, "test": 6})
    config.data.num_channels = 1
    assert next(data.make_iterator(config, "eval"))["x"].shape == (4, 8, 8, 1)


def test_center_crop_resize():
    img = np.arange(20 * 12 * 3, dtype=np.uint8).reshape(20, 12, 3)
    out = data.center_crop_resize(img, 6)
    assert out.shape == (6, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(data.center_crop_resize(img, 12), img[4:16])  # crop only
    square = img[:12]
    assert data.center_crop_resize(square, 12) is square  # already the right size: untouched
    # float images (digits) resize in Pillow's float mode
    b = next(data.make_iterator(digits_config(16, image_size=16, centered=False), "train"))
    assert b["x"].shape == (16, 16, 16, 1) and b["x"].dtype == np.float32
    assert 0.0 <= b["x"].min() and b["x"].max() <= 1.0


def test_digits_info():
    info = data.dataset_info(digits_config())
    assert info == dict(shape=(8, 8, 1), num_classes=10, num_examples={"train": 1500, "eval": 297, "test": 297})


# ---- errors -------------------------------------------------------------------------------------------
def test_unknown_dataset_names_the_field_and_choices():
    with pytest.raises(ValueError, match=r"data\.dataset") as e:
        data.make_iterator(digits_config(dataset="definitely_not_a_dataset"), "train")
    for choice in ("digits", "two_moons", "folder:", "cifar10"):
        assert choice in str(e.value)


def test_batch_not_divisible_by_process_count():
    with pytest.raises(ValueError, match=r"training\.batch_size.*process count \(3\)"):
        data.make_iterator(digits_config(64), "train", shard_index=0, shard_count=3)


def test_channel_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="num_channels"):
        data.make_iterator(digits_config(64, num_channels=3), "train")


def test_missing_folder_and_unknown_split():
    with pytest.raises(ValueError, match="not a directory"):
        data.make_iterator(digits_config(dataset="folder:/nonexistent/dir"), "train")
    with pytest.raises(ValueError, match="split"):
        data.make_iterator(digits_config(), "validation")


def test_tfds_not_prepared_or_tfrecord_says_what_to_run(tmp_path):
    """Workers never download (download=False); a TFRecord-only dataset (what `tfds build` writes by
    default) gets one line saying how to convert it to ArrayRecord, the format random access reads."""
    config = digits_config(8, dataset="mnist", image_size=28, num_channels=1)
    config.data.data_dir = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"not prepared in .*tfds build mnist --data_dir=.*--file_format=array_record"):
        data.make_iterator(config, "train")
    version_dir = tmp_path / "tfr" / "mnist" / "3.0.1"
    version_dir.mkdir(parents=True)
    split = {"name": "train", "numBytes": "10", "shardLengths": ["5"]}
    info = {"name": "mnist", "version": "3.0.1", "fileFormat": "tfrecord", "splits": [split]}
    (version_dir / "dataset_info.json").write_text(json.dumps(info))
    config.data.data_dir = str(tmp_path / "tfr")
    with pytest.raises(ValueError, match=r"prepared as tfrecord.*tfds convert_format --dataset_version_dir=.*array_record"):
        data.make_iterator(config, "train")
    assert not (tmp_path / "empty" / "downloads").exists()  # nothing was downloaded
