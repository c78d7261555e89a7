"""Declared sweeps on Optuna: each trial a DVC experiment and one MLflow run.

    python -m stages.sweep [--trials N] [--jobs J] [--study NAME] [--storage URL]
                           [--timeout S] [--apply] [--clean]

The `sweep` section of params.yaml says what to search. Optuna (its sampler, pruner,
storage and stale-trial heartbeat) decides which trial runs next; each trial is
`dvc exp run --temp -n <study>-<number> -S <its params> <until>`, so it runs in a temporary
copy of the repository, lands as a DVC experiment and, through the stages, as one MLflow
run tagged with its study and trial under the sweep's parent run. The study lives in an
Optuna storage (optuna.db beside params.yaml, or a PostgreSQL URL shared by several
machines): the same command started again continues where the study stands.

While training as a trial, the train stage reports each epoch's validation score to the
study (`Pruning`, below) and ends early, exit 0 and `pruned: true` in metrics/train.json,
when the pruner says so.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from stages import paths, tracking
from stages.errors import StageError, first_line, install_excepthook
from stages.params import Params, Range, Sweep, load_params, parse_params

log = logging.getLogger("stages.sweep")

# How a trial's stages learn that they are a trial: JSON {storage, study, trial, report,
# driver, parent}. DVC passes the environment of `dvc exp run --temp` to the stages.
TRIAL_ENV = "VISION_SWEEP_TRIAL"
# An Optuna storage URL (e.g. postgresql+psycopg://user:pass@host/db) instead of optuna.db;
# --storage wins over it. Credentials belong here, never in params.yaml.
STORAGE_ENV = "VISION_SWEEP_STORAGE"
STORAGE_FILE = "optuna.db"
# Optuna marks a trial whose driver stopped beating for GRACE_S seconds as failed.
HEARTBEAT_S = 5
GRACE_S = 15
# The sweep's metric, and the per-epoch validation score that moves the same way.
REPORTED = {
    "evaluate/accuracy": "val_accuracy",
    "train/val_accuracy": "val_accuracy",
    "evaluate/loss": "val_loss",
    "train/val_loss": "val_loss",
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
LOGS = Path(".dvc/tmp/sweep")  # one log file per trial (DVC keeps .dvc/tmp out of git)
# The DVC of this environment; trials starting or landing at once wait for each other's
# repository lock instead of failing after DVC's default 3 s.
DVC = (sys.executable, "-m", "dvc", "--wait-for-lock")


# -- the space ---------------------------------------------------------------------------
def _lookup(raw: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    """The mapping that holds a dotted params path, and the last key."""
    *sections, key = dotted.split(".")
    node: Any = raw
    for part in sections:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or key not in node or isinstance(node[key], dict):
        raise StageError(f"params.yaml: sweep.space.{dotted}: not a parameter in params.yaml")
    return node, key


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw params with the dotted paths set to these values."""
    copy = json.loads(json.dumps(raw))
    for dotted, value in values.items():
        node, key = _lookup(copy, dotted)
        node[key] = value
    return copy


def distributions(raw: dict[str, Any], spec: Sweep) -> dict[str, Any]:
    """Optuna's distribution for every entry of the space; a bad entry stops with one line.

    Every choice, and both ends of every range, must be a value the params schema takes.
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from stages.params import SETTINGS

    out: dict[str, Any] = {}
    for dotted, entry in spec.space.items():
        if dotted.split(".")[0] in SETTINGS:
            raise StageError(
                f"params.yaml: sweep.space.{dotted}: a setting, not a parameter a trial varies"
            )
        node, key = _lookup(raw, dotted)
        if isinstance(entry, Range):
            integer = isinstance(node[key], int) and not isinstance(node[key], bool)
            ends = [entry.low, entry.high]
            if integer:
                if any(v != int(v) for v in [*ends, entry.step or 1]):
                    raise StageError(
                        f"params.yaml: sweep.space.{dotted}: {dotted} is an integer; "
                        "low, high and step must be whole numbers"
                    )
                ends = [int(v) for v in ends]
            tried = ends
        else:
            tried = list(entry)
        for value in tried:
            try:
                parse_params(with_values(raw, {dotted: value}))
            except StageError as exc:
                reason = str(exc).split(": ", 2)[-1]
                raise StageError(
                    f"params.yaml: sweep.space.{dotted}: the params schema rejects {value!r}: "
                    + reason.removesuffix(f", got {value!r}")
                ) from None
        if not isinstance(entry, Range):
            out[dotted] = CategoricalDistribution(list(entry))
        elif integer:
            step = int(entry.step or 1)
            out[dotted] = IntDistribution(tried[0], tried[1], log=entry.log, step=step)
        else:
            out[dotted] = FloatDistribution(entry.low, entry.high, log=entry.log, step=entry.step)
    return out


def grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid sampler's search space: the choices, or every step of a stepped range."""
    from optuna.distributions import CategoricalDistribution

    out: dict[str, list[Any]] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            out[name] = list(dist.choices)
        elif dist.step is None:
            raise StageError(
                f"params.yaml: sweep.space.{name}: the grid sampler needs choices or a range "
                "with a step"
            )
        else:
            count = round((dist.high - dist.low) / dist.step) + 1
            out[name] = [dist.low + i * dist.step for i in range(count)]
    return out


def metric_stage(spec: Sweep, stages: list[tracking.Stage]) -> str:
    """The stage that writes the sweep's metric, checked against `until` and the workspace."""
    names = [s.name for s in stages]
    if spec.until not in names:
        raise StageError(f"params.yaml: sweep.until: no stage {spec.until!r} in dvc.yaml")
    stage = spec.metric.split("/")[0]
    if stage not in names[: names.index(spec.until) + 1]:
        raise StageError(
            f"params.yaml: sweep.metric: {spec.metric!r}: no stage up to {spec.until!r} writes "
            f"it (stages: {', '.join(names[: names.index(spec.until) + 1])})"
        )
    file = paths.METRICS / f"{stage}.json"
    if file.exists():  # what this workspace's last run wrote
        known = tracking.prefixed(stage, tracking.read_json(file))
        if known and spec.metric not in known:
            raise StageError(
                f"params.yaml: sweep.metric: {file} has no {spec.metric!r}; it has "
                + ", ".join(sorted(known)[:8])
            )
    return stage


def study_name(spec: Sweep) -> str:
    """The default study: named after what is searched, so that a changed space starts anew."""
    searched = spec.model_dump(exclude={"trials", "jobs"})
    blob = json.dumps(searched, sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


# -- the study ---------------------------------------------------------------------------
def storage_url(given: str | None) -> str:
    """--storage, else $VISION_SWEEP_STORAGE, else optuna.db at the repository root."""
    url = given or os.environ.get(STORAGE_ENV) or ""
    if not url:
        return f"sqlite:///{(tracking.repo_root() / STORAGE_FILE).resolve()}"
    return url


def open_storage(url: str, heartbeat: bool = True):
    """Optuna's RDB storage; an unreachable or bad URL stops with one line."""
    import optuna

    # The heartbeat (how a killed sweep's trials are marked failed) is marked experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    shown = re.sub(r"//[^@/]*@", "//***@", url)  # no password in messages
    kwargs = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if heartbeat else {}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:
            # Two machines opening a new database at once race to make its tables: the
            # loser finds them made a moment later.
            if ("duplicate key" in str(exc) or "already exists" in str(exc)) and attempt < 2:
                time.sleep(1.0)
                continue
            raise StageError(
                f"sweep: the Optuna storage {shown} cannot be opened: {first_line(exc)}"
            ) from None


def make_sampler(spec: Sweep, space: dict[str, Any], jobs: int):
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(grid(space), seed=spec.seed)
    # constant_liar: trials running in parallel are not suggested the same point.
    return optuna.samplers.TPESampler(
        seed=spec.seed, n_startup_trials=spec.startup_trials, constant_liar=jobs > 1
    )


def make_pruner(spec: Sweep):
    import optuna

    if spec.pruner == "none" or spec.metric not in REPORTED:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials)


def finished(study) -> int:
    """Trials that count towards the total: complete or pruned."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# -- a running trial's side (the train stage) ----------------------------------------------
class Pruning:
    """In the train stage of a trial (rank 0): report each epoch's validation score to the
    study, and say whether the pruner stops the trial or its sweep is gone."""

    def __init__(self, link: dict[str, Any], spec: Sweep):
        self.link = link
        self.trial = None
        if not link.get("report"):  # pruner none, or a metric with no per-epoch score
            return
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(link["storage"], heartbeat=False)
        study = optuna.load_study(
            study_name=link["study"], storage=storage, pruner=make_pruner(spec)
        )
        study_id = storage.get_study_id_from_name(link["study"])
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, link["trial"])
        self.trial = optuna.trial.Trial(study, trial_id)

    @classmethod
    def from_env(cls, params: Params, is_main: bool) -> Pruning | None:
        """The trial this stage trains (rank 0), or None outside a sweep."""
        link = trial_link()
        return cls(link, params.sweep) if is_main and link else None

    def should_stop(self, row: dict[str, float]) -> bool:
        """Report this epoch; whether the pruner ends the trial here."""
        driver = int(self.link.get("driver") or 0)
        if not _alive(driver):
            raise StageError(f"sweep: the sweep (pid {driver}) is gone; stopping this trial")
        if self.trial is None:
            return False
        self.trial.report(row[self.link["report"]], int(row["epoch"]))
        return self.trial.should_prune()


def _alive(pid: int) -> bool:
    """Whether a process of this machine still runs (0: unknown, taken as alive)."""
    return pid <= 0 or psutil.pid_exists(pid)


def trial_link() -> dict[str, Any] | None:
    """What the sweep told this trial's stages (TRIAL_ENV), or None outside a sweep."""
    text = os.environ.get(TRIAL_ENV)
    return json.loads(text) if text else None


def in_trial() -> bool:
    """Whether this process runs a stage of a sweep's trial."""
    return TRIAL_ENV in os.environ


def trial_tags() -> dict[str, str]:
    """MLflow tags of a trial's run: its study and trial, and the sweep's parent run."""
    link = trial_link()
    if link is None:
        return {}
    tags = {"sweep.study": link["study"], "sweep.trial": str(link["trial"])}
    if link.get("parent"):
        tags["mlflow.parentRunId"] = link["parent"]
    return tags


# -- the driver ----------------------------------------------------------------------------
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
    return {**tracking.prefixed(stage, raw), **({"pruned": 1.0} if raw.get("pruned") else {})}


_DVC_API = threading.Lock()


class TrialFailed(Exception):
    """A trial's `dvc exp run` failed: the trial is marked failed and the sweep goes on."""


class Driver:
    """Runs trials of one study as DVC experiments, J at a time."""

    def __init__(self, params: Params, raw: dict[str, Any], args: argparse.Namespace):
        self.params = params
        self.spec = params.sweep
        self.stages = tracking.pipeline()
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
        self.tracker: Tracker | None = None

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
            if t.user_attrs.get("host") == host and not _alive(int(t.user_attrs.get("driver", 0)))
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


# -- MLflow: the parent run ----------------------------------------------------------------
class Tracker:
    """The sweep's parent run in the MLflow experiment, and the trials' runs under it."""

    def __init__(self, params: Params):
        self.uri = tracking.tracking_uri(params.mlflow)
        tracking.check_store(self.uri)
        mlflow = tracking.import_mlflow()

        self.client = mlflow.MlflowClient(self.uri)
        self.lock = tracking.store_lock(self.uri)
        with self.lock:
            self.experiment_id = tracking.experiment_id(self.client, params.mlflow, self.uri)

    def parent(self, study: str, spec: Sweep) -> str:
        """The study's parent run: found again on a resumed sweep, else made now."""
        with self.lock:
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.`sweep.study` = '{study}' AND tags.`sweep.role` = 'parent'",
                max_results=1,
            )
            if found:
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            run = self.client.create_run(
                self.experiment_id,
                run_name=study,
                tags={"sweep.study": study, "sweep.role": "parent", **tracking.git_tags()},
            )
            for key, value in spec.model_dump(exclude={"space", "trials", "jobs"}).items():
                self.client.log_param(run.info.run_id, f"sweep.{key}", value)
            space = {k: v if isinstance(v, list) else v.model_dump() for k, v in spec.space.items()}
            self.client.log_param(run.info.run_id, "sweep.space", json.dumps(space)[:6000])
        return run.info.run_id

    def trial_run(self, study: str, number: int) -> str | None:
        with self.lock:
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.`sweep.study` = '{study}' AND tags.`sweep.trial` = '{number}'",
                max_results=1,
            )
        return found[0].info.run_id if found else None

    def tag_trial(self, study: str, number: int, state: str) -> None:
        run_id = self.trial_run(study, number)
        if run_id:
            with self.lock:
                self.client.set_tag(run_id, "sweep.state", state)

    def finish(self, run_id: str, study, rows: list[dict[str, Any]], status: str) -> None:
        """The table, Optuna's plots and the best trial on the parent run."""
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp, self.lock:
            folder = Path(tmp)
            pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)
            for name in plot_files(study, folder):
                self.client.log_artifact(run_id, str(name), "sweep")
            self.client.log_artifact(run_id, str(folder / "trials.csv"), "sweep")
            best = best_trial(study)
            if best is not None:
                self.client.log_metric(run_id, "best_value", best.value)
                self.client.set_tag(run_id, "sweep.best_trial", str(best.number))
                self.client.set_tag(run_id, "sweep.best_experiment", best.user_attrs["experiment"])
            self.client.set_terminated(run_id, status)


def best_trial(study):
    """The best complete trial, or None before any completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def plot_files(study, folder: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances as PNGs (what can be drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    out = []
    for name, draw in (
        ("optimization_history.png", plots.plot_optimization_history),
        ("param_importances.png", plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():  # "too few trials": the plot says as much
                warnings.simplefilter("ignore")
                axes = draw(study)
        except Exception as exc:  # importances need two finished trials that differ
            log.info("no %s: %s", name, first_line(exc))
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)
        out.append(folder / name)
    return out


# -- the end -------------------------------------------------------------------------------
def rows(study, metric: str) -> list[dict[str, Any]]:
    """One row per trial: number, the params that differ between trials, metric, state."""
    trials = study.get_trials(deepcopy=False)
    varied = sorted(
        {k for t in trials for k in t.params if len({str(u.params.get(k)) for u in trials}) > 1}
    )
    return [
        {
            "trial": t.number,
            **{k: t.params.get(k) for k in varied},
            # A pruned trial's value is its last validation score: not the metric.
            metric: t.value if t.state.name == "COMPLETE" else None,
            "seconds": t.user_attrs.get("seconds"),
            "state": t.state.name.lower(),
            "experiment": t.user_attrs.get("experiment", ""),
        }
        for t in trials
    ]


def print_table(table: list[dict[str, Any]]) -> None:
    import pandas as pd

    from stages.compare import markdown

    frame = pd.DataFrame(table)
    if frame.empty:
        return
    sys.stdout.write(markdown(frame.rename(columns={"experiment": "run_id"})))
    sys.stdout.flush()


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


def clean(study, keep: str | None) -> None:
    """`dvc exp remove` every experiment of the study but the best one."""
    names = [t.user_attrs.get("experiment") for t in study.get_trials(deepcopy=False)]
    gone = [n for n in names if n and n != keep and exp_ref(n)]
    if gone:
        dvc("exp", "remove", *gone)
    print(f"removed {len(gone)} experiment(s) of {study.study_name}; kept {keep}", file=sys.stderr)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stages.sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--trials", type=int, help="finished trials the study should have")
    parser.add_argument("--jobs", type=int, help="trials at once on this machine")
    parser.add_argument("--study", help="study name (default: from the sweep section)")
    parser.add_argument("--storage", help=f"Optuna storage URL (or ${STORAGE_ENV})")
    parser.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    parser.add_argument(
        "--apply", action="store_true", help="apply the best trial and run the rest of dvc.yaml"
    )
    parser.add_argument(
        "--clean", action="store_true", help="dvc exp remove the study's other experiments"
    )
    args = parser.parse_args(argv)
    for flag in ("trials", "jobs", "timeout"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive")
    return args


def main(argv: list[str]) -> None:
    """Run the study up to its total of finished trials; the table; apply and clean."""
    from stages import logs

    logs.setup("sweep")
    args = parse_args(argv)
    params = load_params()
    raw = yaml.safe_load(paths.PARAMS.read_text(encoding="utf-8"))
    driver = Driver(params, raw, args)
    study = driver.study()
    driver.fail_orphans()
    tracker = Tracker(params) if params.mlflow.enabled else None
    done = finished(study)
    todo = max(driver.total - done, 0)
    if todo and tracker is not None:
        driver.parent = tracker.parent(driver.name, driver.spec)
        driver.tracker = tracker
    log.info(
        "study %s in %s: %d of %d trials finished; %d to run, %d at a time",
        driver.name,
        re.sub(r"//[^@/]*@", "//***@", driver.url),
        done,
        driver.total,
        todo,
        driver.jobs,
    )
    status = "FINISHED"
    try:
        if todo:
            import optuna
            from optuna.trial import TrialState

            counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            study.optimize(
                driver.objective,
                n_trials=todo,
                n_jobs=driver.jobs,
                timeout=args.timeout,
                catch=(TrialFailed,),
                callbacks=[
                    driver.report,
                    # Other machines' running trials count too: none starts past the total.
                    optuna.study.MaxTrialsCallback(driver.total, states=counted),
                ],
            )
    except KeyboardInterrupt:
        status = "KILLED"
        raise StageError(
            f"sweep: interrupted with {finished(study)} of {driver.total} trials finished; "
            "run the same command to continue"
        ) from None
    finally:
        table = rows(study, driver.spec.metric)
        if driver.parent:
            with contextlib.suppress(Exception):
                tracker.finish(driver.parent, study, table, status)
    print_table(table)
    best = best_trial(study)
    if best is None:
        raise StageError(f"sweep: study {driver.name} has no completed trial")
    exp = best.user_attrs["experiment"]
    log.info(
        "best: trial %d (%s %s = %.4f), DVC experiment %s",
        best.number,
        driver.spec.direction,
        driver.spec.metric,
        best.value,
        exp,
    )
    if args.apply:
        dvc("exp", "apply", exp)
        dvc("repro")
    if args.clean:
        clean(study, exp)


def cli() -> None:
    """Console script `vision-sweep`."""
    install_excepthook()
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
