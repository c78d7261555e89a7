"""Every MLflow call of the pipeline: one run per trained model, reopened by later stages.

The train stage (rank 0) starts the run and writes its id to `models/mlflow_run.json`, a
train output, so whatever DVC restores (a cache hit, `dvc exp apply`) points at the run of
that very model. Later stages reopen it; when the store no longer has it (a new store, a
deleted db) they make a new run, tagged with the old id, and log again what the DVC
outputs hold, so the record can always be rebuilt (`python -m stages.tracking sync`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from filelock import FileLock

from stages import paths
from stages.errors import StageError
from stages.params import MLflow, Params

log = logging.getLogger(__name__)

# Stages in pipeline order: a stage that rebuilds a lost run logs the outputs before it.
ORDER = ("train", "evaluate", "export", "convert", "benchmark")
ORIGIN_TAG = "pipeline.origin_run_id"
SYNC_HINT = "re-sync the run later with: python -m stages.tracking sync"

# Fail fast on a dead server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def repo_root() -> Path:
    """The user's repository: DVC_ROOT in queued experiments (temp copies), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(cfg: MLflow) -> str:
    """MLFLOW_TRACKING_URI if set, else mlflow.tracking_uri, else SQLite at the repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri:
        return uri
    return f"sqlite:///{repo_root() / paths.MLFLOW_DB}"


def check_reachable(uri: str) -> None:
    """One clear line, before any heavy work, when a tracking server does not answer."""
    scheme = urlparse(uri).scheme
    if scheme not in ("http", "https"):
        return
    import requests

    try:
        reply = requests.get(uri.rstrip("/") + "/health", timeout=5)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise StageError(
            f"mlflow: tracking server {uri} is unreachable ({reason}); start it or point "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri at a running one"
        ) from None
    if reply.status_code >= 400:
        raise StageError(f"mlflow: tracking server {uri} answered HTTP {reply.status_code}")


def _store_lock(uri: str):
    # SQLite allows one writer; two queued experiments writing at once would otherwise
    # meet "database is locked". A lock file beside the db serializes our writes.
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return contextlib.nullcontext()
    db = Path(uri.removeprefix("sqlite:///"))
    return FileLock(str(db) + ".lock", timeout=300)


def git_tags() -> dict[str, str]:
    """The commit and dirty flag of the repository the stage runs in."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
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


class Tracker:
    """One MLflow run held open for the duration of a stage (rank 0 only)."""

    def __init__(self, cfg: MLflow, stage: str):
        self.cfg = cfg
        self.stage = stage
        self.uri = tracking_uri(cfg)
        self.run_id: str | None = None
        self.healthy = True
        check_reachable(self.uri)
        import mlflow

        self._mlflow = mlflow
        # MLflow sets its own INFO handler on import; keep its notices out of stage logs.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(self.uri)

    # -- opening ---------------------------------------------------------------------
    def _experiment(self):
        """The configured experiment, created on first use.

        With the SQLite store its artifacts go to mlruns/ beside the db, never into the
        temporary copy a queued experiment runs in.
        """
        mlflow = self._mlflow
        name = self.cfg.experiment
        if mlflow.get_experiment_by_name(name) is None:
            location = None
            if urlparse(self.uri).scheme == "sqlite":
                db = Path(self.uri.removeprefix("sqlite:///"))
                location = (db.parent / "mlruns").resolve().as_uri()
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # made meanwhile
                mlflow.create_experiment(name, artifact_location=location)
        return mlflow.set_experiment(name)

    def start(self, tags: dict[str, str], system_metrics: bool = False) -> str:
        """Start a new run (the train stage) and return its id."""
        mlflow = self._mlflow
        with self._lock():
            experiment = self._experiment()
            run = mlflow.start_run(
                experiment_id=experiment.experiment_id,
                run_name=os.environ.get("DVC_EXP_NAME") or None,
                tags={**git_tags(), **tags},
                log_system_metrics=system_metrics,
            )
        self.run_id = run.info.run_id
        log.info("MLflow run %s in %s", self.run_id, self.uri)
        return self.run_id

    def resume(self, run_id: str, system_metrics: bool = False) -> bool:
        """Reopen an existing run by id; False when the store does not have it."""
        mlflow = self._mlflow
        with self._lock():
            try:
                mlflow.MlflowClient().get_run(run_id)
            except mlflow.exceptions.MlflowException:
                return False
            mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        self.run_id = run_id
        return True

    def attach(self, params: Params) -> str:
        """Reopen the run of the model in models/ (or rebuild it from the DVC outputs)."""
        origin = read_run_file()
        if self.resume(origin):
            return origin
        mlflow = self._mlflow
        with self._lock():
            experiment = self._experiment()
            found = mlflow.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{ORIGIN_TAG}` = '{origin}'",
                max_results=1,
                output_format="list",
            )
        if found:
            self.resume(found[0].info.run_id)
            return self.run_id
        log.warning(
            "MLflow run %s is not in %s: rebuilding it from the DVC outputs", origin, self.uri
        )
        self.start({ORIGIN_TAG: origin})
        self.relog_outputs(params, upto=self.stage)
        return self.run_id

    def end(self, failed: bool = False) -> None:
        """Close the run (FAILED when the stage failed)."""
        if self.run_id is None:
            return
        self._call(self._mlflow.end_run, "FAILED" if failed else "FINISHED")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(failed=exc_type is not None)

    # -- logging ---------------------------------------------------------------------
    def _lock(self):
        return _store_lock(self.uri)

    def _call(self, fn, *args, **kwargs) -> Any:
        # After the run is open, a tracking failure must never cost the user the trained
        # model or the DVC outputs: warn once, keep going, and say how to re-sync.
        if not self.healthy:
            return None
        try:
            with self._lock():
                return fn(*args, **kwargs)
        except Exception as exc:
            self.healthy = False
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("MLflow logging failed (%s); the stage goes on; %s", first, SYNC_HINT)
            return None

    def log_params(self, values: dict[str, Any]) -> None:
        """Log flat params (`train.lr`); values already logged are left as they are."""
        client = self._mlflow.MlflowClient()
        run = self._call(client.get_run, self.run_id)
        if run is None:
            return
        new = {k: v for k, v in values.items() if k not in run.data.params}
        if new:
            self._call(self._mlflow.log_params, {k: str(v) for k, v in new.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call(self._mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-numbers are skipped) at an optional step."""
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if numbers:
            self._call(self._mlflow.log_metrics, numbers, step=step)

    def logged_steps(self, key: str) -> set[int]:
        """Steps already logged for a metric (to skip them when a training run resumes)."""
        client = self._mlflow.MlflowClient()
        history = self._call(client.get_metric_history, self.run_id, key) or []
        return {m.step for m in history}

    def log_artifact(self, file: Path, folder: str | None = None) -> None:
        if Path(file).exists():
            self._call(self._mlflow.log_artifact, str(file), folder)

    def log_artifacts(self, folder: Path, dest: str) -> None:
        if Path(folder).is_dir():
            self._call(self._mlflow.log_artifacts, str(folder), dest)

    def log_dataset(self, meta: dict[str, Any]) -> None:
        """The prepared data as an MLflow dataset input: source, digest, splits."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        def log() -> None:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways"
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(str((Path.cwd() / paths.PREPARED).resolve()))
            dataset = MetaDataset(
                source=source, name=f"{meta['source']}-prepared", digest=meta["digest"][:36]
            )
            self._mlflow.log_input(dataset, context="training")

        self._call(log)

    def log_pytorch_model(self, model, example) -> None:
        """The PyTorch model with signature and input example, as an MLflow 3 logged model."""
        if not self.cfg.log_models:
            return
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        def log() -> None:
            with torch.no_grad():
                output = model(example).numpy()
            mlflow.pytorch.log_model(
                model,
                name="pytorch-model",
                signature=infer_signature(example.numpy(), output),
                input_example=example.numpy(),
                code_paths=[str(Path(__file__).parent)],
                # Explicit requirements: inferring them spawns a slow subprocess.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )

        self._call(log)

    def log_onnx_model(self, file: Path, example) -> None:
        """The exported ONNX file as an MLflow 3 logged model linked to the run."""
        if not self.cfg.log_models:
            return
        import mlflow.onnx
        import onnx
        import onnxruntime

        def log() -> None:
            mlflow.onnx.log_model(
                onnx.load(str(file)),
                name="onnx-model",
                input_example=example.numpy(),
                save_as_external_data=False,
                onnx_execution_providers=["CPUExecutionProvider"],
                pip_requirements=[
                    f"onnx=={onnx.__version__}",
                    f"onnxruntime=={onnxruntime.__version__}",
                ],
            )

        self._call(log)

    # -- rebuilding ------------------------------------------------------------------
    def relog_outputs(self, params: Params, upto: str | None = None) -> None:
        """Log what the DVC outputs of the stages before `upto` (all when None) hold."""
        stages = ORDER if upto is None else ORDER[: ORDER.index(upto)]
        if "train" in stages:
            self.log_params(params.flat("seed", "model", "train"))
            meta_file = paths.META
            if meta_file.exists():
                meta = json.loads(meta_file.read_text())
                self.log_params({f"data.{k}": v for k, v in meta.get("params", {}).items()})
                self.log_dataset(meta)
            for step, row in enumerate(read_history(), start=1):
                self.log_metrics(row, step=int(row.get("epoch", step)))
            self.log_metrics(prefixed("train", read_json(paths.TRAIN_METRICS)))
            self.log_artifacts(paths.PLOTS / "train", "plots")
        for stage in stages:
            if stage == "train":
                continue
            params_sections = {
                "export": ("export",),
                "convert": ("openvino",),
                "benchmark": ("benchmark",),
                "evaluate": ("evaluate",),
            }
            self.log_params(params.flat(*params_sections[stage]))
            self.log_metrics(prefixed(stage, read_json(paths.METRICS / f"{stage}.json")))
            self.log_artifacts(paths.PLOTS / stage, "plots")
        if "export" in stages:
            self.log_artifact(paths.ONNX, "onnx")
        if "convert" in stages:
            self.log_artifacts(paths.OPENVINO, "openvino")
        self.log_artifact(Path("dvc.lock"), "snapshot")
        self.log_artifact(paths.PARAMS, "snapshot")


def read_json(file: Path) -> dict[str, Any]:
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


def read_run_file() -> str:
    """The MLflow run id the train stage recorded for the model in models/."""
    try:
        return json.loads(paths.RUN_ID.read_text())["run_id"]
    except FileNotFoundError:
        raise StageError(f"{paths.RUN_ID}: not found (run the train stage first)") from None
    except (json.JSONDecodeError, KeyError):
        raise StageError(f"{paths.RUN_ID}: not a run record (rerun the train stage)") from None


def sync(params: Params) -> str:
    """Log every DVC output into the model's run (after a tracking outage or a new store)."""
    with Tracker(params.mlflow, "sync") as tracker:
        run_id = tracker.attach(params)
        if run_id == read_run_file() or tracker.healthy:
            tracker.relog_outputs(params)
        return run_id


@contextlib.contextmanager
def maybe(tracker: Tracker | None) -> Iterator[Tracker | None]:
    """A context for an optional tracker (None on ranks other than 0)."""
    if tracker is None:
        yield None
        return
    with tracker:
        yield tracker


def main(argv: list[str]) -> None:
    """`python -m stages.tracking sync`: re-log the DVC outputs into MLflow."""
    from stages import logs
    from stages.params import load_params

    logs.setup("tracking")
    if argv != ["sync"]:
        raise StageError("usage: python -m stages.tracking sync")
    run_id = sync(load_params())
    log.info("synced the DVC outputs into MLflow run %s", run_id)


if __name__ == "__main__":
    main(sys.argv[1:])
