"""benchmarks/bench_seeds.py: the spread of a recipe over training seeds. Its tally must count a
grainy seed as grainy however clean the median is (one clean seed must not stand for the recipe),
and the script runs end to end on a budget of a few steps, scoring the EMA and the raw weights
of each run apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench_support import BENCHMARKS, load_bench


def _row(detail: float, grain: float) -> dict[str, float]:
    return {"psnr": 28.0, "lr_psnr": 100.0, "colour_error": 0.05, "detail_ratio": detail, "flat_noise_ratio": grain}


def test_a_grainy_seed_is_counted_beside_clean_ones() -> None:
    bench = load_bench("bench_seeds")
    summary = bench.tally([_row(0.22, 1.63), _row(1.67, 18.81), _row(0.14, 0.62)])
    assert (summary["grainy"], summary["soft"], summary["seeds"]) == (2, 2, 3)
    assert summary["flat_noise_ratio"] == {"median": 1.63, "min": 0.62, "max": 18.81}
    assert bench.tally([_row(1.0, 1.0)])["grainy"] == 0  # the photo's own texture is neither


def test_runs_end_to_end_on_a_tiny_budget(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_seeds.py"), "--seeds", "0", "1", "--steps", "2",
                           "--sample-steps", "2", "--samples", "1", "--threads", "1", "--weights", "ema", "raw",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["residual-x0"]["seeds"]) == {"0", "1"}
    assert results["residual-x0"]["seeds"]["0"] != results["residual-x0"]["seeds"]["1"]  # the seed reaches training
    raw = results["residual-x0, raw weights"]["seeds"]
    assert set(raw) == {"0", "1"} and raw["0"] != results["residual-x0"]["seeds"]["0"]  # other weights, other outputs
    assert "grainy (flat-region noise > 1.5) in" in done.stdout and (tmp_path / "grid.png").exists()
