"""Tiny, seeded, generated datasets in every layout `data.source` accepts.

Nothing here touches the network: the ImageFolder tree (folder, .tar, .tar.gz, .zip) and
the official CIFAR-10 / CIFAR-100 python layouts (folder and .tar.gz) are written from
random pixels, and each fixture also returns the arrays it wrote so tests can check
that reading them back gives exactly the same images and labels.
"""

from __future__ import annotations

import os

# The models and batches here are tiny: one thread is fastest, and with 2 OpenMP threads on a
# machine busy with other work each matrix product can wait ~20 ms at a barrier (50x slower).
# Set before torch is imported, so this process and every stage it spawns use one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# cuBLAS reads this once, at its first call: the deterministic GPU tests need it set before any.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import io  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from vitcnn.models import MODELS, REGISTRY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The real CIFAR-10 class names, written to disk in a scrambled order: readers must sort them.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WRITE_ORDER = ["truck", "cat", "airplane", "horse", "bird", "ship", "dog", "automobile", "frog", "deer"]
TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 2
TOP_FOLDER = "cifar10-jpeg"  # the top-level folder of the real ImageFolder archive


def random_images(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8 random pixels."""
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def pairs(images: np.ndarray, labels) -> list[tuple[int, bytes]]:
    """(label, pixels) of every item, sorted: compares datasets whatever their order."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    assert len(images) == len(labels)
    return sorted((int(label), np.ascontiguousarray(img).tobytes()) for img, label in zip(images, labels))


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    """A tar archive (mode 'w' or 'w:gz') of {member name: content}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def write_tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@dataclass
class ImageFolderData:
    folder: Path  # train/<class>/*.png and test/<class>/*.png directly inside
    tar: Path  # the same files under cifar10-jpeg/
    tar_gz: Path  # the same files under cifar10-jpeg/
    tgz_flat: Path  # .tar.gz without a top folder
    zip: Path  # the same files under cifar10-jpeg/
    members: dict[str, bytes]  # relative name -> PNG bytes (no top folder)
    classes: list[str]  # sorted
    train_images: np.ndarray
    train_labels: np.ndarray  # index into `classes`
    test_images: np.ndarray
    test_labels: np.ndarray


def make_imagefolder_members(seed: int = 0, train_per_class: int = TRAIN_PER_CLASS,
                             test_per_class: int = TEST_PER_CLASS) -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    arrays = {"train": ([], []), "test": ([], [])}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for cls in WRITE_ORDER:
            for i, image in enumerate(random_images(rng, per_class)):
                members[f"{split}/{cls}/{cls}_{i:03d}.png"] = png_bytes(image)
                arrays[split][0].append(image)
                arrays[split][1].append(CIFAR10_CLASSES.index(cls))
    return members, {s: (np.stack(im), np.array(lb, dtype=np.int64)) for s, (im, lb) in arrays.items()}


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory) -> ImageFolderData:
    """10 CIFAR-10 classes, 6 train + 2 test random PNGs each, as a folder and as archives."""
    base = tmp_path_factory.mktemp("imagefolder")
    members, arrays = make_imagefolder_members()
    topped = {f"{TOP_FOLDER}/{name}": data for name, data in members.items()}
    folder = write_tree(base / "folder", members)
    (base / "cifar10.tar").write_bytes(tar_bytes(topped))
    (base / "cifar10.tar.gz").write_bytes(tar_bytes(topped, "w:gz"))
    (base / "flat.tar.gz").write_bytes(tar_bytes(members, "w:gz"))
    (base / "cifar10.zip").write_bytes(zip_bytes(topped))
    return ImageFolderData(
        folder=folder, tar=base / "cifar10.tar", tar_gz=base / "cifar10.tar.gz", tgz_flat=base / "flat.tar.gz",
        zip=base / "cifar10.zip", members=members, classes=list(CIFAR10_CLASSES),
        train_images=arrays["train"][0], train_labels=arrays["train"][1],
        test_images=arrays["test"][0], test_labels=arrays["test"][1],
    )


# --- the official python layouts -----------------------------------------------------------


def to_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) row-major CHW, as the official batches store pixels."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def batch_pickle(obj: dict) -> bytes:
    return pickle.dumps(obj, protocol=2)


@dataclass
class OfficialData:
    folder: Path  # .../cifar-10-batches-py or .../cifar-100-python
    tar_gz: Path | None
    classes: list[str]  # as in the meta file (not re-sorted)
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@pytest.fixture(scope="session")
def official_cifar10(tmp_path_factory) -> OfficialData:
    """cifar-10-batches-py/: 5 train batches of 8 images, a test batch of 10, batches.meta; and its .tar.gz."""
    base = tmp_path_factory.mktemp("cifar10_official")
    rng = np.random.default_rng(1)
    # label_names in the meta file's own order, which is not alphabetical here:
    # the reader must keep it, since labels are indices into it.
    label_names = list(WRITE_ORDER)
    members = {}
    train_images, train_labels = [], []
    for i in range(1, 6):
        images = random_images(rng, 8)
        labels = rng.integers(0, 10, size=8).tolist()
        members[f"data_batch_{i}"] = batch_pickle(
            {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": to_rows(images),
             b"filenames": [f"img_{i}_{j}.png".encode() for j in range(8)]})
        train_images.append(images)
        train_labels += labels
    test_images = random_images(rng, 10)
    test_labels = list(range(10))
    members["test_batch"] = batch_pickle(
        {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": to_rows(test_images)})
    members["batches.meta"] = batch_pickle(
        {b"label_names": [n.encode() for n in label_names], b"num_cases_per_batch": 8, b"num_vis": 3072})
    folder = write_tree(base / "cifar-10-batches-py", members)
    tar_gz = base / "cifar-10-python.tar.gz"
    tar_gz.write_bytes(tar_bytes({f"cifar-10-batches-py/{n}": d for n, d in members.items()}, "w:gz"))
    return OfficialData(folder, tar_gz, label_names, np.concatenate(train_images),
                        np.array(train_labels, dtype=np.int64), test_images, np.array(test_labels, dtype=np.int64))


@pytest.fixture(scope="session")
def official_cifar100(tmp_path_factory) -> OfficialData:
    """cifar-100-python/: train (2 per class), test (1 per class) with fine and coarse labels, and meta."""
    base = tmp_path_factory.mktemp("cifar100_official")
    rng = np.random.default_rng(2)
    names = [f"class{i:03d}" for i in range(100)]
    train_labels = np.repeat(np.arange(100), 2)
    rng.shuffle(train_labels)
    test_labels = rng.permutation(100)
    train_images, test_images = random_images(rng, 200), random_images(rng, 100)
    members = {
        "train": batch_pickle({b"data": to_rows(train_images), b"fine_labels": train_labels.tolist(),
                               b"coarse_labels": (train_labels // 5).tolist()}),
        "test": batch_pickle({b"data": to_rows(test_images), b"fine_labels": test_labels.tolist(),
                              b"coarse_labels": (test_labels // 5).tolist()}),
        "meta": batch_pickle({b"fine_label_names": [n.encode() for n in names],
                              b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}),
    }
    folder = write_tree(base / "cifar-100-python", members)
    return OfficialData(folder, None, names, train_images, train_labels.astype(np.int64),
                        test_images, test_labels.astype(np.int64))


# --- a tiny copy of the project in its own git + DVC repository -----------------------------

TINY_SOURCE = "../tiny-cifar10.tar.gz"  # relative to the project, as a user's local copy may be


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def dvc(*args: str, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, env, timeout)


def make_tiny_project(base: Path, pythonpath: list[Path] = (), env: dict | None = None) -> tuple[Path, dict]:
    """base/project: dvc.yaml, params.yaml (tiny models, one epoch), stages/, src/ and the plot
    templates, committed in a fresh git + DVC repo; its data, 60 + 20 generated images, is base/tiny-cifar10.tar.gz, named by a
    relative data.source. Returns the repo and the environment to run it in: this venv's python
    first on PATH, the copied src/ on PYTHONPATH (after `pythonpath`), no analytics."""
    repo = base / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, repo / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())

    members, _ = make_imagefolder_members(seed=3)
    (repo / TINY_SOURCE).write_bytes(tar_bytes({f"{TOP_FOLDER}/{n}": d for n, d in members.items()}, "w:gz"))

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source=TINY_SOURCE, val_size=20)
    params["train"].update(epochs=1, batch_size=16)
    for name in MODELS:  # every registered model, small
        params[name].update(REGISTRY[name].tiny)
    params["evaluate"].update(latency_runs=2, throughput_batches=1)
    params["visualize"].update(num_images=2)
    params["robustness"].update(subset=0, severities=[1, 5], occlusion_fractions=[0.5])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {
        **os.environ,
        **(env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # the copied code, not the editable install
        "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(repo / "src")]),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(base / "dvc-site-cache"),
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    run(["git", "init", "-q"], repo, env)
    run(["git", "config", "user.name", "test"], repo, env)
    run(["git", "config", "user.email", "test@example.com"], repo, env)
    run(["git", "config", "commit.gpgsign", "false"], repo, env)
    dvc("init", "-q", cwd=repo, env=env)
    # The project's plot templates, as its own .dvc/ has them (dvc.yaml names one).
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots", dirs_exist_ok=True)
    dvc("config", "plots.html_template", "plots/offline.html", cwd=repo, env=env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "tiny project"], repo, env)
    return repo, env
