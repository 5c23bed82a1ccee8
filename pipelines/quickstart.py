"""The quickstart on embedded defaults: the real jobs, chained with local URIs.

    photos (skimage.data) ──jobs/build_pairs.py──> pairs/ (train, val)      and holdout/ (val only)
    pairs ──jobs/train.py (Ray Train, MLflow in a local SQLite file)──> models:/sr3-quickstart@champion
    holdout pairs + champion ──compare──> report/index.html, report/grid.png, report/metrics.json

Every stage is the job a cluster user runs, with local paths instead of gs:// URIs; only the last
stage is in-process (it stands in for jobs/upscale.py and jobs/evaluate.py until those exist).
Rerunning reuses what is done: pairs with a `_SUMMARY.json`, a registered champion of the same
training length.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "motorcycle_left", "motorcycle_right", "colorwheel", "camera", "brick", "grass", "moon")
HOLDOUT_PHOTOS = ("coffee", "chelsea")
MODEL_NAME, ALIAS = "sr3-quickstart", "champion"


def say(message: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {message}", flush=True)


def export_photos(folder: Path, names: tuple[str, ...]) -> None:
    """Write skimage.data photos as PNG files (the bucket of the quickstart)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / f"{name}.png"
        if path.exists():
            continue
        if name.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            array = left if name.endswith("left") else right
        else:
            array = getattr(data, name)()
        Image.fromarray(array).save(path)


def run_job(args: list[str], env: dict[str, str]) -> None:
    say("$ python " + " ".join(args))
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)


def build(photos: Path, output: Path, env: dict[str, str], *, patches: int, val_fraction: float) -> None:
    if (output / "_SUMMARY.json").exists():
        say(f"reusing pairs in {output} (delete the folder to rebuild)")
        return
    run_job(["jobs/build_pairs.py", "--input", str(photos), "--output", str(output), "--recipe", "patches",
             "--hr-size", "64", "--scale", "4", "--patches-per-image", str(patches),
             "--val-fraction", str(val_fraction), "--seed", "0"], env)


def champion_steps(tracking_uri: str) -> int | None:
    """The training length of the registered champion, or None if there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    except MlflowException:
        return None
    return int(float(client.get_run(version.run_id).data.params.get("run.steps", 0)))


def compare(holdout: Path, report: Path, tracking_uri: str, *, sampler: str, steps: int) -> dict:
    """Super-resolve the held-out LR patches through the registry alias; bicubic vs SR3."""
    import mlflow
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from sr3model import metrics
    from sr3model.imageio import decode_png, to_tensor, to_uint8_batch
    from sr3model.resample import upsample

    table = pq.read_table(holdout / "val", columns=["key", "hr", "lr"]).to_pandas().sort_values("key")
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{ALIAS}")
    out = model.predict(pd.DataFrame({"lr": table["lr"].tolist()}),
                        params={"seed": 0, "sampler": sampler, "steps": steps})
    hr = torch.stack([to_tensor(decode_png(b)) for b in table["hr"]])
    lr = torch.stack([to_tensor(decode_png(b)) for b in table["lr"]])
    sr = torch.stack([to_tensor(decode_png(b)) for b in out["sr"]])
    bicubic = upsample(lr, hr.shape[-2:]).clamp(-1, 1)
    results = {}
    for name, images in (("bicubic", bicubic), ("sr3", sr)):
        results[name] = {"psnr": float(metrics.psnr(images, hr).mean()),
                         "ssim": float(metrics.ssim(images, hr).mean()),
                         "consistency_1e-5": float(metrics.consistency(images, lr).mean()),
                         "lr_psnr": float(metrics.lr_psnr(images, lr).mean())}
    report.mkdir(parents=True, exist_ok=True)
    rows = min(8, len(hr))
    nearest = torch.nn.functional.interpolate(lr[:rows], size=hr.shape[-2:], mode="nearest")
    grid = torch.cat([torch.cat(list(t[:rows]), dim=1) for t in (nearest, bicubic, sr, hr)], dim=2)
    Image.fromarray(np.ascontiguousarray(to_uint8_batch(grid[None])[0])).save(report / "grid.png")
    (report / "metrics.json").write_text(json.dumps(results, indent=2))
    cells = "".join(f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{v:.4g}</td>" for v in r.values()) + "</tr>"
                    for m, r in results.items())
    (report / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>SR3 quickstart</title><h1>SR3 quickstart</h1>"
        f"<p>{len(hr)} held-out 16→64 patches ({', '.join(HOLDOUT_PHOTOS)}); model "
        f"<code>models:/{MODEL_NAME}@{ALIAS}</code>, {sampler} with {steps} steps.</p>"
        "<table border=1><tr><th>method</th><th>PSNR dB</th><th>SSIM</th><th>consistency ×1e-5</th>"
        f"<th>LR-PSNR dB</th></tr>{cells}</table>"
        "<p>Columns of the grid: LR (nearest) | bicubic | SR3 | HR</p><img src=grid.png width=256>")
    return results


def run(workdir: Path, *, steps: int, batch_size: int, patches: int, sampler: str, sample_steps: int) -> None:
    workdir = workdir.resolve()
    start = time.time()
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(ROOT)}
    say(f"1/4 photos from skimage.data → {workdir / 'photos'}")
    export_photos(workdir / "photos" / "train", TRAIN_PHOTOS)
    export_photos(workdir / "photos" / "holdout", HOLDOUT_PHOTOS)
    say("2/4 build LR/HR pairs with Ray Data (16→64 patches)")
    build(workdir / "photos" / "train", workdir / "pairs", env, patches=patches, val_fraction=0.1)
    build(workdir / "photos" / "holdout", workdir / "holdout", env, patches=8, val_fraction=1.0)
    say(f"3/4 train the tiny SR3 model with Ray Train for {steps} steps (MLflow: {tracking_uri})")
    done = champion_steps(tracking_uri)
    if done == steps:
        say(f"reusing models:/{MODEL_NAME}@{ALIAS} (trained {steps} steps; delete {workdir} to retrain)")
    else:
        run_job(["jobs/train.py", "--pairs", str(workdir / "pairs"), "--preset", "tiny", "--steps", str(steps),
                 "--batch-size", str(batch_size), "--num-workers", "2", "--storage", str(workdir / "checkpoints"),
                 "--checkpoint-every", str(max(1, steps // 4)), "--val-every", str(max(1, steps // 4)),
                 "--log-every", "25", "--run-name", f"quickstart-{steps}", "--register", MODEL_NAME,
                 "--alias", ALIAS, "--set", "train.lr=2e-3"], env)
    say(f"4/4 super-resolve held-out photos through models:/{MODEL_NAME}@{ALIAS}; compare with bicubic")
    results = compare(workdir / "holdout", workdir / "report", tracking_uri, sampler=sampler, steps=sample_steps)
    for name, r in results.items():
        say(f"   {name:>8}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, "
            f"consistency {r['consistency_1e-5']:.1f}e-5, LR-PSNR {r['lr_psnr']:.1f} dB")
    say(f"done in {time.time() - start:.0f} s. Outputs under {workdir}:")
    say(f"   pairs {workdir / 'pairs'}, checkpoints {workdir / 'checkpoints'}, report {workdir / 'report' / 'index.html'}")
    say(f"   MLflow UI: mlflow ui --backend-store-uri {tracking_uri}")
