"""Reading every supported source layout, refusing unsafe or broken ones, and the prepare split."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image
import torch
import yaml

from conftest import (ROOT, CIFAR10_CLASSES, batch_pickle, pairs, png_bytes, random_images, write_tree,
                      zip_bytes)
from vitcnn.config import DataConfig, Params
from vitcnn.data import load_meta, load_split
from vitcnn.errors import DataError
from vitcnn.prepare import prepare
from vitcnn.sources import read_source


def read(path, dataset="cifar10", **data):
    # download_dir is only for data.source 'download'; a local source never touches it.
    return read_source(DataConfig(source=str(path), dataset=dataset, **data), download_dir=path.parent / "no-downloads-here")


def assert_same_dataset(raw, expected_classes, train_images, train_labels, test_images, test_labels):
    assert raw.classes == expected_classes
    for images, labels, exp_images, exp_labels in ((raw.train_images, raw.train_labels, train_images, train_labels),
                                                   (raw.test_images, raw.test_labels, test_images, test_labels)):
        assert images.dtype == np.uint8
        assert images.shape == (len(exp_images), 32, 32, 3)
        assert labels.shape == (len(exp_images),)
        assert np.issubdtype(labels.dtype, np.integer)
        # Same pixels, each with its own label (whatever order the reader uses).
        assert pairs(images, labels) == pairs(exp_images, exp_labels)


# --- each layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "tar", "tar_gz", "tgz_flat", "zip"])
def test_imagefolder_source_reads_pixels_exactly(imagefolder, kind):
    raw = read(getattr(imagefolder, kind))
    assert raw.classes == sorted(raw.classes) == CIFAR10_CLASSES
    assert_same_dataset(raw, imagefolder.classes, imagefolder.train_images, imagefolder.train_labels,
                        imagefolder.test_images, imagefolder.test_labels)
    assert raw.layout == "imagefolder"


def test_imagefolder_folder_with_top_level_folder(imagefolder, tmp_path):
    root = write_tree(tmp_path / "outer", {f"cifar10-jpeg/{n}": d for n, d in imagefolder.members.items()})
    raw = read(root)
    assert_same_dataset(raw, imagefolder.classes, imagefolder.train_images, imagefolder.train_labels,
                        imagefolder.test_images, imagefolder.test_labels)


def test_imagefolder_converts_grayscale_and_rgba_to_rgb(imagefolder, tmp_path):
    from PIL import Image

    members = dict(imagefolder.members)
    gray = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    rgba = np.dstack([imagefolder.train_images[0], np.full((32, 32), 255, np.uint8)])
    buf_gray, buf_rgba = io.BytesIO(), io.BytesIO()
    Image.fromarray(gray, "L").save(buf_gray, format="PNG")
    Image.fromarray(rgba, "RGBA").save(buf_rgba, format="PNG")
    members["train/cat/zz_gray.png"] = buf_gray.getvalue()
    members["train/cat/zz_rgba.png"] = buf_rgba.getvalue()
    raw = read(write_tree(tmp_path / "mixed", members))
    assert raw.train_images.shape == (len(imagefolder.train_images) + 2, 32, 32, 3)
    images = {img.tobytes() for img in raw.train_images}
    assert np.repeat(gray[:, :, None], 3, axis=2).tobytes() in images


@pytest.mark.parametrize("kind", ["folder", "tar_gz"])
def test_official_cifar10_reads_batches_and_label_names(official_cifar10, kind):
    raw = read(getattr(official_cifar10, kind))
    # Class names come from batches.meta, in its order: labels index into that list.
    assert_same_dataset(raw, official_cifar10.classes, official_cifar10.train_images, official_cifar10.train_labels,
                        official_cifar10.test_images, official_cifar10.test_labels)
    assert len(raw.train_images) == 40 and len(raw.test_images) == 10
    assert raw.layout == "official"


def test_official_cifar100_reads_fine_labels(official_cifar100):
    raw = read(official_cifar100.folder, dataset="cifar100")
    assert len(raw.classes) == 100
    assert_same_dataset(raw, official_cifar100.classes, official_cifar100.train_images,
                        official_cifar100.train_labels, official_cifar100.test_images, official_cifar100.test_labels)


def test_imagefolder_with_the_wrong_number_of_classes_for_the_dataset_is_refused(imagefolder):
    with pytest.raises(DataError) as info:
        read(imagefolder.folder, dataset="cifar100")
    assert "10 classes" in str(info.value) and "cifar100" in str(info.value)


@pytest.mark.parametrize("fixture, dataset", [("official_cifar10", "cifar100"), ("official_cifar100", "cifar10")])
def test_official_archive_of_the_other_dataset_says_which_setting_to_change(request, fixture, dataset):
    # The user has the official archive of one dataset and data.dataset set to the other:
    # the error must point at data.dataset, not claim the folder is of an unknown layout.
    data = request.getfixturevalue(fixture)
    with pytest.raises(DataError) as info:
        read(data.folder, dataset=dataset)
    msg = str(info.value)
    assert dataset in msg, msg
    assert "neither" not in msg, msg


def test_sha256_identifies_the_source_content(imagefolder, tmp_path):
    a = read(imagefolder.tar_gz)
    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(imagefolder.tar_gz.read_bytes())
    assert read(copy).sha256 == a.sha256
    assert read(imagefolder.zip).sha256 != a.sha256


# --- refused sources -----------------------------------------------------------------------


def _tar_with(tmp_path, imagefolder, info: tarfile.TarInfo, data: bytes = b"", name="evil.tar") -> object:
    """A plain tar of the ImageFolder tree, with `info` as its first member."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info.size = len(data) if info.isfile() else 0
        tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
        for member, content in imagefolder.members.items():
            ti = tarfile.TarInfo(member)
            ti.size = len(content)
            tar.addfile(ti, io.BytesIO(content))
    path = tmp_path / name
    path.write_bytes(out.getvalue())
    return path


@pytest.mark.parametrize("member", ["../evil.png", "train/cat/../../../evil.png", "/tmp/evil.png"])
def test_tar_member_escaping_the_folder_is_refused(imagefolder, tmp_path, member):
    path = _tar_with(tmp_path, imagefolder, tarfile.TarInfo(member), png_bytes(imagefolder.train_images[0]))
    with pytest.raises(DataError) as info:
        read(path)
    assert member in str(info.value)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_link_member_is_refused(imagefolder, tmp_path, kind):
    link = tarfile.TarInfo("train/cat/link.png")
    link.type = kind
    link.linkname = "/etc/passwd"
    path = _tar_with(tmp_path, imagefolder, link)
    with pytest.raises(DataError) as info:
        read(path)
    assert "train/cat/link.png" in str(info.value)


@pytest.mark.parametrize("member", ["../x", "/abs/x.png"])
def test_zip_member_escaping_the_folder_is_refused(imagefolder, tmp_path, member):
    members = dict(imagefolder.members)
    members[member] = b"x"
    path = tmp_path / "evil.zip"
    path.write_bytes(zip_bytes(members))
    with pytest.raises(DataError) as info:
        read(path)
    assert member in str(info.value)


def test_folder_of_neither_layout_is_refused(tmp_path):
    root = write_tree(tmp_path / "junk", {"readme.txt": b"hello", "images/a.png": png_bytes(random_images(
        np.random.default_rng(0), 1)[0])})
    with pytest.raises(DataError, match="neither"):
        read(root)


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read(tmp_path / "nowhere.tar.gz")


def test_file_that_is_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="data.csv"):
        read(path)


def _flipped(data: bytes, at: float) -> bytes:
    """64 damaged bytes at a fraction of the file: what a bad download or a bad disk leaves."""
    i = int(len(data) * at)
    return data[:i] + bytes(b ^ 0xFF for b in data[i: i + 64]) + data[i + 64:]


def _assert_corrupt(path, data: bytes) -> None:
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        read(path)
    msg = str(info.value)
    # The message must say the archive itself is damaged, not blame the layout or an image.
    assert path.name in msg and "corrupt" in msg, msg


@pytest.mark.parametrize("suffix", ["tar_gz", "zip"])
@pytest.mark.parametrize("at", [0.02, 0.25, 0.5, 0.75, 0.98])
def test_truncated_archive_is_reported_as_corrupt(imagefolder, tmp_path, suffix, at):
    source = getattr(imagefolder, suffix)
    data = source.read_bytes()
    _assert_corrupt(tmp_path / source.name, data[: int(len(data) * at)])


@pytest.mark.parametrize("suffix", ["tar_gz", "zip"])
def test_garbage_with_an_archive_suffix_is_reported_as_corrupt(imagefolder, tmp_path, suffix):
    source = getattr(imagefolder, suffix)
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _assert_corrupt(tmp_path / source.name, garbage)


@pytest.mark.parametrize("suffix", ["tar_gz", "zip"])
@pytest.mark.parametrize("at", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_damaged_bytes_inside_a_compressed_archive_are_reported_as_corrupt(imagefolder, tmp_path, suffix, at):
    # gzip and zip both carry CRC-32 checksums of their content: damage anywhere is detectable.
    source = getattr(imagefolder, suffix)
    _assert_corrupt(tmp_path / source.name, _flipped(source.read_bytes(), at))


def test_tar_cut_at_a_member_boundary_is_refused(imagefolder, tmp_path):
    # A plain .tar cut short after a complete member (a partial copy) loses the end-of-archive
    # marker: reading it must not silently yield fewer images.
    full = imagefolder.tar.read_bytes()
    with tarfile.open(imagefolder.tar) as tar:
        last = tar.getmembers()[-1]
    cut = full[: last.offset]  # every member but the last, and no end-of-archive blocks
    path = tmp_path / "partial.tar"
    path.write_bytes(cut)
    with pytest.raises(DataError) as info:
        raw = read(path)
        print(f"read {len(raw.test_images)} test images instead of {len(imagefolder.test_images)}")
    assert "partial.tar" in str(info.value)


def test_tar_cut_inside_a_member_is_refused(imagefolder, tmp_path):
    data = imagefolder.tar.read_bytes()
    _assert_corrupt(tmp_path / "cut.tar", data[: len(data) // 2 + 100])


def test_unreadable_image_names_the_file(imagefolder, tmp_path):
    members = dict(imagefolder.members)
    members["train/dog/broken.png"] = b"\x89PNG\r\n\x1a\n this is not a png"
    with pytest.raises(DataError) as info:
        read(write_tree(tmp_path / "src", members))
    assert "train/dog/broken.png" in str(info.value)


def test_an_image_of_another_size_is_brought_to_the_image_size_and_counted(imagefolder, tmp_path):
    members = dict(imagefolder.members)
    small = random_images(np.random.default_rng(0), 1, size=16)[0]
    members["test/ship/small.png"] = png_bytes(small)
    raw = read(write_tree(tmp_path / "src", members))
    assert raw.test_images.shape[1:] == (32, 32, 3)
    assert raw.sizes == {"16x16": 1, "32x32": len(imagefolder.members)}
    upscaled = np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC))
    assert upscaled.tobytes() in {image.tobytes() for image in raw.test_images}


def test_train_and_test_with_different_classes_are_refused(imagefolder, tmp_path):
    members = {n: d for n, d in imagefolder.members.items() if not n.startswith("test/frog/")}
    members["test/toad/t.png"] = imagefolder.members["test/frog/frog_000.png"]
    with pytest.raises(DataError) as info:
        read(write_tree(tmp_path / "src", members))
    assert "frog" in str(info.value) and "toad" in str(info.value)


class _Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for arbitrary code in a hostile batch."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_batch_with_a_foreign_global_is_refused_without_running_it(official_cifar10, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in official_cifar10.folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError) as info:
        read(folder)
    assert "data_batch_3" in str(info.value)
    assert not marker.exists()


def test_pickle_of_a_bare_dangerous_reference_is_refused(official_cifar10, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in official_cifar10.folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": os.system}, protocol=2))
    with pytest.raises(DataError, match="batches.meta"):
        read(folder)


def test_official_batch_with_mismatched_labels_is_refused(official_cifar10, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in official_cifar10.folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    images = random_images(np.random.default_rng(0), 4)
    rows = images.transpose(0, 3, 1, 2).reshape(4, -1)
    (folder / "test_batch").write_bytes(batch_pickle({b"data": rows, b"labels": [0, 1, 2]}))
    with pytest.raises(DataError, match="test_batch"):
        read(folder)


# --- prepare: the stratified, seeded val split ---------------------------------------------


def params_for(source, **data) -> Params:
    return dataclasses.replace(Params(), data=dataclasses.replace(Params().data, source=str(source), **data))


def run_prepare(tmp_path, source, seed=0, **data):
    params = dataclasses.replace(params_for(source, **data), seed=seed)
    out = tmp_path / f"prepared-{seed}-{'-'.join(f'{k}{v}' for k, v in sorted(data.items()))}"
    meta = prepare(params, out_dir=out, download_dir=tmp_path / "no-downloads-here")
    splits = {name: load_split(out, name) for name in ("train", "val", "test")}
    return meta, splits, out


def image_set(split) -> set[bytes]:
    return {img.tobytes() for img in split.images.numpy()}


def per_class(split, num_classes=10) -> list[int]:
    return np.bincount(split.labels.numpy(), minlength=num_classes).tolist()


def test_prepare_holds_out_a_stratified_disjoint_val_split(imagefolder, tmp_path):
    meta, splits, out = run_prepare(tmp_path, imagefolder.tar_gz, val_size=20)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert len(val) == 20 and len(train) == 40 and len(test) == 20
    assert per_class(val) == [2] * 10
    assert per_class(train) == [4] * 10
    assert not image_set(train) & image_set(val)
    # Together, train and val are exactly the source's training images, with their labels.
    together = pairs(np.concatenate([train.images.numpy(), val.images.numpy()]),
                     np.concatenate([train.labels.numpy(), val.labels.numpy()]))
    assert together == pairs(imagefolder.train_images, imagefolder.train_labels)
    assert pairs(test.images.numpy(), test.labels.numpy()) == pairs(imagefolder.test_images, imagefolder.test_labels)
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape[1:]) == (32, 32, 3)


def test_the_split_follows_data_split_seed_not_the_training_seed(imagefolder, tmp_path):
    _, a, out_a = run_prepare(tmp_path / "a", imagefolder.folder, seed=0, val_size=20, subset=20)
    _, b, out_b = run_prepare(tmp_path / "b", imagefolder.folder, seed=7, val_size=20, subset=20)
    _, c, _ = run_prepare(tmp_path / "c", imagefolder.folder, seed=0, val_size=20, subset=20, split_seed=1)
    # Another training seed: byte-identical prepared data (what lets DVC reuse it across seeds).
    for name in ("train.safetensors", "val.safetensors", "test.safetensors", "meta.json"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes()
    assert image_set(a["val"]) != image_set(c["val"]) and image_set(a["train"]) != image_set(c["train"])
    assert per_class(c["val"]) == [2] * 10 and per_class(c["train"]) == [2] * 10


def test_a_relative_source_is_found_from_the_project_root(imagefolder, tmp_path, monkeypatch):
    # A queued experiment runs in a copy under .dvc/tmp/exps/; DVC_ROOT names the project.
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmp1234"
    copy.mkdir(parents=True)
    (tmp_path / "cifar10.tar.gz").write_bytes(imagefolder.tar_gz.read_bytes())
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))
    raw = read_source(DataConfig(source="../cifar10.tar.gz"), download_dir=tmp_path / "no-downloads-here")
    assert pairs(raw.test_images, raw.test_labels) == pairs(imagefolder.test_images, imagefolder.test_labels)
    with pytest.raises(DataError, match=r"data.source: ../nope.tar.gz does not exist \(relative to the project: .*/nope"):
        read_source(DataConfig(source="../nope.tar.gz"), download_dir=tmp_path / "no-downloads-here")


def test_prepare_subset_is_stratified_and_taken_from_train_only(imagefolder, tmp_path):
    _, full, _ = run_prepare(tmp_path / "full", imagefolder.folder, val_size=20)
    meta, sub, _ = run_prepare(tmp_path / "sub", imagefolder.folder, val_size=20, subset=20)
    assert len(sub["train"]) == 20
    assert per_class(sub["train"]) == [2] * 10
    assert image_set(sub["val"]) == image_set(full["val"])  # the subset never changes val
    assert image_set(sub["train"]) <= image_set(full["train"])
    assert meta["counts"] == {"train": 20, "val": 20, "test": 20}


@pytest.mark.parametrize("val_size", [60, 61, 1000])
def test_prepare_refuses_a_val_split_as_large_as_train(imagefolder, tmp_path, val_size):
    with pytest.raises(DataError) as info:
        run_prepare(tmp_path, imagefolder.folder, val_size=val_size)
    assert "data.val_size" in str(info.value)
    assert "60" in str(info.value)


def test_prepare_refuses_a_subset_larger_than_what_remains(imagefolder, tmp_path):
    with pytest.raises(DataError, match="data.subset"):
        run_prepare(tmp_path, imagefolder.folder, val_size=20, subset=41)


def test_prepare_meta_records_counts_classes_and_train_statistics(imagefolder, tmp_path):
    meta, splits, out = run_prepare(tmp_path, imagefolder.zip, val_size=20)
    assert load_meta(out) == meta
    assert meta["classes"] == CIFAR10_CLASSES
    assert meta["dataset"] == "cifar10"
    assert meta["counts"] == {"train": 40, "val": 20, "test": 20}
    assert meta["class_counts"]["val"] == {c: 2 for c in CIFAR10_CLASSES}
    pixels = splits["train"].images.numpy().reshape(-1, 3).astype(np.float64) / 255
    assert np.allclose(meta["mean"], pixels.mean(0), atol=1e-5)
    assert np.allclose(meta["std"], pixels.std(0), atol=1e-5)
    assert len(meta["source_sha256"]) == 64


def test_prepare_with_unequal_classes_keeps_each_class_share(tmp_path):
    # 3 classes... of 10: class sizes 2..11 train images; val gets each class's proportional share.
    rng = np.random.default_rng(5)
    members = {}
    for k, cls in enumerate(CIFAR10_CLASSES):
        for i, img in enumerate(random_images(rng, 2 + k)):
            members[f"train/{cls}/{i}.png"] = png_bytes(img)
        members[f"test/{cls}/0.png"] = png_bytes(random_images(rng, 1)[0])
    root = write_tree(tmp_path / "uneven", members)
    total = sum(2 + k for k in range(10))  # 65
    _, splits, _ = run_prepare(tmp_path, root, val_size=13)  # 20% of each class
    assert len(splits["val"]) == 13 and len(splits["train"]) == total - 13
    shares = np.array([2 + k for k in range(10)]) * 13 / total
    assert np.all(np.abs(np.array(per_class(splits["val"])) - shares) < 1)


def test_prepare_stage_reports_an_unsafe_archive_in_one_line(imagefolder, tmp_path):
    evil = _tar_with(tmp_path, imagefolder, tarfile.TarInfo("../evil.png"), b"x")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": str(evil), "val_size": 20}}))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prepare: error:") and "../evil.png" in lines[0]
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    assert not (tmp_path / "data" / "prepared").exists()
