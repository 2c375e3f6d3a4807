"""Interrupted, killed and failing stages: what the user sees, and that no result is damaged.

The train stage runs as a real process in a scratch project (params.yaml + data prepared
by the real prepare stage from generated images), so kills and signals are real.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, make_imagefolder_members, write_tree

TIMING_KEYS = {"train_time_s", "train_images_per_s", "epoch_time_s", "images_per_s"}


def stage(project: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / args[0]), *args[1:]]


def run_stage(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(stage(project, *args), cwd=project, capture_output=True, text=True, timeout=300)


def write_params(project: Path, **sections) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A scratch project with 1,200 generated training images prepared by the prepare stage."""
    base = tmp_path_factory.mktemp("reliability")
    members, _ = make_imagefolder_members(seed=5, train_per_class=120, test_per_class=2)
    source = write_tree(base / "images", members)
    project = base / "project"
    project.mkdir()
    write_params(project, data={"source": str(source), "val_size": 100},
                 train={"epochs": 3, "batch_size": 16}, vit={"embed_dim": 32, "depth": 2, "num_heads": 2})
    result = run_stage(project, "prepare.py")
    assert result.returncode == 0, result.stderr
    return project


def outputs(project: Path) -> dict:
    """The ViT's weights, metrics and history, timings left out."""
    metrics = json.loads((project / "metrics/train_vit.json").read_text())
    with open(project / "plots/train/vit.csv", newline="") as f:
        history = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in csv.DictReader(f)]
    return {
        "weights": load_file(str(project / "models/vit/model.safetensors")),
        "metrics": {k: v for k, v in metrics.items() if k not in TIMING_KEYS},
        "history": history,
    }


def start_and_stop_after_epoch(project: Path, epoch: int, sig: int) -> subprocess.Popen:
    """Start `train.py vit`, send `sig` as soon as it reports `epoch`, and wait for it to end."""
    proc = subprocess.Popen(stage(project, "train.py", "vit"), cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(f"train_vit: epoch {epoch}/"):
            proc.send_signal(sig)
            break
    proc.wait(timeout=120)
    return proc


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(project):
    uninterrupted = run_stage(project, "train.py", "vit")
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected = outputs(project)

    killed = start_and_stop_after_epoch(project, 1, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert (project / "checkpoints/vit/last.pt").is_file(), "the kill came after the run had finished"

    resumed = run_stage(project, "train.py", "vit")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming vit from epoch" in resumed.stderr
    got = outputs(project)
    assert got["metrics"] == expected["metrics"]
    assert got["history"] == expected["history"]
    assert got["weights"].keys() == expected["weights"].keys()
    for key, tensor in expected["weights"].items():
        assert got["weights"][key].equal(tensor), key
    assert not (project / "checkpoints/vit/last.pt").exists(), "a finished stage leaves no checkpoint"


def test_sigterm_stops_with_one_line_and_leaves_earlier_results_intact(project):
    first = run_stage(project, "train.py", "vit")
    assert first.returncode == 0, first.stderr
    before = {p: (project / p).read_bytes() for p in ("metrics/train_vit.json", "plots/train/vit.csv",
                                                      "models/vit/model.safetensors")}

    stopped = start_and_stop_after_epoch(project, 1, signal.SIGTERM)
    stderr = stopped.stderr.read()
    assert stopped.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("train_vit: interrupted")
    assert {p: (project / p).read_bytes() for p in before} == before
    assert not list(project.rglob("*.tmp")), "no temporary file is left behind"

    (project / "checkpoints/vit/last.pt").unlink(missing_ok=True)


def test_a_non_finite_loss_fails_the_stage_without_metrics(tmp_path, project):
    scratch = tmp_path / "nan"
    scratch.mkdir()
    os.symlink(project / "data", scratch / "data")
    write_params(scratch, train={"epochs": 2, "batch_size": 16, "lr": 1.0e12},
                 vit={"embed_dim": 32, "depth": 2, "num_heads": 2})
    result = run_stage(scratch, "train.py", "vit")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "training loss is not finite at epoch 1, step" in result.stderr
    assert not (scratch / "metrics").exists() and not (scratch / "models").exists()


def test_a_failed_compilation_warns_in_one_line_and_trains_eagerly(tmp_path, project):
    """What a GPU machine without a working compiler toolchain sees, simulated on the CPU."""
    weights = {}
    for mode in ("on", "off"):
        scratch = tmp_path / mode
        scratch.mkdir()
        os.symlink(project / "data", scratch / "data")
        write_params(scratch, train={"epochs": 2, "batch_size": 16, "compile": mode}, cnn={"channels": [8, 16]})
        env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),  # the compiler torch.compile's CPU code needs
               "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}  # no earlier build to fall back on
        result = subprocess.run(stage(scratch, "train.py", "cnn"), cwd=scratch, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        warnings = [line for line in result.stderr.replace("\r", "\n").splitlines() if "compile" in line]
        if mode == "on":
            assert len(warnings) == 1, result.stderr
            assert warnings[0].startswith("train_cnn: torch.compile failed (")
            assert warnings[0].endswith("); training without compilation")
        else:
            assert warnings == []
        weights[mode] = load_file(str(scratch / "models/cnn/model.safetensors"))
    assert weights["on"].keys() == weights["off"].keys()
    for key, tensor in weights["off"].items():
        assert weights["on"][key].equal(tensor), key  # the failed trial step left no trace


def test_a_corrupt_source_fails_prepare_and_keeps_the_prepared_data(tmp_path, project):
    before = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 definitely not a gzip stream")
    params = project / "params.yaml"
    original = params.read_text()
    try:
        write_params(project, data={"source": str(broken), "val_size": 100},
                     train={"epochs": 3, "batch_size": 16}, vit={"embed_dim": 32, "depth": 2, "num_heads": 2})
        result = run_stage(project, "prepare.py")
    finally:
        params.write_text(original)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "corrupt or truncated archive" in result.stderr
    assert str(broken) in result.stderr
    assert {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()} == before


def test_download_checksum_mismatch_is_retried_once_then_reported(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    from vitcnn.errors import DataError
    from vitcnn.sources import download_official

    calls = []

    def corrupt_download(url, root, filename, md5):
        calls.append(url)
        Path(root, filename).write_bytes(b"not the archive")
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(tv_utils, "download_url", corrupt_download)
    with pytest.raises(DataError, match="checksum .*mismatch twice"):
        download_official("cifar10", tmp_path)
    assert len(calls) == 2
    assert not (tmp_path / "cifar-10-python.tar.gz").exists(), "a corrupt download is not kept"


def test_unreachable_download_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    from vitcnn.errors import DataError
    from vitcnn.sources import download_official

    def offline(url, root, filename, md5):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(DataError, match="set data.source to its path"):
        download_official("cifar10", tmp_path)


def test_runs_downloading_at_once_fetch_the_archive_once(tmp_path, monkeypatch):
    # Queued experiments on several GPUs can start together; they share the project's download cache.
    import hashlib
    import threading
    import time

    import torchvision.datasets.utils as tv_utils

    from vitcnn import sources

    archive = b"the official archive"
    monkeypatch.setitem(sources.OFFICIAL, "cifar10", {**sources.OFFICIAL["cifar10"],
                                                      "md5": hashlib.md5(archive).hexdigest()})
    calls = []

    def slow_download(url, root, filename, md5):
        calls.append(url)
        time.sleep(0.3)  # long enough for the other run to look for the file meanwhile
        Path(root, filename).write_bytes(archive)

    monkeypatch.setattr(tv_utils, "download_url", slow_download)
    paths = []
    runs = [threading.Thread(target=lambda: paths.append(sources.download_official("cifar10", tmp_path)))
            for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(calls) == 1
    assert paths == [tmp_path / "cifar-10-python.tar.gz"] * 2 and paths[0].read_bytes() == archive


def test_out_of_memory_names_the_batch_size_and_what_to_try(project, monkeypatch, capsys):
    import runpy

    import torch

    import vitcnn.train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(vitcnn.train, "fit", out_of_memory)
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["stages/train.py", "vit"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "stages" / "train.py"), run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "ran out of memory at train.batch_size 16; try 8" in err[0]
