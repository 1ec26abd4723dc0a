"""`diffjax data prepare NAME`: a TFDS dataset as ArrayRecord, the one step that downloads.

  diffjax data prepare NAME [--data_dir DIR] [--imports MODULE,...] [--manual_dir DIR] [--local_dir DIR]
      download and prepare the TFDS dataset NAME (cifar10, mnist, lsun/church_outdoor, cifar10:3.0.2,
      ...) as ArrayRecord, the format `tfds.data_source` reads at random, in DIR (default: TFDS's,
      $TFDS_DATA_DIR or ~/tensorflow_datasets); a dataset already prepared there as TFRecord only
      gets ArrayRecord shards beside its TFRecord ones and ArrayRecord becomes its file format
      (TFRecord an alternative one: tf.data's `as_dataset` then needs the TFRecord copy elsewhere).
      DIR may be gs://: the dataset is built (or converted) in a local folder and uploaded, record
      files first, dataset_info.json last.
      --imports: modules to import first, whose builders then resolve by name (as `tfds build --imports`).

Run it once, on one host (it never joins a multi-host run): training, sampling and evaluation never
download (`download=False`). TFDS encodes NumPy images and reads TFRecord files with TensorFlow,
so building most datasets, and converting any TFRecord one, needs `pip install tensorflow-cpu`.

`cached_data_dir` is `data.cache_dir`: each host copies the ArrayRecord shards of the split it reads
(and the dataset's metadata) from the data dir to local disk once, then reads the local copy.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from etils import epath

from diffjax import commandline, storage

USAGE = __doc__
PROG = "diffjax data prepare"
ARRAY_RECORD = "array_record"
DATASET_INFO = "dataset_info.json"
PARTIAL = ".partial"
CHUNK = 16 << 20
TENSORFLOW = "needs TensorFlow, which is not installed: `pip install tensorflow-cpu`, then run this again"


class PrepareError(Exception):
    """A user-facing error: printed as one line, exit 2."""


# ---- copies between a data dir and local disk ---------------------------------------------------------
def _is_record_file(name: str) -> bool:
    from tensorflow_datasets.core import file_adapters

    return file_adapters.is_example_file(name)


def _upload_order(name: str) -> tuple[int, str]:
    """Record files, then other metadata, then dataset_info.json: TFDS takes a folder for prepared
    once its dataset_info.json exists, so a copy cut short never looks complete."""
    return (2 if name == DATASET_INFO else 0 if _is_record_file(name) else 1), name


def _copy_file(src: epath.Path, dst: epath.Path) -> None:
    """Stream `src` to `dst`. A local `dst` is written under a temporary name and renamed, so the
    final name never holds a partial copy; an object store's upload appears only when complete."""
    if storage.is_remote(dst):
        with src.open("rb") as fin, dst.open("wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
        return
    tmp = dst.parent / f".{dst.name}.{os.getpid()}{PARTIAL}"
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
        tmp.replace(dst)  # atomic, also over a truncated copy
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_partials(folder: epath.Path) -> None:
    """Delete temporary copies left by killed processes (their pid is gone); live ones are kept."""
    for tmp in folder.glob(f".*{PARTIAL}"):
        pid = tmp.name[: -len(PARTIAL)].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sync(src_dir: epath.Path, dst_dir: epath.Path, names: Iterable[str]) -> tuple[int, int]:
    """Copy the files `names` of `src_dir` that `dst_dir` lacks or holds with another size (a
    truncated copy); returns (files copied, bytes copied)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    if not storage.is_remote(dst_dir):
        _remove_stale_partials(dst_dir)
    files = nbytes = 0
    for name in sorted(set(names), key=_upload_order):
        src, dst = src_dir / name, dst_dir / name
        size = src.stat().length
        if dst.exists() and dst.stat().length == size:
            continue
        _copy_file(src, dst)
        files, nbytes = files + 1, nbytes + size
    return files, nbytes


def _files(folder: epath.Path) -> list[str]:
    """The names of the dataset files in a version folder (no temporaries, no sub-folders)."""
    from tensorflow_datasets.core import constants

    return [
        p.name
        for p in folder.iterdir()
        if not p.name.startswith(".") and constants.INCOMPLETE_PREFIX not in p.name and p.is_file()
    ]


def _relative(builder) -> str:
    """The builder's version folder relative to its data dir: name[/config]/version."""
    root, version_dir = os.fspath(builder._data_dir_root).rstrip("/"), os.fspath(builder.data_dir)
    return version_dir[len(root) :].strip("/")


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def cached_data_dir(builder, split: str, cache_dir: str) -> str:
    """A local TFDS data dir under `cache_dir` holding the ArrayRecord shards of `split` of the
    builder's (prepared) dataset and its metadata, copied from the builder's data dir where missing
    or of another size; prints what it copied."""
    cache_root = storage.path(cache_dir).expanduser()
    if storage.is_remote(cache_root):
        raise ValueError(f"data.cache_dir must be a local folder (each host's disk), got {cache_dir!r}")
    try:
        info = builder.info.splits[split]
    except KeyError:
        raise ValueError(f"data.dataset={builder.name!r} has no split {split!r} to cache") from None
    shards = info.filename_template.replace(filetype_suffix=ARRAY_RECORD).sharded_filenames(info.num_shards)
    version_dir = storage.path(os.fspath(builder.data_dir))
    metadata = [name for name in _files(version_dir) if not _is_record_file(name)]
    local = cache_root / _relative(builder)
    files, nbytes = sync(version_dir, local, [*shards, *metadata])
    if files:
        print(f"data.cache_dir: copied {files} files ({_mb(nbytes)}) of {split} from {version_dir} to {local}", flush=True)
    return os.fspath(cache_root)


# ---- prepare ------------------------------------------------------------------------------------------
def _tfds() -> Any:
    """tensorflow_datasets, importable for preparation: TFDS 4.9 imports the `importlib_resources`
    backport when it prepares a dataset of its own catalogue but requires it only on Python < 3.9;
    the standard library's importlib.resources is the same API."""
    if importlib.util.find_spec("importlib_resources") is None:
        sys.modules["importlib_resources"] = importlib.resources
    import tensorflow_datasets as tfds

    return tfds


def _builder(tfds, name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PrepareError(
            f"NAME {name!r} is not a TFDS dataset ({first}); the names are tfds.list_builders(), "
            f"and a builder of your own resolves after --imports MODULE"
        ) from None


def _formats(builder) -> set[str]:
    return {f.value for f in builder.info.available_file_formats()}


def _generate(tfds, builder, manual_dir: str | None) -> None:
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(file_format=ARRAY_RECORD, download_config=config)
    except ModuleNotFoundError as err:
        if err.name != "tensorflow" and "No module named 'tensorflow'" not in str(err):
            raise
        raise PrepareError(f"building {builder.name} {TENSORFLOW} (TFDS encodes its images with it)") from None


def _convert(version_dir: epath.Path) -> None:
    """Write ArrayRecord shards beside the record files of a local prepared version folder with
    TFDS's own readers and writers (tfds.core.file_adapters, as `tfds convert_format` does; that
    module itself cannot be imported without Apache Beam), then make ArrayRecord the dataset's file
    format in its dataset_info.json, the old one an alternative: TFDS 4.9 builders of its catalogue
    ignore alternative formats, so ArrayRecord as an alternative (what `tfds convert_format` writes)
    stays unreadable for cifar10 & co. Shards already converted are kept: a rerun resumes."""
    from tensorflow_datasets.core import dataset_info as info_lib
    from tensorflow_datasets.core import file_adapters
    from tensorflow_datasets.core.utils import py_utils
    from tqdm import tqdm

    info = info_lib.read_proto_from_builder_dir(version_dir)
    source_format = file_adapters.FileFormat(info.file_format)
    reader = file_adapters.ADAPTER_FOR_FORMAT[source_format]
    writer = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
    splits = info_lib.get_split_dict_from_proto(dataset_info_proto=info, data_dir=version_dir, file_format=source_format)
    for split in splits.values():
        n = split.num_shards
        target = split.filename_template.replace(filetype_suffix=ARRAY_RECORD)
        for i in range(n):
            dst = target.sharded_filepath(shard_index=i, num_shards=n)
            if dst.exists():
                continue
            rows = reader.make_tf_data(split.filename_template.sharded_filepath(shard_index=i, num_shards=n))
            rows = tqdm(rows, desc=f"Converting {dst.name}", unit=" examples", total=split.shard_lengths[i])
            with py_utils.incomplete_file(dst) as tmp:  # renamed when complete
                writer.write_examples(tmp, ((k, row.numpy()) for k, row in enumerate(rows)))
    others = [f for f in (info.file_format, *info.alternative_file_formats) if f != ARRAY_RECORD]
    info.file_format = ARRAY_RECORD
    del info.alternative_file_formats[:]
    info.alternative_file_formats.extend(dict.fromkeys(others))
    info_lib.write_dataset_info_proto(info, dataset_info_dir=version_dir)


@contextmanager
def _workspace(local_dir: str | None) -> Iterator[epath.Path]:
    """A local TFDS data dir to build in: `local_dir` (kept), else a temporary folder (removed)."""
    if local_dir:
        yield storage.path(local_dir).expanduser()
        return
    tmp = epath.Path(tempfile.mkdtemp(prefix="diffjax-prepare-"))
    try:
        yield tmp
    finally:
        tmp.rmtree(missing_ok=True)


def _report(verb: str, copied: tuple[int, int], where: str) -> None:
    print(f"{verb} {copied[0]} files ({_mb(copied[1])}) {where}", flush=True)


def prepare(name: str, data_dir: str | None = None, *, manual_dir: str | None = None, local_dir: str | None = None) -> str:
    """Make the TFDS dataset `name` readable as ArrayRecord in `data_dir` (local or remote; default
    TFDS's): build it, or convert a dataset prepared in another format only; returns a summary line.
    A remote dataset is built or converted under `local_dir` (default: a temporary folder) and uploaded."""
    tfds = _tfds()
    builder = _builder(tfds, name, data_dir)
    target = storage.path(os.fspath(builder.data_dir))
    if builder.is_prepared() and ARRAY_RECORD in _formats(builder):
        return _summary(builder, target, "already ")
    if builder.is_prepared() and importlib.util.find_spec("tensorflow") is None:
        formats = "/".join(sorted(_formats(builder)))
        raise PrepareError(
            f"{name} in {target} is {formats} only; converting it to ArrayRecord {TENSORFLOW} (TFDS reads {formats} with it)"
        )
    if storage.is_remote(target):  # ArrayRecord's writer writes local files only
        with _workspace(local_dir) as work:
            local = work / _relative(builder)
            if builder.is_prepared():
                _report("copied", sync(target, local, _files(target)), f"from {target} to {local} to convert them")
                _convert(local)
            else:
                _generate(tfds, _builder(tfds, name, os.fspath(work)), manual_dir)
            _report("uploaded", sync(local, target, _files(local)), f"to {target}")
    elif builder.is_prepared():
        _convert(target)
    else:
        _generate(tfds, builder, manual_dir)
    builder = _builder(tfds, name, data_dir)  # as the readers will see it
    if ARRAY_RECORD not in _formats(builder):
        raise PrepareError(f"{target} still has no ArrayRecord shards after preparing; see the messages above")
    return _summary(builder, target)


def _summary(builder, target: epath.Path, already: str = "") -> str:
    counts = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
    return f"{already}prepared {builder.name} {builder.version} as ArrayRecord in {target} ({counts} examples)"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] != "prepare":
        commandline.usage_error("diffjax data", f"unknown command {argv[0]!r}; choose prepare (diffjax data --help)")
    p = commandline.Parser(PROG, "prepare a TFDS dataset as ArrayRecord (the one step that downloads)")
    p.add_argument("name", metavar="NAME", help="a TFDS name: cifar10, mnist, lsun/church_outdoor, cifar10:3.0.2, ...")
    p.add_argument("--data_dir", default=None, help="TFDS data dir, local or gs:// (default: TFDS's)")
    p.add_argument("--imports", default="", help="comma-separated modules registering builders (as `tfds build --imports`)")
    p.add_argument("--manual_dir", default=None, help="folder of manually downloaded files, for datasets that need them")
    p.add_argument(
        "--local_dir", default=None, help="local data dir to build in for a gs:// --data_dir (default: a temporary one)"
    )
    args = p.parse(argv[1:])
    for module in filter(None, (m.strip() for m in args.imports.split(","))):
        try:
            importlib.import_module(module)
        except ImportError as err:
            commandline.usage_error(PROG, f"--imports {module}: {type(err).__name__}: {err}")
    if args.data_dir:
        storage.check_writable(args.data_dir, PROG, "--data_dir")
    try:
        print(prepare(args.name, args.data_dir, manual_dir=args.manual_dir, local_dir=args.local_dir))
    except PrepareError as err:
        commandline.usage_error(PROG, str(err))
    return 0
