"""The FID Inception weights file: where it lives and how it is read, without importing torch.

pytorch-fid publishes the 2015-12-05 TF Inception graph's weights as a torch state dict
(``pt_inception-2015-12-05-6726825d.pth``). ``load_pytorch_fid_weights`` reads such a file
directly: both torch's zip format (``<name>/data.pkl`` plus one raw ``<name>/data/<key>`` entry
per storage) and the older single-stream format (magic number, protocol, system info, the
pickle, the storage keys, then each storage's bytes). The pickle goes through a restricted
unpickler that knows only the handful of globals a state dict uses, so the file cannot run
code. ``convert`` writes the same arrays (torch keys and layouts) to a plain ``.npz``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO, Callable, Literal

import numpy as np
from etils import epath

from diffjax import storage

FILENAME = "pt_inception-2015-12-05-6726825d.pth"
URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FILENAME
ENV_VAR = "DIFFJAX_INCEPTION_WEIGHTS"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class InceptionWeightsNotFound(FileNotFoundError):
    """The Inception weights file is not where it was looked for."""


class InceptionWeightsError(ValueError):
    """The weights file cannot be read, or does not hold the FID Inception's parameters."""


def default_cache_path() -> epath.Path:
    """``$XDG_CACHE_HOME/diffjax/<FILENAME>``, ``~/.cache/diffjax/<FILENAME>`` by default."""
    return storage.path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "diffjax" / FILENAME


def weights_path(explicit: str | None = None) -> str:
    """Resolve the weights file: ``explicit`` (``--inception_weights``), else ``$DIFFJAX_INCEPTION_WEIGHTS``,
    else the cache path. Raises ``InceptionWeightsNotFound`` saying where to put the file."""
    if explicit:
        candidate, origin = storage.path(explicit).expanduser(), "--inception_weights"
    elif os.environ.get(ENV_VAR):
        candidate, origin = storage.path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        candidate, origin = storage.path(default_cache_path()), "the default cache path"
    if candidate.is_file():
        return str(candidate)
    raise InceptionWeightsNotFound(
        f"FID Inception weights not found at {candidate} ({origin}). Download pytorch-fid's "
        f"published file from {URL} (nothing is downloaded automatically) and pass "
        f"--inception_weights PATH, set ${ENV_VAR}=PATH, or put it at {default_cache_path()}. "
        "A .npz written by diffjax.evaluation.inception_weights.convert works too."
    )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (a remote file: its cached local copy, which the
    weights reader then reuses instead of downloading it again)."""
    digest = hashlib.sha256()
    with open(storage.local_copy(path), "rb") as f:  # local: a remote file is hashed from its one cached copy
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _StorageRef:
    """A storage named in the pickle; its bytes are read once the pickle is done."""

    def __init__(self, key: str, dtype: np.dtype, numel: int, offset: int = 0):
        self.key, self.dtype, self.numel, self.offset = key, np.dtype(dtype), int(numel), int(offset)


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise InceptionWeightsError("torch file: a tensor without a storage")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_unused):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict with only OrderedDict, tensor rebuilds and storage types."""

    def __init__(self, file: BinaryIO):
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"torch file: global {module}.{name} is not allowed in a state dict")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"torch file: unsupported persistent id {pid!r:.80}")
        dtype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"torch file: unsupported storage type {dtype!r}")
        root = self.storages.setdefault(key, _StorageRef(key, dtype, numel))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        _view_key, offset, view_numel = view  # the old format's views into a root storage
        return _StorageRef(key, dtype, view_numel, offset)


def _materialise(obj: Any, read: Callable[[str], bytes], byteorder: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise InceptionWeightsError(f"torch file holds a {type(obj).__name__}, not a state dict")
    buffers: dict[str, np.ndarray] = {}
    out = {}
    for name, ref in obj.items():
        if not isinstance(ref, _TensorRef):
            raise InceptionWeightsError(f"torch file: entry {name!r} is a {type(ref).__name__}, not a tensor")
        st = ref.storage
        if st.key not in buffers:
            raw = read(st.key)
            raw = raw[: len(raw) - len(raw) % st.dtype.itemsize]
            buffers[st.key] = np.frombuffer(raw, st.dtype.newbyteorder("<" if byteorder == "little" else ">"))
        flat = buffers[st.key][st.offset : st.offset + st.numel]
        if flat.size != st.numel:
            raise InceptionWeightsError(f"torch file: the storage of {name!r} is truncated")
        size, stride = ref.size, ref.stride
        last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else ref.offset - 1
        if len(size) != len(stride) or ref.offset < 0 or min(stride, default=0) < 0 or last >= flat.size:
            raise InceptionWeightsError(f"torch file: tensor {name!r} lies outside its storage")
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False
        )
        out[str(name)] = np.array(view, dtype=st.dtype.newbyteorder("="))
    return out


def _read_torch_zip(zf: zipfile.ZipFile) -> dict[str, np.ndarray]:
    pickles = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise InceptionWeightsError("zip file is neither a torch file (one data.pkl) nor an .npz")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in zf.namelist():
        byteorder = zf.read(prefix + "byteorder").decode()
    unpickler = _StateDictUnpickler(io.BytesIO(zf.read(pickles[0])))
    obj = unpickler.load()

    return _materialise(obj, lambda key: zf.read(f"{prefix}data/{key}"), byteorder)


def _read_torch_legacy(f: BinaryIO) -> dict[str, np.ndarray]:
    if _StateDictUnpickler(f).load() != _LEGACY_MAGIC:
        raise InceptionWeightsError("not a torch file (wrong magic number)")
    _StateDictUnpickler(f).load()  # protocol version
    sys_info = _StateDictUnpickler(f).load()
    byteorder: Literal["little", "big"] = "little" if sys_info.get("little_endian", True) else "big"
    unpickler = _StateDictUnpickler(f)
    obj = unpickler.load()
    keys = _StateDictUnpickler(f).load()
    data = {}
    for key in keys:  # each storage: its element count (int64), then its bytes
        key = str(key)
        numel = int.from_bytes(f.read(8), byteorder)
        data[key] = f.read(numel * unpickler.storages[key].dtype.itemsize)
    return _materialise(obj, data.__getitem__, byteorder)


def load_pytorch_fid_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read pytorch-fid's Inception state dict (torch zip or legacy format) or a converted
    ``.npz`` into ``{torch key: array}`` (torch layouts: conv OIHW, fc (out, in)). No torch needed.
    A remote file (gs://...) is copied to the local cache once (storage.local_copy)."""
    path = storage.local_copy(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if zf.namelist() and all(n.endswith(".npy") for n in zf.namelist()):
                    with np.load(path, allow_pickle=False) as npz:
                        return {k: npz[k] for k in npz.files}
                return _read_torch_zip(zf)
        with open(path, "rb") as f:  # local: storage.local_copy above
            return _read_torch_legacy(f)
    except InceptionWeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise InceptionWeightsError(f"cannot read Inception weights from {path}: {e}") from e


def convert(src_pth: str | os.PathLike, dst_npz: str | os.PathLike) -> str:
    """Write the weights of ``src_pth`` to a torch-free ``.npz`` at exactly ``dst_npz``
    (atomically); returns ``dst_npz``."""
    arrays = load_pytorch_fid_weights(src_pth)
    dst = os.fspath(dst_npz)
    storage.save_npz(dst, **arrays)
    return dst
