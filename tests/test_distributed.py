"""DDP for real: two gloo processes through `dvc repro`, two "nodes" on loopback, kills.

One `dvc repro` with `train.nproc_per_node: 2` is the reference the other runs are held
to: a two-process run killed mid-training and resumed as two single-process nodes joined
by c10d rendezvous must end with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers.processes import (
    LAUNCH,
    TRAIN,
    assert_same_weights,
    copy_repo,
    finish,
    free_port,
    kill,
    metrics,
    python,
    wait_for,
    weights,
)
from helpers.repos import (
    DVC,
    built_once,
    commit_all,
    dvc_env,
    make_repo,
    read_params,
    run_dvc,
    write_params,
)

pytestmark = pytest.mark.slow

EPOCHS = 3
# One thread per process: the same arithmetic whichever way the two processes are
# launched (one node or two), so their weights can be compared bit for bit.
DDP = {"nproc_per_node": 2, "epochs": EPOCHS, "warmup_epochs": 1}
STANDALONE = (*LAUNCH, "--standalone", "--nproc-per-node=2", *TRAIN)


@pytest.fixture(scope="session")
def ddp_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tmp git repo where `dvc repro train` trained with two gloo processes."""
    with built_once(tmp_path_factory, "ddp") as (folder, build):
        repo = folder / "repo"
        if build:
            make_repo(repo, commit=False)
            write_params(repo, train=DDP, runtime={"threads": 1})
            commit_all(repo)
            done = run_dvc(repo, "repro", "train")
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            (repo / "repro.log").write_text(done.stdout + done.stderr)
    return repo


def alive(pids: list[int]) -> list[int]:
    """The pids still running (zombies waiting to be reaped count as gone)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def workers(pid: int, count: int) -> list[psutil.Process]:
    """Wait until `pid` has `count` stages.train worker processes below it; return them."""

    def found() -> list[psutil.Process]:
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        procs = []
        for kid in kids:
            try:
                argv = kid.cmdline()
            except psutil.Error:  # a short-lived helper (git) that is gone already
                continue
            # the launcher's own command line ends in the same words
            if argv[-3:] == list(TRAIN) and "stages.launch" not in argv:
                procs.append(kid)
        return procs if len(procs) == count else []

    return wait_for(found, 120, f"{count} workers under pid {pid}")


# How long a test waits for killed or orphaned processes to be gone: a guard against a
# hang, not a speed limit. The wait ends on the event itself, every pid gone (or a zombie:
# exited, waiting for its reaper), which comes within the workers' 0.5 s poll for their
# launcher on any machine that runs at all; failing here means a process does not exit.
HANG_GUARD_S = 120


def wait_gone(pids: list[int], what: str, log: Path) -> None:
    """Wait until every pid has exited; fail naming those left and the log's tail."""
    try:
        wait_for(lambda: not alive(pids), HANG_GUARD_S, what)
    except AssertionError as exc:
        still = describe(alive(pids))
        raise AssertionError(f"{exc}; still running: {still}\n{log.read_text()[-3000:]}") from None


def sigkill_and_wait(
    proc: subprocess.Popen,
    pids: list[int],
    what: str,
    log: Path,
    paused: psutil.Process | None = None,
) -> None:
    """SIGKILL proc, then wait until every pid is gone (killing stragglers at the end).

    `paused`: one of them, stopped (SIGSTOP) before, continued only once the others are
    gone: it then has no peer left to train with."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        wait_gone([pid for pid in pids if paused is None or pid != paused.pid], what, log)
        if paused is not None:
            paused.resume()
            wait_gone([paused.pid], what, log)
    finally:
        for pid in alive(pids):
            kill(pid)


def describe(pids: list[int]) -> str:
    """`pid: command line` of each pid, for a failure message."""
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())}")
        except psutil.Error:
            out.append(f"{pid}: (gone)")
    return "; ".join(out)


def run_statuses(repo: Path) -> list[str]:
    """The status of each run in the repo's MLflow store (none before MLflow set it up)."""
    db = repo / "mlflow.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
        return [r[0] for r in con.execute("SELECT status FROM runs")] if "runs" in tables else []


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, mtime in ns) of every file under a folder."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def assert_quiet(repo: Path, seconds: float = 2.0) -> None:
    """No file under models/, metrics/ or plots/ changes for `seconds`."""
    folders = [repo / name for name in ("models", "metrics", "plots")]
    before = [snapshot(f) if f.exists() else {} for f in folders]
    time.sleep(seconds)
    after = [snapshot(f) if f.exists() else {} for f in folders]
    assert before == after, "files kept being written after the kill"


def test_dvc_repro_two_gloo_processes(ddp_repo: Path) -> None:
    import mlflow  # here: the GPU machine, which runs this file's gpu test, has no mlflow

    meta = json.loads((ddp_repo / "data/prepared/meta.json").read_text())
    with (ddp_repo / "plots/train/history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["epoch"])) for r in rows] == list(range(1, EPOCHS + 1))
    # Evaluation splits the val split across ranks without padding: each image once.
    assert all(int(float(r["val_images"])) == meta["counts"]["val"] for r in rows)
    # Training pads to an even share (DDP needs equal steps): at most world_size - 1 extra.
    train = meta["counts"]["train"]
    assert all(train <= int(float(r["train_images"])) < train + 2 for r in rows)
    ckpt = torch.load(ddp_repo / "models/checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["epoch"] == EPOCHS
    log = (ddp_repo / "repro.log").read_text()
    assert "[train rank 1]" not in log  # only rank 0 speaks

    mlflow.set_tracking_uri(f"sqlite:///{ddp_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    run = runs[0]
    key = json.loads((ddp_repo / "models/mlflow_run.json").read_text())["run_key"]
    assert run.data.tags["pipeline.run_key"] == key
    assert run.data.tags["world_size"] == "2"
    assert run.data.params["train.nproc_per_node"] == "2"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert run.data.metrics["train/val_accuracy"] == float(rows[-1]["val_accuracy"])
    # One model: rank 0's, whole (every rank holds the same weights after each step).
    blob = torch.load(ddp_repo / "models/model.pt", weights_only=True)
    assert blob["config"]["name"] == "cnn"
    assert_same_weights(blob["state_dict"], ckpt["model"])


def test_killed_launcher_stops_workers_then_two_nodes_resume_it_exactly(
    ddp_repo: Path, tmp_path: Path
) -> None:
    """SIGKILL the launcher of a two-process run: its workers stop and write nothing more.
    README's two-node torchrun commands on loopback then resume it: the same weights as
    the uninterrupted one-node run, and one MLflow run (both nodes point at one store; two
    real machines would share a tracking server, test_mlflow_server's) logged by global
    rank 0, every epoch once, though the run was killed."""
    repo = copy_repo(ddp_repo, tmp_path / "killed")
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'team.db'}"}
    launcher = python(repo, *STANDALONE, env=store)
    procs = workers(launcher.pid, 2)
    rank1 = next(p for p in procs if p.environ().get("RANK") == "1")
    ckpt = repo / "models/checkpoint.pt"
    wait_for(ckpt.exists, 180, "the first checkpoint", poll=0.01)
    # Rank 1 stopped (SIGSTOP) as epoch 1's checkpoint appears: rank 0 then waits at its
    # next collective, so no epoch can end however fast the machine, while the workers
    # take their 0.5 s poll to notice the dead launcher (rank 1 goes on once rank 0 is gone,
    # with no peer to train with). Two whole epochs were left.
    rank1.suspend()
    pids = [p.pid for p in procs]
    sigkill_and_wait(launcher, pids, "the workers to exit", repo / "run.log", paused=rank1)
    assert_quiet(repo)
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert epoch < EPOCHS, "the run ended before it was killed"
    assert "the torchrun launcher died" in (repo / "run.log").read_text()

    port = free_port()
    node = (
        *LAUNCH,
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=loopback-test",
        *TRAIN,
    )
    procs = [python(repo, *node, log=f"node{i}.log", env=store) for i in range(2)]
    logs = [finish(p, repo, f"node{i}.log") for i, p in enumerate(procs)]
    assert sum(f"resuming from epoch {epoch} of {EPOCHS}" in text for text in logs) == 1
    assert sum("trained 3 epochs on 2 process(es)" in text for text in logs) == 1
    assert_same_weights(weights(repo), weights(ddp_repo))
    assert len(torch.load(ckpt, weights_only=True)["rng"]) == 2

    import mlflow  # here: the GPU machine, which runs this file's gpu test, has no mlflow

    client = mlflow.MlflowClient(store["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("vision-pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, EPOCHS + 1))
    # Made by the killed run's rank 0; the resumed one reopened it (no new run was made).
    made = f"MLflow run {run.info.run_id} in {store['MLFLOW_TRACKING_URI']}"
    assert made in (repo / "run.log").read_text()
    assert not any("MLflow run" in text for text in logs)


# DVC runs a stage's cmd through $SHELL (`/bin/sh` when unset). bash execs a lone
# command, so the launcher is dvc's child; dash (Debian's /bin/sh) stays in between as
# `sh -c`, and outlives a killed dvc: the harder case, run here (test_train checks that the
# launcher finds its caller either way).
def test_killed_dvc_repro_stops_launcher_and_workers(ddp_repo: Path, tmp_path: Path) -> None:
    shell = "/bin/sh"
    repo = copy_repo(ddp_repo, tmp_path / "dvc-killed")
    # Many epochs: still training when killed, and a new params hash so DVC must run it.
    write_params(repo, train={**read_params(repo)["train"], "epochs": 500})
    dvc = python(repo, DVC, "repro", "train", env=dvc_env({"SHELL": shell}))
    pids = [p.pid for p in workers(dvc.pid, 2)]
    wait_for((repo / "models/checkpoint.pt").exists, 180, "the first checkpoint")
    wait_for(lambda: run_statuses(repo) == ["RUNNING"], 90, "the MLflow run to open")
    # Everything below dvc now: launcher, workers and rank 0's MLflow helper.
    below = [p.pid for p in psutil.Process(dvc.pid).children(recursive=True)]
    sigkill_and_wait(dvc, below, "the launcher, workers and helpers to exit", repo / "run.log")
    assert set(pids) <= set(below)
    assert_quiet(repo)
    # The killed run is not left RUNNING in the MLflow UI forever.
    assert run_statuses(repo) == ["FAILED"]


def test_a_failed_worker_ends_the_job(ddp_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(ddp_repo, tmp_path / "failed")
    write_params(repo, mlflow={"enabled": False})  # a setting: the same training
    write_params(repo, train={**read_params(repo)["train"], "epochs": 50})
    launcher = python(repo, *STANDALONE)
    procs = workers(launcher.pid, 2)
    wait_for((repo / "models/checkpoint.pt").exists, 180, "the first checkpoint")
    rank1 = next(p for p in procs if p.environ().get("RANK") == "1")
    rank1.kill()  # as the kernel's OOM killer would
    try:
        launcher.wait(timeout=HANG_GUARD_S)  # torchrun stops the job: a hang guard only
    finally:
        kill(launcher.pid)
    try:
        wait_gone([p.pid for p in procs], "the other worker to exit", repo / "run.log")
    finally:
        for pid in alive([p.pid for p in procs]):
            kill(pid)
    text = (repo / "run.log").read_text()
    assert launcher.returncode != 0
    # rank 0 may fail too (its peer vanished mid-collective) before torchrun stops it
    assert re.search(r"worker\(s\) failed \(.*rank 1 exit code -9", text), text[-3000:]


@pytest.mark.gpu
def test_amp_with_nccl_on_every_gpu(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from helpers.processes import prepared_repo

    gpus = torch.cuda.device_count()
    repo = prepared_repo(
        tmp_path / "gpu",
        train={"nproc_per_node": "auto", "device": "cuda", "amp": "bf16", "epochs": 2},
        mlflow={"enabled": False},  # the lent GPU machine has no MLflow; not what this tests
    )
    # NCCL's own word that it ran, beside the stage's: at NCCL_DEBUG=INFO it logs every
    # communicator it makes into NCCL_DEBUG_FILE (%p: one file per process, line buffered,
    # so the workers' fast exit loses nothing); gloo never calls NCCL.
    nccl_logs = tmp_path / "nccl"
    nccl_logs.mkdir()
    nccl = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_FILE": str(nccl_logs / "nccl.%p.log")}
    launch = python(repo, *LAUNCH, "--standalone", "--nproc-per-node=auto", *TRAIN, env=nccl)
    text = finish(launch, repo)
    # auto = every GPU, NCCL when there are several (one process has no process group),
    # autocast in bf16: as rank 0 logs it.
    backend = "nccl" if gpus > 1 else "none"
    setup = f"training on cuda:0, {gpus} process(es), backend {backend}, mixed precision bfloat16"
    assert setup in text, text[-3000:]
    talked = [f for f in nccl_logs.glob("nccl.*.log") if "NCCL INFO" in f.read_text()]
    assert len(talked) == (gpus if gpus > 1 else 0), f"NCCL logged in {len(talked)} processes"
    ckpt = torch.load(repo / "models/checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == gpus  # one rng state saved per process
    assert ckpt["scaler"] == {}  # bf16 needs no loss scaler (fp16 would save its scale)
    assert f"on {gpus} process(es)" in text
    assert metrics(repo)["val_accuracy"] > 0.5


def test_one_process_runs_in_the_launcher_as_its_script_would(tmp_path: Path) -> None:
    # One process on one node: no torchrun worker, the script in the launcher's own
    # process, with its arguments and its folder first on the path (as `python job.py`).
    repo = make_repo(tmp_path / "repo", commit=False)
    jobs = repo / "jobs"
    jobs.mkdir()
    (jobs / "sibling.py").write_text("NAME = 'sibling'\n")
    (jobs / "job.py").write_text(
        "import json, os, sys\n"
        "import sibling\n"
        "json.dump({'pid': os.getpid(), 'argv': sys.argv, 'name': sibling.NAME,\n"
        "           'worker': 'TORCHELASTIC_RUN_ID' in os.environ}, open('job.json', 'w'))\n"
    )
    proc = python(repo, *LAUNCH, "--standalone", "--nproc-per-node=1", "jobs/job.py", "--x", "1")
    text = finish(proc, repo)
    seen = json.loads((repo / "job.json").read_text())
    assert seen == {
        "pid": proc.pid,
        "argv": ["jobs/job.py", "--x", "1"],
        "name": "sibling",
        "worker": False,
    }
    assert "training in the launcher's process" in text
