"""benchmarks/bench_quality.py picks the arm whose sampler comparison the README shows: grain must
not count as detail there (an arm that reaches the detail range by covering flat areas with noise
must rank below a clean arm that is less far from the photo)."""

from __future__ import annotations

from bench_support import load_bench


def _bench():
    return load_bench("bench_quality")


def _arm(detail: float, grain: float, **others: float) -> dict[str, float]:
    return {"lr_psnr": 100.0, "psnr": 28.0, "colour_error": 0.1, "detail_ratio": detail, "flat_noise_ratio": grain,
            **others}


def test_grain_in_the_detail_range_ranks_below_a_clean_softer_arm() -> None:
    bench = _bench()
    grainy, clean = _arm(detail=0.9, grain=15.0), _arm(detail=0.25, grain=1.6)
    assert len(bench.meets(grainy, grainy)) < len(bench.meets(clean, clean))  # what the old order used
    assert bench.rank(clean, clean) < bench.rank(grainy, grainy)
    # grain and blur by the same factor are equally far from the photo; the photo's own texture is best
    assert bench.rank(_arm(1.0, 4.0), _arm(1.0, 4.0))[1] == bench.rank(_arm(0.25, 1.0), _arm(0.25, 1.0))[1]
    assert bench.rank(_arm(1.0, 1.0), _arm(1.0, 1.0)) == (0, 0.0)
    # a target besides grain and detail still comes first: colour drift loses to any texture
    drifted = _arm(1.0, 1.0, colour_error=5.0)
    assert bench.rank(grainy, grainy) < bench.rank(drifted, drifted)
