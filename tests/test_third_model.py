"""A third model, added the way the README's "Adding a model" says (a package under models/, one line in
the registry, one params.yaml section, one dvc.yaml block — nothing else), goes through every stage, is
rerun where it should be, appears in a study's pairs, and passes the whole fast test suite."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, dvc, make_tiny_project, run

pytestmark = pytest.mark.slow

PARAMS = '''"""A small residual CNN: a conv stem, residual stages, global average pooling."""

from __future__ import annotations

from dataclasses import dataclass

from vitcnn.errors import require
from vitcnn.models.spec import GradCam, ModelSpec


@dataclass(frozen=True)
class ThirdParams:
    width: int = 16
    stages: int = 2

    def check(self, section: str, image_size: int) -> None:
        require(self.width >= 1, f"{section}.width", self.width, "use an integer >= 1")
        require(1 <= self.stages and 2**self.stages <= image_size, f"{section}.stages", self.stages,
                "use 1.. as many stages as halve the image")


SPEC = ModelSpec(name="third", label="ResNet-S", color="tab:green", params=ThirdParams,
                 module="vitcnn.models.third.model", explains=(GradCam(),), tiny={"width": 4, "stages": 1})
'''
MODEL = '''"""The third model's nn.Module."""

from __future__ import annotations

import torch
import torch.nn as nn

from vitcnn.models.third import ThirdParams


def build(params: ThirdParams, num_classes: int, img_size: int) -> "Third":
    return Third(num_classes=num_classes, width=params.width, stages=params.stages)


class Stage(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x + self.conv(x))


class Third(nn.Module):
    def __init__(self, *, num_classes: int, width: int, stages: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.ModuleList(Stage(width) for _ in range(stages))
        self.head = nn.Linear(width, num_classes)

    def no_weight_decay(self) -> set[str]:
        return set()

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x)[-1]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
'''


def add_third_model(repo: Path, section: dict) -> None:
    """What the README's "Adding a model" lists, and nothing else; `section`: its params in params.yaml."""
    package = repo / "src/vitcnn/models/third"
    package.mkdir()
    (package / "__init__.py").write_text(PARAMS)
    (package / "model.py").write_text(MODEL)
    registry = repo / "src/vitcnn/models/__init__.py"
    registry.write_text(registry.read_text().replace('    "cnn": "vitcnn.models.cnn",\n',
                                                     '    "cnn": "vitcnn.models.cnn",\n    "third": "vitcnn.models.third",\n'))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["third"] = {**section, "recipe": dict.fromkeys(params["cnn"]["recipe"])}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pipeline = (repo / "dvc.yaml").read_text()
    block = re.search(r"\n  train_cnn:\n.*?(?=\n\n  \w)", pipeline, re.S).group(0)
    copy = re.sub(r"(?<![a-z])cnn\b", "third", block)  # train_cnn, models/cnn, ... but not vitcnn
    (repo / "dvc.yaml").write_text(pipeline.replace(block, block + "\n" + copy))


def test_a_third_model_runs_through_every_stage_and_every_test(tmp_path):
    repo, env = make_tiny_project(tmp_path)
    add_third_model(repo, {"width": 4, "stages": 1})  # tiny, as the tiny project's other models
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "a third model"], repo, env)
    dvc("repro", cwd=repo, env=env, timeout=900)

    def read(path: str) -> dict:
        return json.loads((repo / path).read_text())

    assert set(read("metrics/evaluate.json")) == {"vit", "cnn", "third"}
    assert set(read("metrics/robustness.json")) == {"vit", "cnn", "third"}
    assert {(p["a"], p["b"]) for p in read("plots/robustness/paired.json")} == {
        ("vit", "cnn"), ("vit", "third"), ("cnn", "third")}
    report = (repo / "plots/report.md").read_text()
    assert "ViT vs CNN vs ResNet-S" in report and "ResNet-S feature maps and Grad-CAM" in report
    assert (repo / "plots/images/third_features.png").is_file()
    assert "third" in (repo / "plots/compare/tradeoff.csv").read_text()

    # A change to the third model's params reruns its training and every stage that reads its outputs.
    before = read("metrics/evaluate.json")["third"]
    out = dvc("exp", "run", "-n", "wider", "-S", "third.width=6", cwd=repo, env=env, timeout=900)
    text = out.stdout + out.stderr
    for stage in ("train_third", "evaluate", "robustness", "visualize"):
        assert f"Running stage '{stage}'" in text, text
    for stage in ("train_vit", "train_cnn", "prepare"):
        assert f"Stage '{stage}' didn't change, skipping" in text, text
    after = read("metrics/evaluate.json")["third"]
    assert after["params"] > before["params"] and after["params"] == read("metrics/train_third.json")["params"]

    # A study summary pairs the third model with each other one.
    summary = subprocess.run([sys.executable, "-m", "vitcnn", "study", "summarize", "--json", "--out",
                              str(tmp_path / "summary")], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=300)
    assert summary.returncode == 0, summary.stderr
    (group,) = json.loads(summary.stdout)["groups"]
    assert {(p["a"], p["b"]) for p in group["pairs"]} == {("vit", "cnn"), ("vit", "third"), ("cnn", "third")}

    # And the fast test suite passes as it is, in a copy of the project with the third model registered.
    project = tmp_path / "suite"
    for name in ("src", "stages", "tests", "recipes", "results", "studies", "tools", "benchmarks", ".dvc/plots",
                 "README.md", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore"):
        source, target = ROOT / name, project / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    add_third_model(project, {"width": 16, "stages": 2})  # its defaults, as a shipped params.yaml has them
    suite = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow and not cuda", "-p",
                            "no:cacheprovider", "tests"], cwd=project,
                           env={**env, "PYTHONPATH": str(project / "src"), "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=1800)
    assert suite.returncode == 0, suite.stdout[-4000:] + suite.stderr[-2000:]
    assert re.search(r"\d+ passed", suite.stdout), suite.stdout[-500:]
