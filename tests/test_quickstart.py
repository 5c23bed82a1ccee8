"""The quickstart chain (real jobs, local Ray, MLflow in SQLite) in a fast variant, and its rerun."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(workdir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "jobs/quickstart.py", "--workdir", str(workdir), "--steps", "4",
         "--batch-size", "4", "--patches-per-image", "4", "--sample-steps", "3", "--eval-limit", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_quickstart_runs_every_stage_then_reuses_them(tmp_path):
    first = _run(tmp_path)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {"bicubic", "sr3-quickstart v1"} <= set(metrics)
    assert {"psnr", "ssim", "consistency", "lr_psnr"} <= set(metrics["sr3-quickstart v1"])
    assert metrics["bicubic"]["psnr"] > 20  # bicubic of natural photos: a sanity floor
    page = (tmp_path / "report" / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all((tmp_path / "report" / src).is_file() for src in sources)
    assert (tmp_path / "pairs" / "_SUMMARY.json").exists() and (tmp_path / "mlflow.db").exists()
    assert "models:/sr3-quickstart@champion (version 1)" in first
    for name in ("coffee", "chelsea"):  # 64×64 LR crops upscaled ×4 through the registry alias
        with Image.open(tmp_path / "upscaled" / f"{name}.png") as image:
            assert image.size == (256, 256)
    assert "upscale: 2 listed, 2 done" in first
    second = _run(tmp_path)
    assert "reusing pairs" in second and "reusing models:/sr3-quickstart@champion" in second
    assert "jobs/train.py" not in second  # training was not run again
    assert "upscale: 2 listed, 0 done, 2 skipped" in second  # the manifest says they are done
