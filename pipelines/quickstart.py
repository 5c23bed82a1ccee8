"""The quickstart on embedded defaults: the real jobs, chained with local URIs.

    photos (skimage.data) ──jobs/build_pairs.py──> pairs/ (train, val)      and holdout/ (val only)
    pairs ──jobs/train.py (Ray Train, MLflow in a local SQLite file)──> models:/sr3-quickstart@champion
    held-out LR photos + champion ──jobs/upscale.py (Ray Data)──> upscaled/ (+ _manifest/)
    holdout pairs + champion ──jobs/evaluate.py──> report/index.html, report/metrics.json, MLflow run

Every stage is the job a cluster user runs, with local paths instead of gs:// URIs. Rerunning
reuses what is done: pairs with a `_SUMMARY.json`, a registered champion of the same training
length, upscaled images listed in the manifest; the evaluation runs again (it is cheap).
"""

from __future__ import annotations

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
# The `tiny` preset as it is: its objective, prediction, loss, training levels, sampler and LR consistency are what
# benchmarks/bench_quality.py found best at this budget (README "Quality"). A registered champion
# is reused only when it was trained with these.
REUSE_KEYS = ("objective", "residual_scale", "diffusion.prediction", "diffusion.loss", "diffusion.schedule")


def say(message: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {message}", flush=True)


def photo(name: str):
    """A photo bundled with scikit-image, as a numpy array (`motorcycle_left`/`_right`: the stereo pair)."""
    from skimage import data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(data, name)()


def export_photos(folder: Path, names: tuple[str, ...]) -> None:
    """Write skimage.data photos as PNG files (the bucket of the quickstart)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(photo(name)).save(path)


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


def champion_params(tracking_uri: str) -> dict[str, str]:
    """The training run's params of the registered champion ({} if there is none)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    except MlflowException:
        return {}
    return dict(client.get_run(version.run_id).data.params)


def export_lr_photos(photos: Path, folder: Path, side: int = 256, scale: int = 4) -> None:
    """The folder the upscale stage reads: central side² crops of the held-out photos, shrunk
    ×1/scale with Pillow's bicubic (the pairs' LR operation) — images of any size to upscale."""
    from PIL import Image

    from sr3model.imageio import lr_from_hr

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(photos.glob("*.png")):
        with Image.open(path) as image:
            left, top = (image.width - side) // 2, (image.height - side) // 2
            crop = image.convert("RGB").crop((left, top, left + side, top + side))
        lr_from_hr(crop, scale).save(folder / path.name)


def run(workdir: Path, *, steps: int, batch_size: int, patches: int, sampler: str | None, sample_steps: int,
        eval_limit: int = 64) -> None:
    workdir = workdir.resolve()
    start = time.time()
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(ROOT)}
    champion = f"models:/{MODEL_NAME}@{ALIAS}"
    say(f"1/5 photos from skimage.data → {workdir / 'photos'}")
    export_photos(workdir / "photos" / "train", TRAIN_PHOTOS)
    export_photos(workdir / "photos" / "holdout", HOLDOUT_PHOTOS)
    export_lr_photos(workdir / "photos" / "holdout", workdir / "photos" / "holdout-lr")
    say("2/5 build LR/HR pairs with Ray Data (16→64 patches)")
    build(workdir / "photos" / "train", workdir / "pairs", env, patches=patches, val_fraction=0.1)
    build(workdir / "photos" / "holdout", workdir / "holdout", env, patches=8, val_fraction=1.0)
    say(f"3/5 train the tiny SR3 model with Ray Train for {steps} steps (MLflow: {tracking_uri})")
    from sr3model import preset

    flat = preset("tiny").flat()
    wanted = {"run.steps": str(steps), **{key: str(flat[key]) for key in REUSE_KEYS}}
    found = champion_params(tracking_uri)
    if all(found.get(k) == v for k, v in wanted.items()):
        say(f"reusing {champion} (trained {steps} steps; delete {workdir} to retrain)")
    else:
        run_job(["jobs/train.py", "--pairs", str(workdir / "pairs"), "--val-pairs", str(workdir / "holdout"),
                 "--preset", "tiny", "--steps", str(steps), "--batch-size", str(batch_size),
                 "--num-workers", "2", "--storage", str(workdir / "checkpoints"),
                 "--checkpoint-every", str(max(1, steps // 4)), "--val-every", str(max(1, steps // 4)),
                 "--val-images", "8", "--log-every", "25", "--run-name", f"quickstart-{flat['objective']}-{flat['diffusion.prediction']}-{steps}",
                 "--register", MODEL_NAME, "--alias", ALIAS, "--set", "train.lr=2e-3"], env)
    say(f"4/5 upscale the held-out photos (64×64 LR, tiled) with Ray Data through {champion}")
    run_job(["jobs/upscale.py", "--model", champion, "--input", str(workdir / "photos" / "holdout-lr"),
             "--output", str(workdir / "upscaled"), *(["--sampler", sampler] if sampler else []), "--steps", str(sample_steps),
             "--batch-size", "16"], env)
    say("5/5 evaluate bicubic vs SR3 on the held-out pairs; HTML report")
    run_job(["jobs/evaluate.py", "--model", champion, "--pairs", str(workdir / "holdout"), *(["--sampler", sampler] if sampler else []),
             "--steps", str(sample_steps), "--limit", str(eval_limit), "--report", str(workdir / "report")], env)
    results = json.loads((workdir / "report" / "metrics.json").read_text())
    for method, values in results.items():
        if not method.startswith("_"):
            say(f"   {method:>20}: PSNR {values['psnr']:.2f} dB, SSIM {values['ssim']:.3f}, "
                f"LR-PSNR {values['lr_psnr']:.1f} dB, colour error {values['colour_error']:.2f}/255, "
                f"detail ratio {values['detail_ratio']:.2f}, flat-region noise {values.get('flat_noise_ratio') or float('nan'):.2f}")
    say(f"done in {time.time() - start:.0f} s. Outputs under {workdir}:")
    say(f"   pairs {workdir / 'pairs'}, checkpoints {workdir / 'checkpoints'}, upscaled photos {workdir / 'upscaled'}")
    say(f"   report {workdir / 'report' / 'index.html'} (metrics.json beside it)")
    say(f"   MLflow UI: mlflow ui --backend-store-uri {tracking_uri}")
