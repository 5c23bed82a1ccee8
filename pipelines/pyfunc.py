"""SR3 as an MLflow pyfunc model, and the helpers that log it and name it in the registry.

The logged model holds `artifacts/model/` = `config.json` + `model.safetensors` + `ema.safetensors`
(sr3model.weights; the EMA weights are used), and the `sr3model` package as code, so
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")` works from any job of this project.
(`mlflow.pytorch.log_model` is not used: it exports with torch.export, which breaks the sampler loop.)

Input: a pandas DataFrame with a column `lr` of encoded LR images (PNG/JPEG bytes, any mode; all
of one size), one row per image; an unconditional model ignores `lr` and draws one sample per row.
Output: a DataFrame with a column `sr` of PNG bytes (8-bit RGB) and the `height`/`width`.
Params (predict(..., params={...})): `seed` (default 0; same seed → same output), `sampler`
(`ddpm` | `ddim`, default the config's), `steps` (inference steps, default the config's),
`batch_size` (images per sampler call, default 16).
"""

from __future__ import annotations

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


class SR3PyFunc(mlflow.pyfunc.PythonModel):
    """Loads config.json + EMA safetensors; `predict` super-resolves a DataFrame of LR images."""

    def load_context(self, context) -> None:
        import torch

        from sr3model.weights import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(context.artifacts[ARTIFACT_KEY], ema=True, device=device)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow's signature)
        return super_resolve_frame(self.model, model_input, params)


def super_resolve_frame(model, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """The pyfunc contract on an in-memory `SR3` (also used by tests to compare against)."""
    import torch

    from sr3model.imageio import decode_png, encode_png, to_tensor, to_uint8_batch

    params = dict(params or {})
    cfg = model.config
    seed = int(params.get("seed", 0))
    sampler = params.get("sampler") or cfg.diffusion.sample_sampler
    steps = int(params.get("steps") or cfg.diffusion.sample_steps)
    batch = int(params.get("batch_size") or DEFAULT_BATCH)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    schedule = model.inference_schedule(steps=steps)
    n = len(frame)
    outputs = []
    for start in range(0, n, batch):
        if cfg.conditional:
            images = [to_tensor(decode_png(bytes(b))) for b in frame["lr"].iloc[start:start + batch]]
            lr = torch.stack(images).to(device)
            sr = model.super_resolve(lr, sampler=sampler, schedule=schedule, generator=generator)
        else:
            sr = model.super_resolve(None, batch=min(batch, n - start), sampler=sampler,
                                     schedule=schedule, generator=generator)
        outputs.extend(to_uint8_batch(sr[:, 0].cpu()))
    from PIL import Image

    pngs = [encode_png(Image.fromarray(np.ascontiguousarray(a))) for a in outputs]
    return pd.DataFrame({"sr": pngs, "height": [a.shape[0] for a in outputs],
                         "width": [a.shape[1] for a in outputs]})


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "lr", required=False)]),
        outputs=Schema([ColSpec("binary", "sr"), ColSpec("long", "height"), ColSpec("long", "width")]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("sampler", "string", ""),
                            ParamSpec("steps", "long", 0), ParamSpec("batch_size", "long", DEFAULT_BATCH)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ("torch", "numpy", "pillow", "safetensors", "torchmetrics", "pandas", "mlflow")
    return [f"{name}=={version(name)}" for name in names]


def log_model(model_dir: str | Path, run_id: str, tracking_uri: str, *, register: str | None = None,
              alias: str = "champion") -> tuple[str, str | None]:
    """Log the pyfunc into `run_id`; with `register`, register it and point `alias` at it.

    Returns (model URI, registered version or None). `model_dir` is a checkpoint or a model
    directory; only the weight files are copied into the model."""
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
                code_paths=[str(Path(sr3model.__file__).parent)], signature=_signature(),
                pip_requirements=_requirements(), registered_model_name=register)
    version = None
    if register:
        version = str(info.registered_model_version)
        mlflow.MlflowClient(tracking_uri).set_registered_model_alias(register, alias, version)
        return f"models:/{register}@{alias}", version
    return info.model_uri, version
