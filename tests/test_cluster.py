"""Studies on a Dask cluster, and DVC's queue under faults: a real LocalCluster of worker processes
and a bare git repository as the remote, on a tiny project; cluster specs and missing back-ends as
one line; one worker per GPU with faked devices; a task that finds its run on the remote; a run
that dies with its worker; and, if a single-node Slurm runs here, a study through SLURMCluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import dvc, make_tiny_project, run
from vitcnn.study import cluster, task
from vitcnn.study.grid import StudyError

MODELS = ["vit", "cnn"]


def fast_project(base: Path) -> tuple[Path, dict]:
    """The tiny project without the robustness and visualize stages (a study summarizes evaluate's
    metrics): each run takes half the time. Its runs' scratch ($TMPDIR) is under `base`."""
    (base / "tmp").mkdir()
    repo, env = make_tiny_project(base, env={"TMPDIR": str(base / "tmp")})
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k not in ("robustness", "visualize")}
    pipeline.pop("plots", None)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run(["git", "commit", "-qam", "prepare, train, evaluate"], repo, env)
    return repo, env


def cli(repo: Path, env: dict, *args: str, code: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vitcnn", *args], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == code, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def processes(*fragments: str) -> list[psutil.Process]:
    """Live processes whose command line contains every one of `fragments`."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(p.info["cmdline"] or [])
        if p.info["status"] != psutil.STATUS_ZOMBIE and all(f in line for f in fragments):
            found.append(p)
    return found


def wait_for(what, timeout: float = 120.0, every: float = 0.2):
    """Poll `what()` until it returns something truthy; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := what():
            return got
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what.__doc__ or what}")


def stats(summary: dict) -> list:
    """A summary's numbers that do not depend on timing: n, seeds, test accuracy and the paired gap."""
    (group,) = summary["groups"]
    test_acc = {m: group["metrics"][m]["test_acc"] for m in MODELS}
    return [group["n"], group["seeds"], test_acc, group["diff_test_acc"]]


def experiment_names(repo: Path, env: dict) -> list[str]:
    shown = dvc("exp", "list", "--all-commits", "--name-only", cwd=repo, env=env).stdout
    return sorted(shown.split())


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_queue_faults_and_a_local_dask_cluster_end_with_each_run_once_and_the_same_numbers(tmp_path):
    repo, env = fast_project(tmp_path)
    remote = tmp_path / "remote.git"
    run(["git", "init", "-q", "--bare", str(remote)], tmp_path, env)
    run(["git", "push", "-q", str(remote), "HEAD:refs/heads/main"], repo, env)

    # DVC's queue, three workers; two killed mid-run: one alone (its run goes on, finishes, and `wait`
    # collects it), one with its run (lost, and rerun by `retry`).
    cli(repo, env, "study", "run", "seeds", "--seeds", "3", "--name", "q", "-j", "3", "--no-wait")
    survivor, victim, _ = wait_for(lambda: len(found := processes("exp exec-run", str(repo))) == 3 and found)
    lost = json.loads(Path(victim.cmdline()[-1]).read_text())["name"]
    recovered = json.loads(Path(survivor.cmdline()[-1]).read_text())["name"]
    survivor.parent().kill()
    for p in [victim.parent(), victim, *victim.children(recursive=True)]:
        p.kill()
    waited = cli(repo, env, "study", "wait", "q", code=1)
    assert f"{recovered}: its DVC queue worker died after the run finished; its result is collected" in waited.stderr
    assert f"{lost}: lost: its DVC queue worker died, and the run with it" in waited.stderr
    assert waited.stderr.rstrip().splitlines()[-1] == ("study q: 1 of 3 runs failed or were lost (listed above and "
                                                       "in the summary); run them again with `vitcnn study retry q`")
    assert recovered in experiment_names(repo, env) and not list((repo / ".dvc/tmp/exps").glob("tmp*"))
    assert f"failed, left out: {lost}: lost: its DVC queue worker died, and the run with it" in waited.stdout

    retried = cli(repo, env, "study", "retry", "q")
    assert f"retrying 1 runs ({lost})" in retried.stderr
    queued = json.loads(cli(repo, env, "study", "summarize", "--name", "q", "--json").stdout)
    assert stats(queued)[:2] == [3, [0, 1, 2]] and not queued["failed"]

    # A local Dask cluster of two worker processes, cloning from and pushing to the bare remote; a
    # worker killed while it runs an experiment: Dask runs that task again, and nothing runs twice.
    study = subprocess.Popen([sys.executable, "-m", "vitcnn", "study", "run", "seeds", "--seeds", "3", "--name", "c",
                              "--cluster", "local:2", "--git-remote", str(remote)], cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (running, *_) = wait_for(lambda: processes("vitcnn.study.supervise", "exp run -n c-", str(tmp_path)))
    killed = running.cmdline()[running.cmdline().index("-n") + 1]
    running.parent().kill()  # the supervisor's parent: the Dask worker process
    out, err = study.communicate(timeout=300)
    assert study.returncode == 0, err
    assert not processes("exp run -n c-", str(tmp_path)), "a killed worker's run went on"
    pushed = run(["git", "ls-remote", str(remote), "refs/exps/*"], repo, env).stdout.split()[1::2]
    assert sorted(ref.rsplit("/", 1)[1] for ref in pushed if "/c-" in ref) == ["c-0", "c-1", "c-2"]
    assert experiment_names(repo, env) == ["c-0", "c-1", "c-2", "q-0", "q-1", "q-2"]  # each exactly once
    assert killed in experiment_names(repo, env)

    on_cluster = json.loads(cli(repo, env, "study", "summarize", "--name", "c", "--json").stdout)
    assert stats(on_cluster) == stats(queued)  # the same runs, the same numbers
    assert not on_cluster["failed"]

    # Runs that fail on the cluster, one in training, one in its split's prepare (a task of its own):
    # each listed with its stage's line, left out; the exit status 1.
    failed = cli(repo, env, "study", "run", "data", "--subsets", "30,100000", "--seeds", "1", "--name", "bad",
                 "-S", "train.lr=1e12", "--cluster", "local:2", code=1)
    assert "bad-0: train_vit: error: training loss is not finite" in failed.stderr
    assert "bad-1: prepare: error: data.subset: 100000 is not allowed" in failed.stderr
    assert "failed, left out: bad-0: train_vit: error: training loss is not finite" in failed.stdout  # the summary
    assert "failed, left out: bad-1: prepare: error: data.subset: 100000 is not allowed" in failed.stdout
    assert experiment_names(repo, env) == ["c-0", "c-1", "c-2", "q-0", "q-1", "q-2"]  # failures make none


def test_runs_that_made_no_experiment_are_listed_from_the_studys_record(tmp_path, monkeypatch, capsys):
    from vitcnn.__main__ import main as vitcnn
    from vitcnn.study import record
    from vitcnn.study.experiments import Experiment

    commit = "c" * 40
    params = {"seed": 0, "data.split_seed": 0, "train.lr": 0.1}
    ok = Experiment("s-0", "a" * 40, commit, "success", "2026-01-01T00:00:00", params,
                    {"vit": {"test_acc": 0.5}, "cnn": {"test_acc": 0.6}})
    dvc_failed = Experiment("q-0", "b" * 40, commit, "failed", "2026-01-01T00:00:00", params,
                            error="Experiment run failed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vitcnn.study.experiments.load", lambda all_commits: ([ok, dvc_failed], []))
    runs = [record.RunRecord(f"s-{i}", i, [f"seed={i}"], {**params, "seed": i}) for i in range(4)]
    cluster_study = record.StudyRecord("s", "seeds", commit, "local:2", 2, runs)
    cluster_study.mark("s-1", record.FAILED, "train_vit: error: training loss is not finite at epoch 1, step 2")
    cluster_study.mark("s-2", record.LOST, "lost: every worker that ran it died")
    cluster_study.save()  # s-3: still pending
    queue_study = record.StudyRecord("q", "seeds", commit, record.QUEUE, 1,
                                     [record.RunRecord("q-0", 0, ["seed=0"], params)])
    queue_study.mark("q-0", record.LOST, "lost: its DVC queue worker died, and the run with it")
    queue_study.save()
    assert vitcnn(["study", "summarize", "-A", "--json", "--out", str(tmp_path / "o")]) == 0
    studies = json.loads(capsys.readouterr().out)  # one summary per study
    assert sorted(studies) == ["q", "s"]
    assert [(f["name"], f["error"]) for f in studies["q"]["failed"]] == [
        ("q-0", "lost: its DVC queue worker died, and the run with it")]  # DVC knows it only as failed
    assert sorted((f["name"], f["error"]) for f in studies["s"]["failed"]) == [
        ("s-1", "train_vit: error: training loss is not finite at epoch 1, step 2"),
        ("s-2", "lost: every worker that ran it died")]
    assert [(u["name"], u["state"]) for u in studies["s"]["unfinished"]] == [("s-3", "pending")]
    assert studies["s"]["groups"][0]["experiments"] == ["s-0"]


# --- specs, back-ends, GPUs --------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("local:2", cluster.Spec("local:2", workers=2)),
    ("tcp://10.0.0.5:8786", cluster.Spec("tcp://10.0.0.5:8786", address="tcp://10.0.0.5:8786")),
    ("slurm", cluster.Spec("slurm", system="slurm")),
])
def test_cluster_specs(text, parsed):
    assert cluster.parse_spec(text) == parsed
    assert parsed.owned == (not parsed.address)


@pytest.mark.parametrize("text", ["local:0", "local", "http://host:8786", "tcp://host"])
def test_a_bad_cluster_spec_is_one_line(text):
    with pytest.raises(StudyError, match=f"--cluster: '{text}' is not allowed; use local:N, tcp://HOST:PORT, or "
                                         "one of slurm, pbs, sge, lsf"):
        cluster.parse_spec(text)


def test_kubernetes_is_a_scheduler_started_elsewhere():
    with pytest.raises(StudyError, match=r"with dask-kubernetes \(pip install dask-kubernetes\) and give its "
                                         r"scheduler: --cluster tcp://HOST:PORT"):
        cluster.parse_spec("kubernetes")


def test_missing_back_ends_say_which_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails
    with pytest.raises(StudyError, match=r"one worker per GPU \(2 here\) needs dask-cuda: pip install dask-cuda"):
        cluster._start(cluster.parse_spec("local:2"), 2, ["0", "1"])
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(StudyError, match="--cluster pbs needs dask-jobqueue: pip install dask-jobqueue"):
        cluster._start(cluster.parse_spec("pbs"), 2, [])


def test_a_jobqueue_cluster_without_a_config_is_one_line():
    import dask

    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(StudyError, match=r"--cluster slurm: You must specify how much cores and memory per job.*"
                                             r"~/.config/dask/jobqueue.yaml"):
            cluster._start(cluster.parse_spec("slurm"), 2, [])


def test_jobqueue_workers_run_one_experiment_at_a_time():
    assert cluster.with_resource([], "run=1") == ["--resources", "run=1"]
    assert cluster.with_resource(["--resources", "GPU=1", "--lifetime", "1h"], "run=1") == [
        "--resources", "GPU=1 run=1", "--lifetime", "1h"]


def _fake_dask_cuda() -> types.ModuleType:
    """dask-cuda's LocalCUDACluster as its documentation describes it: one worker process per GPU,
    each given every GPU in CUDA_VISIBLE_DEVICES, rotated so that its own comes first."""
    from distributed import Nanny, Scheduler, SpecCluster

    def LocalCUDACluster(CUDA_VISIBLE_DEVICES, n_workers, threads_per_worker, resources, **kwargs):  # noqa: N802
        devices = CUDA_VISIBLE_DEVICES.split(",")
        workers = {i: {"cls": Nanny, "options": {"nthreads": threads_per_worker, "resources": resources,
                                                 "env": {"CUDA_VISIBLE_DEVICES": ",".join(devices[i:] + devices[:i])}}}
                   for i in range(n_workers)}
        return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})

    module = types.ModuleType("dask_cuda")
    module.LocalCUDACluster = LocalCUDACluster
    return module


def test_on_a_gpu_machine_each_local_worker_runs_on_a_gpu_of_its_own(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "dask_cuda", _fake_dask_cuda())
    gpus = cluster.visible_gpus()
    assert gpus == ["0", "1", "2"]
    spec = cluster.parse_spec("local:4")
    with cluster.connect(spec, 0, gpus) as client:
        assert "local:4: 3 workers, one per GPU" in capsys.readouterr().err
        workers = client.scheduler_info()["workers"].values()
        assert [w["resources"] for w in workers] == [{"GPU": 1}] * 3
        assert cluster.resources(spec, client, gpus) == {"GPU": 1}  # each run takes one
        seen = client.run(lambda: task.run_env(True, {})["CUDA_VISIBLE_DEVICES"])
        assert sorted(seen.values()) == ["0", "1", "2"]  # each run sees its worker's GPU, and only that
        first = client.submit(lambda: task.run_env(True, {})["CUDA_VISIBLE_DEVICES"], resources={"GPU": 1},
                              pure=False)
        assert first.result(timeout=60) in gpus
        # Dask's nanny gives its workers one thread per task; a run gets what it would get here.
        assert set(client.run(lambda: os.environ["OMP_NUM_THREADS"]).values()) == {"1"}
        restored = client.run(lambda: task.run_env(False, {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": None}))
        assert all(env["OMP_NUM_THREADS"] == "2" and "MKL_NUM_THREADS" not in env for env in restored.values())
    assert cluster.run_environ(spec)["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS")
    assert cluster.run_environ(cluster.parse_spec("slurm")) == {
        "OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None, "OPENBLAS_NUM_THREADS": None}  # a job's cores, all
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # the GPUs this process was given, as named
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cluster.visible_gpus() == ["5", "7"]


def test_a_local_run_computes_with_the_threads_a_queued_run_has(tmp_path, monkeypatch):
    """Dask's nannies set OMP_NUM_THREADS=1 (and the like) for their workers, in this very process
    when the cluster is local: the runs must get the values from before the cluster started."""
    import contextlib

    from vitcnn.study import record

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    submitted = []

    class Client:
        def submit(self, fn, *args, **kwargs):
            submitted.append(args[0])

    @contextlib.contextmanager
    def connect(spec, jobs, gpus):
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as a local Nanny does, here, when it starts a worker
        monkeypatch.setenv("MKL_NUM_THREADS", "1")
        yield Client()

    monkeypatch.setattr(cluster, "connect", connect)
    monkeypatch.setattr(cluster, "setup", lambda *a: cluster.Setup(str(tmp_path), "", "", "", False))
    monkeypatch.setattr(cluster, "follow", lambda *a: None)
    study = record.StudyRecord("s", "seeds", "c" * 40, "local:2", 2, [record.RunRecord("s-0", 0, ["seed=0"], {})])
    cluster.run(study, cluster.parse_spec("local:2"), 2, ["s-0"], tmp_path)
    (job,) = submitted
    assert job.environ["OMP_NUM_THREADS"] is None and job.environ["MKL_NUM_THREADS"] == "2"
    assert set(job.environ) == {"MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"}
    env = task.run_env(False, job.environ)
    assert "OMP_NUM_THREADS" not in env and env["MKL_NUM_THREADS"] == "2"


# --- a task on its own -----------------------------------------------------------------------------


def test_a_run_already_on_the_remote_is_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run's scratch
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    commit = "ab" * 20
    job = task.Job("s", "s-1", ("seed=1",), str(remote), commit)
    assert not task.pushed(job)
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=remote, input="x", text=True,
                          capture_output=True, check=True).stdout.strip()
    subprocess.run(["git", "update-ref", f"refs/exps/ab/{'ab' * 19}/s-1", blob], cwd=remote, check=True)
    monkeypatch.setattr(task, "clone", lambda *a: pytest.fail("cloned a run the remote has"))
    outcome = task.run_experiment(job)
    assert outcome.state == "success" and "an earlier attempt pushed it" in outcome.note


def test_a_run_stops_when_its_worker_dies(tmp_path):
    """The supervisor between a Dask worker and `dvc exp run` ends the run when the worker is killed."""
    sleeper = f"import time; open({str(tmp_path / 'started')!r}, 'w').close(); time.sleep(120)"
    worker = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               f"'-m', 'vitcnn.study.supervise', sys.executable, '-c', {sleeper!r}]); time.sleep(120)"])
    wait_for(lambda: (tmp_path / "started").exists(), timeout=30)
    (orphan,) = [p for p in processes(str(tmp_path / "started")) if p.cmdline()[1:] == ["-c", sleeper]]
    worker.kill()
    worker.wait()
    assert wait_for(lambda: not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE, timeout=15)


def test_a_failed_runs_reason_is_its_stages_line_or_the_signal_that_ended_it(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("Running stage 'train_vit':\nERROR: failed to reproduce 'train_vit': failed to run: "
                   "python stages/train.py vit, exited with -9\n")
    assert task.failure(log, 1).endswith("exited with -9 (killed by SIGKILL: out of memory, or stopped by hand?)")
    log.write_text("")
    assert task.failure(log, 128 + signal.SIGKILL) == "killed by SIGKILL (out of memory, or stopped by hand?)"


# --- Slurm -------------------------------------------------------------------------------------------


def _slurm_ready() -> str:
    """Why a single-node Slurm cannot take jobs here, or "" when it can."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "Slurm is not installed (apt-get install slurm-wlm, then a slurm.conf for this node)"
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return "Slurm's controller does not answer (sinfo timed out)"
    if state.returncode != 0 or not {"idle", "mix", "alloc"} & set(state.stdout.split()):  # "idle*": not responding
        return f"no Slurm node takes jobs here ({(state.stderr or state.stdout).strip()[:80]})"
    return ""


@pytest.mark.slow
def test_a_two_run_study_through_slurm(tmp_path):
    if why := _slurm_ready():  # asked here, not at collection: sinfo can take seconds to give up
        pytest.skip(why)
    repo, env = fast_project(tmp_path)
    config = tmp_path / "dask"
    config.mkdir()
    (config / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"slurm": {
        "cores": 1, "memory": "2GB", "processes": 1, "walltime": "00:10:00", "log-directory": str(tmp_path / "logs"),
        "python": sys.executable, "job-script-prologue": [f"export PYTHONPATH={env['PYTHONPATH']}",
                                                          "export DVC_NO_ANALYTICS=1"]}}}))
    env = {**env, "DASK_CONFIG": str(config)}
    cli(repo, env, "study", "run", "seeds", "--seeds", "2", "--name", "sl", "--cluster", "slurm", "-j", "2",
        timeout=600)
    summary = json.loads(cli(repo, env, "study", "summarize", "--name", "sl", "--json").stdout)
    assert stats(summary)[:2] == [2, [0, 1]]
