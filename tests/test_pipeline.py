"""End to end: `dvc repro` of the real dvc.yaml on tiny data, then an experiment that changes one ViT
param and must rerun only the ViT's training (and what depends on it).

A copy of the project (dvc.yaml, params.yaml, stages/, src/) runs in a fresh git + DVC repo
(conftest.make_tiny_project).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import dvc, make_tiny_project, run
from vitcnn import paths
from vitcnn.models import MODELS

pytestmark = pytest.mark.slow

# Put first on PYTHONPATH while the stages run: each stage process records, at exit, which files of the
# project it imported and which it opened to read, so the test can check them against the stage's deps.
IMPORT_RECORDER = """
import atexit, importlib.abc, importlib.machinery, json, os, sys

opened = set()

def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        if not any(c in mode for c in "wax+") and not flags & (os.O_WRONLY | os.O_RDWR):
            opened.add(os.path.abspath(os.fsdecode(args[0])))

sys.addaudithook(_audit)


class _SafetensorsReads(importlib.abc.MetaPathFinder):
    # safetensors reads its files in Rust, where no audit event fires: note the paths it is given
    def find_spec(self, name, path, target=None):
        if name != "safetensors.torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            load_file = module.load_file
            module.load_file = lambda filename, *a, **k: (opened.add(os.path.abspath(filename)), load_file(filename, *a, **k))[1]

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _SafetensorsReads())


def _record():
    if not sys.argv or not sys.argv[0].replace(os.sep, "/").startswith("stages/"):
        return
    root = os.getcwd()
    used = sorted(os.path.relpath(m.__file__, root).replace(os.sep, "/") for name, m in list(sys.modules.items())
                  if (name == "vitcnn" or name.startswith("vitcnn.")) and getattr(m, "__file__", None))
    native = sys.modules.get("vitcnn.kernels")
    if native is not None and native.cpu_kernels.cache_info().currsize:  # the C++ source was built or loaded
        used.append(os.path.relpath(native.SOURCE, root).replace(os.sep, "/"))
    read = sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in opened if p.startswith(root + os.sep))
    out = os.path.join(os.environ["VITCNN_IMPORT_LOG"], f"{os.getpid()}.json")
    with open(out, "w") as f:
        json.dump({"argv": sys.argv, "modules": used, "read": read}, f)

atexit.register(_record)
"""
TEST_IMAGES = 20  # 2 per class in the generated data


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny copy of the project, reproduced once with `dvc repro` and committed."""
    base = tmp_path_factory.mktemp("pipeline")
    recorder = base / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(IMPORT_RECORDER)
    import_log = base / "imports"
    import_log.mkdir()
    repo, env = make_tiny_project(base, pythonpath=[recorder], env={"VITCNN_IMPORT_LOG": str(import_log)})
    repro = dvc("repro", cwd=repo, env=env, timeout=600)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "tiny pipeline"], repo, env)
    imports = [json.loads(p.read_text()) for p in sorted(import_log.glob("*.json"))]
    return {"repo": repo, "env": env, "repro": repro, "imports": imports}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_repro_writes_models_and_training_metrics(project):
    repo = project["repo"]
    for name in MODELS:
        assert (repo / "models" / name / "model.safetensors").stat().st_size > 0
        config = read_json(repo / "models" / name / "config.json")
        assert config["name"] == name and config["num_classes"] == 10
        metrics = read_json(repo / "metrics" / f"train_{name}.json")
        assert metrics["params"] > 0 and metrics["epochs"] == 1
        assert 0 <= metrics["val_acc"] <= 1
        history = read_csv(repo / "plots" / "train" / f"{name}.csv")
        assert [row["epoch"] for row in history] == ["1"]
        assert {"train_loss", "val_loss", "val_acc", "lr"} <= set(history[0])


def test_repro_evaluates_both_models_on_the_test_split(project):
    repo = project["repo"]
    metrics = read_json(repo / "metrics" / "evaluate.json")
    assert set(metrics) == set(MODELS)
    for name in MODELS:
        m = metrics[name]
        assert 0 <= m["test_acc"] <= 1
        assert m["params"] == read_json(repo / "metrics" / f"train_{name}.json")["params"]
        assert m["flops_per_image"] > 0
        assert m["inference_images_per_s"] > 0
        assert m["latency_ms"] > 0
        assert m["train_time_s"] >= 0
        with open(repo / paths.predictions(name), newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0][:2] == ["actual", "predicted"]  # the columns DVC's confusion template reads
        assert len(rows) == 1 + TEST_IMAGES
        classes = read_json(repo / "models" / name / "config.json")["classes"]
        assert all(a in classes and p in classes for a, p, *_ in rows[1:])
        assert sorted(a for a, *_ in rows[1:]) == sorted(classes * 2)  # every test image, once
        assert all(classes[int(i)] == a and classes[int(j)] == p for a, p, i, j, _ in rows[1:])  # indices beside


def test_repro_measures_robustness_and_calibration(project):
    repo = project["repo"]
    metrics = read_json(repo / "metrics" / "robustness.json")
    assert set(metrics) == set(MODELS)
    evaluate = read_json(repo / "metrics" / "evaluate.json")
    for name in MODELS:
        m = metrics[name]
        assert {"corruption_acc", "relative_robustness", "occlusion_patches_acc", "ece", "nll", "brier", "temperature",
                "ece_ts", "nll_ts", "brier_ts"} <= set(m)
        assert 0.05 <= m["temperature"] <= 20  # the search's bounds
        # The subset is the whole (tiny) test split here: its clean accuracy is evaluate's.
        assert m["subset_clean_acc"] == pytest.approx(evaluate[name]["test_acc"], abs=1e-6)
        severity = [r for r in read_csv(repo / paths.robustness_table("severity")) if r["model"] == name]
        assert [row["severity"] for row in severity] == ["0", "1", "5"]
        occlusion = [r for r in read_csv(repo / paths.robustness_table("occlusion")) if r["model"] == name]
        assert [float(row["fraction"]) for row in occlusion] == [0.0, 0.5]
        assert float(occlusion[0]["patches"]) == pytest.approx(m["subset_clean_acc"])
        for kind in ("reliability", "reliability_ts"):
            bins = [r for r in read_csv(repo / paths.robustness_table(kind)) if r["model"] == name]
            assert sum(int(b["count"]) for b in bins) == TEST_IMAGES
    paired = read_json(repo / paths.PAIRED)
    assert [(p["a"], p["b"]) for p in paired] == list(itertools.combinations(MODELS, 2))  # each pair of models
    for key in ("relative_robustness", "occlusion_patches_acc", "occlusion_box_acc", "ece", "ece_ts"):
        # tiny data: an interval, or None where a resample has no ratio
        interval = paired[0][key]["ci95"]
        assert interval is None or interval[0] <= interval[1]
    for key in ("ece", "ece_ts", "occlusion_box_acc"):
        assert paired[0][key]["diff"] == pytest.approx(metrics[MODELS[0]][key] - metrics[MODELS[1]][key], abs=2e-6)
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo, env=project["env"]).stdout)
    assert set(MODELS) <= set(_find_metrics(shown, "metrics/robustness.json"))
    assert "Robustness and calibration" in (repo / "plots" / "report.md").read_text()


def test_repro_draws_the_figures(project):
    images = project["repo"] / "plots" / "images"
    pngs = sorted(p.name for p in images.glob("*.png"))
    assert {"learning_curves.png", "confusion.png", "vit_attention.png", "cnn_features.png", "robustness.png",
            "occlusion.png", "reliability.png"} <= set(pngs)
    for name in pngs:
        assert (images / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _covered(path: str, deps: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_declares_the_code_it_imports_and_the_files_it_reads(project):
    # Code or data missing from a stage's deps means changing it does not rerun that stage. (Both ways, for
    # the code, is tests/test_deps.py's; here what each stage really did.)
    stages = yaml.safe_load((project["repo"] / "dvc.yaml").read_text())["stages"]
    runs = {" ".join(["python", *r["argv"]]): r for r in project["imports"]}
    for name, stage in stages.items():
        assert stage["cmd"] in runs, f"no record of stage {name} running ({sorted(runs)})"
        record = runs[stage["cmd"]]
        assert any(m.startswith("src/vitcnn/") for m in record["modules"])
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        # src/vitcnn/__init__.py holds only the package docstring and version.
        missing = sorted(m for m in set(record["modules"]) - {"src/vitcnn/__init__.py"} if not _covered(m, deps))
        assert not missing, f"stage {name} imports {missing} but dvc.yaml does not list them as deps"
        assert stage["cmd"].split()[1] in deps
        outs = {o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])}
        data = [p for p in record["read"] if p.split("/")[0] in ("data", "models", "metrics", "plots")
                and not _covered(p, outs)]
        assert data or name == "prepare", f"stage {name} read no earlier stage's output"
        unlisted = sorted(p for p in data if not _covered(p, deps))
        assert not unlisted, f"stage {name} reads {unlisted} but dvc.yaml does not list them as deps"


def test_dvc_metrics_show_lists_both_models(project):
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project["repo"], env=project["env"]).stdout)
    text = json.dumps(shown)
    evaluate = _find_metrics(shown, "metrics/evaluate.json")
    assert evaluate is not None, text
    assert set(MODELS) <= set(evaluate)
    for name in MODELS:
        assert _find_metrics(shown, f"metrics/train_{name}.json") is not None


def _find_metrics(node, filename: str):
    """The data of `filename` anywhere in `dvc metrics show --json` output (its layout varies by version)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key.replace("\\", "/").endswith(filename) and isinstance(value, dict):
                return value.get("data", value)
            found = _find_metrics(value, filename)
            if found is not None:
                return found
    return None


def test_second_repro_has_nothing_to_do(project):
    out = dvc("status", "--json", cwd=project["repo"], env=project["env"]).stdout
    assert json.loads(out) == {}, out


def vitcnn(*args: str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vitcnn", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert not check or result.returncode == 0, result.stderr
    return result


def test_results_save_keeps_the_run_with_the_dvc_lock_that_made_it(project):
    repo, env = project["repo"], project["env"]
    vitcnn("results", "save", "tiny", "--note", "a test run", cwd=repo, env=env)
    saved = repo / "results" / "tiny"
    assert (saved / "dvc.lock").read_bytes() == (repo / "dvc.lock").read_bytes()
    assert (saved / "params.yaml").read_bytes() == (repo / "params.yaml").read_bytes()
    for path in [*(repo / "metrics").glob("*.json"), *(repo / "plots").rglob("*.csv"), repo / "plots" / "report.md"]:
        assert (saved / path.relative_to(repo)).read_bytes() == path.read_bytes(), path
    machine = read_json(saved / "machine.json")
    head = run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    assert machine["commit"] == head and machine["source"] == "workspace" and machine["note"] == "a test run"
    assert machine["machine"]["cores"] >= 1 and machine["machine"]["cpu"]
    assert machine["software"]["torch"] == read_json(repo / "metrics" / "train_vit.json")["torch"]
    assert machine["trained"]["cnn"]["train_time_s"] == read_json(repo / "metrics" / "train_cnn.json")["train_time_s"]

    again = vitcnn("results", "save", "tiny", cwd=repo, env=env, check=False)  # nothing is overwritten by accident
    assert again.returncode == 1 and "exists already" in again.stderr and "Traceback" not in again.stderr
    shutil.rmtree(saved)


def test_results_save_refuses_outputs_that_dvc_lock_does_not_describe(project):
    repo, env = project["repo"], project["env"]
    params = repo / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("eval_batch_size: 1000", "eval_batch_size: 999"))
    try:
        result = vitcnn("results", "save", "stale", cwd=repo, env=env, check=False)
    finally:
        params.write_text(text)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "train_cnn" in result.stderr and "dvc repro" in result.stderr
    assert not (repo / "results" / "stale").exists()


def test_experiment_on_a_vit_param_reruns_only_what_depends_on_it(project):
    repo, env = project["repo"], project["env"]
    before = {name: (repo / "metrics" / name).read_bytes() for name in ("train_vit.json", "train_cnn.json")}
    cnn_mtime = (repo / "metrics" / "train_cnn.json").stat().st_mtime_ns
    prepared_mtime = (repo / "data" / "prepared" / "train.safetensors").stat().st_mtime_ns

    result = dvc("exp", "run", "-S", "vit.depth=2", cwd=repo, env=env, timeout=600)
    out = result.stdout + result.stderr
    assert "Stage 'prepare' didn't change, skipping" in out, out
    assert "Stage 'train_cnn' didn't change, skipping" in out, out
    assert "Running stage 'train_vit'" in out, out
    assert "Running stage 'evaluate'" in out, out

    # The CNN's results and the prepared data are untouched ...
    assert (repo / "metrics" / "train_cnn.json").read_bytes() == before["train_cnn.json"]
    assert (repo / "metrics" / "train_cnn.json").stat().st_mtime_ns == cnn_mtime
    assert (repo / "data" / "prepared" / "train.safetensors").stat().st_mtime_ns == prepared_mtime
    # ... and the ViT was retrained with the new depth: one more block, more parameters.
    vit_before, vit_after = json.loads(before["train_vit.json"]), read_json(repo / "metrics" / "train_vit.json")
    assert vit_after["params"] > vit_before["params"]
    assert read_json(repo / "models" / "vit" / "config.json")["params"]["depth"] == 2
    assert read_json(repo / "metrics" / "evaluate.json")["vit"]["params"] == vit_after["params"]

    # The experiment is recorded against the committed baseline, with its param and metrics.
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo, env=env).stdout)
    baseline = next(e for e in shown if e["rev"] != "workspace")
    experiments = [rev for exp in baseline.get("experiments") or [] for rev in exp.get("revs", [])]
    assert len(experiments) == 1, json.dumps(shown)[:2000]
    assert _exp_value(baseline, "params", "params.yaml")["vit"]["depth"] == 1
    assert _exp_value(experiments[0], "params", "params.yaml")["vit"]["depth"] == 2
    assert _exp_value(experiments[0], "metrics", "metrics/train_vit.json")["params"] == vit_after["params"]
    assert _exp_value(experiments[0], "metrics", "metrics/train_cnn.json") == json.loads(before["train_cnn.json"])


def test_results_save_of_an_experiment_reads_its_commit_not_the_workspace(project):
    repo, env = project["repo"], project["env"]
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo, env=env).stdout)
    baseline = next(e for e in shown if e["rev"] != "workspace")
    exp = (baseline.get("experiments") or [])[0]
    rev = exp["revs"][0]
    (repo / "metrics" / "evaluate.json").write_text("{}")  # the workspace is not what gets saved
    try:
        vitcnn("results", "save", "depth2", "--exp", exp["name"], cwd=repo, env=env)
    finally:
        run(["git", "checkout", "--", "metrics/evaluate.json"], repo, env)
    saved = repo / "results" / "depth2"
    assert read_json(saved / "metrics" / "evaluate.json") == _exp_value(rev, "metrics", "metrics/evaluate.json")
    assert yaml.safe_load((saved / "params.yaml").read_text())["vit"]["depth"] == 2
    assert "train_vit" in (saved / "dvc.lock").read_text()
    machine = read_json(saved / "machine.json")
    assert machine["commit"] == baseline["rev"] and machine["source"] == f"experiment {exp['name']}"
    shutil.rmtree(saved)


def _exp_value(entry: dict, kind: str, filename: str) -> dict:
    return entry["data"][kind][filename]["data"]


def test_a_vit_recipe_key_reruns_only_the_vits_training_and_what_depends_on_it(project):
    repo, env = project["repo"], project["env"]
    cnn_before = (repo / "metrics" / "train_cnn.json").read_bytes()
    result = dvc("exp", "run", "-S", "vit.recipe.lr=0.002", cwd=repo, env=env, timeout=600)
    out = result.stdout + result.stderr
    assert "Stage 'prepare' didn't change, skipping" in out, out
    assert "Stage 'train_cnn' didn't change, skipping" in out, out
    assert "Running stage 'train_vit'" in out and "Running stage 'evaluate'" in out, out
    assert (repo / "metrics" / "train_cnn.json").read_bytes() == cnn_before
    # What each model's own recipe sets is in its training metrics, which dvc exp show lists; the whole recipe
    # it was trained with is in its model folder.
    assert read_json(repo / "metrics" / "train_vit.json")["recipe"]["lr"] == 0.002
    assert "recipe" not in read_json(repo / "metrics" / "train_cnn.json")  # train.lr's: a params column
    assert read_json(repo / "models" / "cnn" / "config.json")["recipe"]["lr"] == 0.0003
    history = read_csv(repo / "plots" / "train" / "vit.csv")
    assert float(history[0]["lr"]) == 0.002


# --- dvc plots show / diff, drawn offline in a real browser -------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def render_offline(page: Path, tmp: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran in headless Chromium, every network request failing
    (a proxy that does not exist; file:// pages are read directly); optionally a screenshot."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp}", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
             "--virtual-time-budget=20000", "--window-size=1280,1600"]
    if screenshot:
        subprocess.run([*flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=180,
                       check=True)
    return subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180,
                          check=True).stdout


def assert_every_chart_drew(repo: Path, tmp: Path, page: Path, screenshot: Path | None = None) -> int:
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=[\"']?https?://", html), "the page loads a script from the network"
    declared = html.count("vegaEmbed(")
    assert declared >= 8  # loss, accuracy, lr, 2 confusion matrices, per-class bars, 4 trade-off scatters
    dom = render_offline(page, tmp, screenshot)
    drawn = len(re.findall(r"<canvas[^>]*class=\"marks\"|<svg[^>]*class=\"marks\"", dom))
    assert drawn == declared, f"{drawn} of {declared} Vega charts drew"
    assert 'img' in dom and "static/" in dom  # the PNG figures are on the page too
    return declared


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_dvc_plots_show_and_diff_draw_every_chart_offline(project, tmp_path):
    repo, env = project["repo"], project["env"]
    dvc("plots", "show", "-o", str(tmp_path / "show"), cwd=repo, env=env)
    screenshot = tmp_path / "plots.png"
    assert_every_chart_drew(repo, tmp_path / "browser-show", tmp_path / "show" / "index.html", screenshot)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The committed results against the workspace (the experiments above changed it): two revisions per chart.
    dvc("plots", "diff", "HEAD", "-o", str(tmp_path / "diff"), cwd=repo, env=env)
    assert_every_chart_drew(repo, tmp_path / "browser-diff", tmp_path / "diff" / "index.html")
    assert '"rev": "HEAD"' in (tmp_path / "diff" / "index.html").read_text()
