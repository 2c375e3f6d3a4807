"""Read a raw source (CIFAR, or a user's own images) into uint8 arrays of one size.

Supported sources (`data.source`):
- `download`: the official python archive, fetched with its checksum verified;
- the official archive as a local `.tar.gz`, or its extracted folder
  (`cifar-10-batches-py/` or `cifar-100-python/`);
- an ImageFolder tree, as a folder or a `.tar`, `.tar.gz`/`.tgz` or `.zip` archive, possibly
  under one top folder: either split (`train/<class>/<image>` and `test/<class>/<image>`, with
  an optional `val/` or `validation/` that is then the validation split as given), or one
  folder of class folders (`<class>/<image>`, no split: `prepare` holds out the test and
  validation splits, stratified and seeded).

Images are recognised by their content, whatever their extension's case (PIL opens them);
other files (`.DS_Store`, `Thumbs.db`, a README, a LICENSE) are skipped and counted. A file
whose extension says image but that does not decode is a broken image: one line naming it,
or skipped and counted with `data.skip_bad`. Every image is turned upright (its EXIF
orientation), made RGB (grayscale, palette, RGBA and CMYK alike) and brought to
`data.image_size` by `data.resize`: `crop` (the shorter side resized to the size, then the
centre cropped: the standard evaluation transform), `pad` (the longer side resized, then
black borders) or `stretch`; PIL's antialiased bicubic filter, once, here. An image already
of that size is kept as it is, so CIFAR at 32 px is read bit for bit. An image of more than
`MAX_PIXELS` pixels is refused before it is decoded (a decompression bomb).

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
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image, ImageOps, UnidentifiedImageError

from vitcnn.config import NUM_CLASSES, OFFICIAL_SIZE
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
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "val", "validation": "val"}  # folder -> split
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_PIXELS = 64_000_000  # an image larger than this (e.g. 8000 x 8000) is refused before it is decoded
RESAMPLE = Image.Resampling.BICUBIC  # antialiased when shrinking, as PIL's filters are


@dataclass
class RawDataset:
    """The splits a source gives, before the validation split is held out (when it is not given)."""

    train_images: np.ndarray  # (N, S, S, 3) uint8, S = data.image_size
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray | None  # None: the source has no split; prepare holds one out
    test_labels: np.ndarray | None
    classes: list[str]
    layout: str  # "official", "imagefolder" (train/ and test/) or "classfolders" (<class>/, no split)
    source: str
    sha256: str
    val_images: np.ndarray | None = None  # the source's own validation split (val/ or validation/), if any
    val_labels: np.ndarray | None = None
    folder: str = ""  # the name of the folder that holds the classes (or the splits), if it has one
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" as stored -> images of that size
    skipped: dict[str, int] = field(default_factory=dict)  # why -> files skipped (not images, broken)


@dataclass(frozen=True)
class Decode:
    """How images become arrays: the side they are brought to, how, and whether broken ones are skipped."""

    size: int
    resize: str  # crop | pad | stretch
    skip_bad: bool


def read_source(cfg: Any, download_dir: Path) -> RawDataset:
    """Read `cfg.source` ("download" or a path) as the dataset `cfg.dataset`, its images brought to
    `cfg.image_size` by `cfg.resize` (`cfg`: params.yaml's `data` section).

    A relative path is taken from the project's root (`io.project_root`), so it names the same
    file in a queued experiment, which runs in a temporary copy of the project.
    """
    source, dataset = cfg.source, cfg.dataset
    decode = Decode(cfg.image_size, cfg.resize, cfg.skip_bad)
    if source == "download":
        if dataset not in OFFICIAL:
            raise DataError(f"data.source: download fetches CIFAR-10 or CIFAR-100; for data.dataset {dataset}, "
                            "set data.source to the path of your images")
        path = download_official(dataset, download_dir)
    else:
        path = project_root() / Path(source).expanduser()  # an absolute path stays as it is
        if not path.exists():
            where = "" if Path(source).expanduser().is_absolute() else f" (relative to the project: {path.resolve()})"
            raise DataError(f"data.source: {source} does not exist{where}; use 'download' or a path to an archive or folder")
    files, dirs, digest = _read_files(path)
    raw = _parse(files, dirs, dataset, str(path), decode)
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


def _read_files(path: Path) -> tuple[dict[str, bytes], set[str], str]:
    """Every regular file under `path` as {posix relative name: bytes}, every folder's name (empty ones too),
    and a sha256 of the source."""
    if path.is_dir():
        entries = sorted(path.rglob("*"))
        files = {p.relative_to(path).as_posix(): p.read_bytes() for p in entries if p.is_file()}
        digest = hashlib.sha256()
        for name, data in files.items():
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return files, {p.relative_to(path).as_posix() for p in entries if p.is_dir()}, digest.hexdigest()
    name = path.name.lower()
    if not name.endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"data.source: {path} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        if name.endswith(".zip"):
            files, dirs = _read_zip(data, path)
        else:
            # Decompress whole first: gzip then checks its CRC, which a tar stream never reaches.
            files, dirs = _read_tar(gzip.decompress(data) if name.endswith((".tar.gz", ".tgz")) else data, path)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"{path}: corrupt or truncated archive ({exc})") from None
    return files, dirs, digest


def _check_member(name: str, archive: Path) -> None:
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{archive}: member '{name}' would escape the target folder; refusing this archive")


def _read_tar(data: bytes, archive: Path) -> tuple[dict[str, bytes], set[str]]:
    files, dirs = {}, set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            _check_member(member.name, archive)
            if member.issym() or member.islnk():
                raise DataError(f"{archive}: member '{member.name}' is a link; refusing this archive")
            if member.isfile():
                files[member.name] = tar.extractfile(member).read()
            elif member.isdir():
                dirs.add(member.name.rstrip("/"))
        end = tar.offset
    # tarfile takes a cut-off archive (or a damaged header) for its end; a whole one ends in zero blocks.
    if data[end : end + tarfile.BLOCKSIZE] != bytes(tarfile.BLOCKSIZE):
        raise tarfile.ReadError(f"no end-of-archive marker after byte {end}")
    return files, dirs


def _read_zip(data: bytes, archive: Path) -> tuple[dict[str, bytes], set[str]]:
    files, dirs = {}, set()
    with zipfile.ZipFile(io.BytesIO(data)) as zipped:
        for info in zipped.infolist():
            _check_member(info.filename, archive)
            if info.is_dir():
                dirs.add(info.filename.rstrip("/"))
            else:
                files[info.filename] = zipped.read(info)
    return files, dirs


# --- layouts -------------------------------------------------------------------------------


def _parse(files: dict[str, bytes], dirs: set[str], dataset: str, where: str, decode: Decode) -> RawDataset:
    names = {PurePosixPath(n).name for n in files}
    official = {"cifar10": "data_batch_1" in names, "cifar100": {"train", "test", "meta"} <= names}
    if official.get(dataset):
        raw = _parse_official_cifar10(files, where) if dataset == "cifar10" else _parse_official_cifar100(files, where)
        raw = _resized(raw, decode)
    elif any(official.values()):
        other = next(d for d, found in official.items() if found)
        raise DataError(f"{where}: this is the official {other} layout, but data.dataset is {dataset}; set data.dataset: {other}")
    else:
        raw = _parse_imagefolder(files, dirs, where, decode)
    expected = NUM_CLASSES.get(dataset)
    if expected and len(raw.classes) != expected:
        raise DataError(f"{where}: found {len(raw.classes)} classes, but data.dataset is {dataset} ({expected} classes); "
                        "for your own images set data.dataset: folder")
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
        images = pixels.reshape(-1, 3, OFFICIAL_SIZE, OFFICIAL_SIZE).transpose(0, 2, 3, 1)  # (N, H, W, C)
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
    train_images = np.concatenate([p[0] for p in parts])
    return RawDataset(train_images, np.concatenate([p[1] for p in parts]), test_images, test_labels, classes,
                      "official", where, "", sizes={f"{OFFICIAL_SIZE}x{OFFICIAL_SIZE}": len(train_images) + len(test_images)})


def _parse_official_cifar100(files: dict[str, bytes], where: str) -> RawDataset:
    train_images, train_labels = _batch_arrays(files, "train", "fine_labels", where)
    test_images, test_labels = _batch_arrays(files, "test", "fine_labels", where)
    classes = _label_names(files, "meta", "fine_label_names", where)
    return RawDataset(train_images, train_labels, test_images, test_labels, classes, "official", where, "",
                      sizes={f"{OFFICIAL_SIZE}x{OFFICIAL_SIZE}": len(train_images) + len(test_images)})


def _resized(raw: RawDataset, decode: Decode) -> RawDataset:
    """The official arrays (32 px) at `decode.size`, resized as a folder's images are; unchanged at 32."""
    if decode.size == OFFICIAL_SIZE:
        return raw

    def resize(images: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(_fit(Image.fromarray(image), decode)) for image in images])

    raw.train_images, raw.test_images = resize(raw.train_images), resize(raw.test_images)
    return raw


def _parse_imagefolder(files: dict[str, bytes], dirs: set[str], where: str, decode: Decode) -> RawDataset:
    """Find `<root>/train/<class>/<file>` and `<root>/test/<class>/<file>` (and `val/` or `validation/`),
    else `<root>/<class>/<file>` with two classes or more; decode the images, skip the rest."""
    visible = {n: d for n, d in files.items() if not any(p.startswith(".") for p in PurePosixPath(n).parts)}
    skipped = Counter({"hidden files": len(files) - len(visible)})
    split = _split_layout(visible, where)
    if split:
        root, by_split = split
        layout = "imagefolder"
        parents = {SPLIT_FOLDERS[p.parts[len(root)].lower()]: p.parts[: len(root) + 1]  # split -> its folder
                   for p in map(PurePosixPath, visible) if len(p.parts) == len(root) + 3 and p.parts[:len(root)] == root
                   and p.parts[len(root)].lower() in SPLIT_FOLDERS}
    else:
        root, classes = _class_layout(visible, where)
        by_split, layout, parents = {"train": classes}, "classfolders", {"train": root}
    for split_name, parent in parents.items():  # a class folder with no file at all is not silently dropped
        empty = sorted(d for d in dirs if PurePosixPath(d).parts[:-1] == parent
                       and PurePosixPath(d).name not in by_split[split_name] and not PurePosixPath(d).name.startswith("."))
        if empty:
            raise DataError(f"{where}: {empty[0]}/ holds no image; remove the folder or add images to it")
    considered = {name for classes in by_split.values() for names in classes.values() for name in names}
    _check_memory(len(considered), decode.size, where)
    skipped["files beside the class folders"] += sum(1 for n in visible if n not in considered)
    classes = sorted(by_split["train"])
    for split_name, found in by_split.items():
        if sorted(found) != classes:
            only_train = sorted(set(classes) - set(found))
            only_there = sorted(set(found) - set(classes))
            raise DataError(f"{where}: train and {split_name} have different classes (only in train: {only_train}, "
                            f"only in {split_name}: {only_there})")
    sizes: Counter = Counter()
    arrays = {}
    for split_name, by_class in by_split.items():
        images, labels = [], []
        for label, cls in enumerate(classes):
            decoded = [_decode_image(files[name], f"{where}: {name}", decode) for name in by_class[cls]]
            for why, counted in (("not an image", "not images"), ("broken image", "broken images")):
                skipped[counted] += sum(1 for d in decoded if d == why)
            kept = [d for d in decoded if isinstance(d, tuple)]
            if not kept:
                raise DataError(f"{where}: {'/'.join([*root, *([] if layout == 'classfolders' else [split_name]), cls])}/ "
                                "holds no image; remove the folder or add images to it")
            images += [image for image, _ in kept]
            labels += [label] * len(kept)
            sizes.update(f"{w}x{h}" for _, (w, h) in kept)
        arrays[split_name] = (np.stack(images), np.asarray(labels, dtype=np.int64))
    test = arrays.get("test", (None, None))
    val = arrays.get("val", (None, None))
    return RawDataset(*arrays["train"], *test, classes, layout, where, "", *val, root[-1] if root else "",
                      dict(sorted(sizes.items())), {why: n for why, n in skipped.items() if n})


def _split_layout(files: dict[str, bytes], where: str) -> tuple[tuple[str, ...], dict[str, dict[str, list[str]]]] | None:
    """(root, {split: {class: [file names]}}) when the files hold train/ and test/ folders of classes."""
    roots: dict[tuple[str, ...], dict[str, dict[str, list[str]]]] = {}
    for name in sorted(files):
        parts = PurePosixPath(name).parts
        if len(parts) >= 3 and parts[-3].lower() in SPLIT_FOLDERS:
            split = SPLIT_FOLDERS[parts[-3].lower()]
            roots.setdefault(parts[:-3], {}).setdefault(split, {}).setdefault(parts[-2], []).append(name)
    trees = {root: found for root, found in roots.items() if {"train", "test"} <= set(found)}
    if len(trees) > 1:
        raise DataError(f"{where}: more than one ImageFolder tree ({', '.join('/'.join(r) or '.' for r in sorted(trees))})")
    return next(iter(trees.items())) if trees else None


def _class_layout(files: dict[str, bytes], where: str) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """(root, {class: [file names]}) for one folder of class folders, at the shallowest depth that has two."""
    by_parent: dict[tuple[str, ...], dict[str, list[str]]] = {}
    for name in sorted(files):
        parts = PurePosixPath(name).parts
        if len(parts) >= 2:
            by_parent.setdefault(parts[:-2], {}).setdefault(parts[-2], []).append(name)
    candidates = sorted((root for root, classes in by_parent.items() if len(classes) >= 2), key=len)
    if not candidates:
        raise DataError(
            f"{where}: neither the official CIFAR layout nor an ImageFolder tree (train/<class>/<image> and "
            "test/<class>/<image>, or one folder of two or more <class>/<image> folders)")
    shallowest = [root for root in candidates if len(root) == len(candidates[0])]
    if len(shallowest) > 1:
        raise DataError(f"{where}: more than one folder of class folders "
                        f"({', '.join('/'.join(r) or '.' for r in shallowest)}); point data.source at one of them")
    return shallowest[0], by_parent[shallowest[0]]


def _decode_image(data: bytes, name: str, decode: Decode) -> tuple[np.ndarray, tuple[int, int]] | str:
    """(the RGB image at decode.size, its stored (width, height)), or why it is skipped: "not an image" (PIL
    does not know it and its extension does not claim an image) or "broken image" (with data.skip_bad)."""
    claims_image = name.lower().endswith(IMAGE_SUFFIXES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:  # checked on the header, before decoding
                    raise DataError(f"{name}: {width}x{height} pixels is more than {MAX_PIXELS:,}; refusing to decode "
                                    "it (a decompression bomb, or a photo to shrink first)")
                image = ImageOps.exif_transpose(img).convert("RGB")  # upright; L, P, RGBA, CMYK -> RGB
                return np.asarray(_fit(image, decode)), (width, height)
    except UnidentifiedImageError:
        if not claims_image:
            return "not an image"
        why = "not an image format Pillow can read"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{name}: refused before decoding ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged data
        why = str(exc)
    if decode.skip_bad:
        log.warning("skipping %s: unreadable image (%s)", name, why)
        return "broken image"
    raise DataError(f"{name}: unreadable image ({why}); fix or remove it, or set data.skip_bad: true to skip it")


def _fit(image: Image.Image, decode: Decode) -> Image.Image:
    """`image` brought to decode.size x decode.size by decode.resize; an image of that size as it is."""
    size = (decode.size, decode.size)
    if image.size == size:
        return image
    if decode.resize == "crop":  # the shorter side to the size, then the centre
        return ImageOps.fit(image, size, method=RESAMPLE)
    if decode.resize == "pad":  # the longer side to the size, then black borders
        return ImageOps.pad(image, size, method=RESAMPLE, color=(0, 0, 0))
    return image.resize(size, RESAMPLE)


def _check_memory(images: int, size: int, where: str) -> None:
    """Refuse, before decoding anything, a data set whose uint8 arrays would not fit in the memory free now
    (prepare holds them all at once, and training twice: a copy on the device, padded for cropping)."""
    need = images * size * size * 3
    try:
        free = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: nothing to check against
        return
    if need > 0.5 * free:
        raise DataError(f"{where}: {images:,} images at {size}x{size} take {need / 2**30:.1f} GiB as uint8, more than "
                        f"half the {free / 2**30:.1f} GiB this machine has free; use a smaller data.image_size, or a "
                        "part of the images")
