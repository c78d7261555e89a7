"""Every MLflow call of the pipeline: one run per trained model, reopened by later stages.

The train stage (rank 0) starts the run and writes its id to `models/mlflow_run.json`, a
train output, so whatever DVC restores (a cache hit, `dvc exp apply`) points at the run of
that very model. Later stages reopen it; when the store no longer has it (a new store, a
deleted db) the first of them makes a new run tagged with the old id and logs again what
the DVC outputs hold, and the stages after it find that run by the tag.
`python -m stages.tracking sync` does the same for every output at once.

The train stage talks to MLflow through a helper process (BackgroundTracker): importing
MLflow and opening its store take seconds of CPU, far more than 2% of a small training
run, so a helper process does them, and every later call, while the model trains.
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from filelock import FileLock, Timeout

from stages import paths
from stages.errors import StageError
from stages.params import MLflow, Params

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Stages in pipeline order: a stage that rebuilds a lost run logs the outputs before it.
ORDER = ("train", "evaluate", "export", "convert", "benchmark")
# The params sections each stage reads (as in dvc.yaml), logged by that stage.
STAGE_PARAMS = {
    "train": ("seed", "model", "train"),
    "evaluate": ("evaluate",),
    "export": ("export",),
    "convert": ("openvino",),
    "benchmark": ("benchmark",),
}
ORIGIN_TAG = "pipeline.origin_run_id"
PYTORCH_MODEL = "pytorch-model"
ONNX_MODEL = "onnx-model"
SYNC_HINT = "re-sync the run later with: python -m stages.tracking sync"
LOCK_TIMEOUT_S = 300
AGENT_TIMEOUT_S = 600
AGENT_OPS = frozenset(
    {
        "start",
        "resume",
        "end",
        "log_params",
        "set_tags",
        "log_metrics",
        "logged_steps",
        "log_artifact",
        "log_artifacts",
        "log_dataset",
        "log_pytorch_model",
        "log_onnx_model",
    }
)

# Fail fast on a dead server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# The pipeline runs offline by design: no usage telemetry thread knocking on the network.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# -- where -----------------------------------------------------------------------------
def repo_root() -> Path:
    """The user's repository: DVC_ROOT in queued experiments (temp copies), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(cfg: MLflow) -> str:
    """MLFLOW_TRACKING_URI if set, else mlflow.tracking_uri, else SQLite at the repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if not uri:
        return f"sqlite:///{repo_root() / paths.MLFLOW_DB}"
    # A relative SQLite path means the user's repository, also from the temporary copy a
    # queued experiment runs in (which DVC deletes afterwards).
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{repo_root() / uri.removeprefix('sqlite:///')}"
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def check_store(uri: str) -> None:
    """One clear line, before any heavy work, when the store cannot be used at all."""
    db = sqlite_file(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StageError(f"mlflow: cannot create {db.parent} for {uri}: {exc}") from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise StageError(f"mlflow: {db} is not writable (set mlflow.tracking_uri)")
        return
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            pass
    except urllib.error.HTTPError as exc:
        raise StageError(f"mlflow: tracking server {uri} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StageError(
            f"mlflow: tracking server {uri} is unreachable ({reason}); start it or point "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri at a running one"
        ) from None


def store_lock(uri: str) -> FileLock | contextlib.nullcontext:
    """A lock file beside a SQLite db; nothing for a server, which serializes on its own."""
    # SQLite allows one writer, and MLflow creates and migrates the schema on first open:
    # two queued experiments doing either at once meet "database is locked" or a half-made
    # schema. Every store access of ours, reads included, holds this lock. The same object
    # may be taken again by its holder (FileLock counts), so nested calls cannot deadlock.
    db = sqlite_file(uri)
    if db is None:
        return contextlib.nullcontext()
    return FileLock(str(db) + ".lock", timeout=LOCK_TIMEOUT_S)


# -- what ------------------------------------------------------------------------------
def git_tags() -> dict[str, str]:
    """The commit and dirty flag of the repository the stage runs in."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        except OSError:
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "git.commit": commit,
        "git.dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit,
    }


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    """A history row under MLflow names grouped by split: train/loss, val/accuracy, ..."""
    return {
        "train/loss": row["train_loss"],
        "train/accuracy": row["train_accuracy"],
        "val/loss": row["val_loss"],
        "val/accuracy": row["val_accuracy"],
        "train/lr": row["lr"],
        # Not train/images_per_second: that name holds the whole run's rate (train.json).
        "train/epoch_images_per_second": row["images_per_second"],
    }


def prefixed(stage: str, metrics: dict[str, Any], sep: str = "/") -> dict[str, float]:
    """Flatten nested metrics under the stage name: evaluate/accuracy, benchmark/onnxruntime/..."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{stage}{sep}{key}"
        if isinstance(value, dict):
            out.update(prefixed(name, value, sep))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def read_json(file: Path) -> dict[str, Any]:
    """A metrics file as a dict; empty when the stage has not written it."""
    try:
        return json.loads(Path(file).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_history() -> list[dict[str, float]]:
    """Per-epoch rows of plots/train/history.csv as numbers."""
    if not paths.TRAIN_HISTORY.exists():
        return []
    with paths.TRAIN_HISTORY.open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def read_run_file() -> str:
    """The run the train stage recorded for the model in models/ (or a key for that model)."""
    # A train stage that could not open a run records null; the model file's hash then
    # names the run that later stages build, so they still share one.
    try:
        run_id = json.loads(paths.RUN_ID.read_text())["run_id"]
    except FileNotFoundError:
        raise StageError(f"{paths.RUN_ID}: not found (run the train stage first)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise StageError(f"{paths.RUN_ID}: not a run record (rerun the train stage)") from None
    if run_id:
        return str(run_id)
    digest = hashlib.sha256(paths.MODEL.read_bytes()).hexdigest()[:16]
    return f"model-{digest}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (MLflow's can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- the in-process tracker -------------------------------------------------------------
class Tracker:
    """One MLflow run held open for the duration of a stage (rank 0 only)."""

    def __init__(self, cfg: MLflow, stage: str, uri: str | None = None):
        self.cfg = cfg
        self.stage = stage
        self.uri = uri or tracking_uri(cfg)
        self.run_id: str | None = None
        self.healthy = True
        self.rebuilt = False
        check_store(self.uri)
        self._lock = store_lock(self.uri)
        self._experiment: str | None = None
        self._params: dict[str, str] = {}
        self._monitor = None
        self._ended = False
        import mlflow

        self._mlflow = mlflow
        # MLflow and alembic talk at INFO on import and on opening a db; keep stage logs clean.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        mlflow.set_tracking_uri(self.uri)
        # Making the client opens the store: it creates or migrates the schema, so it
        # holds the lock like every other access.
        with self._opening():
            self._client = mlflow.MlflowClient(self.uri)

    @property
    def known_run_id(self) -> str | None:
        """The run id (the in-process tracker always knows it once the run is open)."""
        return self.run_id

    # -- opening ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _opening(self) -> Iterator[None]:
        # Before the run is open a store problem stops the stage with one line: nothing
        # has been computed yet that could be lost.
        try:
            with self._lock:
                yield
        except StageError:
            raise
        except Timeout:
            raise StageError(
                f"mlflow: {sqlite_file(self.uri)} stayed locked by another process for "
                f"{LOCK_TIMEOUT_S} s"
            ) from None
        except Exception as exc:
            raise StageError(f"mlflow: {self.uri}: {first_line(exc)}") from None

    def _experiment_id(self) -> str:
        """The configured experiment, created on first use."""
        # With the SQLite store its artifacts go to mlruns/ beside the db, never into the
        # temporary copy a queued experiment runs in.
        if self._experiment is not None:
            return self._experiment
        name = self.cfg.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            db = sqlite_file(self.uri)
            location = (db.parent / "mlruns").resolve().as_uri() if db else None
            try:
                self._experiment = self._client.create_experiment(name, location)
            except self._mlflow.exceptions.MlflowException:  # made meanwhile by another
                self._experiment = self._client.get_experiment_by_name(name).experiment_id
        elif experiment.lifecycle_stage == "deleted":
            raise StageError(
                f"mlflow: experiment '{name}' is deleted in {self.uri}; restore it in the "
                "MLflow UI or set mlflow.experiment to another name"
            )
        else:
            self._experiment = experiment.experiment_id
        return self._experiment

    def start(self, tags: dict[str, Any], system_metrics: bool = False) -> str:
        """Start a new run (the train stage) and return its id."""
        module = "tracking" if self.stage == "sync" else self.stage
        source = {"mlflow.source.name": f"stages/{module}.py", "mlflow.source.type": "LOCAL"}
        with contextlib.suppress(Exception):  # no user name in some containers
            source["mlflow.user"] = getpass.getuser()
        values = {k: str(v) for k, v in tags.items() if v is not None and v != ""}
        with self._opening():
            run = self._client.create_run(
                self._experiment_id(),
                tags={**source, **git_tags(), **values},
                run_name=os.environ.get("DVC_EXP_NAME") or None,
            )
        self.run_id = run.info.run_id
        self._params = {}
        self._watch_system(system_metrics, resume=False)
        log.info("MLflow run %s in %s", self.run_id, self.uri)
        return self.run_id

    def resume(self, run_id: str, system_metrics: bool = False) -> bool:
        """Reopen an existing run by id; False when the store does not have it."""
        if not run_id or run_id.startswith("model-"):
            return False
        missing = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
        with self._opening():
            try:
                run = self._client.get_run(run_id)
            except self._mlflow.exceptions.MlflowException as exc:
                if exc.error_code in missing:
                    return False
                raise
            if run.info.lifecycle_stage == "deleted":
                return False
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._experiment = run.info.experiment_id
        self._params = dict(run.data.params)
        self._watch_system(system_metrics, resume=True)
        return True

    def attach(self, params: Params) -> str:
        """Reopen the run of the model in models/ (or rebuild it from the DVC outputs)."""
        origin = read_run_file()
        if self.resume(origin):
            return origin
        with self._opening():
            found = self._client.search_runs(
                [self._experiment_id()],
                filter_string=f"tags.`{ORIGIN_TAG}` = '{origin}'",
                max_results=1,
            )
        if found and self.resume(found[0].info.run_id):
            return found[0].info.run_id
        log.warning(
            "MLflow run %s is not in %s: rebuilding it from the DVC outputs", origin, self.uri
        )
        train = read_json(paths.TRAIN_METRICS)
        self.start(
            {
                ORIGIN_TAG: origin,
                "pipeline.rebuilt_by": self.stage,
                "dvc.experiment": os.environ.get("DVC_EXP_NAME"),
                "params.hash": params.digest(*STAGE_PARAMS["train"]),
                "world_size": train.get("world_size"),
                "model.name": params.model.name,
                "data.source": params.data.source,
            }
        )
        self.rebuilt = True
        self.relog_outputs(params, upto=self.stage)
        return self.run_id

    def _watch_system(self, enabled: bool, resume: bool) -> None:
        """MLflow's system metrics (CPU, memory, GPU) for this run, when asked for."""
        if not enabled:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id, resume_logging=resume, tracking_uri=self.uri
        )
        self._monitor.start()

    def end(self, failed: bool = False) -> None:
        """Close the run (FAILED when the stage failed), with the params/lock snapshot."""
        if self.run_id is None or self._ended:
            return
        self._ended = True
        # dvc.lock gets this stage's entry only after the stage exits: the snapshot holds
        # the stages before it (`python -m stages.tracking sync` logs the finished one).
        if not failed and self.stage != "train":
            self.log_artifact(paths.PARAMS, "snapshot")
            self.log_artifact(Path("dvc.lock"), "snapshot")
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._call(self._client.set_terminated, self.run_id, "FAILED" if failed else "FINISHED")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(failed=exc_type is not None)

    # -- logging ---------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """Stop logging after the first failure, with one warning that says how to recover."""
        if self.healthy:
            self.healthy = False
            log.warning(
                "MLflow logging failed (%s); the stage goes on; %s", first_line(exc), SYNC_HINT
            )

    def _call(self, fn, *args, **kwargs) -> Any:
        # After the run is open, a tracking failure must never cost the user the trained
        # model or the DVC outputs: warn once, keep going, and say how to re-sync.
        if not self.healthy or self.run_id is None:
            return None
        try:
            with self._lock:
                return fn(*args, **kwargs)
        except Exception as exc:
            self.fail(exc)
            return None

    def _log_batch(self, metrics=(), params=()) -> None:
        if metrics or params:
            self._call(self._client.log_batch, self.run_id, metrics=metrics, params=params)

    def _new_params(self, values: dict[str, Any]) -> list:
        """Param entities for keys the run does not have yet (MLflow params never change)."""
        from mlflow.entities import Param

        out = []
        for key, value in values.items():
            text = str(value)
            if key not in self._params:
                out.append(Param(key, text))
                self._params[key] = text
            elif self._params[key] != text:
                log.info(
                    "MLflow run keeps %s=%s (params are write-once); %s now says %s",
                    key,
                    self._params[key],
                    paths.PARAMS,
                    text,
                )
        return out

    def log_params(self, values: dict[str, Any]) -> None:
        """Log flat params (`train.lr`); values already logged are left as they are."""
        self._log_batch(params=self._new_params(values))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (values as text)."""
        for key, value in tags.items():
            self._call(self._client.set_tag, self.run_id, key, str(value))

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (non-numbers are skipped) at an optional step, in one call."""
        from mlflow.entities import Metric

        now = _now_ms()
        self._log_batch(
            metrics=[
                Metric(key, float(value), now, step or 0)
                for key, value in metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            ]
        )

    def logged_steps(self, key: str) -> set[int]:
        """Steps already logged for a metric (to skip them when a training run resumes)."""
        history = self._call(self._client.get_metric_history, self.run_id, key) or []
        return {m.step for m in history}

    def log_artifact(self, file: Path | str, folder: str | None = None) -> None:
        """One file under `folder` of the run's artifacts (skipped when missing)."""
        if Path(file).is_file():
            self._call(self._client.log_artifact, self.run_id, str(file), folder)

    def log_artifacts(self, folder: Path | str, dest: str) -> None:
        """The files of a folder under `dest`, without hidden ones (DVC's .gitignore)."""
        folder = Path(folder)
        if not folder.is_dir():
            return
        files = [f.relative_to(folder) for f in sorted(folder.rglob("*")) if f.is_file()]
        visible = [f for f in files if not any(part.startswith(".") for part in f.parts)]
        if len(visible) == len(files):  # one call for the whole folder
            self._call(self._client.log_artifacts, self.run_id, str(folder), dest)
            return
        for file in visible:
            where = dest if file.parent == Path(".") else f"{dest}/{file.parent.as_posix()}"
            self.log_artifact(folder / file, where)

    def log_dataset(self, meta: dict[str, Any]) -> None:
        """The prepared data as an MLflow dataset input: source, digest, split counts."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=f"{meta['source']}-prepared",
            digest=meta["digest"][:36],  # MLflow's limit; the full digest is in meta.json
            source_type="local",
            source=json.dumps({"uri": str(repo_root() / paths.PREPARED)}),
            profile=json.dumps(meta.get("counts", {})),
        )
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])
        self._call(self._client.log_inputs, self.run_id, datasets=[entry])

    def _logged_models(self) -> set[str]:
        """Names of the MLflow models already linked to this run."""
        found = self._call(
            self._client.search_logged_models,
            experiment_ids=[self._experiment_id()],
            filter_string=f"source_run_id = '{self.run_id}'",
        )
        return {model.name for model in found or []}

    def _model_experiment(self) -> None:
        # Model.log files a logged model under the active experiment, not its run's.
        self._mlflow.set_experiment(experiment_id=self._experiment_id())

    def log_pytorch_model(self, file: Path | str = paths.MODEL) -> None:
        """models/model.pt as an MLflow 3 logged model, with signature and input example."""
        # Once per run: a run belongs to one model.pt (both are train outputs), so a rerun
        # of evaluate on the same model adds no copy.
        if not self.cfg.log_models or not Path(file).exists():
            return
        if PYTORCH_MODEL in self._logged_models():
            return

        def log() -> None:
            import mlflow.pytorch
            import torch
            from mlflow.models import infer_signature

            from stages import models

            self._model_experiment()
            model, config = models.load(file)
            # Two images, so the saved program (torch.export, MLflow's pt2 format) keeps
            # a dynamic batch axis instead of specializing to batch 1.
            example = models.example_input(config, 2)
            with torch.no_grad():
                output = model.eval()(example).numpy()
            mlflow.pytorch.log_model(
                model,
                name=PYTORCH_MODEL,
                signature=infer_signature(example.numpy(), output),
                input_example=example.numpy(),
                # Explicit requirements: inferring them spawns a slow subprocess.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                run_id=self.run_id,
            )

        self._call(log)

    def log_onnx_model(self, file: Path | str = paths.ONNX, example=None) -> None:
        """The exported ONNX file as an MLflow 3 logged model linked to the run."""
        if not self.cfg.log_models or not Path(file).exists():
            return

        def log() -> None:
            import mlflow.onnx
            import onnx
            import onnxruntime
            from mlflow.models import infer_signature

            from stages import models, runtimes

            self._model_experiment()
            sample = example
            if sample is None:
                sample = models.example_input(models.load(paths.MODEL)[1], 1)
            output = runtimes.onnxruntime(Path(file))(sample.numpy())
            mlflow.onnx.log_model(
                onnx.load(str(file)),
                name=ONNX_MODEL,
                signature=infer_signature(sample.numpy(), output),
                input_example=sample.numpy(),
                save_as_external_data=False,
                onnx_execution_providers=["CPUExecutionProvider"],
                pip_requirements=[
                    f"onnx=={onnx.__version__}",
                    f"onnxruntime=={onnxruntime.__version__}",
                ],
                run_id=self.run_id,
            )

        self._call(log)

    # -- rebuilding ------------------------------------------------------------------
    def relog_outputs(self, params: Params, upto: str | None = None) -> None:
        """Log what the DVC outputs of the stages before `upto` hold (all when None)."""
        # Only what the run lacks is logged (params, epochs, changed final metrics, models),
        # so syncing twice, or after a partial outage, never duplicates a curve.
        from mlflow.entities import Metric

        stages = ORDER[: ORDER.index(upto)] if upto in ORDER else ORDER
        run = self._call(self._client.get_run, self.run_id)
        if run is None:
            return
        self._params.update(run.data.params)
        have = run.data.metrics
        now = _now_ms()
        values: dict[str, Any] = {}
        metrics: list[Metric] = []
        for stage in stages:
            values.update(params.flat(*STAGE_PARAMS[stage]))
            final = prefixed(stage, read_json(paths.METRICS / f"{stage}.json"))
            metrics += [Metric(k, v, now, 0) for k, v in final.items() if have.get(k) != v]
        if "train" in stages:
            meta = read_json(paths.META)
            values.update({f"data.{k}": v for k, v in meta.get("params", {}).items()})
            done = self.logged_steps("train/loss")
            for row in read_history():
                epoch = int(row["epoch"])
                if epoch not in done:
                    metrics += [Metric(k, v, now, epoch) for k, v in epoch_metrics(row).items()]
            if meta:
                self.log_dataset(meta)
        self._log_batch(metrics=metrics, params=self._new_params(values))
        for stage in stages:
            self.log_artifacts(paths.PLOTS / stage, "plots")
        if "evaluate" in stages:
            self.log_pytorch_model(paths.MODEL)
        if "export" in stages and self.cfg.log_models and ONNX_MODEL not in self._logged_models():
            self.log_onnx_model(paths.ONNX)
        if "convert" in stages:
            self.log_artifacts(paths.OPENVINO, "openvino")


# -- the train stage's tracker: the same calls, in a helper process ----------------------
class BackgroundTracker:
    """Tracker's interface for the train stage, carried out by a helper process."""

    # Calls return at once (a line written to a pipe); the few whose answer training needs
    # (resume, logged_steps, run_id) wait for it. The helper reports its own failures the
    # way Tracker does: one warning, and the stage goes on.

    def __init__(self, cfg: MLflow, stage: str):
        self.cfg = cfg
        self.stage = stage
        self.uri = tracking_uri(cfg)
        check_store(self.uri)
        self.healthy = True
        self._run_id: str | None = None
        self._start_request: int | None = None
        self._replies: dict[int, dict[str, Any]] = {}
        self._closed = False
        self._cond = threading.Condition()
        self._ids = itertools.count()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "stages.tracking", "agent"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            raise StageError(f"mlflow: cannot start the helper process: {exc}") from None
        self._reader = threading.Thread(target=self._read, name="mlflow-replies", daemon=True)
        self._reader.start()
        self._write({"stage": stage, "uri": self.uri, "cfg": cfg.model_dump()})

    def _read(self) -> None:
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError), self._cond:
                reply = json.loads(line)
                self._replies[reply["id"]] = reply
                self.healthy = self.healthy and reply["healthy"]
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _write(self, message: dict[str, Any]) -> bool:
        try:
            self._proc.stdin.write(json.dumps(message, default=str) + "\n")
            self._proc.stdin.flush()
            return True
        except (OSError, ValueError):  # the helper is gone
            self._lost()
            return False

    def _lost(self) -> None:
        if self.healthy:
            self.healthy = False
            log.warning("the MLflow helper process ended early; the stage goes on; %s", SYNC_HINT)

    def _send(self, op: str, *args: Any, **kwargs: Any) -> int | None:
        if self._closed or not self.healthy:
            return None
        request = next(self._ids)
        sent = self._write({"id": request, "op": op, "args": args, "kwargs": kwargs})
        return request if sent else None

    def _wait(self, request: int | None) -> Any:
        if request is None:
            return None
        with self._cond:
            self._cond.wait_for(lambda: request in self._replies or self._closed)
            reply = self._replies.get(request)
        return reply["result"] if reply else None

    @property
    def known_run_id(self) -> str | None:
        """The run id if the helper has opened the run already, else None (no waiting)."""
        if self._run_id is None and self._start_request is not None:
            with self._cond:
                reply = self._replies.get(self._start_request)
            self._run_id = reply["result"] if reply else None
        return self._run_id

    @property
    def run_id(self) -> str | None:
        """The run id, waiting for the helper to open the run (None if it could not)."""
        if self._run_id is None and self._start_request is not None:
            self._run_id = self._wait(self._start_request)
        return self._run_id

    def start(self, tags: dict[str, Any], system_metrics: bool = False) -> None:
        """Ask the helper to start a run; its id is `run_id` once the helper answered."""
        self._start_request = self._send("start", tags, system_metrics)

    def resume(self, run_id: str, system_metrics: bool = False) -> bool:
        """Tracker.resume, waiting for the helper's answer."""
        resumed = bool(self._wait(self._send("resume", run_id, system_metrics)))
        if resumed:
            self._run_id = run_id
        return resumed

    def logged_steps(self, key: str) -> set[int]:
        """Tracker.logged_steps, waiting for the helper's answer."""
        return set(self._wait(self._send("logged_steps", key)) or [])

    def log_params(self, values: dict[str, Any]) -> None:
        """Tracker.log_params, in the helper."""
        self._send("log_params", values)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Tracker.set_tags, in the helper."""
        self._send("set_tags", tags)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Tracker.log_metrics, in the helper."""
        self._send("log_metrics", metrics, step)

    def log_artifact(self, file: Path | str, folder: str | None = None) -> None:
        """Tracker.log_artifact, in the helper."""
        self._send("log_artifact", str(file), folder)

    def log_artifacts(self, folder: Path | str, dest: str) -> None:
        """Tracker.log_artifacts, in the helper."""
        self._send("log_artifacts", str(folder), dest)

    def log_dataset(self, meta: dict[str, Any]) -> None:
        """Tracker.log_dataset, in the helper."""
        self._send("log_dataset", meta)

    def log_pytorch_model(self, file: Path | str = paths.MODEL) -> None:
        """Tracker.log_pytorch_model, in the helper."""
        self._send("log_pytorch_model", str(file))

    def end(self, failed: bool = False) -> None:
        """Close the run and wait for the helper to finish what it was given."""
        if self._proc is None:
            return
        self._send("end", failed)
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.close()
        try:
            code = self._proc.wait(timeout=AGENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._reader.join(timeout=10)
        if code != 0:
            self._lost()
        self._proc = None

    def __enter__(self) -> BackgroundTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(failed=exc_type is not None)


class _Stopped(BaseException):
    """SIGTERM in the helper: the stage's process group is being ended."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped


def agent() -> None:
    """`python -m stages.tracking agent`: carry out a BackgroundTracker's calls in order."""
    from stages import logs

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    # Anything a library prints must not garble the replies: stdout now goes to stderr.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # Ctrl-C reaches the whole process group; the stage decides, and tells us by "end".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # torchrun ends a worker with SIGTERM to its whole group (this helper included): mark
    # the run FAILED rather than leave it RUNNING forever in the UI.
    signal.signal(signal.SIGTERM, _stop)
    tracker: Tracker | None = None
    try:
        header = json.loads(sys.stdin.readline() or "null")
        if not header:
            return
        logs.setup(header["stage"])
        try:
            tracker = Tracker(MLflow(**header["cfg"]), header["stage"], uri=header["uri"])
        except Exception as exc:
            log.warning(
                "MLflow logging failed (%s); the stage goes on; %s", first_line(exc), SYNC_HINT
            )
        _serve(tracker, replies)
    except _Stopped:
        pass
    # The stage died (or was ended) without closing its run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if tracker is not None:
        tracker.end(failed=True)
    # Skip the interpreter's teardown of MLflow's modules: nothing waits for it, and a
    # dead stage's helper should not linger.
    sys.stderr.flush()
    os._exit(0)


def _serve(tracker: Tracker | None, replies: Any) -> None:
    """Answer the stage's requests in order until it says "end" or goes away."""
    for line in sys.stdin:
        request = json.loads(line)
        result = None
        ended = False
        if tracker is not None and request["op"] in AGENT_OPS:
            try:
                result = getattr(tracker, request["op"])(*request["args"], **request["kwargs"])
            except Exception as exc:
                tracker.fail(exc)
            ended = request["op"] == "end"
        if isinstance(result, set):
            result = sorted(result)
        healthy = tracker is not None and tracker.healthy
        try:
            replies.write(
                json.dumps({"id": request["id"], "result": result, "healthy": healthy}) + "\n"
            )
        except OSError:  # the stage is gone
            return
        if ended:
            # Everything is committed and answered.
            return


@contextlib.contextmanager
def maybe(tracker: Tracker | BackgroundTracker | None) -> Iterator[Any]:
    """A context for an optional tracker (None on ranks other than 0)."""
    if tracker is None:
        yield None
        return
    with tracker:
        yield tracker


# -- reading the record back: comparison and registry -----------------------------------
def _reader(cfg: MLflow):
    """MLflow set to an existing store, with its URI and the store's lock."""
    uri = tracking_uri(cfg)
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        raise StageError(f"mlflow: no store at {db} yet (run the pipeline first)")
    check_store(uri)
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    return mlflow, uri, store_lock(uri)


def runs_frame(cfg: MLflow) -> pd.DataFrame:
    """Every live run of the configured experiment: params.*, metrics.*, tags.* columns."""
    mlflow, uri, lock = _reader(cfg)
    try:
        with lock:  # opening the store may migrate its schema
            client = mlflow.MlflowClient(uri)
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                raise StageError(f"mlflow: no experiment '{cfg.experiment}' in {uri} yet")
            return mlflow.search_runs([experiment.experiment_id], output_format="pandas")
    except StageError:
        raise
    except Exception as exc:
        raise StageError(f"mlflow: {uri}: {first_line(exc)}") from None


def register_champion(cfg: MLflow, run_id: str, name: str, alias: str = "champion") -> str:
    """Register the run's PyTorch model under `name` and point `alias` at it; the version."""
    mlflow, uri, lock = _reader(cfg)
    try:
        with lock:
            client = mlflow.MlflowClient(uri)
            run = client.get_run(run_id)
            found = client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = '{PYTORCH_MODEL}'",
            )
            if not found:
                raise StageError(
                    f"mlflow: run {run_id} has no logged PyTorch model (run the evaluate "
                    "stage, or python -m stages.tracking sync)"
                )
            version = mlflow.register_model(found[0].model_uri, name)
            client.set_registered_model_alias(name, alias, version.version)
            return str(version.version)
    except StageError:
        raise
    except Exception as exc:
        raise StageError(f"mlflow: {uri}: {first_line(exc)}") from None


# -- sync ------------------------------------------------------------------------------
def sync(params: Params) -> str:
    """Log every DVC output into the model's run (after a tracking outage or into a new store)."""
    with Tracker(params.mlflow, "sync") as tracker:
        run_id = tracker.attach(params)
        if not tracker.rebuilt:  # a rebuilt run has just been given everything
            tracker.relog_outputs(params)
        if not tracker.healthy:
            raise StageError(f"mlflow: the sync into {tracker.uri} failed (see the warning)")
    return run_id


def main(argv: list[str]) -> None:
    """`python -m stages.tracking sync`: re-log the DVC outputs into MLflow."""
    if argv == ["agent"]:
        agent()
        return
    from stages import logs
    from stages.params import load_params

    logs.setup("tracking")
    if argv != ["sync"]:
        raise StageError("usage: python -m stages.tracking sync")
    run_id = sync(load_params())
    log.info("synced the DVC outputs into MLflow run %s", run_id)


if __name__ == "__main__":
    main(sys.argv[1:])
