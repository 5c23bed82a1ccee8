"""The promotion gate's statistics: is a new version no worse than the alias holder, and better?

Both versions are scored on the same val pairs with the same seeds, N samples per pair
(`pipelines.eval.run.evaluate`, `EvalResult.per_pair`: one value per pair and metric, the mean of
its samples). A *paired bootstrap* resamples the pairs with replacement (`resamples` times, seeded),
recomputes each set-level metric for both versions on the same resample, and gives the 95%
interval of Δ = badness(new) − badness(holder), where badness is the metric turned into "lower is
better": −PSNR-like metrics, the value of error-like ones, |log ratio| for ratios whose ideal is 1.
Pairs are resampled, not outputs: each pair is one draw of the photos a model will meet, and the
two versions' outputs of a pair share its photo (which is what makes the comparison paired).

Guards (the default decision, `GUARDS`): the new version must not be worse than the holder by more
than a stated tolerance on any of them, with 95% confidence (the interval's upper end ≤ tolerance),
and it must be better on at least one (Δ < 0); a tie — two copies of one model give Δ = 0 on every
metric — keeps the holder. The guards are the ones a blurry, colour-shifted or grainy model fails:

| metric              | badness                     | tolerance | a model that fails it                 |
| ------------------- | --------------------------- | --------- | ------------------------------------- |
| `lr_psnr`           | −LR-PSNR (dB)               | 0.5 dB    | ignores its input, drifts in colour   |
| `colour_error`      | colour error (/255)         | 0.5       | shifts the picture's colours          |
| `detail_ratio`      | |log detail ratio|          | 0.1       | blurs (ratio ≪ 1) or invents noise (≫ 1) |
| `flat_noise_ratio`  | |log flat-region noise| when above the photo's (1), else 0 | 0.1 | grain where the photo is flat |
| `lpips`             | LPIPS (with its weights)    | 0.01      | looks less like the photo             |
| `fid`               | FID (with its weights; a set-level number: compared on the point values, no interval) | 1.0 | |

`single(metric)`: one metric decides (`--promote-metric`): the new version moves when it is better on
it (Δ < 0) and its interval's upper end is within that metric's tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sr3model.metrics import RATIOS, badness  # RATIOS: (numerator, denominator) keys of summed energies

Table = Mapping[str, np.ndarray]  # per-pair values of one version (`Running.per_pair`)
# metric → (tolerance on Δ badness, the unit it is stated in)
GUARDS: dict[str, tuple[float, str]] = {
    "lr_psnr": (0.5, "dB"), "colour_error": (0.5, "/255"), "detail_ratio": (0.1, "|log ratio|"),
    "flat_noise_ratio": (0.1, "|log ratio| above 1"), "lpips": (0.01, ""),
}
POINT_GUARDS: dict[str, tuple[float, str]] = {"fid": (1.0, "")}
TOLERANCES = {**GUARDS, **POINT_GUARDS, "psnr": (0.5, "dB"), "ssim": (0.01, ""), "consistency": (1.0, "×1e-5")}


@dataclass(frozen=True)
class Comparison:
    """One metric: both versions' set-level values, Δ badness (new − holder) and its 95% interval."""

    metric: str
    new: float
    holder: float
    delta: float
    low: float
    high: float
    tolerance: float

    @property
    def worse(self) -> bool:
        """Worse beyond the tolerance, or not shown to be within it (95%)."""
        return not self.high <= self.tolerance

    @property
    def better(self) -> bool:
        return self.delta < 0

    def describe(self) -> str:
        return (f"{self.metric} {self.new:.4g} vs {self.holder:.4g} (Δ badness {self.delta:+.3g}, 95% "
                f"[{self.low:+.3g}, {self.high:+.3g}], tolerance {self.tolerance:g})")


def value(metric: str, table: Table, index: np.ndarray | None = None) -> float | None:
    """The set-level metric of `table` over the pairs `index` (all when None); None if absent."""
    pick = (lambda a: a) if index is None else (lambda a: a[index])
    if metric in RATIOS:
        top, bottom = RATIOS[metric]
        if top not in table:
            return None
        return float(pick(table[top]).sum() / max(float(pick(table[bottom]).sum()), 1e-12))
    if metric not in table:
        return None
    return float(pick(table[metric]).mean())


def compare(new: Table, holder: Table, metrics: list[str], *, resamples: int = 2000,
            seed: int = 0) -> dict[str, Comparison]:
    """Paired bootstrap of Δ badness for each metric both tables have (module docstring)."""
    pairs = len(next(iter(new.values())))
    if any(len(v) != pairs for t in (new, holder) for v in t.values()):
        raise ValueError("both versions must be scored on the same pairs")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, pairs, size=(resamples, pairs))
    out = {}
    for metric in metrics:
        a, b = value(metric, new), value(metric, holder)
        if a is None or b is None:
            continue
        deltas = np.array([badness(metric, value(metric, new, i)) - badness(metric, value(metric, holder, i))
                           for i in draws])
        deltas = deltas[np.isfinite(deltas)] if np.isfinite(deltas).any() else np.array([math.inf])
        tolerance = TOLERANCES.get(metric, (0.0, ""))[0]
        out[metric] = Comparison(metric, a, b, badness(metric, a) - badness(metric, b),
                                 float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5)), tolerance)
    return out


def point(metric: str, new: float | None, holder: float | None) -> Comparison | None:
    """A set-level metric without per-pair values (FID): Δ of the point values, no interval."""
    if new is None or holder is None:
        return None
    delta = badness(metric, new) - badness(metric, holder)
    return Comparison(metric, new, holder, delta, delta, delta, TOLERANCES.get(metric, (0.0, ""))[0])


@dataclass(frozen=True)
class Verdict:
    moved: bool
    reason: str
    comparisons: dict[str, Comparison]


def decide(comparisons: Mapping[str, Comparison], single: str | None = None) -> Verdict:
    """Guards (default) or one metric (`single`): whether the new version takes the alias, and why."""
    if single is not None:
        c = comparisons.get(single)
        if c is None:
            return Verdict(False, f"{single}: no value for both versions", dict(comparisons))
        if c.worse:
            return Verdict(False, f"worse on {c.describe()}", dict(comparisons))
        if not c.better:
            return Verdict(False, f"tie on {c.describe()}: the holder keeps it", dict(comparisons))
        return Verdict(True, f"better on {c.describe()}", dict(comparisons))
    if not comparisons:
        return Verdict(False, "no guard metric could be compared", {})
    worse = [c for c in comparisons.values() if c.worse]
    if worse:
        return Verdict(False, "worse beyond tolerance on " + "; ".join(c.describe() for c in worse),
                       dict(comparisons))
    better = [c for c in comparisons.values() if c.better]
    if not better:
        return Verdict(False, "no better on any guard (a tie: the holder keeps it)", dict(comparisons))
    return Verdict(True, "no worse on every guard, better on " + "; ".join(c.describe() for c in better),
                   dict(comparisons))
