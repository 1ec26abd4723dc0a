"""The FID Inception port against pytorch-fid itself (random weights saved as pytorch-fid's file
format), its torch-free weight reading and conversion, and its error messages."""

import hashlib
import os
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax.evaluation import inception as inc
from diffjax.evaluation import inception_weights as iw


def _rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """(pytorch-fid net, its inner network with fc, the .pth its state dict was saved to)."""
    torch_peers = pytest.importorskip("torch_peers")  # tests/torch_peers.py; skips without torch
    net, inner = torch_peers.fid_inception_peer(seed=0)
    import torch

    path = tmp_path_factory.mktemp("inception") / iw.FILENAME
    torch.save(inner.state_dict(), path)
    return net, inner, path


@pytest.fixture(scope="module")
def model(peer):
    return inc.create(iw.load_pytorch_fid_weights(peer[2]))


def _torch_outputs(peer, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    net, inner, _ = peer
    with torch.no_grad():
        # An NCHW view of NHWC memory (channels_last): same math, ~10x faster convs on the CPU.
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        (pool3,) = net(x)
        pool3 = pool3.flatten(1)
        return pool3.numpy(), inner.fc(pool3).numpy()


@pytest.fixture(scope="module")
def zero_weights():
    return {k: np.zeros(s, np.float32) for k, s in inc.state_dict_shapes().items()}


@pytest.mark.parametrize(
    "src,dst", [((32, 32), (299, 299)), ((64, 48), (299, 299)), ((512, 400), (299, 299)), ((7, 5), (3, 11))]
)
def test_resize_matches_torch_interpolate(src, dst):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, *src, 3), dtype=np.float32)
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=dst, mode="bilinear", align_corners=False
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    # jax.image.resize antialiases when downsampling (its default): off by ~0.5 on 512 -> 299.
    np.testing.assert_allclose(np.asarray(inc.resize_bilinear(jnp.asarray(x), dst)), ref, rtol=0, atol=3e-7)


def test_state_dict_matches_published_layout(peer):
    """The file's keys (minus num_batches_tracked) and shapes are exactly what create() expects,
    and the torch-free reader returns the saved tensors bit for bit."""
    _, inner, path = peer
    sd = {k: v.numpy() for k, v in inner.state_dict().items()}
    assert {k: v.shape for k, v in sd.items() if not k.endswith("num_batches_tracked")} == inc.state_dict_shapes()
    loaded = iw.load_pytorch_fid_weights(path)
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v), k


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (299, 299), (360, 320)])
def test_matches_pytorch_fid(peer, model, size):
    images = np.random.default_rng(size[0]).random((2, *size, 3), dtype=np.float32)
    ref_pool3, ref_logits = _torch_outputs(peer, images)
    pool3, logits = model(jnp.asarray(images))
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert _rel_err(pool3, ref_pool3) <= 1e-4
    assert _rel_err(logits, ref_logits) <= 1e-4


def test_features_sharded_matches_pytorch_fid(peer, model):
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    pool3, logits = inc.features(model, images, batch_size=8)  # one batch of 8 on 8 devices, 5 padded
    ref_pool3, ref_logits = _torch_outputs(peer, images.astype(np.float32) / 255)
    assert pool3.shape == (3, 2048) and logits.shape == (3, 1008) and pool3.dtype == np.float32
    assert _rel_err(pool3, ref_pool3) <= 1e-4 and _rel_err(logits, ref_logits) <= 1e-4


class _Probe(nnx.Module):
    """Stands in for the network in features(): returns a per-image fingerprint."""

    def __call__(self, x):
        return x[:, 0, 0, :], x.sum(axis=(1, 2, 3))[:, None]


def test_features_batches_pads_and_keeps_order():
    assert len(jax.devices()) == 8  # tests/conftest.py: 8 fake CPU devices
    images = np.random.default_rng(2).random((19, 4, 4, 3), dtype=np.float32)
    first, total = inc.features(_Probe(), images, batch_size=5)  # 3 batches of 8, the last padded
    np.testing.assert_array_equal(first, images[:, 0, 0, :])
    np.testing.assert_allclose(total[:, 0], images.sum(axis=(1, 2, 3)), rtol=1e-6)
    empty = inc.features(_Probe(), images[:0], batch_size=5)
    assert empty[0].shape == (0, 2048) and empty[1].shape == (0, 1008)


def test_npz_round_trip(peer, model, tmp_path):
    dst = tmp_path / "inception_weights"  # no .npz suffix: written at exactly this path
    assert iw.convert(peer[2], dst) == str(dst) and dst.is_file()
    from_pth, from_npz = iw.load_pytorch_fid_weights(peer[2]), iw.load_pytorch_fid_weights(dst)
    assert from_npz.keys() == from_pth.keys()
    assert all(np.array_equal(from_npz[k], from_pth[k]) for k in from_pth)
    images = np.random.default_rng(3).random((1, 32, 32, 3), dtype=np.float32)
    for a, b in zip(inc.create(from_npz)(images), model(images)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reads_legacy_torch_format(peer, tmp_path):
    import torch

    path = tmp_path / "legacy.pth"
    torch.save(peer[1].state_dict(), path, _use_new_zipfile_serialization=False)
    legacy, current = iw.load_pytorch_fid_weights(path), iw.load_pytorch_fid_weights(peer[2])
    assert legacy.keys() == current.keys()
    assert all(np.array_equal(legacy[k], current[k]) for k in current)


def test_refuses_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(iw.InceptionWeightsError, match="system is not allowed"):
        iw.load_pytorch_fid_weights(path)
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    with pytest.raises(iw.InceptionWeightsError, match="junk.pth"):
        iw.load_pytorch_fid_weights(tmp_path / "junk.pth")


def test_weights_path_resolution_and_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(iw.ENV_VAR, raising=False)
    cached = tmp_path / "cache" / "diffjax" / iw.FILENAME
    with pytest.raises(iw.InceptionWeightsNotFound) as err:
        iw.weights_path(None)
    assert isinstance(err.value, FileNotFoundError)
    for hint in (str(cached), iw.URL, iw.ENV_VAR, "--inception_weights"):
        assert hint in str(err.value)
    missing = tmp_path / "nope.pth"
    with pytest.raises(iw.InceptionWeightsNotFound, match="nope.pth"):
        iw.weights_path(str(missing))
    monkeypatch.setenv(iw.ENV_VAR, str(missing))
    with pytest.raises(iw.InceptionWeightsNotFound, match=r"nope\.pth \(\$DIFFJAX_INCEPTION_WEIGHTS\)"):
        iw.weights_path(None)
    monkeypatch.delenv(iw.ENV_VAR)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert iw.weights_path(None) == str(cached)
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"w")
    monkeypatch.setenv(iw.ENV_VAR, str(cached))
    assert iw.weights_path(None) == str(cached) and iw.weights_path(str(explicit)) == str(explicit)
    assert iw.file_sha256(explicit) == hashlib.sha256(b"w").hexdigest()


def test_create_rejects_wrong_weights(zero_weights):
    bad = dict(zero_weights, **{"Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 7, 1), np.float32)})
    wrong = r"'Mixed_6b.branch7x7_2.conv.weight' has shape \(128, 128, 7, 1\), expected \(128, 128, 1, 7\)"
    with pytest.raises(iw.InceptionWeightsError, match=wrong):
        inc.create(bad)
    missing = {k: v for k, v in zero_weights.items() if k != "fc.bias"}
    with pytest.raises(iw.InceptionWeightsError, match="missing key 'fc.bias'"):
        inc.create(missing)
    extra = dict(zero_weights, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(iw.InceptionWeightsError, match="unexpected key 'AuxLogits.fc.weight'"):
        inc.create(extra)


def test_rejects_wrong_image_shape(zero_weights):
    model = inc.create(zero_weights)
    for shape in [(2, 32, 32, 1), (2, 32, 32, 4), (32, 32, 3), (2, 3, 32, 32)]:
        with pytest.raises(ValueError, match=re.escape(str(shape))):
            model(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        inc.features(model, np.zeros((2, 32, 32, 1), np.float32))


_SPLIT_FEATURES = """
import sys
import numpy as np
from diffjax import commandline, distributed
from diffjax.evaluation import inception
from diffjax.evaluation.evaluate import Extractor

args = distributed.parse(commandline.Parser("split", ""), [])
import jax

ran = []  # the images this process's network saw
run = inception.features
inception.features = lambda model, x, batch_size: ran.append(len(x)) or run(model, x, batch_size)
images = np.random.default_rng(4).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
pool3, logits = Extractor(sys.argv[1], batch_size=2).features(images)
if jax.process_index() == 0:
    np.savez(sys.argv[2], pool3=pool3, logits=logits, processes=jax.process_count(), ran=sum(ran))
"""


def test_features_split_across_processes_equal_one_process(peer, tmp_path):
    """2 processes (gloo) share an Inception feature set (each runs its 1/2,
    padded; all-gathered) and get the features one process computes alone, in order."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "split.py"
    script.write_text(_SPLIT_FEATURES)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for n in (1, 2):
        launch = [sys.executable, f"{root}/launch/local.py", f"--num-processes={n}", "--devices-per-process=1", "--"]
        res = subprocess.run(
            [*launch, sys.executable, str(script), str(peer[2]), str(tmp_path / f"{n}.npz")],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = np.load(tmp_path / "1.npz"), np.load(tmp_path / "2.npz")
    assert int(one["processes"]) == 1 and int(two["processes"]) == 2
    assert int(one["ran"]) == 3 and int(two["ran"]) == 2  # process 0 ran its half (2 of 3), not all
    assert two["pool3"].shape == (3, 2048) and two["logits"].shape == (3, 1008)
    for key in ("pool3", "logits"):  # same network, same images; only the device split differs
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-5 * np.abs(one[key]).max())
