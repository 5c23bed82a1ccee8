"""The evaluation report: its folder (metrics.json, index.html, PNGs), its copy on any storage
URI, and its MLflow run.

    REPORT/metrics.json        {method: {metric: value}, "_meta": {...}}; non-finite values → null
    REPORT/index.html          the metric table, notes (skipped metrics), one row of images per pair
    REPORT/grid.png            the same grid as one image (for a quick look in the MLflow UI)
    REPORT/images/RRR-CC.png   one cell of the grid: row RRR (pair), column CC

Images are written at HR size (the LR column nearest-neighbour upsampled, so its pixels show);
the HTML references them by relative paths, so the folder can be copied anywhere (`publish`).

MLflow (`log_run`): one run per evaluation, tagged `sr3.model_name`, `sr3.model_version`,
`sr3.model_uri` (the pinned version); params sampler, steps, schedule, ...; metrics
`<method>/<metric>` (`metric_prefix`: characters MLflow refuses in keys become `_`); the folder as
artifacts under `report/`.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from pipelines import storage, tracking
from sr3model.imageio import to_uint8_batch

if TYPE_CHECKING:
    from pipelines.registry.models import ModelRef

DIRECTION = {"psnr": "↑", "ssim": "↑", "consistency": "↓", "lr_psnr": "↑", "colour_error": "↓",
             "detail_ratio": "→1", "flat_noise_ratio": "↓", "diversity": "", "fid": "↓", "is": "↑", "lpips": "↓"}
HEADINGS = {"psnr": "PSNR dB", "ssim": "SSIM", "consistency": "consistency ×1e-5", "lr_psnr": "LR-PSNR dB",
            "colour_error": "colour error /255", "detail_ratio": "detail ratio",
            "flat_noise_ratio": "flat-region noise", "diversity": "diversity σ",
            "fid": "FID", "is": "IS", "lpips": "LPIPS"}
MIN_DISPLAY = 128  # px: small patches are shown enlarged (pixelated) in the HTML


def finite(value: Any) -> Any:
    """JSON-safe: non-finite floats (PSNR of identical images is +inf) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path)


def write_images(folder: Path, columns: Sequence[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Each column (name, (R, 3, H, W) in [-1, 1]) → images/RRR-CC.png and grid.png.
    Returns the relative paths, [row][column]."""
    cells = [to_uint8_batch(images.detach().cpu()) for _, images in columns]  # each (R, H, W, 3)
    rows = len(cells[0])
    paths = [[f"images/{r:03d}-{c:02d}.png" for c in range(len(cells))] for r in range(rows)]
    for r in range(rows):
        for c, column in enumerate(cells):
            _png(column[r], folder / paths[r][c])
    grid = np.concatenate([np.concatenate([column[r] for column in cells], axis=1) for r in range(rows)], axis=0)
    _png(grid, folder / "grid.png")
    return paths


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.4g}"


def render_html(title: str, results: Mapping[str, Mapping[str, float | None]], meta: Mapping[str, Any],
                notes: Sequence[str], headers: Sequence[str], keys: Sequence[str],
                paths: Sequence[Sequence[str]], size: int) -> str:
    esc = html.escape
    metrics = [m for m in DIRECTION if any(m in r for r in results.values())]
    head = "".join(f"<th>{esc(HEADINGS[m])} {DIRECTION[m]}</th>" for m in metrics)
    body = "".join(f"<tr><th>{esc(method)}</th>" + "".join(f"<td>{_number(r.get(m))}</td>" for m in metrics)
                   + "</tr>" for method, r in results.items())
    facts = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in meta.items()
                    if not isinstance(v, (dict, list)))
    remarks = "".join(f"<li>{esc(n)}</li>" for n in notes)
    shown = max(MIN_DISPLAY, size)
    grid_head = "<th>pair</th>" + "".join(f"<th>{esc(h)}</th>" for h in headers)
    grid_rows = "".join(
        f"<tr><td><code>{esc(key)}</code></td>"
        + "".join(f'<td><img src="{esc(p)}" width="{shown}" alt="{esc(h)}"></td>' for p, h in zip(row, headers))
        + "</tr>" for key, row in zip(keys, paths))
    return (
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px;text-align:center}img{image-rendering:pixelated}</style></head><body>"
        f"<h1>{esc(title)}</h1><ul>{facts}</ul>"
        f"<h2>Metrics</h2><table><tr><th>method</th>{head}</tr>{body}</table>"
        + (f"<h2>Notes</h2><ul>{remarks}</ul>" if remarks else "")
        + f"<h2>Samples</h2><table><tr>{grid_head}</tr>{grid_rows}</table>"
        "<p>Metrics are means over the evaluated pairs (and over samples); consistency is MSE of the "
        "downsampled output against the LR input on [0, 1] images, ×1e-5 (SR3 Table 2).</p>"
        "</body></html>")


def write_report(folder: Path, *, title: str, results: Mapping[str, Mapping[str, float | None]],
                 meta: Mapping[str, Any], notes: Sequence[str], columns: Sequence[tuple[str, torch.Tensor]],
                 keys: Sequence[str]) -> Path:
    """Write the whole report folder (see the module docstring); returns index.html's path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_images(folder, columns) if keys else []
    size = int(columns[0][1].shape[-1]) if columns else MIN_DISPLAY
    document = {**finite(dict(results)), "_meta": finite({**meta, "notes": list(notes)})}
    (folder / "metrics.json").write_text(json.dumps(document, indent=2, allow_nan=False))
    page = render_html(title, results, meta, notes, [name for name, _ in columns], keys, paths, size)
    (folder / "index.html").write_text(page, encoding="utf-8")
    return folder / "index.html"


def publish(folder: Path, uri: str) -> None:
    """Copy a local report folder to a storage URI (gs://, s3://, ...), file by file."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(uri, path.relative_to(folder).as_posix()), path.read_bytes())


@contextmanager
def staged(uri: str) -> Iterator[Path]:
    """A local folder for the report at `uri`: the folder itself when `uri` is local, else a
    temporary folder copied to `uri` (`publish`) when the block ends without an error."""
    if storage.protocol(uri) in ("file", "local"):
        folder = Path(storage.resolve(uri)[1])
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="sr3-report-"))
    try:
        yield folder
        publish(folder, uri)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def metric_prefix(label: str) -> str:
    """A method label as an MLflow metric key prefix (MLflow accepts letters, digits, _ - . space)."""
    return re.sub(r"[^\w.\- ]", "_", label).strip() or "model"


def log_params_and_dataset(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """`tracking.log_params`, and the identity of the pairs dataset named by the `pairs` param
    (`tracking.log_dataset`), so an evaluation says which dataset version it scored."""
    from pipelines.pairs import store as pair_store

    if isinstance(params.get("pairs"), str) and params["pairs"]:
        try:
            tracking.log_dataset(uri, run_id, pair_store.identity(params["pairs"]))
        except ValueError:  # not a committed dataset: its readers already said so
            pass
    tracking.log_params(uri, run_id, params)


def log_run(uri: str, experiment: str, run_name: str, ref: ModelRef, report_uri: str, meta: Mapping[str, Any],
            results: Mapping[str, Mapping[str, float | None]], *, notes: Sequence[str], folder: Path) -> str:
    """One MLflow run: tags naming the model version, params, `<method>/<metric>`, the report folder."""
    from mlflow import MlflowClient

    tags = {"sr3.model_name": ref.name or "", "sr3.model_version": ref.version or "",
            "sr3.model_uri": ref.pinned, "sr3.pairs": meta["pairs"], "sr3.report": report_uri,
            "sr3.job": "evaluate"}
    run_id, _ = tracking.start_or_resume(uri, experiment, run_name, tags)
    tracking.set_tags(uri, run_id, tags)
    params = {k: meta[k] for k in ("sampler", "steps", "schedule", "schedule_source", "samples", "seed",
                                   "n_images", "pairs", "model_uri")}
    params["baselines"] = ",".join(m.get("model_uri", "") for k, m in meta["methods"].items()
                                   if k not in ("bicubic", meta["model"]))
    log_params_and_dataset(uri, run_id, params)
    logger = tracking.RunLogger(uri, run_id)
    logger.log_metrics({f"{metric_prefix(method)}/{name}": value for method, values in results.items()
                        for name, value in values.items() if value is not None}, step=0)
    if notes:
        logger.log_text("\n".join(notes) + "\n", "notes.txt")
    MlflowClient(uri).log_artifacts(run_id, str(folder), artifact_path="report")
    tracking.end_run(uri, run_id)
    return run_id
