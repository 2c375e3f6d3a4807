"""dvc.yaml's code deps, both ways, without running anything: each stage lists every file of the project's
code it reads (else editing that file does not rerun it) and nothing it does not read (else editing it
reruns the stage for nothing).

What a stage reads is its script's imports followed through `src/` (every `import` in a module, at any
depth, counts: an import inside a function may run), plus what the registry imports by name: a
`train_<model>` stage builds that model (its package and its `model` module), the stages after training
every registered model. The slow pipeline test records what each stage really imports and opens.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from vitcnn.models import MODELS, REGISTRY

SRC = ROOT / "src"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
IGNORED = {"src/vitcnn/__init__.py"}  # the package's docstring and version only
# Files a module reads besides its imports: the fused CPU dropout's source, compiled when a model with
# dropout trains (models/layers.py's Dropout builds it on first use).
BUILT_WHEN_TRAINING = {"src/vitcnn/models/layers.py": "src/vitcnn/kernels/cpu_kernels.cpp"}


def module_file(module: str) -> Path | None:
    path = SRC / Path(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imports_of(path: Path, package: str) -> set[str]:
    """The vitcnn modules `path` imports anywhere in it (`package`: its own, for relative imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vitcnn"}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module.split(".")[0] == "vitcnn":
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names if module_file(f"{module}.{a.name}")}
    return found


def files_read(modules: set[str]) -> set[str]:
    """The project's files behind `modules` and everything they import, parent packages included."""
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = module_file(module)
        if path:
            todo += imports_of(path, module if path.name == "__init__.py" else ".".join(parts[:-1]))
    return {module_file(m).relative_to(ROOT).as_posix() for m in seen if module_file(m)} - IGNORED


def stage_reads(name: str, stage: dict) -> set[str]:
    script = stage["cmd"].split()[1]
    modules = imports_of(ROOT / script, "")
    trained = name.removeprefix("train_") if name.startswith("train_") else None
    if trained:  # builds its own model, by the registry's name of its module
        modules |= {REGISTRY[trained].module, f"vitcnn.models.{trained}"}
    elif "src/vitcnn/models/store.py" in files_read(modules):  # loads every trained model
        modules |= {REGISTRY[m].module for m in MODELS}
    read = files_read(modules) | {script}
    if trained:
        read |= {built for module, built in BUILT_WHEN_TRAINING.items() if module in read}
    return read


def declared(stage: dict) -> set[str]:
    """The code files a stage's deps name, folders expanded to the files in them."""
    files = set()
    for dep in stage["deps"]:
        path = ROOT / (dep if isinstance(dep, str) else next(iter(dep)))
        if path.is_dir() and path.relative_to(ROOT).parts[0] in ("src", "stages"):
            files |= {p.relative_to(ROOT).as_posix() for p in path.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts}
        elif path.relative_to(ROOT).parts[0] in ("src", "stages"):
            files.add(path.relative_to(ROOT).as_posix())
    return files - IGNORED


def test_every_registered_model_has_its_training_stage():
    assert {f"train_{name}" for name in MODELS} <= set(STAGES)
    for name in MODELS:
        assert STAGES[f"train_{name}"]["cmd"] == f"python stages/train.py {name}"


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_lists_the_code_it_reads_and_nothing_else(name):
    stage = STAGES[name]
    reads, listed = stage_reads(name, stage), declared(stage)
    assert not sorted(reads - listed), f"{name} reads {sorted(reads - listed)}, which dvc.yaml does not list"
    assert not sorted(listed - reads), f"{name} lists {sorted(listed - reads)}, which it never reads"


def test_the_check_sees_a_missing_and_an_unread_dependency():
    stage = STAGES["train_cnn"]
    without = {**stage, "deps": [d for d in stage["deps"] if d != "src/vitcnn/augment.py"]}
    assert "src/vitcnn/augment.py" in stage_reads("train_cnn", without) - declared(without)
    extra = {**stage, "deps": [*stage["deps"], "src/vitcnn/explain.py"]}
    assert "src/vitcnn/explain.py" in declared(extra) - stage_reads("train_cnn", extra)
