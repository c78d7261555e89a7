"""The MLflow store and, in it, the run of the model in models/: where, which run, what.

A pipeline result is its DVC outputs (params.yaml, metrics/, plots/, models/); its MLflow
run is a copy of them to browse and compare.

- Where: MLFLOW_TRACKING_URI, else `mlflow.tracking_uri`, else SQLite `mlflow.db` at the
  root of the user's repository (also for queued experiments, which run in temporary
  copies of it); the experiment is MLFLOW_EXPERIMENT_NAME, else `mlflow.experiment`.
- Which run: the train stage draws a run key and writes it to models/mlflow_run.json (a
  train output; the checkpoint keeps it too, so a resumed training keeps its run). The
  run is the one tagged with that key; the first stage that finds none makes it. So
  whatever DVC restores (a cache hit, `dvc exp apply`) names the run of that very model,
  in any store, and a new store or a deleted mlflow.db fills itself from the outputs.
- What: each stage's params sections, metrics files and plots, read from dvc.yaml; the
  per-epoch history; the prepared data as a dataset input; the PyTorch and ONNX models
  as MLflow models and the IR files. Only what the run lacks is logged, so logging the
  same outputs twice changes nothing.

When it is logged (a helper process beside each stage) is tracking/helper.py.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from filelock import FileLock

from stages.core import paths
from stages.core.dvcyaml import Stage, artifact_folder
from stages.core.errors import StageError
from stages.core.outputs import prefixed, read_history, read_json
from stages.core.params import MLflow, Params
from stages.core.paths import repo_root

log = logging.getLogger(__name__)

RUN_KEY_TAG = "pipeline.run_key"
PYTORCH_MODEL = "pytorch-model"
ONNX_MODEL = "onnx-model"
SYNC_HINT = "re-sync the run later with: vision-sync"
LOCK_TIMEOUT_S = 600
# MLflow's environment for every process that imports it through import_mlflow():
MLFLOW_ENVIRONMENT = {
    # Fail fast on a dead server instead of MLflow's default minutes of retries.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # The pipeline runs offline by design: no usage telemetry thread knocking on the network.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # A stage's log is its own lines: no progress bars for the small files it moves.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


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


def experiment_name(cfg: MLflow) -> str:
    """MLFLOW_EXPERIMENT_NAME if set, else mlflow.experiment."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.experiment


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
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=5):
            pass
        # An API call, as MLflow's client makes it: the login, and the server's database.
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if user:
            login = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
            request.add_header("Authorization", "Basic " + base64.b64encode(login).decode())
        with urllib.request.urlopen(request, timeout=20):
            pass
    except urllib.error.HTTPError as exc:
        hint = {
            401: "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a login it knows",
            403: "this login may not use it; ask its admin for a permission",
        }.get(exc.code, "its log says why (is its database up?)")
        message = f"mlflow: tracking server {uri} answered HTTP {exc.code}; {hint}"
        raise StageError(message) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StageError(
            f"mlflow: tracking server {uri} is unreachable ({reason}); start it or point "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri at a running one"
        ) from None


def store_lock(uri: str) -> FileLock | contextlib.nullcontext:
    """A lock file beside a SQLite db; nothing for a server, which serializes on its own."""
    # SQLite allows one writer, and MLflow creates and migrates the schema on first open:
    # two processes doing either at once meet "database is locked" or a half-made schema.
    # Every store access of ours holds this lock. FileLock counts re-entries by the same
    # object, so nested uses cannot deadlock.
    db = sqlite_file(uri)
    if db is None:
        return contextlib.nullcontext()
    return FileLock(str(db) + ".lock", timeout=LOCK_TIMEOUT_S)


def new_run_key() -> str:
    """A fresh key for the run of a model about to be trained."""
    return uuid.uuid4().hex


def read_run_key() -> str:
    """The run key of the model in models/, as the train stage recorded it."""
    try:
        return str(json.loads(paths.RUN_ID.read_text())["run_key"])
    except FileNotFoundError:
        raise StageError(f"{paths.RUN_ID}: not found (run the train stage first)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise StageError(f"{paths.RUN_ID}: not a run record (rerun the train stage)") from None


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


def import_mlflow() -> Any:
    """MLflow, with this project's environment (unless the user set those variables) and
    its loggers kept quiet (it sets them to INFO on import: schema migrations, notices)."""
    for name, value in MLFLOW_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def experiment_id(client: Any, cfg: MLflow, uri: str) -> str:
    """The configured experiment, made on first use with its files beside a SQLite db."""
    name = experiment_name(cfg)
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise StageError(
            f"mlflow: experiment '{name}' is deleted in {uri}; restore it in the "
            "MLflow UI or set mlflow.experiment to another name"
        )
    if found is not None:
        return found.experiment_id
    # Never into the temporary copy a queued experiment runs in: mlruns/ beside the db.
    db = sqlite_file(uri)
    return client.create_experiment(name, (db.parent / "mlruns").as_uri() if db else None)


class Store:
    """The MLflow store, and in it the run of the model in models/ (the helper's side)."""

    def __init__(self, params: Params, stage: str):
        mlflow = import_mlflow()
        self.params = params
        self.key = ""
        self.stage = stage
        self.uri = tracking_uri(params.mlflow)
        self.lock = store_lock(self.uri)
        self.mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)  # for log_model, which has no client argument
        # Making the client opens the store, which may create or migrate its schema.
        with self.lock:
            self.client = mlflow.MlflowClient(self.uri)
            self.experiment_id = self._experiment()
        self.run_id = ""
        self._monitor = None

    def _experiment(self) -> str:
        return experiment_id(self.client, self.params.mlflow, self.uri)

    def open_run(self, run_key: str, tags: dict[str, Any]) -> bool:
        """Reopen the run with this key, or make it; True when it was made now."""
        self.key = run_key
        with self.lock:
            found = self.client.search_runs(
                [self.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{self.key}'", max_results=1
            )
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return False
            git = git_tags()
            run = self.client.create_run(
                self.experiment_id,
                tags={**self._origin(), **git, **{k: str(v) for k, v in tags.items()}},
                run_name=os.environ.get("DVC_EXP_NAME") or self._readable_name(git),
            )
        self.run_id = run.info.run_id
        log.info("MLflow run %s in %s", self.run_id, self.uri)
        return True

    def _readable_name(self, git: dict[str, str]) -> str:
        """model-data-commit (cnn-digits-1a2b3c4), for a run no DVC experiment names."""
        parts = [self.params.model.name, self.params.data.source]
        if git:
            parts.append(git["git.commit"][:7] + ("-dirty" if git["git.dirty"] == "true" else ""))
        return "-".join(parts)

    def _origin(self) -> dict[str, str]:
        tags = {
            RUN_KEY_TAG: self.key,
            "mlflow.source.name": f"stages/{self.stage}.py",
            "mlflow.source.type": "LOCAL",
            "params.hash": self.params.digest("seed", "model", "train"),
            "model.name": self.params.model.name,
            "data.source": self.params.data.source,
        }
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
        from stages.sweep import trials

        tags.update(trials.trial_tags())
        with contextlib.suppress(Exception):  # no user name in some containers
            tags["mlflow.user"] = getpass.getuser()
        return tags

    def watch_system(self) -> None:
        """MLflow's system metrics (CPU, memory, GPU) while the stage runs, if asked for."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id, resume_logging=True, tracking_uri=self.uri
        )
        self._monitor.start()

    def finish(self, status: str) -> None:
        """Close the run: FINISHED, or FAILED when the stage failed or was killed."""
        if self._monitor is not None:
            self._monitor.finish()
        with self.lock:
            self.client.set_terminated(self.run_id, status)

    # -- logging what the outputs hold -------------------------------------------------
    def log_params(self, stages: list[Stage]) -> None:
        """The params sections these stages read, flattened (`train.lr`), once each."""
        from mlflow.entities import Param

        with self.lock:
            have = self.client.get_run(self.run_id).data.params
            new = []
            for stage in stages:
                for key, value in self.params.flat(*stage.params).items():
                    if key not in have:
                        new.append(Param(key, str(value)))
                        have[key] = str(value)
                    elif have[key] != str(value):
                        log.info("MLflow run keeps %s=%s (params are write-once)", key, have[key])
            for start in range(0, len(new), 100):  # MLflow's limit per call
                self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_stages(self, stages: list[Stage]) -> None:
        """Everything these stages' outputs hold that the run lacks."""
        from mlflow.entities import Metric

        self.log_params(stages)
        names = {s.name for s in stages}
        if "prepare" in names and paths.META.exists():
            self.log_dataset(json.loads(paths.META.read_text()))
        if "train" in names:
            self.log_epochs(read_history())
        with self.lock:
            have = self.client.get_run(self.run_id).data.metrics
            now = int(time.time() * 1000)
            metrics = [
                Metric(key, value, now, 0)
                for stage in stages
                for file in stage.metrics
                for key, value in prefixed(stage.name, read_json(file)).items()
                if have.get(key) != value
            ]
            for start in range(0, len(metrics), 1000):  # MLflow's limit per call
                self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
            # Words in a metrics file (convert's int8_method, promote's decision) as tags.
            words = {
                f"{stage.name}.{key}": value
                for stage in stages
                for file in stage.metrics
                for key, value in read_json(file).items()
                if isinstance(value, str)
            }
            for key, value in words.items():
                self.client.set_tag(self.run_id, key, value)
        for stage in stages:
            for file in stage.files:
                self.log_files(file, artifact_folder(file))

    def log_epochs(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch curves (`step` = epoch) for the epochs the run does not have yet."""
        from mlflow.entities import Metric

        with self.lock:
            done = {m.step for m in self.client.get_metric_history(self.run_id, "train/loss")}
            now = int(time.time() * 1000)
            metrics = [
                Metric(name, value, now, int(row["epoch"]))
                for row in rows
                if int(row["epoch"]) not in done
                for name, value in epoch_metrics(row).items()
            ]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)

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
        with self.lock:
            self.client.log_inputs(self.run_id, datasets=[entry])

    def log_files(self, path: Path, folder: str) -> None:
        """A file, or a folder's visible files, under `folder`: those the run lacks."""
        if path.is_dir():  # without hidden files (DVC's .gitignore)
            files = [
                f
                for f in sorted(path.rglob("*"))
                if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
            ]
        else:
            files = [path] if path.is_file() else []
        with self.lock:
            for file in files:
                where = folder
                if path.is_dir() and file.parent != path:
                    where = f"{folder}/{file.parent.relative_to(path).as_posix()}"
                have = {f.path: f.file_size for f in self.client.list_artifacts(self.run_id, where)}
                if have.get(f"{where}/{file.name}") != file.stat().st_size:
                    self.client.log_artifact(self.run_id, str(file), where)

    def log_model(self, name: str) -> None:
        """One of the pipeline's MLflow models, packaged once (when mlflow.log_models)."""
        if not self.params.mlflow.log_models:
            return
        if name == PYTORCH_MODEL:
            self.log_pytorch_model()
        else:
            self.log_onnx_model()

    def _logged_models(self) -> set[str]:
        with self.lock:
            found = self.client.search_logged_models(
                [self.experiment_id], filter_string=f"source_run_id = '{self.run_id}'"
            )
        return {model.name for model in found}

    def log_pytorch_model(self) -> None:
        """models/model.pt as an MLflow model with signature and input example, once."""
        if not paths.MODEL.exists() or PYTORCH_MODEL in self._logged_models():
            return
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        from stages.models import zoo

        model, config = zoo.load(paths.MODEL)
        # Two images, so the saved program (torch.export, MLflow's pt2 format) keeps a
        # dynamic batch axis instead of specializing to batch 1.
        example = zoo.example_input(config, 2).numpy()
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        with self.lock:
            self.mlflow.set_experiment(experiment_id=self.experiment_id)
            mlflow.pytorch.log_model(
                model,
                name=PYTORCH_MODEL,
                signature=infer_signature(example, output),
                input_example=example,
                # Explicit requirements: inferring them spawns a slow subprocess.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                run_id=self.run_id,
            )

    def log_onnx_model(self) -> None:
        """models/model.onnx as an MLflow model with signature and input example, once."""
        if not paths.ONNX.exists() or ONNX_MODEL in self._logged_models():
            return
        import mlflow.onnx
        import onnx
        import onnxruntime
        from mlflow.models import infer_signature

        from stages.models import runtimes, zoo

        example = zoo.example_input(zoo.load(paths.MODEL)[1], 1).numpy()
        output = runtimes.onnxruntime(paths.ONNX)(example)
        with self.lock:
            self.mlflow.set_experiment(experiment_id=self.experiment_id)
            mlflow.onnx.log_model(
                onnx.load(str(paths.ONNX)),
                name=ONNX_MODEL,
                signature=infer_signature(example, output),
                input_example=example,
                save_as_external_data=False,
                onnx_execution_providers=["CPUExecutionProvider"],
                pip_requirements=[
                    f"onnx=={onnx.__version__}",
                    f"onnxruntime=={onnxruntime.__version__}",
                ],
                run_id=self.run_id,
            )

    def log_snapshot(self) -> None:
        """params.yaml and dvc.lock as they stand (dvc.lock lacks the running stage)."""
        for file in (paths.PARAMS, paths.DVC_LOCK):
            self.log_files(file, "snapshot")
