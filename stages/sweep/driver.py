"""A sweep's driver: runs each trial as `dvc exp run --temp -n <study>-<number> -S ... <until>`,
some at once, and reads back the metric the study optimizes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.core import dvcyaml, outputs, paths
from stages.core.errors import StageError, first_line
from stages.core.params import Params
from stages.sweep.space import NAME, distributions, metric_stage, study_name
from stages.sweep.studies import (
    REPORTED,
    finished,
    make_pruner,
    make_sampler,
    open_storage,
    storage_url,
)
from stages.sweep.trials import TRIAL_ENV, process_alive

log = logging.getLogger(__name__)

LOGS = Path(".dvc/tmp/sweep")  # one log file per trial (DVC keeps .dvc/tmp out of git)

# The DVC of this environment; trials starting or landing at once wait for each other's
# repository lock instead of failing after DVC's default 3 s.
DVC = (sys.executable, "-m", "dvc", "--wait-for-lock")


def yaml_value(value: Any) -> str:
    """A value as `dvc exp run -S` reads it back (YAML): 1e-05 needs a dot to be a float."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@dataclass
class Slot:
    """One place a trial runs: a share of the cores, and a GPU where there are GPUs."""

    cores: list[int]
    gpu: int | None


def slots(jobs: int) -> list[Slot]:
    """J slots: the usable cores split evenly, and the GPUs dealt round-robin."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cores = list(range(os.cpu_count() or 1))
    gpus = gpu_count()
    share = max(len(cores) // jobs, 1)
    out = []
    for i in range(jobs):
        start = (i * share) % len(cores)
        mine = cores[start : start + share] or cores
        out.append(Slot(mine, i % gpus if gpus else None))
    return out


def gpu_count() -> int:
    """GPUs here (none without an NVIDIA driver, without importing PyTorch)."""
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        return 0
    import torch

    return torch.cuda.device_count()


def exp_ref(name: str) -> str | None:
    """The git ref of the DVC experiment with this name, if it landed."""
    listed = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps/"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    found = [ref for ref in listed if ref.rsplit("/", 1)[-1] == name]
    return found[-1] if found else None


def exp_metrics(ref: str, stage: str) -> dict[str, float]:
    """The flattened metrics file of a stage in an experiment (from DVC's cache)."""
    import dvc.api

    try:
        with _DVC_API:  # one Repo at a time: trials finish in threads of their own
            raw = json.loads(dvc.api.read(str(paths.METRICS / f"{stage}.json"), rev=ref))
    except Exception:  # the stage did not run in this trial
        return {}
    return {**outputs.prefixed(stage, raw), **({"pruned": 1.0} if raw.get("pruned") else {})}


_DVC_API = threading.Lock()


class TrialFailed(Exception):
    """A trial's `dvc exp run` failed: the trial is marked failed and the sweep goes on."""


class Driver:
    """Runs trials of one study as DVC experiments, J at a time."""

    def __init__(self, params: Params, raw: dict[str, Any], args: argparse.Namespace):
        self.params = params
        self.spec = params.sweep
        self.stages = dvcyaml.pipeline()
        self.stage = metric_stage(self.spec, self.stages)
        self.space = distributions(raw, self.spec)
        self.jobs = args.jobs or self.spec.jobs
        self.total = args.trials or self.spec.trials
        self.name = args.study or study_name(self.spec)
        if not NAME.match(self.name):
            raise StageError(
                f"sweep: --study {self.name!r}: use letters, digits, '.', '_' and '-' "
                "(it names DVC experiments)"
            )
        self.url = storage_url(args.storage)
        self.slots: queue.Queue[Slot] = queue.Queue()
        for slot in slots(self.jobs):
            self.slots.put(slot)
        self.parent = ""  # the MLflow parent run, set once the sweep has trials to run
        # The sweep's MLflow parent run (tracking/sweep_run.py), set by vision-sweep.
        self.tracker: Any = None

    def study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        sampler = make_sampler(self.spec, self.space, self.jobs)
        self.storage = storage = open_storage(self.url)
        try:
            return optuna.create_study(
                storage=storage,
                study_name=self.name,
                direction=self.spec.direction,
                sampler=sampler,
                pruner=make_pruner(self.spec),
                load_if_exists=True,
            )
        except Exception as exc:
            raise StageError(f"sweep: study {self.name}: {first_line(exc)}") from None

    def objective(self, trial) -> float:
        import optuna

        values = {name: suggest(trial, name, dist) for name, dist in self.space.items()}
        exp = f"{self.name}-{trial.number}"
        trial.set_user_attr("experiment", exp)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("driver", os.getpid())
        slot = self.slots.get()
        try:
            code, seconds, logfile = self.run_trial(trial.number, exp, values, slot)
        finally:
            self.slots.put(slot)
        trial.set_user_attr("seconds", round(seconds, 1))
        ref = exp_ref(exp) if code == 0 else None
        if ref is None:
            return self.fail(trial, f"{last_error(logfile)} (log: {logfile})")
        metrics = {**exp_metrics(ref, "train"), **exp_metrics(ref, self.stage)}
        if metrics.get("pruned"):
            raise optuna.TrialPruned()
        if self.spec.metric not in metrics:
            return self.fail(trial, f"{exp} wrote no {self.spec.metric} (log: {logfile})")
        return metrics[self.spec.metric]

    def fail_orphans(self) -> list[int]:
        """Trials an earlier sweep on this machine left running (it was killed): marked
        failed now. Optuna's heartbeat does the same for other machines, after GRACE_S."""
        from optuna.trial import TrialState

        study_id = self.storage.get_study_id_from_name(self.name)
        host = socket.gethostname()
        orphans = [
            t.number
            for t in self.storage.get_all_trials(study_id, states=(TrialState.RUNNING,))
            if t.user_attrs.get("host") == host
            and not process_alive(int(t.user_attrs.get("driver", 0)))
        ]
        for number in orphans:
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            log.info("trial %d was running when its sweep was stopped: marked failed", number)
        return orphans

    @staticmethod
    def fail(trial, why: str) -> float:
        trial.set_user_attr("error", why)
        raise TrialFailed(why)

    def run_trial(
        self, number: int, exp: str, values: dict[str, Any], slot: Slot
    ) -> tuple[int, float, Path]:
        """`dvc exp run --temp` of one trial on its slot; exit code, seconds, log file."""
        sets = [arg for k, v in values.items() for arg in ("-S", f"{k}={yaml_value(v)}")]
        link = {
            "storage": self.url,
            "study": self.name,
            "trial": number,
            "report": REPORTED.get(self.spec.metric) if self.spec.pruner != "none" else None,
            "driver": os.getpid(),
            "parent": self.parent,
        }
        env = {**dvc_env(), TRIAL_ENV: json.dumps(link)}
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
        LOGS.mkdir(parents=True, exist_ok=True)
        logfile = LOGS / f"{exp}.log"
        command = [*DVC, "exp", "run", "--temp", "-n", exp, *sets, self.spec.until]
        started = time.monotonic()
        with open(logfile, "w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setaffinity(proc.pid, slot.cores)  # inherited by its stages
            code = proc.wait()
        return code, time.monotonic() - started, logfile

    def report(self, study, trial) -> None:
        """One line per finished trial, and its state on its MLflow run."""
        shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        value = f"{self.spec.metric} {trial.value:.4f} " if trial.value is not None else ""
        if trial.state.name == "PRUNED" and trial.intermediate_values:
            epoch = max(trial.intermediate_values)
            value = f"stopped after epoch {epoch}, {REPORTED[self.spec.metric]} "
            value += f"{trial.intermediate_values[epoch]:.4f} "
        seconds = trial.user_attrs.get("seconds", 0)
        state = trial.state.name.lower()
        why = f": {trial.user_attrs['error']}" if "error" in trial.user_attrs else ""
        print(
            f"trial {trial.number} {state} in {seconds:.0f} s: {value}({shown}){why} "
            f"[{finished(study)}/{self.total}]",
            file=sys.stderr,
            flush=True,
        )
        if self.tracker is not None and self.parent:
            with contextlib.suppress(Exception):
                self.tracker.tag_trial(self.name, trial.number, state)


def last_error(logfile: Path) -> str:
    """The line of a trial's log that says what went wrong."""
    try:
        lines = [line.strip() for line in logfile.read_text(errors="replace").splitlines()]
    except OSError:
        return "the trial failed"
    errors = [line for line in lines if line.lower().startswith("error")]
    return (errors or [line for line in lines if line] or ["the trial failed"])[0][:300]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def suggest(trial, name: str, dist) -> Any:
    """The trial's value of one params path, through Optuna's public suggest API."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def dvc_env() -> dict[str, str]:
    """This environment, with this interpreter's folder first on PATH: the stages that DVC
    starts run the same Python as the sweep."""
    folder = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": folder + os.pathsep + os.environ.get("PATH", "")}


def dvc(*args: str) -> None:
    """Run a dvc command in the foreground; stop with its error when it fails."""
    done = subprocess.run([*DVC, *args], check=False, env=dvc_env())
    if done.returncode != 0:
        raise StageError(f"sweep: dvc {' '.join(args)} failed (exit {done.returncode})")
