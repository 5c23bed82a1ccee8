"""SR3 as an MLflow pyfunc model, and the helpers that log it and name it in the registry.

The logged model holds `artifacts/model/` = `config.json` + `model.safetensors` + `ema.safetensors`
(sr3model.weights; the EMA weights are used), and the `sr3model` and `pipelines` packages as code,
so `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` and `mlflow models serve` work anywhere.
(`mlflow.pytorch.log_model` is not used: it exports with torch.export, which breaks the sampler loop.)

One sampling path: `predict` samples through `pipelines.sampling`, as jobs/upscale.py does —
the same decoding and encoding (`pipelines.images.fidelity.split` and `assemble`), tiling for sizes
other than the model's, per-image noise seeded by `image_seed(seed, name, 0)` and the same choice
of schedule: params, else the schedule `jobs/search_schedule.py --apply` stored with the registry
version (tag `sr3.sampling`, read when the model is loaded), else the config's. So the same version, image, name and seed give
the picture `jobs/upscale.py` writes for `name` (its path relative to --input).

Input: a pandas DataFrame with a column `lr` of encoded LR images (PNG/JPEG/WebP/TIFF bytes, any
mode, depth or profile, any sizes), one row per image, and optionally `name` (default: the row
number) — the name that seeds the noise; an unconditional model ignores `lr` and draws one sample
per row.
Output: a DataFrame with a column `sr` of encoded images that keep what the input had, as the
job's outputs do (`pipelines.images.fidelity`: alpha, 16-bit depth, ICC profile, EXIF/XMP,
greyscale; unconditional samples are 8-bit RGB) and the `height`/`width`.
Params (predict(..., params={...})): `seed` (default 0), `sampler` (default: stored, else the
config's), `steps`, `schedule` ("START,END"), `batch_size` (outputs per sampler call, default 16),
`tile`, `overlap` (LR pixels, for sizes other than the model's), `max_batch_pixels`, `consistency`
("on" / "off"; default: stored, else the config's `diffusion.sample_consistency`); what outputs
keep, as the job's flags: `format` (png | jpeg | webp | tiff, default png), `alpha` (keep | drop),
`colour` (keep | srgb; default keep, srgb with strip_metadata), `strip_metadata` (bool),
`fallback` (refuse | convert). An image that fails to sample even alone, or that `format` cannot
hold with `fallback` refuse, raises (after its batch was retried in halves).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

MODEL_NAME = "model"  # the name the model is logged under in its run
ARTIFACT_KEY = "model"
WEIGHT_FILES = ("config.json", "model.safetensors", "ema.safetensors")
DEFAULT_BATCH = 16
SAMPLING_TAG = "sr3.sampling"  # = pipelines.registry.models.SAMPLING_TAG (not imported: keeps fsspec out of serving)


class SR3PyFunc(mlflow.pyfunc.PythonModel):
    """Loads config.json + EMA safetensors and the stored schedules; `predict` super-resolves a
    DataFrame of LR images."""

    def load_context(self, context) -> None:
        import torch

        from sr3model.weights import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(context.artifacts[ARTIFACT_KEY], ema=True, device=device)
        self.stored = stored_sampling(Path(context.artifacts[ARTIFACT_KEY]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow's signature)
        return super_resolve_frame(self.model, model_input, params, stored=getattr(self, "stored", {}))


def stored_sampling(artifacts: Path) -> dict[int, dict[str, Any]]:
    """The search's stored schedules of the registry version logged from this model's run ({} when
    the model is not registered, the registry cannot be reached, or the run has several versions)."""
    try:
        from mlflow import MlflowClient
        from mlflow.models import Model

        root = next(p for p in [artifacts, *artifacts.parents] if (p / "MLmodel").exists())
        logged = Model.load(str(root / "MLmodel"))
        versions = MlflowClient().search_model_versions(f"run_id = '{logged.run_id}'")
        if len(versions) > 1 and getattr(logged, "model_id", None):
            versions = [v for v in versions if logged.model_id in (v.source or "")]
        if len(versions) != 1:
            return {}
        text = (versions[0].tags or {}).get(SAMPLING_TAG)
        return {int(k): v for k, v in json.loads(text).items()} if text else {}
    except Exception:  # noqa: BLE001 — no registry: the config's schedule, as a plain model directory
        return {}


def super_resolve_frame(model, frame: pd.DataFrame, params: dict[str, Any] | None = None,
                        stored: dict[int, dict[str, Any]] | None = None) -> pd.DataFrame:
    """The pyfunc contract on an in-memory `SR3` (also used by tests to compare against);
    `stored`: the search's schedules per K, as `pipelines.registry.models.ModelRef.sampling`."""
    import torch

    from pipelines.images.fidelity import Carried, Fidelity, assemble, split
    from pipelines.sampling import Layout, choose_sampling, image_seed, quantise, sample_batches
    from sr3model.imageio import ImageRejected

    params = dict(params or {})
    cfg = model.config
    seed = int(params.get("seed") or 0)
    schedule = params.get("schedule") or None
    bounds = tuple(float(v) for v in schedule.split(",")) if schedule else None
    consistency = str(params.get("consistency") or "").lower()
    if consistency not in ("", "on", "off"):
        raise ValueError(f"params consistency={consistency!r}: use on or off")
    sampling = choose_sampling(cfg, stored or {}, sampler=params.get("sampler") or None,
                               steps=int(params.get("steps") or 0) or None, schedule=bounds,
                               consistency={"on": True, "off": False}.get(consistency))
    layout = Layout(int(params.get("batch_size") or DEFAULT_BATCH), int(params.get("max_batch_pixels") or 0) or None,
                    int(params.get("tile") or 0) or None,
                    None if params.get("overlap") in (None, "", -1) else int(params["overlap"]))
    fidelity = Fidelity.resolve(params.get("format") or "png", alpha=params.get("alpha") or "keep",
                                colour=params.get("colour") or None,
                                strip_metadata=str(params.get("strip_metadata", "")).lower() in ("1", "true", "yes"),
                                fallback=params.get("fallback") or "refuse")
    n = len(frame)
    names = [str(v) for v in frame["name"]] if "name" in frame else [str(i) for i in range(n)]
    outputs: list[np.ndarray | None] = [None] * n
    parts = [Carried()] * n
    alphas: list[np.ndarray | None] = [None] * n
    if cfg.conditional:
        images = []
        for i, data in enumerate(frame["lr"]):
            try:
                found = split(bytes(data), fidelity)  # the job's decode (bucket.decode_batch)
            except ImageRejected as error:
                raise ValueError(f"row {names[i]}: {error.reason}: {error.detail}") from None
            images.append(found.rgb)
            parts[i], alphas[i] = found.carried, found.alpha
        for sampled in sample_batches(model, images, names, sampling=sampling, samples=1, seed=seed, layout=layout):
            if sampled.outputs is None:
                raise ValueError(f"row {names[sampled.units[0][0]]}: {sampled.reason}: {sampled.detail}")
            for u, (i, _) in enumerate(sampled.units):
                outputs[i] = quantise(sampled.outputs[u:u + 1], parts[i].bits)[0]
    else:
        device = next(model.parameters()).device
        schedule_ = sampling.schedule(model)
        for start in range(0, n, layout.batch_size):
            rows = names[start:start + layout.batch_size]
            generators = [torch.Generator(device=device).manual_seed(image_seed(seed, name, 0)) for name in rows]
            sr = model.super_resolve(None, batch=len(rows), sampler=sampling.sampler, schedule=schedule_,
                                     generator=generators)
            outputs[start:start + len(rows)] = list(quantise(sr[:, 0].cpu(), 8))
    encoded = [assemble(a, alpha, carried, fidelity)[0] for a, alpha, carried in zip(outputs, alphas, parts)]
    return pd.DataFrame({"sr": encoded, "height": [a.shape[0] for a in outputs],
                         "width": [a.shape[1] for a in outputs]})


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "lr", required=False), ColSpec("string", "name", required=False)]),
        outputs=Schema([ColSpec("binary", "sr"), ColSpec("long", "height"), ColSpec("long", "width")]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("sampler", "string", ""),
                            ParamSpec("steps", "long", 0), ParamSpec("schedule", "string", ""),
                            ParamSpec("batch_size", "long", DEFAULT_BATCH), ParamSpec("tile", "long", 0),
                            ParamSpec("overlap", "long", -1), ParamSpec("max_batch_pixels", "long", 0),
                            ParamSpec("format", "string", "png"), ParamSpec("alpha", "string", "keep"),
                            ParamSpec("colour", "string", ""), ParamSpec("strip_metadata", "boolean", False),
                            ParamSpec("fallback", "string", "refuse"), ParamSpec("consistency", "string", "")]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ("torch", "numpy", "pillow", "safetensors", "torchmetrics", "pandas", "mlflow")
    return [f"{name}=={version(name)}" for name in names]


def log_model(model_dir: str | Path, run_id: str, tracking_uri: str, *, register: str | None = None,
              alias: str | None = "champion", version_tags: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Log the pyfunc into `run_id`; with `register`, register it — `version_tags` set in the same
    registry call that creates the version, so a version is never seen without them — and point
    `alias` at it (with `alias=None` the version is registered without one: the training job's
    promotion gate decides).

    Returns (model URI, registered version or None). `model_dir` is a checkpoint or a model
    directory; only the weight files are copied into the model."""
    import pipelines
    import sr3model

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sr3-pyfunc-") as tmp:
        weights = Path(tmp) / "weights"
        weights.mkdir()
        for name in WEIGHT_FILES:
            if (Path(model_dir) / name).exists():
                shutil.copy2(Path(model_dir) / name, weights / name)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=SR3PyFunc(), artifacts={ARTIFACT_KEY: str(weights)},
                code_paths=[str(Path(sr3model.__file__).parent), str(Path(pipelines.__file__).parent)],
                signature=_signature(),
                pip_requirements=_requirements())
    version = None
    if register:
        version = str(mlflow.register_model(info.model_uri, register, tags=version_tags or None).version)
        if alias is None:
            return f"models:/{register}/{version}", version
        mlflow.MlflowClient(tracking_uri).set_registered_model_alias(register, alias, version)
        return f"models:/{register}@{alias}", version
    return info.model_uri, version
