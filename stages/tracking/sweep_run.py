"""A sweep's parent run in MLflow: the study's settings, its best trial and Optuna's plots,
with every trial's run beneath it."""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from stages.core.errors import first_line
from stages.core.params import Params, Sweep
from stages.sweep.studies import best_trial
from stages.tracking import mlflow_store

log = logging.getLogger(__name__)


class Tracker:
    """The sweep's parent run in the MLflow experiment, and the trials' runs under it."""

    def __init__(self, params: Params):
        self.uri = mlflow_store.tracking_uri(params.mlflow)
        mlflow_store.check_store(self.uri)
        mlflow = mlflow_store.import_mlflow()

        self.client = mlflow.MlflowClient(self.uri)
        self.lock = mlflow_store.store_lock(self.uri)
        with self.lock:
            self.experiment_id = mlflow_store.experiment_id(self.client, params.mlflow, self.uri)

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
                tags={"sweep.study": study, "sweep.role": "parent", **mlflow_store.git_tags()},
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
