"""params.yaml loaded once into typed, validated objects; bad values stop with one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stages.core import paths
from stages.core.errors import StageError


class ParamsError(StageError):
    """params.yaml is missing, not YAML, or holds a bad value."""


class Section(BaseModel):
    # Unknown keys are typos (lr_rate, epoch): reject them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[int, Field(ge=1)]


class Data(Section):
    source: Literal["digits", "mnist", "fashion_mnist", "kmnist", "image_folder", "pdf_folder"]
    root: str
    download: bool
    image_size: Annotated[int, Field(ge=8, le=512)]
    channels: Literal[1, 3]
    val_fraction: Annotated[float, Field(ge=0.0, le=0.5)]
    test_fraction: Annotated[float, Field(ge=0.05, le=0.5)]
    skip_bad_files: bool
    pdf_dpi: Annotated[int, Field(ge=36, le=600)]


class Model(Section):
    name: Literal["cnn", "lenet5", "resnet18", "vgg11_bn", "googlenet"]


class Train(Section):
    epochs: Annotated[int, Field(ge=1, le=1000)]
    max_steps: Annotated[int, Field(ge=0)]
    batch_size: Annotated[int, Field(ge=1, le=65536)]
    optimizer: Literal["adamw", "sgd", "adadelta"]
    lr: Annotated[float, Field(gt=0.0, le=100.0)]
    momentum: Fraction
    weight_decay: Annotated[float, Field(ge=0.0)]
    schedule: Literal["cosine", "step", "constant"]
    warmup_epochs: Annotated[int, Field(ge=0)]
    step_epochs: Positive
    gamma: Annotated[float, Field(gt=0.0, le=1.0)]
    label_smoothing: Annotated[float, Field(ge=0.0, le=0.5)]
    grad_clip: Annotated[float, Field(ge=0.0)]
    augment_shift: Annotated[int, Field(ge=0, le=8)]
    amp: Literal["auto", "off", "bf16", "fp16"]
    compile: bool
    channels_last: bool
    deterministic: bool
    device: Literal["auto", "cpu", "cuda"]
    nproc_per_node: Literal["auto"] | Positive

    @model_validator(mode="after")
    def _warmup_within_epochs(self) -> Train:
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must not exceed epochs ({self.epochs})"
            )
        return self


class Evaluate(Section):
    batch_size: Annotated[int, Field(ge=1, le=65536)]


class Export(Section):
    opset: Annotated[int, Field(ge=17, le=23)]
    atol: Annotated[float, Field(gt=0.0)]
    min_agreement: Fraction
    legacy: bool


# The INT8 rungs convert may try, cheapest and fastest model first.
Int8Method = Literal["plain", "mixed", "accuracy_aware"]


class OpenVINO(Section):
    fp32: bool
    calibration_size: Annotated[int, Field(ge=10, le=10000)]
    int8_methods: list[Int8Method]
    max_accuracy_drop: Fraction

    @field_validator("int8_methods")
    @classmethod
    def _each_once(cls, methods: list[str]) -> list[str]:
        # A rung tried twice gives the same model twice: a repeat is a slip in the list.
        if len(set(methods)) != len(methods):
            raise ValueError("each INT8 method at most once")
        return methods


class Benchmark(Section):
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    threads: Annotated[int, Field(ge=0)]
    seconds: Annotated[float, Field(ge=0.2, le=600.0)]
    warmup_iterations: Annotated[int, Field(ge=0)]
    benchmark_app: bool


class Promote(Section):
    # MLflow's registered-model names: letters, digits, and . _ - inside.
    registered_model: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    metric: Literal["accuracy", "macro_f1"]
    alpha: Annotated[float, Field(gt=0.0, lt=0.5)]
    min_improvement: Annotated[float, Field(ge=0.0, lt=1.0)]
    min_speedup: Annotated[float, Field(ge=1.0, le=100.0)]


class MLflow(Section):
    enabled: bool
    tracking_uri: str
    experiment: Annotated[str, Field(min_length=1)]
    system_metrics: bool
    log_models: bool


class Runtime(Section):
    threads: Annotated[int, Field(ge=0)]
    resume: bool


class Range(Section):
    """A numeric search range of a sweep: low..high, log-uniform or on a step grid."""

    low: float
    high: float
    log: bool = False
    step: Annotated[float, Field(gt=0.0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Range:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.step is not None or self.low <= 0):
            raise ValueError("log ranges need low > 0 and no step")
        return self


Scalar = bool | int | float | str
Choices = Annotated[list[Scalar], Field(min_length=1)]


class Sweep(Section):
    metric: Annotated[str, Field(pattern=r"^[a-z_]+/[A-Za-z0-9_./-]+$")]
    direction: Literal["maximize", "minimize"]
    trials: Positive
    jobs: Positive
    until: Annotated[str, Field(min_length=1)]
    sampler: Literal["tpe", "random", "grid"]
    pruner: Literal["median", "none"]
    startup_trials: Annotated[int, Field(ge=0)]
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)]
    space: Annotated[dict[str, Range | Choices], Field(min_length=1)]


# Sections that say how the pipeline runs, not what it computes: stages read them, but
# dvc.yaml lists none of them, so editing them reruns no stage.
SETTINGS = ("mlflow", "runtime", "sweep")
# Keys that moved, so that an old params.yaml (an old experiment) explains itself.
MOVED = {
    "train.threads": "runtime.threads",
    "train.resume": "runtime.resume",
}
# Keys whose meaning another key took over, with what to write instead.
REPLACED = {
    "openvino.accuracy_aware": (
        "openvino.int8_methods (the INT8 methods tried in order until one passes "
        "openvino.max_accuracy_drop, e.g. [plain, mixed, accuracy_aware]; [] = FP16 only)"
    ),
}


class Params(Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)]
    data: Data
    model: Model
    train: Train
    evaluate: Evaluate
    export: Export
    openvino: OpenVINO
    benchmark: Benchmark
    promote: Promote
    mlflow: MLflow
    runtime: Runtime
    sweep: Sweep

    def flat(self, *sections: str) -> dict[str, Any]:
        """The given sections as flat `section.key` pairs, the names DVC and MLflow use."""
        out: dict[str, Any] = {}
        for name in sections:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                out.update({f"{name}.{k}": v for k, v in value.model_dump().items()})
            else:
                out[name] = value
        return out

    def digest(self, *sections: str) -> str:
        """A stable hash of the given sections: the checkpoint key, the MLflow tag."""
        blob = json.dumps(self.flat(*sections), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _describe(error: dict[str, Any]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "missing":
        return "missing: every parameter must be set in the file"
    if kind == "extra_forbidden":
        return "unknown key (a typo? see the comments in params.yaml for the valid keys)"
    msg = msg.removeprefix("Value error, ")
    msg = msg.replace("Input should be", "expected").replace("input should be", "expected")
    return f"{msg[:1].lower()}{msg[1:]}, got {error['input']!r}"


def _format(file: Path, exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function"))
    # Several failed alternatives (int | "auto") repeat the same location: report it once.
    others = {tuple(e["loc"][:2]) for e in errors[1:]} - {tuple(first["loc"][:2])}
    more = f" (and {len(others)} more problem(s))" if others else ""
    return f"{file}: {where or 'top level'}: {_describe(first)}{more}"


def _present(raw: dict[str, Any], dotted: str) -> bool:
    section, key = dotted.split(".")
    return isinstance(raw.get(section), dict) and key in raw[section]


def _moved(raw: dict[str, Any], file: Path) -> None:
    for old, new in MOVED.items():
        if _present(raw, old):
            raise ParamsError(
                f"{file}: {old}: moved to {new} (a setting: editing it reruns no stage)"
            )
    for old, new in REPLACED.items():
        if _present(raw, old):
            raise ParamsError(f"{file}: {old}: replaced by {new}")


def parse_params(raw: Any, file: Path = paths.PARAMS) -> Params:
    """Validate an already-parsed YAML document."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{file}: expected a mapping of sections, got {type(raw).__name__}")
    _moved(raw, file)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format(file, exc)) from None


def load_params(file: Path | str = paths.PARAMS) -> Params:
    """Read and validate params.yaml; any problem raises ParamsError with one line."""
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{file}: not found (run from the repository root)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{file}: cannot be read: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{file}: {where}not valid YAML: {problem}") from None
    return parse_params(raw, file)
