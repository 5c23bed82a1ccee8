"""Fool rates with 95% intervals, and the catch-trial exclusions, from the exported answers.

- fool rate of a model = trials in which the rater picked the model's output / its trials
  (test trials of included raters; 50% is "indistinguishable from the photo");
- Wilson score interval over those trials (treats trials as independent);
- bootstrap over raters: raters resampled with replacement (`resamples`, seeded), the pooled fool
  rate of each resample, its 2.5th and 97.5th percentiles — wider when raters differ, which is why
  it is the interval to quote;
- a rater is excluded when they missed (picked the degraded copy in) more than
  `max_catch_misses` catch trials; the excluded raters are listed with their counts;
- per image: the fool rate of each (model, source image), for the paper's Fig. 11.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(fooled: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion; (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p = fooled / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_raters(fooled: Iterable[int], trials: Iterable[int], resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the pooled rate Σfooled/Σtrials when raters are resampled."""
    k, n = np.asarray(list(fooled), dtype=np.float64), np.asarray(list(trials), dtype=np.float64)
    if n.sum() == 0:
        return 0.0, 1.0
    picks = np.random.default_rng(seed).integers(0, len(n), size=(resamples, len(n)))
    totals = n[picks].sum(axis=1)
    rates = k[picks].sum(axis=1) / np.where(totals > 0, totals, np.nan)
    low, high = np.nanpercentile(rates, [2.5, 97.5])
    return float(low), float(high)


def exclusions(rows: Iterable[Mapping[str, Any]], max_catch_misses: int = 0) -> dict[int, dict[str, int]]:
    """{rater: {"slot", "catch_answered", "catch_missed"}} of the raters excluded by catch trials."""
    seen: dict[int, dict[str, int]] = {}
    for row in rows:
        if row["model"] is None:
            entry = seen.setdefault(row["rater"], {"slot": row["slot"], "catch_answered": 0, "catch_missed": 0})
            entry["catch_answered"] += 1
            entry["catch_missed"] += row["picked"] != "real"
    return {r: e for r, e in seen.items() if e["catch_missed"] > max_catch_misses}


def fool_rates(rows: list[Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]], *,
               max_catch_misses: int = 0, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Everything `results` reports (see the module docstring), from `StudyDB.export()` rows."""
    excluded = exclusions(rows, max_catch_misses)
    kept = [r for r in rows if r["rater"] not in excluded and r["model"] is not None]
    per_rater: dict[str, dict[int, list[int]]] = {m: defaultdict(lambda: [0, 0]) for m in models}
    per_image: dict[str, dict[int, list[int]]] = {m: defaultdict(lambda: [0, 0]) for m in models}
    for row in kept:
        fooled = int(row["picked"] == "model")
        for table, key in ((per_rater, row["rater"]), (per_image, row["image"])):
            table[row["model"]][key][0] += fooled
            table[row["model"]][key][1] += 1
    summary: dict[str, Any] = {}
    for model, entry in models.items():
        counts = per_rater[model]
        fooled, trials = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
        rts = sorted(r["rt_ms"] for r in kept if r["model"] == model)
        summary[model] = {
            "label": entry["label"], "uri": entry.get("uri", ""), "fool_rate": fooled / trials if trials else None,
            "fooled": fooled, "trials": trials, "raters": len(counts),
            "wilson95": list(wilson(fooled, trials)),
            "bootstrap95": list(bootstrap_raters([c[0] for c in counts.values()], [c[1] for c in counts.values()],
                                                 resamples, seed)),
            "median_rt_ms": rts[len(rts) // 2] if rts else None,
            "images": sorted(({"image": i, "fooled": c[0], "trials": c[1], "fool_rate": c[0] / c[1]}
                              for i, c in per_image[model].items()), key=lambda e: (-e["fool_rate"], -e["trials"],
                                                                                    e["image"])),
        }
    raters_seen = {r["rater"] for r in rows}
    finished = {r["rater"] for r in rows if r["finished_at"] is not None}
    return {"models": summary, "excluded": [{"rater": r, **e} for r, e in sorted(excluded.items())],
            "raters": {"answered": len(raters_seen), "finished": len(finished),
                       "included": len(raters_seen - set(excluded))},
            "answers": len(rows), "max_catch_misses": max_catch_misses}
