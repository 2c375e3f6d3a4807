"""Studies: the statistics against hand-computed cases, grouping and what is left out, one-line
errors before anything is queued, and a real 3-seed study on DVC's queue in a tiny project."""

from __future__ import annotations

import errno
import json
import math
import signal
import subprocess
import sys
import time

import pytest
from matplotlib.collections import PathCollection

from conftest import ROOT, dvc, make_tiny_project, run
from vitcnn.__main__ import main as vitcnn
from vitcnn.study import report, runs
from vitcnn.study.grid import StudyError
from vitcnn.study.experiments import Baseline, Experiment, last_error, parse
from vitcnn.study.summary import estimate, summarize

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student t quantiles, from tables (df: value)
MODELS = ["vit", "cnn"]
DEFAULTS = {"seed": 0, "data.split_seed": 0, "data.subset": 0, "train.epochs": 20, "vit.depth": 6}


def experiment(name: str, seed: int, vit: float, cnn: float | None, baseline: str = "a" * 40,
               state: str = "success", **params) -> Experiment:
    metrics = {"vit": {"test_acc": vit, "train_time_s": 10.0 + seed}}
    if cnn is not None:
        metrics["cnn"] = {"test_acc": cnn, "train_time_s": 20.0}
    return Experiment(name=name, rev=f"{name:0<40}"[:40], baseline=baseline, state=state,
                      timestamp=f"2026-01-01T00:00:0{seed}", params={**DEFAULTS, "seed": seed, **params},
                      metrics=metrics if state == "success" else {})


# --- statistics -------------------------------------------------------------------------------


def test_mean_std_and_t_interval_match_a_hand_computed_case():
    e = estimate([0.5, 0.6, 0.7])
    half = T_975[2] * 0.1 / math.sqrt(3)
    assert e.n == 3 and e.mean == pytest.approx(0.6) and e.std == pytest.approx(0.1)
    assert e.ci95 == pytest.approx((0.6 - half, 0.6 + half))


def test_one_value_has_a_mean_but_no_spread_or_interval():
    e = estimate([0.42])
    assert (e.mean, e.std, e.ci95) == (0.42, None, None)


def test_the_paired_difference_is_computed_per_seed():
    vit, cnn = [0.50, 0.60, 0.70], [0.80, 0.82, 0.95]
    summary = summarize([experiment(f"s-{i}", i, v, c) for i, (v, c) in enumerate(zip(vit, cnn))], [], MODELS)
    (group,) = summary.groups
    diffs = [-0.30, -0.22, -0.25]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = T_975[2] * std / math.sqrt(3)
    assert group.diff.mean == pytest.approx(mean)
    assert group.diff.std == pytest.approx(std)
    assert group.diff.ci95 == pytest.approx((mean - half, mean + half))
    # Paired, the gap is clearly below zero; each model's own interval is far wider.
    assert group.diff.ci95[1] < 0
    assert group.metrics["vit"]["test_acc"].ci95[1] - group.metrics["vit"]["test_acc"].ci95[0] > 4 * half
    assert group.seeds == [0, 1, 2] and group.models == ("vit", "cnn")


# --- grouping, and what is left out -------------------------------------------------------------


def test_groups_differ_in_params_not_seed_and_show_only_what_varies():
    runs = [experiment(f"d-{n}-{s}", s, 0.3 + n / 1e5 + s / 100, 0.5, **{"data.subset": n})
            for n in (1000, 5000) for s in range(3)]
    summary = summarize(runs, [Baseline("a" * 40, "main", DEFAULTS)], MODELS)
    assert summary.varying == ["data.subset"]
    assert [g.params for g in summary.groups] == [{"data.subset": 1000}, {"data.subset": 5000}]
    assert [len(g.experiments) for g in summary.groups] == [3, 3]
    assert summary.shared == {}  # nothing else differs from params.yaml
    assert summary.groups[1].metrics["vit"]["test_acc"].mean == pytest.approx(0.35 + 0.01)
    assert report.curve_axis(summary) == "data.subset"


def test_failed_and_unfinished_experiments_are_listed_and_left_out(tmp_path):
    log = tmp_path / "run.out"
    log.write_text("Running stage 'train_vit':\ntrain_vit: error: training loss is not finite at epoch 1, step 2\n"
                   "ERROR: failed to reproduce 'train_vit': failed to run: python stages/train.py vit, exited with 1\n")
    shown = [{"rev": "workspace", "data": {}}, {
        "rev": "b" * 40, "name": "main", "data": {"params": {"params.yaml": {"data": {"seed": 0}}}},
        "experiments": [
            _shown("ok", {"seed": 0}, {"vit": 0.4, "cnn": 0.6}, {"state": "success"}),
            _shown("bad", {"seed": 1}, None, {"state": "failed", "local": {"log": str(log)}}, error=True),
            _shown("busy", {"seed": 2}, None, {"state": "running"}),
            _shown("later", {"seed": 3}, None, {"state": "queued"}),
        ]}]
    found, baselines = parse(shown)
    summary = summarize(found, baselines, MODELS)
    assert [e.name for e in summary.groups[0].experiments] == ["ok"]
    assert [(e.name, e.error) for e in summary.failed] == [
        ("bad", "train_vit: error: training loss is not finite at epoch 1, step 2")]
    assert [(e.name, e.state) for e in summary.unfinished] == [("busy", "running"), ("later", "queued")]
    assert any("need >= 2 seeds" in note for note in summary.notes)
    text = report.markdown(summary, "t", [])
    assert "± — [—]" in text and "`bad`: train_vit: error: training loss" in text and "`busy`: running" in text


def test_other_commits_and_missing_models_are_grouped_apart_and_said_so():
    runs = [experiment("x-0", 0, 0.4, 0.6), experiment("x-1", 1, 0.5, 0.7),
            experiment("y-0", 0, 0.3, 0.5, baseline="c" * 40), experiment("z-0", 0, 0.2, None)]
    summary = summarize(runs, [], MODELS)
    keys = sorted((g.baseline[0], g.models, len(g.experiments)) for g in summary.groups)
    assert keys == [("a", ("vit",), 1), ("a", ("vit", "cnn"), 2), ("c", ("vit", "cnn"), 1)]
    assert any("2 commits" in note for note in summary.notes)
    assert any("lack a model" in note for note in summary.notes)
    assert next(g for g in summary.groups if g.models == ("vit",)).diff is None
    assert report.curve_axis(summary) is None


def test_a_seed_run_twice_counts_once():
    runs = [experiment("r-0", 0, 0.4, 0.6), experiment("again-0", 0, 0.4, 0.6), experiment("r-1", 1, 0.5, 0.7)]
    runs[1].timestamp = "2026-01-02T00:00:00"
    (group,) = summarize(runs, [], MODELS).groups
    assert group.seeds == [0, 1] and group.duplicates == ["r-0"]


def test_summary_files_hold_the_table_the_csv_and_the_figures(tmp_path):
    runs = [experiment(f"b-{e}-{s}", s, 0.3 + e / 100 + s / 200, 0.6 + e / 200, **{"train.epochs": e})
            for e in (1, 2, 4) for s in range(2)]
    summary = summarize(runs, [Baseline("a" * 40, "main", DEFAULTS)], MODELS)
    written = report.write(summary, tmp_path / "out", "Study b")
    assert sorted(p.name for p in written) == ["accuracy.png", "curve.png", "summary.csv", "summary.md"]
    for name in ("accuracy.png", "curve.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("train.epochs,commit,model,n,seeds,test_acc_mean,test_acc_std")
    assert len(rows) == 1 + 3 * 2 and rows[1].split(",")[:5] == ["1", "a" * 40, "vit", "2", "0 1"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| train.epochs=4 | 2 | 0 1 | 34.25% ± 0.35" in md and "![curve.png](curve.png)" in md


def _shown(name, params, accuracies, executor, error=False):
    metrics = {}
    if accuracies:
        metrics["metrics/evaluate.json"] = {"data": {m: {"test_acc": a, "train_time_s": 1.0} for m, a in accuracies.items()}}
    return {"name": name, "executor": executor, "revs": [{
        "rev": f"{name:0<40}"[:40], "name": name, "error": {"msg": "Experiment run failed"} if error else None,
        "data": {"timestamp": "2026-01-01T00:00:00", "params": {"params.yaml": {"data": params}}, "metrics": metrics}}]}


# --- one-line errors before anything is queued ---------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["data", "--subsets", "0"], "--subsets: '0' is not allowed; give training-image counts as integers >= 1"),
    (["data", "--subsets", "1000,x"], "--subsets: 'x' is not allowed"),
    (["data"], "--subsets is required for a data study (data.subset)"),
    (["budget", "--epochs", "5,5"], "--epochs: '5,5' repeats a value"),
    (["seeds", "-S", "vit.dept=8"], "-S vit.dept=8: unknown key 'vit.dept' (did you mean 'vit.depth'?)"),
    (["seeds", "-S", "seed=4"], "-S seed=4: seed is set by the study (--seeds); leave it out of -S"),
    (["data", "--subsets", "100", "-S", "data.subset=5"], "data.subset is set by the study (--subsets)"),
    (["sweep", "-S", "vit.embed_dim=128,130"], "vit.num_heads: 4 is not allowed; vit.embed_dim (130) must be divisible"),
    (["sweep", "-S", "vit.depth=4,,6"], "-S: Error parsing override 'vit.depth=4,,6'"),
    (["sweep"], "a sweep study needs at least one -S"),
    (["seeds", "--seeds", "0"], "--seeds: 0 is not allowed; use an integer >= 1"),
    (["seeds", "--name", "no spaces"], "--name: 'no spaces' is not allowed"),
])
def test_an_invalid_study_is_one_line_before_queueing(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vitcnn.study.queue.submit", lambda *a, **k: pytest.fail("queued an invalid study"))
    assert vitcnn(["study", "run", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitcnn study: error: ") and message in err, err


def test_the_grid_is_dvcs_own_expansion_seed_by_seed(tmp_path, monkeypatch):
    from vitcnn.study.grid import plan

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    runs = plan("sweep", "sw", 2, [], ["vit.depth=4,8", "train.lr=range(1,3)"], tmp_path / "params.yaml")
    assert [r.name for r in runs][:2] == ["sw-0", "sw-1"] and len(runs) == 2 * 2 * 2
    assert [r.seed for r in runs] == [0] * 4 + [1] * 4  # whole seeds first: stopping early leaves whole seeds
    assert runs[0].overrides == ("vit.depth=4", "train.lr=1", "seed=0")
    data = plan("data", "d", 1, [1000, 5000], ["train.epochs=3"], tmp_path / "params.yaml")
    assert [r.overrides for r in data] == [("train.epochs=3", "data.subset=1000", "seed=0"),
                                           ("train.epochs=3", "data.subset=5000", "seed=0")]


def test_a_study_takes_exactly_its_runs_name_dash_integer(tmp_path, monkeypatch, capsys):
    found = [experiment(name, seed, 0.5 + seed / 100, 0.6) for seed, name in
             enumerate(["v3-0", "v3-1", "v3b-0", "v3c-1", "v3-best", "v3-0-old"])]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vitcnn.study.experiments.load", lambda all_commits: (found, []))
    assert vitcnn(["study", "summarize", "--name", "v3", "--json", "--out", str(tmp_path / "o")]) == 0
    (group,) = json.loads(capsys.readouterr().out)["groups"]
    assert group["experiments"] == ["v3-0", "v3-1"]


def test_an_unavailable_device_or_missing_data_is_one_line_before_queueing(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("vitcnn.study.queue.submit", lambda *a, **k: pytest.fail("queued a study that must fail"))
    assert vitcnn(["study", "run", "seeds", "-S", "device=cuda"]) == 1
    assert capsys.readouterr().err == ("vitcnn study: error: -S device=cuda: this machine has no CUDA device that "
                                       "torch can use; use device=auto or cpu, or run the study where there is one "
                                       "(--cluster)\n")
    assert vitcnn(["study", "run", "seeds", "-S", "data.source=../nowhere.tar.gz"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data.source: ../nowhere.tar.gz does not exist (relative to the project: " \
        f"{(tmp_path / '../nowhere.tar.gz').resolve()})" in err
    (tmp_path / "dvc.lock").write_text("")  # what DVC leaves after a full disk
    assert vitcnn(["study", "run", "seeds"]) == 1
    assert "dvc.lock is empty (left by a DVC command that ran out of disk space?)" in capsys.readouterr().err


class FakeQueue:
    """DVC's celery queue as `queue.wait` sees it: each status() is the next poll of a script; no
    worker process files (wdir), so no worker lives."""

    wdir = "/nonexistent"

    def __init__(self, polls: list[list[tuple[str, str, int]]], on_poll=None, workers: int = 1):
        self.polls, self.calls, self.on_poll, self.workers = polls, 0, on_poll, workers

    def status(self) -> list[dict]:
        poll = self.polls[min(self.calls, len(self.polls) - 1)]
        self.calls += 1
        assert self.calls < 20, "still waiting after 20 polls"
        return [{"name": name, "status": status, "timestamp": t, "rev": f"{name}{t}"} for name, status, t in poll]

    def worker_status(self) -> dict:
        return {f"worker-{i}": [] for i in range(self.workers)}

    def _iter_active_tasks(self) -> list:
        return []


@pytest.fixture
def fake_queue(monkeypatch):
    """Install a FakeQueue behind `queue.open_repo`; no waiting between polls."""
    import contextlib
    import types

    from vitcnn.study import queue

    def install(polls, on_poll=None, workers=1):
        fake = FakeQueue(polls, on_poll, workers)

        @contextlib.contextmanager
        def open_repo(root):
            yield types.SimpleNamespace(experiments=types.SimpleNamespace(celery_queue=fake))

        monkeypatch.setattr(queue, "open_repo", open_repo)
        monkeypatch.setattr(queue.time, "sleep", lambda s: fake.on_poll and fake.on_poll())
        return fake

    return install


def test_wait_follows_a_requeued_seed_by_its_latest_entry(fake_queue):
    from vitcnn.study import queue

    # DVC lists running tasks first, failed ones after: the old failure of s-1 came last.
    fake = fake_queue([[("s-1", "Running", 2), ("s-0", "Success", 0), ("s-1", "Failed", 1)],
                       [("s-1", "Success", 2), ("s-0", "Success", 0), ("s-1", "Failed", 1)]])
    assert queue.wait(["s-0", "s-1"], "s", poll_s=0).states == {"s-0": "Success", "s-1": "Success"}
    assert fake.calls == 2


def test_runs_queued_with_no_worker_left_end_the_waiting_with_one_line(fake_queue, monkeypatch):
    from vitcnn.study import queue

    fake_queue([[("s-0", "Success", 0), ("s-1", "Queued", 0)]], workers=0)  # its worker was killed
    monkeypatch.setattr(queue, "IDLE_S", 0.0)  # the grace a worker just started gets, not waited out here
    with pytest.raises(StudyError, match=r"^1 runs of 's' are queued and no DVC queue worker is running \(stopped, "
                                         r"or killed\?\): start workers with `dvc queue start -j 2`, then follow "
                                         r"them with `vitcnn study wait s`$"):
        queue.wait(["s-0", "s-1"], "s", poll_s=0, jobs=2)


def test_wait_exits_nonzero_when_runs_failed(fake_queue, tmp_path, monkeypatch):
    fake_queue([[("s-0", "Success", 0), ("s-1", "Failed", 0), ("s-2", "Failed", 0)]])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vitcnn.study.cli.summarize_command", lambda *a, **k: 0)
    assert vitcnn(["study", "wait", "s"]) == 1


def test_the_time_left_counts_only_runs_finished_while_waiting(fake_queue, monkeypatch):
    from vitcnn.study import queue

    bars, shown = [], []

    class Bar(queue.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(queue, "tqdm", Bar)
    fake_queue([[("s-0", "Success", 0), ("s-1", "Success", 0), ("s-2", "Running", 0), ("s-3", "Running", 0)],
                [(f"s-{i}", "Success", 0) for i in range(4)]], on_poll=lambda: shown.append(str(bars[0])))
    queue.wait([f"s-{i}" for i in range(4)], "s", poll_s=0)
    assert "2/4 [00:00<?" in shown[0], shown  # two done before it looked: no rate, no estimate from them


def test_a_terminated_waiter_says_what_goes_on(tmp_path):
    code = f"""
import contextlib, sys, types
from pathlib import Path
from vitcnn.study import queue

class Queue:
    wdir = "/nonexistent"

    def status(self):
        Path({str(tmp_path / "polled")!r}).touch()
        return [{{"name": "s-0", "status": "Running", "timestamp": 0, "rev": "r"}}]
    def worker_status(self):
        return {{"worker-1": [{{"id": "t"}}]}}
    def _iter_active_tasks(self):
        return []

@contextlib.contextmanager
def open_repo(root):
    yield types.SimpleNamespace(experiments=types.SimpleNamespace(celery_queue=Queue()))

queue.open_repo = open_repo
from vitcnn.__main__ import main
sys.exit(main(["study", "wait", "s"]))
"""
    waiter = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "polled").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    waiter.send_signal(signal.SIGTERM)
    _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 130, err
    assert "vitcnn study: stopped waiting; 1 runs of 's' go on in the background" in err


def test_a_second_study_is_told_that_the_queue_workers_are_shared(monkeypatch, capsys):
    from vitcnn.study import queue
    from vitcnn.study.grid import Run

    calls = []
    monkeypatch.setattr(queue, "live_workers", lambda root=None: 1)
    monkeypatch.setattr(queue, "dvc", lambda *args, cwd=None: calls.append(args) or "")
    queue.submit([Run("s-0", 0, ("seed=0",))], "s", 2)
    assert calls[-1] == ("queue", "start", "-j", "2")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DVC's queue is one per repository and 1 of its workers run already" in err


@pytest.mark.parametrize("raised, line", [
    (lambda tmp: OSError(errno.ENOSPC, "No space left on device", str(tmp)),
     "prepare: error: No space left on device: {tmp}; free space on that disk"),
    (lambda tmp: __import__("safetensors").SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
     "prepare: error: No space left on device: {repo}; free space on that disk"),
    (lambda tmp: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     "prepare: error: No space left on device: {repo}; free space on that disk"),  # torch.save's words for it
    (lambda tmp: PermissionError(errno.EACCES, "Permission denied", str(tmp)),
     "prepare: error: Permission denied: {tmp}; check the file's and its folder's permissions"),
])
def test_an_os_error_in_a_stage_is_one_line_that_the_summary_shows(raised, line, tmp_path, monkeypatch, capsys):
    import runpy
    import shutil as shutil_module

    repo, _ = make_tiny_project(tmp_path)
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the stage's SIGTERM handler: not in pytest's process
    written = []

    def full_disk(tensors, path):
        written.append(path)
        raise raised(path)

    monkeypatch.setattr("vitcnn.data.save_file", full_disk)
    usage = shutil_module.disk_usage(repo)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage._replace(free=0))
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(repo / "stages" / "prepare.py"), run_name="__main__")
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line.format(tmp=written[0], repo=repo)), err
    log = tmp_path / "queue.log"  # as the run's log holds it, beside DVC's own lines
    log.write_text(f"Running stage 'prepare':\n{err}ERROR: failed to reproduce 'prepare': failed to run: "
                   "python stages/prepare.py, exited with 1\n")
    assert last_error(log) == err.strip()


def test_a_bug_in_a_stage_keeps_its_traceback(monkeypatch):
    from vitcnn.cli import run_stage

    monkeypatch.setattr(signal, "signal", lambda *a: None)
    with pytest.raises(ZeroDivisionError):
        run_stage("prepare", lambda: 1 / 0)


# --- one GPU per queued run ------------------------------------------------------------------------


@pytest.fixture
def three_gpus(tmp_path, monkeypatch):
    """torch sees three GPUs (UUIDs, free memory); GPU locks go to a scratch folder."""
    import torch

    from vitcnn import runtime

    class Properties:
        def __init__(self, index):
            self.uuid = f"GPU-{index:04d}"

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", Properties)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ({0: 10, 1: 70, 2: 40}[i] * 2**30, 80 * 2**30))
    monkeypatch.setattr(runtime, "GPU_LOCKS", tmp_path / "locks")
    yield chosen
    for lock in runtime._held_gpu_locks:
        lock.release()
    runtime._held_gpu_locks.clear()


def test_each_run_takes_a_gpu_no_other_run_holds(three_gpus, tmp_path, caplog):
    from filelock import FileLock

    from vitcnn.runtime import resolve_device

    other_run = FileLock(tmp_path / "locks" / "GPU-0000.lock")  # another process's claim, as far as flock goes
    (tmp_path / "locks").mkdir()
    other_run.acquire()
    try:
        assert resolve_device("auto") == __import__("torch").device("cuda", 1)
        assert resolve_device("cuda").index == 2
        # Every GPU taken: share the one with the most free memory, and say so.
        assert resolve_device("auto").index == 1
        assert "all 3 GPUs are in use by other runs; sharing cuda:1" in caplog.text
    finally:
        other_run.release()
    assert three_gpus == [1, 2, 1]


def test_without_usable_gpu_locks_the_gpu_with_most_free_memory_is_taken(three_gpus, tmp_path, monkeypatch, caplog):
    from vitcnn import runtime

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setattr(runtime, "GPU_LOCKS", tmp_path / "not-a-folder")
    assert runtime.resolve_device("auto").index == 1
    assert "GPU locks in" in caplog.text and "sharing cuda:1" in caplog.text


def test_a_finished_run_frees_its_gpu_for_the_next(three_gpus, tmp_path):
    code = ("import sys, torch; from vitcnn import runtime; from pathlib import Path;"
            "torch.cuda.device_count = lambda: 3;"
            "torch.cuda.get_device_properties = lambda i: type('P', (), {'uuid': f'GPU-{i:04d}'});"
            "print(runtime.claim_gpu(Path(sys.argv[1])))")
    first = subprocess.run([sys.executable, "-c", code, str(tmp_path / "locks")], capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", code, str(tmp_path / "locks")], capture_output=True, text=True)
    assert first.stdout.split()[-1] == second.stdout.split()[-1] == "0", first.stderr + second.stderr


def test_study_workers_default_to_one_per_gpu(three_gpus, monkeypatch):
    from vitcnn.study.queue import default_jobs

    assert default_jobs() == 3
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert default_jobs() == 1


# --- a real study on DVC's queue -------------------------------------------------------------------


@pytest.mark.slow
def test_a_three_seed_study_runs_on_dvcs_queue_and_summarizes_exactly(tmp_path):
    repo, env = make_tiny_project(tmp_path)

    def vitcnn_cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "vitcnn", *args], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=600)
        assert (result.returncode == 0) == ok, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    empty = vitcnn_cli("study", "summarize", ok=False)
    assert empty.returncode == 1 and empty.stderr.count("\n") == 1 and "no experiments of this commit" in empty.stderr

    # A run that fails (its loss diverges), queued first, named like the study but not one of its runs.
    dvc("exp", "run", "--queue", "-n", "tinyfail", "-S", "train.lr=1e12", cwd=repo, env=env)
    vitcnn_cli("study", "run", "seeds", "--seeds", "3", "--name", "tiny", "-j", "2")

    summary = json.loads(vitcnn_cli("study", "summarize", "--name", "tiny", "--json").stdout)
    (group,) = summary["groups"]
    assert group["n"] == 3 and group["seeds"] == [0, 1, 2] and group["params"] == {}
    assert sorted(group["experiments"]) == ["tiny-0", "tiny-1", "tiny-2"]
    assert not summary["failed"]  # tinyfail is no run of study tiny (tiny-<i>, exactly)
    everything = json.loads(vitcnn_cli("study", "summarize", "--json").stdout)  # one summary per study
    assert sorted(everything) == ["other", "tiny"] and everything["tiny"]["groups"] == summary["groups"]
    assert [f["name"] for f in everything["other"]["failed"]] == ["tinyfail"]
    assert everything["other"]["failed"][0]["error"].startswith("train_vit: error: training loss is not finite")

    # The numbers are those of each experiment's own metrics file, read from git.
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo, env=env).stdout)
    revs = {exp["name"]: exp["revs"][0]["rev"] for row in shown for exp in row.get("experiments") or []}
    metrics = [json.loads(run(["git", "show", f"{revs[name]}:metrics/evaluate.json"], repo, env).stdout)
               for name in group["experiments"]]
    for model in MODELS:
        values = [m[model]["test_acc"] for m in metrics]
        mean = sum(values) / 3
        got = group["metrics"][model]["test_acc"]
        assert got["mean"] == pytest.approx(mean, abs=1e-12)
        assert got["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2), abs=1e-12)
    diffs = [m["vit"]["test_acc"] - m["cnn"]["test_acc"] for m in metrics]
    assert summary["groups"][0]["diff_test_acc"]["mean"] == pytest.approx(sum(diffs) / 3, abs=1e-12)

    # Seeds share one split: every study run took prepare's output from DVC's run cache.
    for name in ("tiny-1", "tiny-2"):  # (tiny-0 may have prepared alongside the failing run)
        log = dvc("queue", "logs", name, cwd=repo, env=env).stdout
        assert "Stage 'prepare' is cached - skipping run" in log, log

    out = repo / "studies" / "tiny"
    assert {"summary.md", "summary.csv", "accuracy.png"} <= {p.name for p in out.iterdir()}
    assert "| all runs | 3 | 0 1 2 |" in (out / "summary.md").read_text()
    assert "`tinyfail`: train_vit: error" in (repo / "studies" / "all" / "other" / "summary.md").read_text()

    again = vitcnn_cli("study", "run", "seeds", "--name", "tiny", ok=False)
    assert again.stderr.count("\n") == 1 and "a study named 'tiny' exists already (3 experiments" in again.stderr


def test_a_summary_carries_robustness_and_calibration_with_their_intervals(tmp_path):
    runs = [experiment(f"r-{s}", s, 0.5, 0.7) for s in range(3)]
    for s, experiment_run in enumerate(runs):
        experiment_run.metrics["vit"] |= {"corruption_acc": 0.40 + s / 100, "ece": 0.03 + s / 1000,
                                          "ece_ts": 0.012 + s / 1000}
        experiment_run.metrics["cnn"] |= {"corruption_acc": 0.50, "ece": 0.08, "ece_ts": 0.02}
    summary = summarize(runs, [], MODELS)
    ece = summary.groups[0].metrics["vit"]["ece"]
    assert ece.mean == pytest.approx(0.031) and ece.ci95 is not None
    md = report.markdown(summary, "t", [])
    assert "## Robustness and calibration" in md and "41.00% ± 1.00" in md and "0.031 ± 0.001" in md
    assert "ViT ECE, temperature-scaled" in md and "0.013 ± 0.001" in md
    assert "corruption_acc_mean" in report.to_csv(summary).splitlines()[0]


# --- runs.csv: every run kept, the summary computed again from it ------------------------------------


def _study_runs() -> tuple[list[Experiment], list[Baseline]]:
    """Two groups of three seeds, a failed run, params of every kind (a list, a string, a bool)."""
    runs = [experiment(f"v-{i}", s, 0.30 + s / 97 + n / 1e5, 0.5 + s / 89, **{
        "data.subset": n, "data.source": "../shared/x.tar.gz", "cnn.channels": [8, 16], "train.flip": False})
        for i, (n, s) in enumerate((n, s) for n in (1000, 4000) for s in range(3))]
    for e in runs:
        e.metrics["vit"]["ece"] = 0.031 + e.params["seed"] / 1e3
    runs.append(experiment("v-6", 3, 0.0, None, state="failed", **{"data.subset": 1000}))
    runs[-1].error = "train_vit: error: training loss is not finite at epoch 1, step 2"
    baselines = [Baseline("a" * 40, "main", {**DEFAULTS, "data.source": "download", "cnn.channels": [64, 128],
                                              "train.flip": True})]
    return runs, baselines


def test_runs_csv_keeps_every_run_and_gives_back_the_same_summary(tmp_path):
    found, baselines = _study_runs()
    summary = summarize(found, baselines, MODELS)
    report.write(summary, tmp_path / "live", "Study v", found, baselines)
    text = (tmp_path / "live" / "runs.csv").read_text()
    head = text.splitlines()[0].split(",")
    assert head[:7] == ["name", "rev", "commit", "state", "timestamp", "error", "seed"]
    assert {"data.subset", "data.source", "cnn.channels", "train.flip", "vit:test_acc", "vit:ece", "cnn:test_acc"} <= set(head)
    assert "train.epochs" not in head  # the same everywhere and as params.yaml has it: no column
    assert len(text.splitlines()) == 1 + 1 + 7  # the header, the commit's params, every run (the failed one too)

    again, again_baselines = runs.read(tmp_path / "live" / "runs.csv")
    assert [(e.name, e.state, e.params["seed"], e.metrics) for e in again] == [
        (e.name, e.state, e.params["seed"], e.metrics) for e in sorted(found, key=lambda e: (e.timestamp, e.name))]
    assert again[0].params["cnn.channels"] == [8, 16] and again[0].params["train.flip"] is False
    report.write(summarize(again, again_baselines, MODELS), tmp_path / "again", "Study v", again, again_baselines)
    for name in ("summary.md", "summary.csv", "runs.csv"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "live" / name).read_text(), name
    md = (tmp_path / "again" / "summary.md").read_text()
    assert "`v-6`: train_vit: error: training loss is not finite" in md
    assert "`data.source=../shared/x.tar.gz`" in md  # set by the study: differs from params.yaml


def test_summarize_from_a_runs_csv_writes_the_summary_offline(tmp_path, capsys):
    found, baselines = _study_runs()
    report.write(summarize(found, baselines, MODELS), tmp_path / "v", "Study v", found, baselines)
    assert vitcnn(["study", "summarize", "--from", str(tmp_path / "v" / "runs.csv"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "summary.md").read_text() == (tmp_path / "v" / "summary.md").read_text()
    assert (tmp_path / "o" / "curve.png").is_file()
    assert vitcnn(["study", "summarize", "--from", str(tmp_path / "missing.csv")]) == 1
    assert "missing.csv: not found" in capsys.readouterr().err


@pytest.mark.parametrize("study", sorted(p.parent.name for p in (ROOT / "studies").glob("*/runs.csv")))
def test_each_committed_study_summary_is_what_its_runs_give(study, tmp_path):
    folder = ROOT / "studies" / study
    assert vitcnn(["study", "summarize", "--from", str(folder / "runs.csv"), "--out", str(tmp_path)]) == 0
    for name in ("summary.md", "summary.csv"):
        assert (tmp_path / name).read_text() == (folder / name).read_text(), f"studies/{study}/{name}"


def test_intervals_stay_within_what_the_quantity_allows():
    accuracy = estimate([0.02, 0.05, 0.30], bounds=(0.0, 1.0))  # three seeds: t(2) is wide
    assert accuracy.ci95[0] == 0.0 and accuracy.clipped and accuracy.ci95[1] < 1.0
    time = estimate([5.0, 500.0], bounds=(0.0, math.inf))
    assert time.ci95[0] == 0.0 and time.clipped
    assert not estimate([0.5, 0.6, 0.7], bounds=(0.0, 1.0)).clipped
    runs = [experiment(f"c-{s}", s, [0.11, 0.45][s], [0.9, 0.2][s]) for s in range(2)]
    summary = summarize(runs, [], MODELS)
    (group,) = summary.groups
    assert group.metrics["vit"]["test_acc"].ci95[0] == 0.0 and group.diff.ci95[1] <= 1.0
    assert any("clipped" in note for note in summary.notes)


def test_study_figures_mark_each_seed_and_join_no_measured_values(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi: drawn.append(fig))
    found, baselines = _study_runs()
    summary = summarize(found, baselines, MODELS)
    report.curve_figure(summary, "data.subset", tmp_path / "curve.png")
    report.accuracy_figure(summary, tmp_path / "accuracy.png")
    for fig in drawn:
        ax = fig.axes[0]
        dots = sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
        assert dots == 2 * 6  # every seed of both models, in both groups
        joined = [line for line in ax.get_lines() if line.get_linestyle() not in ("None", "") and len(line.get_xdata()) > 2]
        assert not joined  # no line between measured values: nothing suggests a value in between
    assert drawn[0].axes[0].get_xscale() == "log"


# --- what a new user meets: leftovers, chance, several studies ------------------------------------


def test_summarize_without_a_name_writes_one_summary_per_study(tmp_path, monkeypatch, capsys):
    found = [experiment(f"seeds-a-{s}", s, 0.5 + s / 100, 0.6) for s in range(2)]
    found += [experiment(f"data-b-{i}", s, 0.3 + n / 1e5, 0.4, **{"data.subset": n, "train.lr": 0.001,
                                                                  "vit.depth": 8, "train.batch_size": 64})
              for i, (n, s) in enumerate((n, s) for n in (1000, 4000) for s in range(2))]
    found.append(experiment("tried-depth", 0, 0.45, 0.5, **{"vit.depth": 4}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vitcnn.study.experiments.load", lambda all_commits: (found, []))
    assert vitcnn(["study", "summarize", "--out", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("## ")] == ["## data-b", "## other", "## seeds-a"]
    for study, n in (("data-b", 4), ("other", 1), ("seeds-a", 2)):
        md = (tmp_path / "all" / study / "summary.md").read_text()
        assert f"{n} successful run" in md
    # each study's groups are labelled by what varies within it: data.subset only, not the params the studies differ in
    assert "| data.subset=1000 | 2 | 0 1 |" in (tmp_path / "all" / "data-b" / "summary.md").read_text()

    assert vitcnn(["study", "summarize", "--json", "--out", str(tmp_path / "j")]) == 0
    assert sorted(json.loads(capsys.readouterr().out)) == ["data-b", "other", "seeds-a"]  # one JSON document


def test_figure_labels_stay_short_with_a_legend_for_long_ones(tmp_path):
    many = {"train.lr": 0.001, "train.batch_size": 64, "vit.depth": 8, "vit.embed_dim": 192, "train.epochs": 7}
    runs = [experiment("x-0", 0, 0.5, 0.6), experiment("y-0", 0, 0.4, 0.5, **many)]
    summary = summarize(runs, [Baseline("a" * 40, "main", DEFAULTS)], MODELS)
    assert report.figure_labels(summary) == ["G1", "G2"]
    legend = report.legend_table(summary)
    assert "| G2 | " in legend and "vit.embed_dim=192" in legend
    short = summarize([experiment("d-0", 0, 0.5, 0.6, **{"data.subset": 1000}),
                       experiment("d-1", 0, 0.5, 0.6, **{"data.subset": 4000})], [], MODELS)
    assert report.figure_labels(short) == ["data.subset=1000", "data.subset=4000"] and report.legend_table(short) is None


def test_a_model_at_chance_gets_no_verdict_in_a_study():
    runs = [experiment(f"c-{s}", s, 0.40 + s / 100, 0.1 + s / 1000) for s in range(3)]
    for e in runs:
        e.metrics["vit"].update(corruption_acc=0.3, ece=0.05, above_chance=1.0)
        e.metrics["cnn"].update(corruption_acc=0.1, ece=0.01, above_chance=0.0)
    summary = summarize(runs, [], MODELS)
    (group,) = summary.groups
    assert group.at_chance == {"cnn": 3}
    assert any("the CNN is not clearly above chance in 3 of 3 runs" in note for note in summary.notes)
    assert "(CNN at chance)" in report.table(summary)
    robust = report.robustness_table(summary)
    assert robust.count(report.AT_CHANCE) == 2 and "0.010" not in robust  # no ECE shown for the CNN to compare


def test_a_study_starts_from_the_committed_params(tmp_path, monkeypatch, capsys):
    from dvc.utils.hydra import apply_overrides

    from vitcnn.study.cli import with_leftovers

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    apply_overrides(tmp_path / "params.yaml", ["vit.depth=8", "train.epochs=2", "seed=3"])  # left by `dvc exp run -S`
    overrides = with_leftovers(["train.epochs=3"], "seeds", from_workspace=False, cloned=False)
    assert overrides == ["vit.depth=6", "train.epochs=3"]  # -S and the study's own seed win over what was left
    assert "params.yaml holds vit.depth=8 (committed: 6)" in capsys.readouterr().err
    assert with_leftovers(["train.epochs=3"], "seeds", from_workspace=True, cloned=False) == ["train.epochs=3"]
    assert with_leftovers([], "seeds", from_workspace=True, cloned=True) == ["train.epochs=2", "vit.depth=8"]  # params.yaml order
