"""Read a raw CIFAR source into uint8 arrays.

Supported sources (`data.source`):
- `download`: the official python archive, fetched with its checksum verified;
- the official archive as a local `.tar.gz`, or its extracted folder
  (`cifar-10-batches-py/` or `cifar-100-python/`);
- an ImageFolder tree (`train/<class>/<image>`, `test/<class>/<image>`, possibly under
  one top folder) as a folder or a `.tar`, `.tar.gz`/`.tgz` or `.zip` archive.

Archives are read in memory and never extracted; a member whose name would escape the
archive's folder (absolute, `..`, or a link) is refused. The official batches are
pickles: they are read with a restricted unpickler that only builds numpy arrays and
plain Python values.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from filelock import FileLock
from PIL import Image, UnidentifiedImageError

from vitcnn.config import IMAGE_SIZE, NUM_CLASSES
from vitcnn.errors import DataError
from vitcnn.io import project_root

log = logging.getLogger(__name__)

OFFICIAL = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "filename": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "filename": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


@dataclass
class RawDataset:
    """The official train/test split of a source, before the validation split."""

    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    layout: str  # "official" or "imagefolder"
    source: str
    sha256: str


def read_source(source: str, dataset: str, download_dir: Path) -> RawDataset:
    """Read `source` ("download" or a path) as the dataset `dataset`.

    A relative path is taken from the project's root (`io.project_root`), so it names the same
    file in a queued experiment, which runs in a temporary copy of the project.
    """
    if source == "download":
        path = download_official(dataset, download_dir)
    else:
        path = project_root() / Path(source).expanduser()  # an absolute path stays as it is
        if not path.exists():
            where = "" if Path(source).expanduser().is_absolute() else f" (relative to the project: {path.resolve()})"
            raise DataError(f"data.source: {source} does not exist{where}; use 'download' or a path to an archive or folder")
    files, digest = _read_files(path)
    raw = _parse(files, dataset, str(path))
    raw.source, raw.sha256 = source, digest
    return raw


def download_official(dataset: str, download_dir: Path) -> Path:
    """Fetch the official archive into download_dir (kept as a cache), verifying its md5.

    A corrupt or partial file is deleted and fetched once more before giving up. A lock
    file beside it lets one process download while others (queued experiments running at
    the same time) wait for it and then use the same file.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(download_dir / f"{OFFICIAL[dataset]['filename']}.lock"):
        return _download_checked(dataset, download_dir)


def _download_checked(dataset: str, download_dir: Path) -> Path:
    from torchvision.datasets.utils import check_integrity, download_url

    spec = OFFICIAL[dataset]
    path = download_dir / spec["filename"]
    for attempt in (1, 2):
        if check_integrity(str(path), spec["md5"]):
            return path
        path.unlink(missing_ok=True)
        try:
            download_url(spec["url"], str(download_dir), spec["filename"], spec["md5"])
        except RuntimeError:  # torchvision: downloaded but the checksum does not match
            log.warning("checksum mismatch for %s (attempt %d of 2)", path, attempt)
        except OSError as exc:
            raise DataError(
                f"cannot download {spec['url']} ({exc}); download it elsewhere and set data.source to its path"
            ) from None
    path.unlink(missing_ok=True)
    raise DataError(f"{spec['url']}: checksum (md5) mismatch twice; expected {spec['md5']}")


# --- reading files from a folder or an archive --------------------------------------------


def _read_files(path: Path) -> tuple[dict[str, bytes], str]:
    """Every regular file under `path` as {posix relative name: bytes}, and a sha256 of the source."""
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        digest = hashlib.sha256()
        for name, data in files.items():
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return files, digest.hexdigest()
    name = path.name.lower()
    if not name.endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"data.source: {path} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        if name.endswith(".zip"):
            files = _read_zip(data, path)
        else:
            # Decompress whole first: gzip then checks its CRC, which a tar stream never reaches.
            files = _read_tar(gzip.decompress(data) if name.endswith((".tar.gz", ".tgz")) else data, path)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({exc})") from None
    return files, digest


def _check_member(name: str, archive: Path) -> None:
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{archive}: member '{name}' would escape the target folder; refusing this archive")


def _read_tar(data: bytes, archive: Path) -> dict[str, bytes]:
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            _check_member(member.name, archive)
            if member.issym() or member.islnk():
                raise DataError(f"{archive}: member '{member.name}' is a link; refusing this archive")
            if member.isfile():
                files[member.name] = tar.extractfile(member).read()
        end = tar.offset
    # tarfile takes a cut-off archive (or a damaged header) for its end; a whole one ends in zero blocks.
    if data[end : end + tarfile.BLOCKSIZE] != bytes(tarfile.BLOCKSIZE):
        raise tarfile.ReadError(f"no end-of-archive marker after byte {end}")
    return files


def _read_zip(data: bytes, archive: Path) -> dict[str, bytes]:
    files = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zipped:
        for info in zipped.infolist():
            _check_member(info.filename, archive)
            if not info.is_dir():
                files[info.filename] = zipped.read(info)
    return files


# --- layouts -------------------------------------------------------------------------------


def _parse(files: dict[str, bytes], dataset: str, where: str) -> RawDataset:
    names = {PurePosixPath(n).name for n in files}
    official = {"cifar10": "data_batch_1" in names, "cifar100": {"train", "test", "meta"} <= names}
    if official[dataset]:
        raw = _parse_official_cifar10(files, where) if dataset == "cifar10" else _parse_official_cifar100(files, where)
    elif any(official.values()):
        other = next(d for d, found in official.items() if found)
        raise DataError(f"{where}: this is the official {other} layout, but data.dataset is {dataset}; set data.dataset: {other}")
    else:
        raw = _parse_imagefolder(files, where)
    expected = NUM_CLASSES[dataset]
    if len(raw.classes) != expected:
        raise DataError(f"{where}: found {len(raw.classes)} classes, but data.dataset is {dataset} ({expected} classes)")
    return raw


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only what the official CIFAR batches contain: numpy arrays and plain values."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes, name: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any malformed pickle is a data problem, reported by file name
        raise DataError(f"{name}: not a readable CIFAR batch ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: not a CIFAR batch (expected a dict, got {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _find(files: dict[str, bytes], basename: str, where: str) -> tuple[str, bytes]:
    matches = [n for n in files if PurePosixPath(n).name == basename]
    if len(matches) != 1:
        raise DataError(f"{where}: expected one '{basename}' file of the official CIFAR layout, found {len(matches)}")
    return f"{where}: {matches[0]}", files[matches[0]]  # (name for messages, bytes)


def _batch_arrays(files: dict[str, bytes], basename: str, label_key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    name, data = _find(files, basename, where)
    batch = _unpickle(data, name)
    try:
        pixels = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
        images = pixels.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)  # (N, H, W, C)
    except (KeyError, ValueError) as exc:
        raise DataError(f"{name}: not a CIFAR batch ({exc})") from None
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels


def _label_names(files: dict[str, bytes], basename: str, key: str, where: str) -> list[str]:
    name, data = _find(files, basename, where)
    meta = _unpickle(data, name)
    if key not in meta:
        raise DataError(f"{name}: has no '{key}'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def _parse_official_cifar10(files: dict[str, bytes], where: str) -> RawDataset:
    parts = [_batch_arrays(files, f"data_batch_{i}", "labels", where) for i in range(1, 6)]
    test_images, test_labels = _batch_arrays(files, "test_batch", "labels", where)
    classes = _label_names(files, "batches.meta", "label_names", where)
    return RawDataset(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
        test_images, test_labels, classes, "official", where, "",
    )


def _parse_official_cifar100(files: dict[str, bytes], where: str) -> RawDataset:
    train_images, train_labels = _batch_arrays(files, "train", "fine_labels", where)
    test_images, test_labels = _batch_arrays(files, "test", "fine_labels", where)
    classes = _label_names(files, "meta", "fine_label_names", where)
    return RawDataset(train_images, train_labels, test_images, test_labels, classes, "official", where, "")


def _parse_imagefolder(files: dict[str, bytes], where: str) -> RawDataset:
    """Find `<root>/train/<class>/<file>` and `<root>/test/<class>/<file>` and decode them."""
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    roots = set()
    for name in sorted(files):
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or parts[-3] not in splits or any(p.startswith(".") for p in parts):
            continue
        roots.add(parts[:-3])
        splits[parts[-3]].setdefault(parts[-2], []).append(name)
    if not splits["train"] or not splits["test"]:
        raise DataError(
            f"{where}: neither the official CIFAR layout nor an ImageFolder tree "
            "(train/<class>/<image> and test/<class>/<image>)"
        )
    if len(roots) > 1:
        raise DataError(f"{where}: more than one ImageFolder tree ({', '.join('/'.join(r) or '.' for r in sorted(roots))})")
    classes = sorted(splits["train"])
    if sorted(splits["test"]) != classes:
        only_train = sorted(set(classes) - set(splits["test"]))
        only_test = sorted(set(splits["test"]) - set(classes))
        raise DataError(f"{where}: train and test have different classes (only in train: {only_train}, only in test: {only_test})")
    arrays = [_decode_split(files, splits[s], classes, where) for s in ("train", "test")]
    return RawDataset(*arrays[0], *arrays[1], classes, "imagefolder", where, "")


def _decode_split(files: dict[str, bytes], by_class: dict[str, list[str]], classes: list[str], where: str):
    images, labels = [], []
    for label, cls in enumerate(classes):
        for name in by_class[cls]:
            images.append(_decode_image(files[name], f"{where}: {name}"))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _decode_image(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):  # checked before decoding: no huge decodes
                raise DataError(f"{name}: image is {img.size[0]}x{img.size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise DataError(f"{name}: unreadable image (not an image format Pillow can read)") from None
    except (Image.DecompressionBombError, OSError, ValueError) as exc:
        raise DataError(f"{name}: unreadable image ({exc})") from None
