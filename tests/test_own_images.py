"""Your own images: every layout a user has (train/ + test/ with or without val/, one folder of class
folders), as folders and archives; images of any size and mode, brought to data.image_size; and the
bad input such folders hold, each one line before any training."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from conftest import tar_bytes, write_tree, zip_bytes
from vitcnn.config import ConfigError, load_params, params_type
from vitcnn.data import load_split
from vitcnn.errors import DataError
from vitcnn.prepare import prepare

# One colour per class, so that a prepared image tells its class and that it was not mixed up.
COLOURS = {"apple": (200, 30, 30), "leaf": (30, 200, 30), "sky": (30, 30, 200)}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def solid(cls: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", size, COLOURS[cls])
    return image.convert(mode) if mode != "RGB" else image


def sideways(cls: str) -> bytes:
    """A JPEG stored rotated a quarter turn, with the EXIF orientation that turns it upright: upright, its top
    half is the class's colour and its bottom half white."""
    upright = Image.new("RGB", (40, 40), (255, 255, 255))
    upright.paste(Image.new("RGB", (40, 20), COLOURS[cls]), (0, 0))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # displayed after ROTATE_270: orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def class_images(cls: str, count: int) -> dict[str, bytes]:
    """`count` images of one class in every size and mode a folder of photos has, and its oddities."""
    kinds = [
        ("a.PNG", encode(solid(cls, (30, 20)), "PNG")),  # upper-case extension, wider than tall
        ("b.jpeg", encode(solid(cls, (64, 64)), "JPEG", quality=95)),
        ("c.JPG", encode(solid(cls, (50, 90), "CMYK"), "JPEG", quality=95)),  # CMYK JPEG, taller than wide
        ("d.png", encode(solid(cls, (24, 24), "L"), "PNG")),  # grayscale
        ("e.png", encode(solid(cls, (24, 24), "P"), "PNG")),  # palette
        ("f.png", encode(solid(cls, (24, 24), "RGBA"), "PNG")),  # RGBA
        ("g.jpg", sideways(cls)),  # EXIF-rotated
        ("h.webp", encode(solid(cls, (33, 31)), "WEBP", lossless=True)),
    ]
    return {f"{cls}/{i:02d}{name}": data for i, (name, data) in enumerate(kinds * (count // len(kinds) + 1))
            if i < count}


def class_folders(counts: dict[str, int]) -> dict[str, bytes]:
    members = {name: data for cls, n in counts.items() for name, data in class_images(cls, n).items()}
    members |= {".DS_Store": b"\0\0\0\1Bud1", "README.md": b"# my photos\n", "LICENSE": b"MIT", "apple/Thumbs.db": b"\xd0\xcf"}
    return members


def params_for(source, **data):
    base = params_type(())()
    return dataclasses.replace(base, data=dataclasses.replace(base.data, source=str(source), dataset="folder",
                                                              image_size=24, **data))


def run_prepare(tmp_path, source, **data):
    out = tmp_path / "prepared"
    meta = prepare(params_for(source, **data), out_dir=out, download_dir=tmp_path / "no-downloads")
    return meta, {name: load_split(out, name) for name in ("train", "val", "test")}


def colour_of(image: np.ndarray) -> str:
    """The class whose colour the image's top-left quarter is closest to."""
    patch = image[: image.shape[0] // 4, : image.shape[1] // 4].reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - patch).sum())


def grey_of(cls: str) -> int:
    return round(np.dot(COLOURS[cls], (0.299, 0.587, 0.114)))  # PIL's L of the colour


@pytest.mark.parametrize("packed", ["folder", "tar.gz", "zip"])
def test_one_folder_of_class_folders_is_split_stratified_and_every_image_made_the_size(tmp_path, packed):
    members = {f"photos/{n}": d for n, d in class_folders({"apple": 20, "leaf": 10, "sky": 30}).items()}
    source = {"folder": lambda: write_tree(tmp_path / "src", members),
              "tar.gz": lambda: (tmp_path / "photos.tar.gz").write_bytes(tar_bytes(members, "w:gz")) and tmp_path / "photos.tar.gz",
              "zip": lambda: (tmp_path / "photos.zip").write_bytes(zip_bytes(members)) and tmp_path / "photos.zip"}[packed]()
    meta, splits = run_prepare(tmp_path, source, val_size=0.25, test_size=0.2)
    assert meta["classes"] == ["apple", "leaf", "sky"] and meta["layout"] == "classfolders"
    assert meta["counts"] == {"train": 36, "val": 12, "test": 12}  # 20% of 60 held out, then 25% of the 48 left
    for name, per_class in (("test", [4, 2, 6]), ("val", [4, 2, 6]), ("train", [12, 6, 18])):  # each class's share
        assert np.bincount(splits[name].labels.numpy(), minlength=3).tolist() == per_class, name
    assert meta["image_size"] == 24 and meta["image_shape"] == [24, 24, 3]
    assert meta["skipped"] == {"hidden files": 1, "files beside the class folders": 2, "not images": 1}
    assert meta["stored_sizes"]["30x20"] == 9 and meta["stored_sizes"]["40x40"] == 6  # as stored, before turning
    assert meta["name"] == "photos" and "held out" in meta["splits"]["test"]
    for split in splits.values():
        images, labels = split.images.numpy(), split.labels.numpy()
        assert images.dtype == np.uint8 and images.shape[1:] == (24, 24, 3)
        classes = [meta["classes"][i] for i in labels]
        # Every image is its class's colour (grayscale ones its grey), upright.
        for image, cls in zip(images, classes):
            top, bottom = image[:6].reshape(-1, 3).mean(0), image[-6:].reshape(-1, 3).mean(0)
            expected = [np.array(COLOURS[cls]), np.full(3, grey_of(cls))]
            assert min(np.abs(top - e).max() for e in expected) < 12, cls
            assert np.abs(bottom - 255).max() < 12 or min(np.abs(bottom - e).max() for e in expected) < 12


def test_train_test_and_a_validation_folder_are_kept_as_given(tmp_path):
    members = {}
    for split, n in (("train", 8), ("Validation", 3), ("test", 4)):
        members |= {f"{split}/{name}": data for name, data in class_folders(dict.fromkeys(COLOURS, n)).items()
                    if "/" in name and not name.endswith("Thumbs.db")}
    meta, splits = run_prepare(tmp_path, write_tree(tmp_path / "src", members))
    assert meta["layout"] == "imagefolder" and meta["counts"] == {"train": 24, "val": 9, "test": 12}
    assert "validation split" in meta["splits"]["val"] and meta["splits"]["test"] == "the source's test split"


@pytest.mark.parametrize("policy", ["crop", "pad", "stretch"])
def test_each_resize_policy_keeps_what_it_says(tmp_path, policy):
    wide = Image.new("RGB", (60, 20), (255, 255, 255))
    wide.paste(Image.new("RGB", (10, 20), (0, 0, 255)), (0, 0))  # a blue band at the far left
    members = {f"{c}/{i}.png": encode(wide if c == "sky" else solid(c, (20, 20)), "PNG")
               for c in COLOURS for i in range(4)}
    meta, splits = run_prepare(tmp_path, write_tree(tmp_path / "src", members), resize=policy, val_size=3,
                               test_size=3)
    images = np.concatenate([s.images.numpy()[s.labels.numpy() == 2] for s in splits.values()])  # the sky class
    left = images[:, 8:16, :3].reshape(-1, 3).mean(0)
    top = images[:, :3].reshape(-1, 3).mean(0)
    if policy == "crop":  # the centre of the wide image: the band at the far left is cut away
        assert left.min() > 200
    elif policy == "pad":  # all of it, with black above and below
        assert left[2] > 200 and left[0] < 60 and top.max() < 10
    else:  # all of it, squeezed: the band stays on the left, nothing black
        assert left[2] > 200 and left[0] < 60 and top.min() > 60
    assert meta["resize"] == policy


def test_cifar_at_32_is_prepared_as_before(imagefolder, tmp_path):
    base = params_type(())()
    params = dataclasses.replace(base, data=dataclasses.replace(base.data, source=str(imagefolder.tar_gz), val_size=20))
    prepare(params, out_dir=tmp_path / "p", download_dir=tmp_path)
    images = {img.tobytes() for name in ("train", "val") for img in load_split(tmp_path / "p", name).images.numpy()}
    assert images == {img.tobytes() for img in imagefolder.train_images}  # the very pixels, not resampled


# --- bad input: one line each, before any training ----------------------------------------------------


def test_a_broken_image_is_named_or_skipped_and_counted(tmp_path):
    members = class_folders(dict.fromkeys(COLOURS, 8))
    png = members["leaf/01b.jpeg"]
    members["leaf/99broken.PNG"] = encode(solid("leaf", (24, 24)), "PNG")[:60]  # truncated
    with pytest.raises(DataError, match=r"leaf/99broken.PNG: unreadable image .*data.skip_bad"):
        run_prepare(tmp_path, write_tree(tmp_path / "src", members), val_size=3, test_size=3)
    meta, splits = run_prepare(tmp_path, tmp_path / "src", val_size=3, test_size=3, skip_bad=True)
    assert meta["skipped"]["broken images"] == 1 and sum(meta["counts"].values()) == 24
    assert png  # the other images of the class are read


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    members = class_folders(dict.fromkeys(COLOURS, 8))
    members["sky/bomb.png"] = encode(Image.new("1", (9000, 9000)), "PNG")  # 81 M pixels, a few kB of PNG
    with pytest.raises(DataError, match=r"sky/bomb.png: 9000x9000 pixels is more than"):
        run_prepare(tmp_path, write_tree(tmp_path / "src", members))


def test_an_empty_class_folder_is_one_line(tmp_path):
    root = write_tree(tmp_path / "src", class_folders(dict.fromkeys(COLOURS, 8)))
    (root / "cloud").mkdir()
    with pytest.raises(DataError, match=r"cloud/ holds no image"):
        run_prepare(tmp_path, root)


def test_a_class_in_test_but_not_in_train_is_one_line(tmp_path):
    members = {f"train/{n}": d for n, d in class_images("apple", 8).items()} | {
        f"train/{n}": d for n, d in class_images("leaf", 8).items()} | {
        f"test/{n}": d for n, d in class_images("sky", 4).items()} | {
        f"test/{n}": d for n, d in class_images("apple", 4).items()}
    with pytest.raises(DataError, match=r"only in train: \['leaf'\], only in test: \['sky'\]"):
        run_prepare(tmp_path, write_tree(tmp_path / "src", members))


def test_a_split_with_fewer_images_than_classes_is_one_line(tmp_path):
    root = write_tree(tmp_path / "src", class_folders(dict.fromkeys(COLOURS, 3)))
    with pytest.raises(DataError, match=r"the test split would hold 2 images for 3 classes"):
        run_prepare(tmp_path, root, test_size=2, val_size=3)


def test_an_image_size_a_model_cannot_take_names_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 8\n")
    with pytest.raises(ConfigError, match=r"cnn.channels: .* at most 3 widths fit 8x8"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 36\nvit:\n  patch_size: 8\n")
    with pytest.raises(ConfigError, match=r"vit.patch_size: 8 is not allowed; the image size 36"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.slow
def test_every_stage_runs_on_a_folder_of_photos_at_48_px(tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    from conftest import dvc, make_tiny_project, run

    repo, env = make_tiny_project(tmp_path)
    members = {f"photos/{n}": d for n, d in class_folders(dict.fromkeys(COLOURS, 16)).items()}
    (tmp_path / "photos.zip").write_bytes(zip_bytes(members))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="../photos.zip", dataset="folder", image_size=48, val_size=0.25, test_size=0.25)
    params["robustness"].update(occlusion_patch=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "photos at 48 px"], repo, env)
    dvc("repro", cwd=repo, env=env, timeout=900)

    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert meta["image_shape"] == [48, 48, 3] and meta["classes"] == sorted(COLOURS) and meta["name"] == "photos"
    assert meta["counts"] == {"train": 27, "val": 9, "test": 12}
    for name in ("vit", "cnn"):
        assert json.loads((repo / "models" / name / "config.json").read_text())["image_size"] == 48
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluate) == {"vit", "cnn"} and evaluate["vit"]["flops_per_image"] > 0
    assert set(json.loads((repo / "metrics/robustness.json").read_text())) == {"vit", "cnn"}
    report = (repo / "plots/report.md").read_text()
    assert "on photos" in report and "images of 48×48 px (brought to that size by `crop`)" in report
    for figure in ("compare_sample.png", "vit_attention.png", "cnn_features.png", "robustness.png", "occlusion.png"):
        assert (repo / "plots/images" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    from PIL import Image as PILImage

    with PILImage.open(repo / "plots/images/compare_sample.png") as shown:
        assert shown.size[0] > 200  # the images, at their size, in a real figure
    summary = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=repo, env=env, capture_output=True,
                             text=True)
    assert summary.returncode == 0 and "test_acc" in summary.stdout
