"""benchmarks/gpu_check.py is run rarely (only where a GPU is lent), so it must not rot: its code
runs here on the CPU at tiny sizes and prints every row of its table. Its utilisation figures are
physical — HFU (hence MFU) ≤ 100% of the measured matmul ceiling, a step ≈ 3 forward passes — and a
wrong FLOP count (doubled with --flops-scale 2) makes it exit non-zero."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench_support import load_bench

ROOT = Path(__file__).resolve().parents[1]


def run_check(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--quick", "--device", "cpu", "--out", str(out),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return done, json.loads((out / "gpu_check.json").read_text())


def test_gpu_check_runs_end_to_end_on_cpu_with_physical_utilisation(tmp_path):
    out, report = run_check(tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [r["checkpointing"] for r in report["train"]] == [False, True] and not report["skipped"]
    assert report["problems"] == [] and "IMPOSSIBLE" not in out.stdout
    for row in report["train"]:
        assert row["images_per_s"] > 0 and 0 < row["mfu"] <= row["hfu"] <= 1, row
        assert 2.5 <= row["model_flops"] / row["forward_flops"] <= 3.5
    plain, checkpointed = report["train"]
    assert plain["model_flops"] == plain["hardware_flops"], "no recomputation without checkpointing"
    assert checkpointed["model_flops"] == plain["model_flops"] < checkpointed["hardware_flops"], "recompute is not model work"
    assert report["loss"]["relative"] < 0.05  # bf16 autocast vs fp32 on one batch
    assert report["sampling_psnr"]["psnr_db"] > 30 and report["sampling"]["images_per_s"] > 0
    assert "| tiny |" in out.stdout and "bf16 vs fp32 samples" in out.stdout


def test_a_doubled_flop_count_fails_the_check(tmp_path):
    out, report = run_check(tmp_path, "--flops-scale", "2")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(report["problems"]) == 2 and all("× its forward pass" in p for p in report["problems"])
    assert "IMPOSSIBLE: tiny: the counted training step is" in out.stdout


@pytest.fixture(scope="module")
def gpu_check():
    return load_bench("gpu_check")


KINDS = {"ceiling": "exceeds the measured matmul ceiling", "forward": "× its forward pass",
         "recompute": "recomputation adds at most one forward"}


@pytest.mark.parametrize("hardware, model, forward, expected", [
    (0.90, 0.90, 0.30, []),  # 90% of the ceiling, a step of 3 forwards
    (0.95, 0.75, 0.25, []),  # checkpointing: executes 1.27× the model's FLOPs
    (1.20, 1.20, 0.40, ["ceiling"]),  # faster than the machine's best matrix product
    (1.10, 0.90, 0.30, ["ceiling"]),  # MFU 90%, but what it executes exceeds the ceiling
    (0.30, 0.30, 0.30, ["forward"]),  # a step counted as one forward: the backward pass lost
    (0.60, 0.60, 0.10, ["forward"]),  # a step counted twice
    (0.90, 0.45, 0.15, ["recompute"]),  # recomputation counted as two extra forwards
])
def test_impossible_figures_are_named(gpu_check, hardware, model, forward, expected):
    """Per image, in TFLOP for a one-second step against a 1 TFLOP/s ceiling."""
    report = {"matmul": {"tflops": 1.0}, "train": [
        {"preset": "p", "checkpointing": hardware != model, "step_s": 1.0, "hardware_flops": hardware * 1e12,
         "model_flops": model * 1e12, "forward_flops": forward * 1e12, "tflops": hardware}]}
    gpu_check.utilisation(report)
    problems = gpu_check.impossible_figures(report)
    assert sorted(k for k, text in KINDS.items() if any(text in p for p in problems)) == expected, problems
    assert len(problems) == len(expected)
