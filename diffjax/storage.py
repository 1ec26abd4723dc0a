"""Every path a user gives (workdirs, --out, --ref, statistics, weights, folder: datasets) is an
etils.epath.Path: a local path or any fsspec URL such as gs://bucket/dir (through gcsfs).

GCS emulators: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (the variable gcsfs and Google's
client libraries read) is all a user sets. `configure()` (called by the `diffjax` command before
any subcommand, before gcsfs is imported) then points the other GCS client in the process,
TensorStore's (orbax writes array data through it), at the same server, makes both use no
credentials, and keeps gcsfs off Google's gRPC control endpoint, so that nothing but the emulator
is contacted (no GCE metadata probe either).
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

from etils import epath

from diffjax import commandline

EMULATOR_VAR = "STORAGE_EMULATOR_HOST"
PathLike = str | os.PathLike


def configure() -> None:
    """Point TensorStore's, ArrayRecord's and gcsfs's GCS clients at $STORAGE_EMULATOR_HOST when it
    is set. gs:// paths always go through gcsfs (epath would use tf.io.gfile where TensorFlow is
    installed, which ignores an emulator): one tested client everywhere."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    host = os.environ.get(EMULATOR_VAR, "").strip()
    if not host:
        return
    if "://" not in host:
        host = f"http://{host}"
        os.environ[EMULATOR_VAR] = host
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", host)  # google-cloud-cpp (ArrayRecord's gs:// reader)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore: no credential search
    os.environ.setdefault("NO_GCE_CHECK", "true")  # google-auth: never probe the metadata server
    # gcsfs's default file system asks the Storage Control API (gRPC, Google's endpoint, not the
    # emulator) for each bucket's layout: off, so that nothing but the emulator is contacted.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec

    fsspec.config.conf.setdefault("gs", {}).setdefault("token", "anon")


def path(p: PathLike, *parts: str) -> epath.Path:
    return epath.Path(p, *parts)


def is_remote(p: PathLike) -> bool:
    return "://" in os.fspath(p)


def absolute(p: PathLike) -> epath.Path:
    """`p` with a local path made absolute (orbax wants absolute directories); URLs unchanged."""
    return path(p) if is_remote(p) else path(p).expanduser().absolute()


def display(p: PathLike) -> str:
    """A path as the user wrote it (remote) or absolute (local)."""
    return os.fspath(p) if is_remote(p) else os.path.abspath(os.fspath(p))


def refresh(p: PathLike) -> None:
    """Forget cached directory listings of a remote path (gcsfs caches them), so that files other
    processes wrote since (a newer checkpoint) are seen."""
    if is_remote(p):
        import fsspec

        cls = type(fsspec.filesystem(os.fspath(p).split("://", 1)[0]))
        for instance in list(getattr(cls, "_cache", {}).values()):  # every instance (epath's has its own options)
            instance.invalidate_cache()


def write_bytes(p: PathLike, data: bytes) -> epath.Path:
    """Write `data` to `p` so that no reader ever sees a partial file: a local file is written to a
    temporary name and renamed; an object store's upload is atomic (the object appears when done)."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=os.fspath(target.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.fspath(target))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target


def write_text(p: PathLike, text: str) -> epath.Path:
    return write_bytes(p, text.encode())


def save_npz(p: PathLike, **arrays: Any) -> epath.Path:
    """np.savez into `p` exactly (no '.npz' appended), atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes(p, buf.getvalue())


def open_npz(p: PathLike):
    """np.load of an .npz (allow_pickle=False), local or remote (remote: read whole into memory)."""
    import numpy as np

    if is_remote(p):
        return np.load(io.BytesIO(path(p).read_bytes()), allow_pickle=False)
    return np.load(os.fspath(p), allow_pickle=False)


def local_copy(p: PathLike) -> str:
    """A local file path with the contents of `p`: `p` itself if local, else a copy in
    $XDG_CACHE_HOME/diffjax/remote (kept, re-fetched when the remote size changes)."""
    if not is_remote(p):
        return os.fspath(p)
    src = path(p)
    cache = epath.Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "diffjax" / "remote"
    local = cache / os.fspath(p).replace("://", "/")
    size = src.stat().length
    if not (local.exists() and local.stat().length == size):
        write_bytes(local, src.read_bytes())
    return os.fspath(local)


def require_credentials(p: PathLike, prog: str, flag: str) -> None:
    """gs:// without an emulator needs Google credentials; say so before any request is made
    (gcsfs would otherwise fall back to anonymous access and fail later, object by object)."""
    if not os.fspath(p).startswith("gs://") or os.environ.get(EMULATOR_VAR):
        return
    import logging

    import google.auth
    import google.auth.exceptions

    quiet = logging.getLogger("google.auth._default")  # its "metadata server unavailable" warning: ours says more
    level, quiet.level = quiet.level, logging.ERROR
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        commandline.usage_error(
            prog,
            f"{flag} {os.fspath(p)}: no Google credentials found (run `gcloud auth application-default login`, "
            f"use a VM's service account, set GOOGLE_APPLICATION_CREDENTIALS, or set {EMULATOR_VAR} for an emulator)",
        )
    finally:
        quiet.level = level


def check_writable(p: PathLike, prog: str, flag: str, shown: PathLike | None = None) -> None:
    """A usage error (one line, exit 2) unless `p` (a directory) can be written: a missing bucket,
    missing credentials or an unreachable store are named before any work is done. `shown`: the
    path the user gave, when `p` is the folder it goes into."""
    shown = p if shown is None else shown
    require_credentials(shown, prog, flag)
    target = path(p)
    probe = target / f".write_probe_{os.getpid()}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as err:  # noqa: BLE001 - each backend raises its own kinds; all mean "cannot write"
        commandline.usage_error(prog, f"cannot write to {flag} {os.fspath(shown)}: {describe_error(err, p)}")


def describe_error(err: BaseException, p: PathLike) -> str:
    """One line for a storage failure, saying what to do for the usual GCS causes."""
    text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    if not is_remote(p):
        return getattr(err, "strerror", None) or text
    lowered = text.lower()
    if "credentials" in lowered or "401" in lowered or "403" in lowered or "refresh" in lowered:
        return (
            f"{text} (no usable Google credentials: run `gcloud auth application-default login`, use a VM "
            f"service account, or set {EMULATOR_VAR} for an emulator)"
        )
    if "bucket" in lowered or "404" in lowered or isinstance(err, FileNotFoundError):
        bucket = os.fspath(p).split("://", 1)[1].split("/", 1)[0]
        return f"bucket gs://{bucket} does not exist or is not visible (create it with `gcloud storage buckets create gs://{bucket}`)"
    return text
