"""`diffjax data prepare` (TFDS -> ArrayRecord, the one step that downloads) and `data.cache_dir` (each
host's local copy of the shards it reads), on a tiny builder defined here that generates its
images locally: no network, no TensorFlow (its images are PNG bytes encoded with Pillow)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import digits
from diffjax import data, data_prepare

NAME = "diffjax_tiny_images"
VERSION = "1.0.0"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class DiffjaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """24 train / 8 test random 8x8 RGB images, labels 0..2 (registered as diffjax_tiny_images)."""

    VERSION = tfds.core.Version(VERSION)

    def _info(self):
        features = {"image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24, 0), "test": self._generate_examples(8, 1)}

    def _generate_examples(self, n, seed):
        from PIL import Image

        rng = np.random.default_rng(seed)
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, "PNG")
            yield i, {"image": png.getvalue(), "label": i % 3}


class DiffjaxTinyNumpyImages(DiffjaxTinyImages):
    """The same images as NumPy arrays, which TFDS encodes with TensorFlow (as cifar10's builder)."""

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i % 3}


def _has_tensorflow() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _config(data_dir, **fields):
    config = digits.get_config()
    config.training.batch_size = config.eval.batch_size = 4
    config.data.dataset, config.data.image_size, config.data.num_channels = NAME, 8, 3
    config.data.data_dir = str(data_dir)
    for k, v in fields.items():
        config.data[k] = v
    return config


def _read(config, split="eval"):
    return [b["x"] for b in data.make_iterator(config, split)]


def _prepare(*argv):
    return data_prepare.main(["prepare", NAME, *argv])


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _one_line_exit_2(capsys, call, after_progress=False):
    """The one stderr line of a usage error (after TFDS's progress bars, if it got that far)."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and (after_progress or len(err.splitlines()) == 1), err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny dataset prepared once by `diffjax data prepare` (in-process)."""
    root = tmp_path_factory.mktemp("tfds")
    assert _prepare("--data_dir", str(root)) == 0
    return root


def test_prepare_writes_array_record_that_the_reader_reads(prepared, capsys):
    names = _files(prepared / NAME / VERSION)
    assert f"{NAME}-train.array_record-00000-of-00001" in names and f"{NAME}-test.array_record-00000-of-00001" in names
    assert not [n for n in names if "tfrecord" in n]
    batches = _read(_config(prepared))
    assert len(batches) == 2 and batches[0].shape == (4, 8, 8, 3)  # the 8 test images
    assert data.dataset_info(_config(prepared))["num_examples"] == {"train": 24, "eval": 8, "test": 8}
    assert _prepare("--data_dir", str(prepared)) == 0  # a second run finds it prepared: nothing to do
    assert "already prepared diffjax_tiny_images 1.0.0 as ArrayRecord" in capsys.readouterr().out


def test_command_line_imports_the_builder(tmp_path):
    """`diffjax data prepare NAME --imports MODULE` (as `tfds build --imports`), in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "diffjax", "data", "prepare", NAME, "--data_dir", str(tmp_path)]
    run = subprocess.run([*argv, "--imports", "test_data_prepare"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (
        f"prepared {NAME} {VERSION} as ArrayRecord in {tmp_path}/{NAME}/{VERSION} (train 24, test 8 examples)" in run.stdout
    )
    bad = subprocess.run([*argv, "--imports", "no_such_module_xyz"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "diffjax data prepare: --imports no_such_module_xyz: ModuleNotFoundError: No module named 'no_such_module_xyz'"
    ]


def test_unknown_name_and_command_are_one_line(tmp_path, capsys):
    err = _one_line_exit_2(
        capsys, lambda: data_prepare.main(["prepare", "no_such_dataset_xyz", "--data_dir", str(tmp_path)])
    )
    assert (
        err.startswith("diffjax data prepare: NAME 'no_such_dataset_xyz' is not a TFDS dataset")
        and "tfds.list_builders()" in err
    )
    assert not (tmp_path / "downloads").exists()
    err = _one_line_exit_2(capsys, lambda: data_prepare.main(["fetch", NAME]))
    assert err == "diffjax data: unknown command 'fetch'; choose prepare (diffjax data --help)"
    _one_line_exit_2(capsys, lambda: data_prepare.main(["prepare"]))  # NAME missing


def test_building_numpy_images_without_tensorflow_is_one_line(tmp_path, capsys):
    argv = ["prepare", "diffjax_tiny_numpy_images", "--data_dir", str(tmp_path)]
    if _has_tensorflow():
        assert data_prepare.main(argv) == 0
    else:
        err = _one_line_exit_2(capsys, lambda: data_prepare.main(argv), after_progress=True)
        assert "needs TensorFlow, which is not installed: `pip install tensorflow-cpu`" in err
        assert not (tmp_path / "diffjax_tiny_numpy_images" / VERSION).exists()


def test_catalogue_builders_resolve_their_code_without_the_importlib_resources_backport():
    """TFDS 4.9 asks the `importlib_resources` backport for the code of its own builders (cifar10 &
    co.) when preparing them; data_prepare stands in the standard library's importlib.resources."""
    assert data_prepare._tfds().testing.DummyMnist.code_path.name == "test_utils.py"


def _as_tfrecord_only(version_dir):
    """Relabel a prepared copy as TFRecord-only (what `tfds build` writes by default): its metadata
    says tfrecord and its shards carry that name (never read: converting needs TensorFlow first)."""
    info = json.loads((version_dir / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (version_dir / "dataset_info.json").write_text(json.dumps(info))
    for f in version_dir.glob("*.array_record-*"):
        f.rename(version_dir / f.name.replace("array_record", "tfrecord"))


def test_unprepared_and_tfrecord_only_errors_name_the_command(prepared, tmp_path, capsys):
    with pytest.raises(ValueError, match=rf"not prepared in .*`diffjax data prepare {NAME} --data_dir {tmp_path}`"):
        data.make_iterator(_config(tmp_path), "train")
    assert not (tmp_path / "downloads").exists()  # the reader never downloads
    copy = tmp_path / "tfr"
    (copy / NAME).mkdir(parents=True)
    for f in (prepared / NAME / VERSION).iterdir():
        (copy / NAME / VERSION).mkdir(exist_ok=True)
        (copy / NAME / VERSION / f.name).write_bytes(f.read_bytes())
    _as_tfrecord_only(copy / NAME / VERSION)
    with pytest.raises(ValueError, match=rf"prepared as tfrecord.*`diffjax data prepare {NAME} --data_dir {copy}`") as e:
        data.make_iterator(_config(copy), "train")
    assert "\n" not in str(e.value) and "not `tfds convert_format" in str(e.value)
    if not _has_tensorflow():
        err = _one_line_exit_2(capsys, lambda: _prepare("--data_dir", str(copy)))
        assert "is tfrecord only; converting it to ArrayRecord needs TensorFlow, which is not installed" in err


def test_tfrecord_only_is_converted(prepared, tmp_path):
    """A dataset prepared by TFDS as TFRecord gets ArrayRecord shards beside its TFRecord ones and
    reads, through its registered builder, the same examples as one prepared as ArrayRecord
    (TensorFlow reads the TFRecord files)."""
    pytest.importorskip("tensorflow")
    DiffjaxTinyImages(data_dir=str(tmp_path)).download_and_prepare(file_format="tfrecord")
    assert _prepare("--data_dir", str(tmp_path)) == 0
    names = _files(tmp_path / NAME / VERSION)
    assert f"{NAME}-train.tfrecord-00000-of-00001" in names and f"{NAME}-train.array_record-00000-of-00001" in names
    for a, b in zip(_read(_config(tmp_path)), _read(_config(prepared))):
        np.testing.assert_array_equal(a, b)


# ---- data.cache_dir ---------------------------------------------------------------------------------
def test_cache_dir_copies_each_split_once_and_reads_the_same(prepared, tmp_path, capsys):
    uncached = _read(_config(prepared))
    capsys.readouterr()
    cache = tmp_path / "cache"
    local = cache / NAME / VERSION
    local.mkdir(parents=True)
    (local / f".{NAME}-test.array_record-00000-of-00001.999999999{data_prepare.PARTIAL}").write_bytes(b"killed")
    config = _config(prepared, cache_dir=str(cache))
    cached = _read(config)
    out = capsys.readouterr().out
    assert "data.cache_dir: copied 3 files" in out and f"of test from {prepared}/{NAME}/{VERSION} to {local}" in out
    assert _files(local) == sorted(["dataset_info.json", "features.json", f"{NAME}-test.array_record-00000-of-00001"])
    for a, b in zip(cached, uncached, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _read(config) and "copied" not in capsys.readouterr().out  # second run: nothing to copy
    shard = local / f"{NAME}-test.array_record-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated copy is copied again
    for a, b in zip(_read(config), uncached, strict=True):
        np.testing.assert_array_equal(a, b)
    assert "data.cache_dir: copied 1 files" in capsys.readouterr().out
    next(data.make_iterator(config, "train"))  # the train split joins on first use
    assert f"{NAME}-train.array_record-00000-of-00001" in _files(local)


def test_cache_dir_must_be_local(prepared):
    with pytest.raises(ValueError, match="data.cache_dir must be a local folder"):
        data.make_iterator(_config(prepared, cache_dir="gs://bucket/cache"), "train")


@pytest.mark.gcs
def test_prepare_into_a_bucket_and_read_through_the_cache(prepared, tmp_path, capsys):
    """`--data_dir gs://...` builds locally and uploads (ArrayRecord's writer writes local files
    only); readers copy the split from the bucket to data.cache_dir."""
    from gcs_emulator import GcsEmulator

    from diffjax import storage

    names = ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")
    saved = {k: os.environ.get(k) for k in (*names, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    try:
        with GcsEmulator() as gcs:
            gcs.create_bucket("bkt")
            os.environ.update(gcs.env({}))
            storage.configure()
            assert _prepare("--data_dir", "gs://bkt/tfds") == 0
            out = capsys.readouterr().out
            assert "uploaded 4 files" in out and f"as ArrayRecord in gs://bkt/tfds/{NAME}/{VERSION}" in out
            cached = _read(_config("gs://bkt/tfds", cache_dir=str(tmp_path / "cache")))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for a, b in zip(cached, _read(_config(prepared)), strict=True):
        np.testing.assert_array_equal(a, b)
