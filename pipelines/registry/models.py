"""Model URIs → weights and registry identity; the sampling defaults stored with a model version.

`--model` (and `--base`, `--stage`, `--baseline`) accept:

| URI                                   | resolved through                                          |
| ------------------------------------- | --------------------------------------------------------- |
| `models:/NAME@ALIAS`                  | MLflow registry alias → that version (pinned for the run) |
| `models:/NAME/VERSION`                | MLflow registry                                           |
| `runs:/RUN_ID/PATH`                   | a pyfunc logged by `jobs/train.py` (name/version looked up) |
| a model directory (path or any URI)   | `config.json` + `ema.safetensors` / `model.safetensors`   |
| a downloaded MLflow model directory   | its `MLmodel` folder, weights found inside                 |

The resolved `ModelRef` carries the config text and the weight bytes, so a job resolves once on
the driver and ships the same bytes to every worker (through Ray's object store): workers need no
MLflow access and an alias moved mid-run cannot mix two versions in one output.

Sampling defaults, written by `jobs/search_schedule.py --apply` and read by `jobs/upscale.py`:
a JSON mapping {steps K: {"sampler", "beta_start", "beta_end", "consistency", "metric", "value"}} stored as the
model version tag `sr3.sampling` (registry models) or as `sampling.json` in a model directory.
`sampling_for` picks, per setting, the flag if given, else the stored schedule for the chosen
(steps, sampler), else the model config's `diffusion.sample_*` values; the registered pyfunc
reads the same tag (`pipelines.registry.pyfunc`) and picks the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import storage, tracking
from pipelines.sampling import Sampling, choose_sampling

__all__ = ["ModelRef", "Sampling", "parse_schedule", "resolve_model", "sampling_for", "store_sampling"]

if TYPE_CHECKING:
    from sr3model.config import SR3Config
    from sr3model.model import SR3

SAMPLING_TAG = "sr3.sampling"
SAMPLING_FILE = "sampling.json"
CONFIG_FILE, MODEL_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_RUN = re.compile(r"^runs:/(?P<run_id>[0-9a-f]+)(/.*)?$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: where it came from, its registry identity, its config and weight bytes."""

    uri: str  # as the user gave it
    name: str | None
    version: str | None
    run_id: str | None
    directory: str | None  # a model directory URI, when the model is one
    config_json: str
    weights: bytes = field(repr=False)  # one safetensors file (EMA when present)
    sampling: dict[int, dict[str, Any]] = field(default_factory=dict)  # stored search results

    @property
    def pinned(self) -> str:
        """The URI that names exactly these weights (an alias resolved to its version)."""
        if self.name and self.version:
            return f"models:/{self.name}/{self.version}"
        return self.uri

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.name else self.uri

    def config(self) -> SR3Config:
        from sr3model.config import SR3Config

        return SR3Config.from_json(self.config_json)

    def load(self, device: str = "cpu") -> SR3:
        from sr3model.weights import load_model_bytes

        return load_model_bytes(self.config_json, self.weights, device=device)

    @cached_property
    def digest(self) -> str:
        """A short hash of the weights: tells two models apart where no registry version does."""
        return hashlib.blake2b(self.weights, digest_size=8).hexdigest()

    def record(self) -> dict[str, str]:
        """Columns every output row carries."""
        return {"model_uri": self.pinned, "model_name": self.name or "", "model_version": self.version or "",
                "model_digest": self.digest}


def resolve_model(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """Resolve any accepted model URI (see the module docstring); a clear error when it is none."""
    mlflow_uri = tracking.tracking_uri(tracking_uri)
    if uri.startswith("models:/"):
        name, version, run_id, tags = _registry_version(uri, mlflow_uri)
        config, weights = _download(f"models:/{name}/{version}", mlflow_uri)
        return ModelRef(uri, name, version, run_id, None, config, weights, _parse(tags.get(SAMPLING_TAG)))
    if uri.startswith("runs:/"):
        found = _RUN.match(uri)
        if not found:
            raise ValueError(f"{uri}: expected runs:/RUN_ID/PATH")
        run_id = found["run_id"]
        config, weights = _download(uri, mlflow_uri)
        name = version = None
        tags: dict[str, str] = {}
        from mlflow import MlflowClient

        versions = MlflowClient(mlflow_uri).search_model_versions(f"run_id = '{run_id}'")
        if len(versions) == 1:
            name, version, tags = versions[0].name, str(versions[0].version), dict(versions[0].tags)
        return ModelRef(uri, name, version, run_id, None, config, weights, _parse(tags.get(SAMPLING_TAG)))
    return _from_directory(uri)


def _registry_version(uri: str, tracking_uri: str) -> tuple[str, str, str | None, dict[str, str]]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    alias, number = _ALIAS.match(uri), _VERSION.match(uri)
    try:
        if alias:
            found = client.get_model_version_by_alias(alias["name"], alias["alias"])
        elif number:
            found = client.get_model_version(number["name"], number["version"])
        else:
            raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    except MlflowException as error:
        raise ValueError(f"{uri}: not found in the MLflow registry at {tracking_uri} ({error.message})") from None
    return found.name, str(found.version), found.run_id, dict(found.tags or {})


def _download(artifact_uri: str, tracking_uri: str) -> tuple[str, bytes]:
    import mlflow.artifacts
    from mlflow import MlflowClient

    if artifact_uri.startswith("models:/"):  # the registry at `tracking_uri`, whatever mlflow's global one is
        name, version = artifact_uri[len("models:/"):].rsplit("/", 1)
        artifact_uri = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(
            name, version)
    with tempfile.TemporaryDirectory(prefix="sr3-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp,
                                                    tracking_uri=tracking_uri)
        return _read_local_weights(Path(local), artifact_uri)


def _read_local_weights(root: Path, label: str) -> tuple[str, bytes]:
    """config.json + weights of a model directory, or of the one inside a logged MLflow model."""
    candidates = [root] if (root / CONFIG_FILE).exists() else sorted(
        p.parent for p in root.rglob(CONFIG_FILE) if any(p.parent.glob("*.safetensors")))
    if not candidates:
        raise ValueError(f"{label}: no model found (expected {CONFIG_FILE} + {MODEL_FILE})")
    directory = candidates[0]
    weights = directory / EMA_FILE if (directory / EMA_FILE).exists() else directory / MODEL_FILE
    if not weights.exists():
        raise ValueError(f"{label}: {directory} has {CONFIG_FILE} but no {MODEL_FILE}")
    return (directory / CONFIG_FILE).read_text(), weights.read_bytes()


def _from_directory(uri: str) -> ModelRef:
    if storage.protocol(uri) in ("file", "local"):
        _, path = storage.resolve(uri)
        if not Path(path).is_dir():
            raise ValueError(f"{uri}: not a model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/…) "
                             "nor an existing model directory")
        config, weights = _read_local_weights(Path(path), uri)
        directory = str(Path(path).resolve())
    else:
        if not storage.exists(storage.join(uri, CONFIG_FILE)):
            raise ValueError(f"{uri}: no {CONFIG_FILE} there (a model directory holds {CONFIG_FILE} + {MODEL_FILE})")
        config = storage.read_bytes(storage.join(uri, CONFIG_FILE)).decode()
        ema = storage.join(uri, EMA_FILE)
        weights = storage.read_bytes(ema if storage.exists(ema) else storage.join(uri, MODEL_FILE))
        directory = uri
    stored = storage.join(directory, SAMPLING_FILE)
    sampling = _parse(storage.read_bytes(stored).decode()) if storage.exists(stored) else {}
    return ModelRef(uri, None, None, None, directory, config, weights, sampling)


def _parse(text: str | None) -> dict[int, dict[str, Any]]:
    return {int(k): v for k, v in json.loads(text).items()} if text else {}


def sampling_for(ref: ModelRef, *, sampler: str | None = None, steps: int | None = None,
                 schedule: tuple[float, float] | None = None, consistency: bool | None = None) -> Sampling:
    """Flags win; else the schedule (and LR consistency) stored for (steps, sampler) by the search;
    else the config's (`pipelines.sampling.choose_sampling`, which the pyfunc shares)."""
    return choose_sampling(ref.config(), ref.sampling, sampler=sampler, steps=steps, schedule=schedule,
                           consistency=consistency)


def parse_schedule(text: str | None) -> tuple[float, float] | None:
    """`--schedule START,END` → (β_1, β_K)."""
    if not text:
        return None
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--schedule {text!r}: expected START,END (e.g. 1e-4,0.2)") from None
    if not 0 < start <= end < 1:
        raise ValueError(f"--schedule {text!r}: need 0 < START ≤ END < 1")
    return start, end


def store_sampling(ref: ModelRef, best: dict[int, dict[str, Any]], tracking_uri: str | None = None) -> str:
    """Merge `best` ({K: {"sampler", "beta_start", "beta_end", ...}}) into the model's stored
    sampling defaults; returns where they went. Needs a registry version or a model directory."""
    merged = {str(k): v for k, v in {**ref.sampling, **best}.items()}
    text = json.dumps(merged, sort_keys=True)
    if ref.name and ref.version:
        from mlflow import MlflowClient

        MlflowClient(tracking.tracking_uri(tracking_uri)).set_model_version_tag(
            ref.name, ref.version, SAMPLING_TAG, text)
        return f"tag {SAMPLING_TAG} of models:/{ref.name}/{ref.version}"
    if ref.directory:
        target = storage.join(ref.directory, SAMPLING_FILE)
        storage.write_bytes(target, text.encode())
        return target
    raise ValueError(f"{ref.uri}: cannot store a schedule with a run's model that is not registered; "
                     "pass models:/NAME/VERSION or a model directory")
