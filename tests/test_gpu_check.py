"""benchmarks/gpu_check.py is run rarely (only where a GPU is lent), so it must not rot: its code
runs here on the CPU at tiny sizes and prints every row of its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--device", "cpu", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["checkpointing"] for r in report["train"]] == [False, True] and not report["skipped"]
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] < 1.5 for r in report["train"])
    assert report["loss"]["relative"] < 0.05  # bf16 autocast vs fp32 on one batch
    assert report["sampling_psnr"]["psnr_db"] > 30 and report["sampling"]["images_per_s"] > 0
    assert "| tiny |" in out.stdout and "bf16 vs fp32 samples" in out.stdout
