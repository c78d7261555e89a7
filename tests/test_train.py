"""The train stage: its helpers, every CPU-runnable option, checkpoints and resume."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.processes import (
    TRAIN,
    assert_same_weights,
    copy_repo,
    finish,
    metrics,
    prepared_repo,
    python,
    wait_for,
    weights,
)
from helpers.repos import write_params
from stages import launch, train
from stages.core import paths
from stages.core.errors import StageError
from stages.core.params import ParamsError, Train, load_params, parse_params
from stages.training import checkpoint, dist, engine, optim

TINY = {"train": 192, "val": 64, "test": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared repo with a few hundred digits and MLflow off; tests train in copies."""
    return prepared_repo(
        tmp_path_factory.mktemp("tiny") / "repo",
        counts=TINY,
        train={"epochs": 2, "warmup_epochs": 1},
        mlflow={"enabled": False},
    )


@pytest.fixture
def copy(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny repo, the working directory of the test."""
    repo = copy_repo(tiny, tmp_path / "repo")
    monkeypatch.chdir(repo)
    return repo


def cfg(**changes: Any) -> Train:
    """The repository's train params with some values changed."""
    return load_params().train.model_copy(update=changes)


# -- helpers ----------------------------------------------------------------------------


def test_lr_warms_up_then_follows_the_schedule(copy: Path) -> None:
    steps = 10
    cosine = cfg(epochs=4, warmup_epochs=1, schedule="cosine")
    assert optim.lr_factor(0, cosine, steps) == pytest.approx(0.1)
    assert optim.lr_factor(5, cosine, steps) == pytest.approx(0.55)
    assert optim.lr_factor(10, cosine, steps) == pytest.approx(1.0)
    assert optim.lr_factor(25, cosine, steps) == pytest.approx(0.5)
    assert optim.lr_factor(40, cosine, steps) == pytest.approx(0.0, abs=1e-12)
    step = cfg(epochs=6, warmup_epochs=0, schedule="step", step_epochs=2, gamma=0.5)
    assert [optim.lr_factor(e * steps, step, steps) for e in range(6)] == [
        1.0, 1.0, 0.5, 0.5, 0.25, 0.25,
    ]  # fmt: skip
    constant = cfg(epochs=3, warmup_epochs=0, schedule="constant")
    assert {optim.lr_factor(s, constant, steps) for s in range(30)} == {1.0}


def test_shift_translates_each_image_within_bounds() -> None:
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    images[:, :, 4, 4] = 255  # one bright pixel in the centre
    moved = engine.shift(images, 2)
    assert moved.shape == images.shape and moved.dtype == torch.uint8
    for image in moved:
        (y, x) = torch.nonzero(image[0]).tolist()[0]
        assert abs(y - 4) <= 2 and abs(x - 4) <= 2
        assert int(image.sum()) == 255  # moved, not blurred or lost
    assert len({tuple(torch.nonzero(i[0]).tolist()[0]) for i in moved}) > 5
    torch.manual_seed(0)
    assert torch.equal(engine.shift(images, 2), moved)  # seeded: reproducible


def test_amp_dtype_follows_params_and_device(copy: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert engine.amp_dtype(cfg(amp="auto"), cpu) is None
    assert engine.amp_dtype(cfg(amp="auto"), cuda) == torch.bfloat16
    assert engine.amp_dtype(cfg(amp="bf16"), cpu) == torch.bfloat16
    assert engine.amp_dtype(cfg(amp="fp16"), cuda) == torch.float16
    assert engine.amp_dtype(cfg(amp="off"), cuda) is None
    with pytest.raises(StageError, match="fp16 needs a CUDA device"):
        engine.amp_dtype(cfg(amp="fp16"), cpu)


def test_every_sample_is_evaluated_exactly_once_across_ranks() -> None:
    for world in range(1, 5):
        for count in (0, 1, 7, 144):
            shares = [
                list(dist.shard(count, dist.Context(r, world, r, world, torch.device("cpu"))))
                for r in range(world)
            ]
            assert sorted(i for share in shares for i in share) == list(range(count))


def test_launcher_watches_the_caller_through_a_shell_wrapper() -> None:
    # What `dvc repro` does when SHELL is unset: `/bin/sh -c cmd`; `; exit` keeps any sh
    # from exec-ing the command, so the shell stays between the caller and the launcher.
    code = "from stages.core import processes; print(*[p.pid for p in processes.callers()])"
    run = [sys.executable, "-c", code]
    direct = subprocess.run(run, capture_output=True, text=True, check=True)
    assert direct.stdout.split() == [str(os.getpid())]
    shell = subprocess.Popen(
        ["/bin/sh", "-c", f"{shlex.join(run)}; exit $?"], stdout=subprocess.PIPE, text=True
    )
    out = shell.communicate(timeout=120)[0]
    assert shell.returncode == 0
    assert out.split() == [str(shell.pid), str(os.getpid())]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_training_process_keeps_the_memory_a_step_frees() -> None:
    # A step's activations (here four 1 MiB tensors) freed and allocated again: untuned,
    # glibc gives them back to the system and faults them in again page by page (1,000 to
    # 9,000 faults in this loop, depending on what the imports freed before).
    code = """if True:
        import resource, torch
        from stages.training import dist
        dist.setup("cpu", 1)
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(20):
                step = [torch.ones(1 << 18) for _ in range(4)]
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults()  # the first steps take their memory from the system
        print(faults())
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    pages = 20 * 4 * (1 << 20) // resource.getpagesize()
    assert int(done.stdout) < pages // 100


def test_nproc_auto_is_one_process_on_cpu_and_every_gpu_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.resolve(["--standalone", "--nproc-per-node=auto", "-m", "x"]) == [
        "--standalone", "--nproc-per-node=1", "-m", "x",
    ]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert launch.resolve(["--nproc_per_node", "auto"]) == ["--nproc_per_node", "4"]
    assert launch.resolve(["--nproc-per-node=2"]) == ["--nproc-per-node=2"]
    assert launch.resolve(["--nproc-per-node", "gpu"]) == ["--nproc-per-node", "gpu"]


def test_bad_train_params_stop_with_one_line(copy: Path) -> None:
    raw = json.loads(json.dumps(load_params().model_dump()))
    for key, value, expected in (
        ("optimizer", "rmsprop", "train.optimizer: expected 'adamw', 'sgd' or 'adadelta'"),
        ("nproc_per_node", 0, "train.nproc_per_node"),
        ("threads", 2, "train.threads: moved to runtime.threads"),
        ("warmup_epochs", 5, "warmup_epochs (5) must not exceed epochs (2)"),
        ("amp", "fp8", "train.amp"),
    ):
        bad = {**raw, "train": {**raw["train"], key: value}}
        with pytest.raises(ParamsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            parse_params(bad)


def test_checkpoint_key_holds_what_changes_the_result_only(copy: Path) -> None:
    params = load_params()
    meta = json.loads(paths.META.read_text())
    key = checkpoint.checkpoint_key(params, meta, 1)
    settings = params.model_copy(
        update={
            "runtime": params.runtime.model_copy(update={"threads": 7, "resume": False}),
            "mlflow": params.mlflow.model_copy(update={"experiment": "other"}),
        }
    )
    assert checkpoint.stale_reason(checkpoint.checkpoint_key(settings, meta, 1), key) is None
    other = params.model_copy(update={"train": params.train.model_copy(update={"lr": 0.5})})
    assert "params" in checkpoint.stale_reason(checkpoint.checkpoint_key(other, meta, 1), key)
    assert "2 process(es)" in checkpoint.stale_reason(
        checkpoint.checkpoint_key(params, meta, 2), key
    )
    assert "data" in checkpoint.stale_reason(
        checkpoint.checkpoint_key(params, {"digest": "x"}, 1), key
    )
    assert "older version" in checkpoint.stale_reason("a-string-key", key)


# -- every option that runs on a CPU ----------------------------------------------------

OPTIONS = {
    "sgd+step": {"optimizer": "sgd", "lr": 0.05, "schedule": "step", "step_epochs": 1},
    "adadelta+constant": {"optimizer": "adadelta", "lr": 1.0, "schedule": "constant"},
    "bf16-on-cpu": {"amp": "bf16"},
    "channels_last": {"channels_last": True},
    "grad_clip+label_smoothing": {"grad_clip": 0.5, "label_smoothing": 0.1},
    "augment_shift": {"augment_shift": 2},
}


@pytest.mark.parametrize("changes", OPTIONS.values(), ids=OPTIONS.keys())
def test_option_trains(copy: Path, changes: dict[str, Any]) -> None:
    write_params(copy, train=changes)
    params = load_params()
    train.main(params)
    scores = metrics(copy)
    ckpt = torch.load(paths.CHECKPOINT, weights_only=True)
    assert [row["val_images"] for row in ckpt["history"]] == [TINY["val"]] * 2
    assert math.isfinite(scores["train_loss"]) and math.isfinite(scores["val_loss"])
    assert scores["val_accuracy"] > 0.2  # 10 classes: well above chance after 2 epochs
    ckpt = torch.load(paths.CHECKPOINT, weights_only=True)
    # The lr the schedule asked for after the last step (2 epochs x 3 steps of 64).
    steps = 3
    expected = params.train.lr * optim.lr_factor(2 * steps, params.train, steps)
    assert ckpt["history"][-1]["lr"] == pytest.approx(expected)
    if changes.get("channels_last"):
        conv = next(w for w in weights(copy).values() if w.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)


def test_max_steps_cuts_each_epoch_and_its_schedule(copy: Path) -> None:
    # 2 of the epoch's 3 steps of 64 images: each epoch trains 128 images, validates on all,
    # and the lr schedule spans the steps that ran.
    write_params(copy, train={"max_steps": 2})
    params = load_params()
    train.main(params)
    history = torch.load(paths.CHECKPOINT, weights_only=True)["history"]
    assert [row["train_images"] for row in history] == [2 * 64] * 2
    assert [row["val_images"] for row in history] == [TINY["val"]] * 2
    expected = params.train.lr * optim.lr_factor(2 * 2, params.train, 2)
    assert history[-1]["lr"] == pytest.approx(expected)


@pytest.mark.slow
def test_compile_trains(copy: Path) -> None:
    import shutil

    import torch._inductor  # noqa: F401  (ships with torch: missing is a broken install)

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    write_params(copy, train={"compile": True, "epochs": 1, "warmup_epochs": 0})
    train.main(load_params())
    assert metrics(copy)["val_accuracy"] > 0.2


# -- checkpoints and resume -------------------------------------------------------------


def test_changed_params_refuse_the_checkpoint(copy: Path, capfd: pytest.CaptureFixture) -> None:
    write_params(copy, train={"epochs": 1, "warmup_epochs": 0})
    train.main(load_params())
    first = weights(copy)
    capfd.readouterr()

    # Only speed settings changed: the finished checkpoint is reused, nothing retrains.
    write_params(copy, runtime={"threads": 1})
    train.main(load_params())
    assert "resuming from epoch 1 of 1" in capfd.readouterr().err
    assert_same_weights(weights(copy), first)

    write_params(copy, train={"lr": 0.001})
    train.main(load_params())
    err = capfd.readouterr().err
    assert "was written with other seed/model/train params; ignoring it" in err
    assert "resuming" not in err
    ckpt = torch.load(paths.CHECKPOINT, weights_only=True)
    assert [row["epoch"] for row in ckpt["history"]] == [1]
    assert ckpt["key"] == checkpoint.checkpoint_key(
        load_params(), json.loads(paths.META.read_text()), 1
    )


@pytest.mark.slow
def test_killed_run_resumes_bit_identical_into_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed the moment epoch 1's checkpoint appears (a SIGKILL acts at once), with two
    # whole epochs of every step (no train.max_steps: 10 steps each) still to go.
    counts = {"train": 640, "val": 64, "test": 64}
    base = prepared_repo(
        tmp_path / "base",
        counts=counts,
        train={
            "epochs": 3,
            "max_steps": 0,
            "warmup_epochs": 1,
            "deterministic": True,
            "augment_shift": 1,
        },
        runtime={"threads": 1},  # the two runs side by side share the cores
    )
    whole = copy_repo(base, tmp_path / "whole")
    write_params(whole, mlflow={"enabled": False})  # the reference needs no record
    killed = copy_repo(base, tmp_path / "killed")
    victim = python(killed, *TRAIN)
    ckpt = killed / "models/checkpoint.pt"
    wait_for(ckpt.exists, 240, "the first checkpoint", poll=0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert epoch < 3, "the run ended before it was killed"
    assert not (killed / "models/model.pt").exists()

    text = finish(python(killed, *TRAIN, log="resume.log"), killed, "resume.log")
    assert f"resuming from epoch {epoch} of 3" in text
    # The uninterrupted reference, in this process (the same thread count, from params).
    monkeypatch.chdir(whole)
    train.main(load_params())
    assert_same_weights(weights(killed), weights(whole))
    history = torch.load(ckpt, weights_only=True)["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # One MLflow run, FINISHED, with each epoch logged once, though it was killed.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{killed / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("vision-pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
