"""A team's setup (README "Team"): the pipeline logging into an `mlflow server` on
PostgreSQL with MLflow's basic-auth login and served artifacts, checked through the
server's REST API; and the database going away mid-training. (Queued experiments, which
run in DVC's temporary copies, are test_queue's: the store's URL is the same from any
copy.)

PostgreSQL is a real server in a temporary folder on a free loopback port (started as the
`postgres` user when the tests run as root: initdb refuses root). `.ci/run` installs it
from the system's packages when it is missing; elsewhere the test skips, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from test_sweep import TRAIN_ONLY, set_sweep

from helpers.processes import TRAIN, finish, free_port, http_server, prepared_repo, python, wait_for
from helpers.repos import child_env, clone, console_script, git, write_params
from stages import convert, evaluate, export, train
from stages.core.errors import StageError
from stages.core.params import load_params
from stages.tools import sync

pytestmark = pytest.mark.slow

API = "/api/2.0/mlflow"
COUNTS = {"train": 400, "val": 60, "test": 60}


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class Postgres:
    """A PostgreSQL server of our own: initdb, start, stop (and start again), on loopback."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pg-"))  # not under root's 0700 tmp
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.command("initdb", "-D", str(self.data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")

    def command(self, program: str, *args: str) -> None:
        argv = [*self.as_user, str(self.bindir / program), *args]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=self.root)
        assert done.returncode == 0, f"{program}: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
        self.command("pg_ctl", "-D", str(self.data), "-o", options, "-l", "pg.log", "-w", "start")

    def stop(self) -> None:
        self.command("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create(self, name: str) -> str:
        self.command("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", name)
        return f"postgresql://mlflow@127.0.0.1:{self.port}/{name}"


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it: apt-get install postgresql)")
    # The server extra's driver, declared by the test extra: missing is a broken install.
    import psycopg  # noqa: F401

    server = Postgres(bindir)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(AssertionError):
            server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


ADMIN = ("admin", "admin-password-for-the-test")
USER = ("alice", "alice-password-for-the-test")


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str, auth_db: str) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` on a free loopback port, its runs in `backend`,
    its logins in `auth_db`, its artifacts under root; its URL."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    config = root / "basic_auth.ini"
    config.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {auth_db}\n"
        f"admin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Checking a password (PBKDF2) costs tens of ms of CPU per request without it.
        "auth_cache_ttl_seconds = 60\n"
    )
    log_file = root / f"server-{port}.log"
    log = log_file.open("w")
    env = {
        **os.environ,
        # No job runner: its seven helper processes (for GenAI jobs) cost 15 s to start.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],  # used once, to make the admin
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-static-secret-for-the-test",
    }
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--app-name",
            "basic-auth",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: the workers go down with it
    )
    try:
        with http_server(proc, f"http://127.0.0.1:{port}", "/health", log_file) as url:
            yield url
    finally:
        log.close()


def api(url: str, method: str, path: str, auth: tuple[str, str] = USER, **kwargs) -> dict:
    reply = requests.request(method, f"{url}{API}/{path}", timeout=30, auth=auth, **kwargs)
    reply.raise_for_status()
    return reply.json()


def runs(url: str, auth: tuple[str, str] = USER) -> list[dict]:
    """Every run of the pipeline's experiment, as the REST API returns them."""
    with contextlib.suppress(requests.HTTPError):
        experiment = api(
            url,
            "GET",
            "experiments/get-by-name",
            auth=auth,
            params={"experiment_name": "vision-pipeline"},
        )["experiment"]
        found = api(
            url,
            "POST",
            "runs/search",
            auth=auth,
            json={"experiment_ids": [experiment["experiment_id"]]},
        )
        return found.get("runs", [])
    return []


def metric_steps(url: str, run_id: str, key: str, auth: tuple[str, str] = USER) -> list[int]:
    query = {"run_id": run_id, "metric_key": key}
    history = api(url, "GET", "metrics/get-history", auth=auth, params=query)
    return sorted(int(m.get("step", 0)) for m in history.get("metrics", []))


def metric_keys(run: dict) -> set[str]:
    return {m["key"] for m in run["data"].get("metrics", [])}


def login(url: str) -> dict[str, str]:
    """The environment a pipeline process logs to the team's server with."""
    return {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": USER[0],
        "MLFLOW_TRACKING_PASSWORD": USER[1],
    }


def test_pipeline_logs_to_postgresql_with_a_login_and_outlives_the_database(
    postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epochs = 20
    repo = prepared_repo(tmp_path / "repo", counts=COUNTS, train={"epochs": epochs})
    (tmp_path / "server").mkdir()
    backend, logins = postgres.create("runs"), postgres.create("logins")
    with mlflow_server(tmp_path / "server", backend, logins) as url:
        # Without a login the server answers nothing but its health.
        anonymous = requests.get(f"{url}{API}/experiments/search?max_results=1", timeout=30)
        assert anonymous.status_code == 401
        alice = {"username": USER[0], "password": USER[1]}
        api(url, "POST", "users/create", auth=ADMIN, json=alice)
        # The stages run in this process where the process boundary is not the point (the
        # training is: the database goes down under it); each one's MLflow helper is its own.
        monkeypatch.chdir(repo)
        for name, value in {**login(url), "MLFLOW_TRACKING_PASSWORD": "no"}.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(StageError) as wrong:
            train.main(load_params())
        assert str(wrong.value) == (
            f"mlflow: tracking server {url} answered HTTP 401; set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a login it knows"
        )
        assert not (repo / "models/checkpoint.pt").exists()  # stopped before any work
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])

        training = python(repo, *TRAIN, env=login(url))

        def first_epoch_logged() -> list[dict]:
            found = runs(url)
            return (
                found
                if found and metric_steps(url, found[0]["info"]["run_id"], "train/loss")
                else []
            )

        # The training process is paused (SIGSTOP) once it has handed epoch 1 to its MLflow
        # helper (its log line follows the hand-over) and goes on only after the database
        # is down: the database goes away mid-training whatever the machine's speed.
        epoch_1 = f"] epoch 1/{epochs}: loss "
        log = repo / "run.log"
        wait_for(lambda: epoch_1 in log.read_text(), timeout=300, what="epoch 1", poll=0.02)
        os.kill(training.pid, signal.SIGSTOP)
        try:
            still_training = not (repo / "metrics" / "train.json").exists()
            # Curves are live: the helper puts the first epoch on the server meanwhile.
            [run] = wait_for(first_epoch_logged, 300, "epoch 1 on the server", poll=0.2)
            postgres.stop()  # the database goes away, the server stays
        finally:
            os.kill(training.pid, signal.SIGCONT)
        output = finish(training, repo, timeout=600)
        assert still_training, "training ended before it was paused: raise the epochs"
        for output_file in ("models/model.pt", "metrics/train.json", "plots/train/history.csv"):
            assert (repo / output_file).exists(), output_file
        warnings = [line for line in output.splitlines() if "MLflow logging failed" in line]
        assert len(warnings) == 1, output[-3000:]
        assert "vision-sync" in warnings[0]
        assert "Traceback" not in output

        # A later stage stops with one line before any work.
        params = load_params()
        with pytest.raises(StageError, match=f"^mlflow: tracking server {url} answered HTTP 5"):
            evaluate.main(params)
        assert not (repo / "metrics/evaluate.json").exists()

        postgres.start()  # back, with what it held
        sync.main([])
        # Through the stage that packages each MLflow model (benchmark records the way
        # evaluate does: not run here).
        for stage in (evaluate, export, convert):
            stage.main(params)

        [run] = runs(url)
        run_id = run["info"]["run_id"]
        key = json.loads((repo / "models" / "mlflow_run.json").read_text())["run_key"]
        assert {"key": "pipeline.run_key", "value": key} in run["data"]["tags"]
        assert run["info"]["status"] == "FINISHED"
        assert metric_steps(url, run_id, "train/loss") == list(range(1, epochs + 1))
        keys = metric_keys(run)
        for name in ("train/images_per_second", "evaluate/accuracy", "export/max_abs_diff"):
            assert name in keys, name
        assert "convert/accuracy_int8" in keys
        # Files and models go through the server to its artifact store.
        listed = api(url, "GET", "artifacts/list", params={"run_id": run_id, "path": "plots"})
        names = {f["path"] for f in listed.get("files", [])}
        assert {"plots/curves.png", "plots/history.csv", "plots/confusion.png"} <= names
        import mlflow

        models = mlflow.MlflowClient(url).search_logged_models(
            [run["info"]["experiment_id"]], filter_string=f"source_run_id = '{run_id}'"
        )
        assert sorted(m.name for m in models) == ["onnx-model", "pytorch-model"]

    artifacts = tmp_path / "server" / "artifacts"
    assert len(list(artifacts.rglob("MLmodel"))) == 2
    assert list(artifacts.rglob("model_int8.xml"))
    assert not (repo / "mlflow.db").exists()
    assert not (repo / "mlruns").exists()


def test_two_machines_share_one_sweep_study_on_postgresql(
    postgres: Postgres, pipeline: Path, tmp_path: Path
) -> None:
    """The team's database server holds the sweeps' Optuna study too: two clones ("two
    machines") run the same sweep against it at once, and between them run the study's
    total, one trial each."""
    url = postgres.create("optuna").replace("postgresql://", "postgresql+psycopg://")
    machines = [clone(pipeline, tmp_path / name) for name in ("a", "b")]
    space = {"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}, "train.epochs": [1]}
    for repo in machines:
        set_sweep(repo, **TRAIN_ONLY, trials=2, jobs=1, space=space)
        # What is shared here is the study; the trials' MLflow runs are test_sweep's (a
        # setting: the trials train the same).
        write_params(repo, mlflow={"enabled": False})
    command = [console_script("vision-sweep"), "--study", "team", "--storage", url]
    drivers = [
        subprocess.Popen(
            command, cwd=repo, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for repo in machines
    ]
    outputs = [driver.communicate(timeout=600) for driver in drivers]
    for driver, (_, err) in zip(drivers, outputs, strict=True):
        assert driver.returncode == 0, err.decode()[-3000:]
    import optuna

    study = optuna.load_study(study_name="team", storage=url)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.user_attrs["driver"] for t in trials} == {d.pid for d in drivers}
    for repo in machines:  # each machine's trial landed in its own repository
        refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
        assert len([r for r in refs if "/team-" in r]) == 1
