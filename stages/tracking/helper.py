"""When a stage's MLflow run is logged: by a helper process beside the stage.

Each stage runs inside a `Recorder`: a helper process at idle CPU priority (it only gets
CPU time the stage leaves unused) that imports MLflow and opens the run while the stage
works, logs what earlier stages wrote that the run lacks, takes the train stage's epochs
as they end, and logs the stage's own outputs once the stage has written them. The stage
waits for it only at its end. The MLflow models are packaged by the helpers of export
(PyTorch) and convert (ONNX), while those stages work.

A tracking failure never costs the DVC outputs: a store that cannot be used at all stops a
stage with one line before any work; a failure after that is one warning, and the stage
goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from stages.core import paths
from stages.core.dvcyaml import Stage, pipeline, stages_before
from stages.core.entry import exit_now
from stages.core.errors import StageError, first_line
from stages.core.params import Params, load_params
from stages.tracking.mlflow_store import (
    ONNX_MODEL,
    PYTORCH_MODEL,
    SYNC_HINT,
    Store,
    check_store,
    read_run_key,
    tracking_uri,
)

log = logging.getLogger(__name__)

# The helper that packages each MLflow model, while its stage works: export's for the
# PyTorch model (export keeps one core busy and leaves the other to its helper; evaluate
# is too short to hide the 5 s of torch.export), convert's for the ONNX model. An
# experiment that stops at evaluate (a sweep's trial) so packages no model; `sync`
# packages any that are missing.
PACKAGED_WITH = {"export": PYTORCH_MODEL, "convert": ONNX_MODEL}

# promote records in its own process, since deciding needs the registry.
RECORDS_IN_PROCESS = ("promote",)

HELPER_TIMEOUT_S = 900


class Recorder:
    """A stage's MLflow helper: `with Recorder("evaluate", params): ...`.

    The helper is started at once (or was, by `prestart`); `ready()` waits until it has
    opened the run and logged what the earlier stages wrote (train and benchmark wait
    before timing anything); `log_epoch(row)` hands over one epoch; leaving the block
    waits while the helper logs this stage's outputs (the run is then FINISHED, or FAILED
    if the block raised).
    """

    def __init__(self, stage: str, params: Params, run_key: str | None = None, **tags: Any):
        self._proc = _PRESTARTED.pop(stage, None)
        self._ready: str | None = ""
        if not params.mlflow.enabled:
            self._proc = None  # a prestarted helper ends when its input does
            return
        try:
            check_store(tracking_uri(params.mlflow))
            header = {"run_key": run_key or read_run_key(), "tags": tags}
        except StageError:
            _end(self._proc)  # a prestarted helper: nothing for it to do
            raise
        self._proc = self._proc or start_helper(stage)
        self._ready = None
        self._send(json.dumps(header))

    def ready(self) -> None:
        """Wait until the run is open; a store that cannot be used stops the stage here."""
        if self._ready is None:
            self._ready = self._proc.stdout.readline().strip()
        if self._ready.startswith("error: "):
            raise StageError(self._ready.removeprefix("error: "))

    def log_epoch(self, row: dict[str, float]) -> None:
        """One finished epoch's row, logged by the helper as CPU time allows."""
        self._send(json.dumps(row))

    def _send(self, line: str) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError, ValueError):  # the helper is gone: it warned
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()

    def close(self, ok: bool) -> None:
        """Let the helper log this stage's outputs (when ok) and close the run; wait for it."""
        if self._proc is None:
            return
        if ok:
            self._send("done")
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=HELPER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            log.warning("the MLflow helper took over %d s; %s", HELPER_TIMEOUT_S, SYNC_HINT)
            return
        if (self._ready or "").startswith("error: "):
            return  # ready() raised it as the stage's error
        # A failure ready() did not hear of: one warning, and the stage goes on.
        unread = self._proc.stdout.read().splitlines()
        error = next((line for line in unread if line.startswith("error: ")), None)
        if error:
            log.warning(
                "MLflow logging failed (%s); the stage goes on; %s",
                error.removeprefix("error: "),
                SYNC_HINT,
            )

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


# Helpers started before their stage's module was imported (`python -m stages <stage>`).
_PRESTARTED: dict[str, subprocess.Popen] = {}


def records_through_helper(stage: Stage) -> bool:
    """Whether a stage records through a helper process: those that write or read the run
    record (a run belongs to a trained model: prepare makes none), promote aside."""
    run_record = paths.RUN_ID.as_posix()
    touches = run_record in stage.outs or run_record in stage.deps
    return touches and stage.name not in RECORDS_IN_PROCESS


def start_helper(stage: str) -> subprocess.Popen:
    """`python -m stages.tracking.helper STAGE`, talking over its stdin and stdout."""
    argv = [sys.executable, "-m", "stages.tracking.helper", stage]
    try:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    except OSError as exc:
        raise StageError(f"mlflow: cannot start the helper process: {exc}") from None


def prestart(stage: str, params: Params) -> None:
    """Start the stage's helper now, so that importing MLflow and opening the store happen
    while the stage imports PyTorch; the stage's Recorder (in this process) takes it over."""
    if params.mlflow.enabled and stage not in _PRESTARTED:
        _PRESTARTED[stage] = start_helper(stage)


def discard(stage: str) -> None:
    """End a prestarted helper that no Recorder will take."""
    _end(_PRESTARTED.pop(stage, None))


def _end(proc: subprocess.Popen | None) -> None:
    """Stop a helper that has no header yet, so has logged nothing."""
    if proc is not None:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def optional_recorder(recorder: Recorder | None) -> Iterator[Recorder | None]:
    """A context for an optional recorder (None on ranks other than 0)."""
    if recorder is None:
        yield None
        return
    with recorder:
        yield recorder


class _Stopped(BaseException):
    """SIGTERM in the helper: the stage's process group is being ended."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped


def _idle_priority() -> None:
    # The helper may use only CPU time the stage leaves unused (SCHED_IDLE on Linux, the
    # lowest nice level elsewhere), so it never slows training or a measurement.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def record(stage: str) -> None:
    """`python -m stages.tracking.helper STAGE`: the helper behind a Recorder.

    Its input: one line {"run_key", "tags"}, then one line per finished epoch (train), then
    "done" once the stage has written its outputs; an input that ends before "done" means
    the stage failed or died. Its output: "ready" once the run is open, or "error: ...".
    """
    from stages.core import logs

    _idle_priority()
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    # Anything a library prints must not garble the reply: stdout now goes to stderr.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # Ctrl-C reaches the whole process group: the stage decides, and closes our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # torchrun ends a worker with SIGTERM to its process group (this helper included).
    signal.signal(signal.SIGTERM, _stop)
    logs.setup(stage)
    store: Store | None = None
    status = "FAILED"
    try:
        params = load_params()
        stages = pipeline()
        earlier = stages_before(stage, stages)
        mine = [s for s in stages if s.name == stage]
        store = Store(params, stage)
        header = sys.stdin.readline()
        if not header:  # the stage ended before it got to its Recorder
            return
        header = json.loads(header)
        if store.open_run(header["run_key"], header["tags"]) and stage != "train":
            log.warning("MLflow had no run of the model in models/: filling it from the outputs")
        if stage == "train" and params.mlflow.system_metrics:
            store.watch_system()
        store.log_stages(earlier)
        store.log_params(mine)
        replies.write("ready\n")
        if stage in PACKAGED_WITH:
            store.log_model(PACKAGED_WITH[stage])
        for line in sys.stdin:
            if line.strip() != "done":
                store.log_epochs([json.loads(line)])
                continue
            store.log_stages(mine)
            store.log_snapshot()
            status = "FINISHED"
            break
    except _Stopped:
        pass
    except Exception as exc:
        # The stage hears of it: at ready() it stops (nothing is computed yet), at its
        # end it warns and goes on (its outputs are written).
        with contextlib.suppress(OSError):  # the stage may have ended already
            replies.write(f"error: {exc if isinstance(exc, StageError) else first_line(exc)}\n")
        store = None
        with contextlib.suppress(_Stopped):
            for _ in sys.stdin:  # let the stage finish writing without a broken pipe
                pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if store is not None and store.run_id:
        with contextlib.suppress(Exception):
            store.finish(status)
    sys.stderr.flush()


if __name__ == "__main__":
    record(sys.argv[1])
    exit_now()  # skip the interpreter's teardown of MLflow's modules: nothing waits for it
