"""The deployable model: the INT8 IR as an MLflow pyfunc model, registered as @champion,
loaded where the project cannot be imported, served over HTTP, and saved to a folder.

One model is logged and registered for the whole module (in a tmp SQLite store); every
expectation is the IR's own output, computed here with OpenVINO directly.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from helpers.processes import free_port, http_server, inside
from helpers.repos import ROOT, child_env
from stages.core import paths
from stages.core.errors import StageError
from stages.data import datasets
from stages.release import pyfunc

pytestmark = pytest.mark.slow

REGISTERED = "vision-classifier"
CHAMPION = f"models:/{REGISTERED}@champion"
SERVED_IMAGES = 16

# Runs in a subprocess whose cwd is a tmp folder. The editable install puts the project on
# every sys.path, so it is blocked by hand: a None in sys.modules makes `import stages`
# raise, as it would where the repository does not exist.
LOAD_WITHOUT_PROJECT = """
import sys
sys.modules["stages"] = None
try:
    import stages
except ImportError:
    pass
else:
    raise SystemExit("the project is importable")
import json
import mlflow
import numpy as np
uri, images, out, project = sys.argv[1:]
frame = mlflow.pyfunc.load_model(uri).predict(np.load(images))
# The model ran the copy of ir_model.py inside it, nothing from the project's folder.
loaded = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
assert not [f for f in loaded if f.startswith(project)], [f for f in loaded if project in f]
with open(out, "w") as fh:
    json.dump({"columns": list(frame.columns), "rows": frame.values.tolist()}, fh)
"""


@dataclass
class Champion:
    """The registered model, its store and the IR's own answers on the test split."""

    store: str
    xml: Path
    classes: list[str]
    shape: tuple[int, int, int]
    images: np.ndarray  # float32 N x C x H x W in 0..1
    labels: np.ndarray  # true class indices
    uint8: np.ndarray  # the same images as stored, for the PNG files
    logits: np.ndarray  # of the IR, compiled here with OpenVINO


def ir_logits(xml: Path, images: np.ndarray) -> np.ndarray:
    """The IR's logits, compiled here with OpenVINO's defaults (not the model's code)."""
    import openvino as ov

    return ov.Core().compile_model(str(xml), "CPU")(images)[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def champion(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Champion]:
    """The INT8 IR logged into a run of a tmp SQLite store, registered, aliased @champion."""
    import mlflow

    with inside(trained):
        meta = datasets.load_meta()
        test = datasets.load_split("test")
    xml = trained / paths.IR_INT8
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    images = datasets.to_model_input(test.images).numpy()
    root = tmp_path_factory.mktemp("serving")
    store = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        client = mlflow.MlflowClient(store)
        # Artifacts beside the db, not in ./mlruns of whatever the cwd is.
        experiment = client.create_experiment("serving", (root / "mlruns").as_uri())
        run_id = client.create_run(experiment).info.run_id
        info = pyfunc.log(xml, meta["classes"], shape, run_id)
        client.set_terminated(run_id)
        version = mlflow.register_model(info.model_uri, REGISTERED)
        client.set_registered_model_alias(REGISTERED, "champion", version.version)
        yield Champion(
            store,
            xml,
            list(meta["classes"]),
            shape,
            images,
            test.labels.numpy(),
            test.images.numpy(),
            ir_logits(xml, images),
        )
    finally:
        mlflow.set_tracking_uri(previous)


def expected_labels(champion: Champion, logits: np.ndarray) -> list[str]:
    return [champion.classes[i] for i in logits.argmax(axis=1)]


def test_champion_loads_and_predicts_without_the_project(
    champion: Champion, tmp_path: Path
) -> None:
    np.save(tmp_path / "images.npy", champion.images)
    out = tmp_path / "predictions.json"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_PROJECT,
            CHAMPION,
            str(tmp_path / "images.npy"),
            str(out),
            str(ROOT / "stages"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=child_env({"MLFLOW_TRACKING_URI": champion.store}),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    frame = json.loads(out.read_text())
    assert frame["columns"] == ["label", *champion.classes]
    labels = [row[0] for row in frame["rows"]]
    probabilities = np.array([row[1:] for row in frame["rows"]], dtype=np.float64)
    assert all(isinstance(label, str) for label in labels)
    assert labels == expected_labels(champion, champion.logits)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probabilities, softmax(champion.logits), atol=1e-5)


def write_pngs(images: np.ndarray, folder: Path) -> list[Path]:
    """uint8 C x H x W images as PNG files, grey or RGB."""
    folder.mkdir()
    files = []
    for number, image in enumerate(images):
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        file = folder / f"{number:03d}.png"
        Image.fromarray(pixels).save(file)
        files.append(file)
    return files


def read_pngs(files: list[Path], channels: int) -> np.ndarray:
    """Image files as the float32 N x C x H x W of 0..1 pixels the model takes."""
    mode = "L" if channels == 1 else "RGB"
    batch = []
    for file in files:
        with Image.open(file) as image:
            pixels = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        batch.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
    return np.stack(batch)


@contextlib.contextmanager
def model_server(uri: str, store: str, log: Path) -> Iterator[str]:
    """`mlflow models serve` of `uri` on a free loopback port; its URL; killed at the end."""
    port = free_port()
    argv = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri]
    argv += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env({"MLFLOW_TRACKING_URI": store}),
            start_new_session=True,  # its own process group: uvicorn's workers go with it
        )
    with http_server(proc, f"http://127.0.0.1:{port}", "/ping", log) as url:
        yield url


def test_served_champion_classifies_image_files(champion: Champion, tmp_path: Path) -> None:
    # Spread over the classes: every other test image, from the start of the split.
    pick = slice(0, 2 * SERVED_IMAGES, 2)
    files = write_pngs(champion.uint8[pick], tmp_path / "images")
    images = read_pngs(files, champion.shape[0])
    own = expected_labels(champion, ir_logits(champion.xml, images))
    with model_server(CHAMPION, champion.store, tmp_path / "serve.log") as url:
        reply = requests.post(
            f"{url}/invocations",
            json={"inputs": images.tolist()},
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
    assert reply.ok, reply.text[:2000]
    rows = reply.json()["predictions"]
    assert list(rows[0]) == ["label", *champion.classes]
    labels = [row["label"] for row in rows]
    assert labels == own
    truth = [champion.classes[i] for i in champion.labels[pick]]
    hits = sum(a == b for a, b in zip(labels, truth, strict=True))
    assert hits >= 0.75 * len(truth), f"{hits} of {len(truth)} right"
    for row in rows:
        assert sum(row[c] for c in champion.classes) == pytest.approx(1.0, abs=1e-6)


def test_saved_folder_predicts_like_the_ir_and_replaces_the_previous_one(
    champion: Champion, tmp_path: Path
) -> None:
    import mlflow

    dest = tmp_path / "deployable"
    pyfunc.save(champion.xml.with_name(paths.IR_FP16.name), champion.classes, champion.shape, dest)
    pyfunc.save(champion.xml, champion.classes, champion.shape, dest)
    model = mlflow.pyfunc.load_model(str(dest))
    assert model.metadata.metadata["precision"] == "INT8"
    frame = model.predict(champion.images)
    assert list(frame.columns) == ["label", *champion.classes]
    assert frame["label"].tolist() == expected_labels(champion, champion.logits)
    np.testing.assert_allclose(
        frame[champion.classes].to_numpy(), softmax(champion.logits), atol=1e-5
    )
    # A bad IR is refused before anything is written: the previous model stays.
    with pytest.raises(StageError, match="gives 10 scores"):
        pyfunc.save(champion.xml, champion.classes[:-1], champion.shape, dest)
    assert mlflow.pyfunc.load_model(str(dest)).metadata.metadata["precision"] == "INT8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployable"]
