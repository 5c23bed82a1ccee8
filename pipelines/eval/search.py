"""Noise-schedule search (`jobs/search_schedule.py`): for each step budget K, a grid search over
the linear inference schedule's last β_1 and first level γ_K (hence β_K) on held-out pairs.

Why it is cheap: the network is conditioned on the continuous noise level γ, not on a step index
(SR3 §2.5), so any schedule can be tried on a trained model without retraining; a trial costs K
network passes per pair. The best schedule per K is the paper's hyper-parameter search; its score
against K is the paper's "quality vs. refinement steps" curve (`metric_vs_steps.png`).

Grid (`--grid N` values per axis, log-spaced, rounded to 4 significant digits; N = 1 takes the
geometric middle of each range), only over valid schedules:

- β_1 in START_RANGE = [1e-6, 1e-2]. β_1 = 1 − γ_1 is the noise variance left before the last
  step: from the first level of SR3's training schedule (1e-6) to 1e-2 (noise std 0.1, where the
  last step already returns a visibly smoothed posterior mean).
- γ_K, the first (noisiest) level, in [γ_T / 100, γ_T] where γ_T is the training schedule's last
  level (`--gamma-k-range`). The sampler starts from N(0, I), which is q(y_K | y0) only when γ_K is
  that small (`sr3model.schedules.check_start` refuses anything above γ_T); for each (K, β_1, γ_K)
  the linear schedule's β_K is solved for (`sr3model.schedules.linear_end_for`), so every trial is
  a valid schedule whatever K: a few steps need β_K near 1, many steps a small one.

Metric (`--metric`): `fid` when Inception weights are given (`--fid-weights` / SR3_FID_WEIGHTS)
and torch-fidelity is installed, else `ssim`. Not `psnr`: PSNR is maximised by the posterior mean,
so a PSNR search drifts to schedules that stop early (large β_1) and return blur — it ranks
exactly the failure a generative sampler should avoid. Not `consistency`/`lr_psnr`: they only
see what survives downsampling to LR, so they cannot see left-over high-frequency noise, the other
typical failure of a too-short schedule. SSIM compares local structure and contrast, so both
left-over noise and strong smoothing lower it; it is bounded and stable on a few dozen pairs.
All of psnr, ssim, consistency, lr_psnr (and fid, is, lpips with weights) can be chosen; every
trial logs all the cheap ones anyway.

Trials are comparable: the same pairs (the first `--limit` of val/ by key), and for each pair the
same noise seeds in every trial (`pipelines.sampling.image_seed(seed, key, 0)`). Every
(trial, batch of pairs) is one work item for the sampling actors (`pipelines.eval.scoring`, GPU
actors when the cluster has or can scale to GPUs); the driver aggregates each trial's values in
order, then logs it.

MLflow: one parent run (experiment `sr3-schedule-search`) tagged with the model version, params of
the search, metrics `best_<metric>`, `best_beta_start`, `best_beta_end` stepped by K, and the
artifacts `search.json` + `metric_vs_steps.png`; one nested child run per trial
(`mlflow.parentRunId`) with params steps, beta_start, beta_end, sampler and all its metrics
(plus `gamma_K`, the signal left at the chain's start). `--apply` stores the best schedule per K
with the model version (`pipelines.registry.models.store_sampling`); `jobs/upscale.py` then uses it by
default for those steps (`pipelines.registry.models.sampling_for`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipelines import tracking
from pipelines.eval import report, scoring
from pipelines.eval.data import check_model, load_val
from pipelines.eval.measures import BASE_METRICS, FID_ENV, LOWER_IS_BETTER, METRICS, Perceptual, device_for
from pipelines.eval.report import metric_prefix
from pipelines.eval.run import Say, default_report_dir, label_of
from pipelines.registry.models import resolve_model, store_sampling
from pipelines.runtime import SamplingOptions, init_ray_if_named
from pipelines.sampling import Sampling
from sr3model.metrics import badness

START_RANGE = (1e-6, 1e-2)
GAMMA_K_SPAN = 100.0  # default γ_K range: [γ_T / 100, γ_T]
DEFAULT_METRIC = "ssim"
DEFAULT_EXPERIMENT = "sr3-schedule-search"


def _axis(low: float, high: float, n: int, name: str = "β") -> list[float]:
    if not 0 < low <= high < 1:
        raise ValueError(f"a {name} range needs 0 < low ≤ high < 1, got [{low:g}, {high:g}]")
    values = [math.sqrt(low * high)] if n == 1 else np.geomspace(low, high, n).tolist()
    return sorted({float(f"{v:.4g}") for v in values})


def gamma_k_range(limit: float) -> tuple[float, float]:
    """The default range of first levels γ_K searched: [γ_T / 100, γ_T] (γ_T = `limit`)."""
    return limit / GAMMA_K_SPAN, limit


def grid(n: int, steps: int, gamma_range: Sequence[float], start_range: Sequence[float] = START_RANGE
         ) -> list[tuple[float, float]]:
    """(β_1, β_K) candidates for K = `steps`: n log-spaced β_1 × n log-spaced γ_K, each γ_K reached
    by solving for β_K; duplicates dropped (K = 1 has a single β, 1 − γ_K)."""
    from sr3model.schedules import linear_end_for

    if n < 1:
        raise ValueError("--grid must be at least 1")
    gammas = _axis(*gamma_range, n, "γ_K")
    if steps == 1:
        return [(1 - g, 1 - g) for g in gammas]
    out = [(b1, linear_end_for(steps, b1, g)) for b1 in _axis(*start_range, n) for g in gammas]
    return list(dict.fromkeys(out))


def better(metric: str, a: float, b: float) -> bool:
    """Whether score `a` beats `b` for this metric (`sr3model.metrics.badness`)."""
    return badness(metric, a) < badness(metric, b)


@dataclass
class Trial:
    steps: int
    beta_start: float
    beta_end: float
    gamma_K: float  # noqa: N815 (the paper's symbol)
    scores: dict[str, float | None]
    value: float | None
    run_id: str | None = None


@dataclass
class SearchResult:
    metric: str
    sampler: str
    trials: list[Trial]
    best: dict[int, dict[str, Any]]  # K → {"sampler", "beta_start", "beta_end", "metric", "value"}
    report: str
    run_id: str | None = None
    stored: str | None = None
    notes: list[str] = field(default_factory=list)


def choose_metric(metric: str | None, *, fid_weights: str | None = None, lpips_weights: str | None = None,
                  device: str = "cpu", batch_size: int = 16) -> tuple[str, Perceptual | None, list[str]]:
    """(metric, the perceptual scorer it needs or None, notes); an explicit metric that cannot
    run is an error, the default falls back to DEFAULT_METRIC with a note."""
    if metric is not None and metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: choose from {list(METRICS)}")
    if metric in BASE_METRICS:
        return metric, None, []
    if metric is None:
        fid_given = bool(fid_weights or os.environ.get(FID_ENV))
        perceptual = Perceptual(["fid"] if fid_given else [], fid_weights=fid_weights, device=device,
                                batch_size=batch_size)
        if perceptual.available:
            return "fid", perceptual, []
        return DEFAULT_METRIC, None, [*perceptual.notes, f"scoring with {DEFAULT_METRIC}, the default "
                                      "without Inception weights (see pipelines/eval/search.py)"]
    perceptual = Perceptual([metric], fid_weights=fid_weights, lpips_weights=lpips_weights, device=device,
                            batch_size=batch_size)
    if metric not in perceptual.available:
        raise ValueError(f"--metric {metric}: " + "; ".join(perceptual.notes))
    return metric, perceptual, []


@dataclass(frozen=True)
class SearchOptions(SamplingOptions):
    """What `jobs/search_schedule.py` lets a user choose (field names are its flags)."""

    metric: str | None = None  # default: fid with Inception weights, else ssim
    grid_n: int = 5  # values per axis (N×N schedules per K)
    limit: int | None = 32  # val pairs (the first N by key)
    seed: int = 0  # the same noise for every trial
    apply: bool = False  # store the best schedule per K with the model version
    start_range: tuple[float, float] = START_RANGE
    gamma_range: tuple[float, float] | None = None  # default: `gamma_k_range` of the training schedule
    fid_weights: str | None = None
    lpips_weights: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    batch_size: int = 16
    report_uri: str | None = None
    on_cluster: bool | None = None


def search(model_uri: str, pairs: str, steps: Sequence[int], options: SearchOptions | None = None, *,
           say: Say = print, **fields: Any) -> SearchResult:
    """Grid-search valid (β_1, β_K) for each K in `steps`; log every trial; optionally store the best.
    `fields` override `options`; `gamma_range` (first levels γ_K) defaults to `gamma_k_range` of the
    model's training schedule.

    Trials are sampled on the Ray cluster's sampling actors, as in `pipelines.eval.run.evaluate`
    (`on_cluster`, `device`, `workers`, `num_gpus_per_worker`); the driver scores and logs."""
    o = replace(options or SearchOptions(), **fields)
    metric, grid_n, limit, sampler, seed, apply = o.metric, o.grid_n, o.limit, o.sampler, o.seed, o.apply
    start_range, gamma_range, batch_size, experiment = o.start_range, o.gamma_range, o.batch_size, o.experiment
    from mlflow import MlflowClient

    if not steps or any(k < 1 for k in steps):
        raise ValueError("--steps needs one or more positive step counts")
    if o.on_cluster is not False:
        init_ray_if_named(o.ray_address)
    uri = tracking.tracking_uri(o.tracking_uri)
    metric, perceptual, notes = choose_metric(metric, fid_weights=o.fid_weights, lpips_weights=o.lpips_weights,
                                              device=device_for(None), batch_size=batch_size)
    for note in notes:
        say(note)
    ref = resolve_model(model_uri, uri)
    if apply and not (ref.name and ref.version) and not ref.directory:
        raise ValueError(f"{model_uri}: --apply needs a registered model (models:/NAME/VERSION) or a model "
                         "directory to store the schedule with")
    config = ref.config()
    if config.objective == "regression":
        raise ValueError(f"{model_uri}: a regression model has no noise schedule to search")
    sampler = sampler or config.diffusion.sample_sampler
    consistency = config.diffusion.sample_consistency if o.consistency is None else o.consistency
    from sr3model.schedules import start_limit

    gamma_t = start_limit(config.diffusion)
    gamma_range = tuple(gamma_range or gamma_k_range(gamma_t))
    if gamma_range[1] > gamma_t * 1.01:
        raise ValueError(f"--gamma-k-range {gamma_range[0]:g} {gamma_range[1]:g}: γ_K above the training schedule's "
                         f"last level {gamma_t:.3g} does not match the start noise (see sr3model.schedules)")
    data = load_val(pairs, limit)
    check_model(ref, data, label_of(ref))
    steps = sorted(set(int(k) for k in steps))
    candidates = {k: grid(grid_n, k, gamma_range, start_range) for k in steps}
    trials_at = [(k, b1, bk) for k in steps for b1, bk in candidates[k]]
    say(f"{label_of(ref)}: {len(trials_at)} schedules over K in {steps} (γ_K in [{gamma_range[0]:.3g}, "
        f"{gamma_range[1]:.3g}]) on {len(data)} val pairs, {sampler}, scored by {metric}")
    whole = perceptual is not None
    items = [scoring.work_item(0, t, start, min(start + batch_size, len(data)),
                               Sampling(sampler, k, b1, bk, "", consistency), whole)
             for t, (k, b1, bk) in enumerate(trials_at)
             for start in range(0, len(data), batch_size)]

    run_id = _start_parent(uri, experiment, o.run_name, ref, {
        "metric": metric, "sampler": sampler, "steps": " ".join(map(str, steps)), "grid": grid_n,
        "start_range": f"{start_range[0]:g},{start_range[1]:g}",
        "gamma_k_range": f"{gamma_range[0]:.4g},{gamma_range[1]:.4g}",
        "limit": limit, "n_images": len(data), "seed": seed, "pairs": pairs, "model_uri": ref.pinned})
    trials: list[Trial] = []
    best: dict[int, dict[str, Any]] = {}
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    try:
        stream = scoring.score([ref], data, items, samples=1, seed=seed, batch_size=batch_size,
                               on_cluster=o.on_cluster, device=o.device or "auto", workers=o.workers,
                               num_gpus_per_worker=o.num_gpus_per_worker)
        for group in scoring.grouped(stream, "trial", data, perceptual):
            k, b1, bk = trials_at[group.id]
            scores = group.running.result()
            value = scores.get(metric)
            value = value if value is not None and math.isfinite(value) else None
            trial = Trial(k, b1, bk, group.gamma_k, scores, value)
            trial.run_id = _log_trial(client, experiment_id, run_id, sampler, metric, trial)
            trials.append(trial)
            if value is not None and (k not in best or better(metric, value, best[k]["value"])):
                best[k] = {"sampler": sampler, "beta_start": b1, "beta_end": bk, "consistency": consistency,
                           "metric": metric, "value": value}
            shown = "no score" if value is None else f"{value:.4g}"
            leader = f" (best {best[k]['value']:.4g})" if k in best else ""
            say(f"K={k} [{len([t for t in trials if t.steps == k])}/{len(candidates[k])}] β {b1:g}→{bk:.6g} "
                f"(γ_K {group.gamma_k:.3g}): {metric} {shown}{leader}")
        result = SearchResult(metric, sampler, trials, best, o.report_uri or default_report_dir("search"),
                              run_id, notes=notes)
        if apply and best:
            result.stored = store_sampling(ref, best, uri)
            say(f"stored the best schedule per K in {result.stored}")
        _finish_parent(uri, run_id, result, start_range, gamma_range, grid_n)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    return result


def _start_parent(uri: str, experiment: str, run_name: str | None, ref, params: dict[str, Any]) -> str:
    tags = {"sr3.model_name": ref.name or "", "sr3.model_version": ref.version or "",
            "sr3.model_uri": ref.pinned, "sr3.job": "search_schedule"}
    name = run_name or f"search-{metric_prefix(label_of(ref))}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id, _ = tracking.start_or_resume(uri, experiment, name, tags)
    report.log_params_and_dataset(uri, run_id, params)
    return run_id


def _log_trial(client, experiment_id: str, parent: str, sampler: str, metric: str, trial: Trial) -> str:
    """A nested child run of the parent: params of the schedule, all its metrics (step = K)."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, run_name=f"K{trial.steps}-{trial.beta_start:g}-{trial.beta_end:g}",
                            tags={"mlflow.parentRunId": parent, "sr3.job": "search_schedule.trial"})
    params = {"steps": trial.steps, "beta_start": trial.beta_start, "beta_end": trial.beta_end,
              "sampler": sampler, "metric": metric}
    now = int(time.time() * 1000)
    values = {**trial.scores, "gamma_K": trial.gamma_K}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, trial.steps) for k, v in values.items()
                              if v is not None and math.isfinite(v)])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def plot(best: dict[int, dict[str, Any]], metric: str, path) -> None:
    """Best score per K against K (the paper's quality-vs-steps figure), Agg canvas, no pyplot."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.8), layout="constrained")
    axes = figure.subplots()
    ks = sorted(best)
    values = [best[k]["value"] for k in ks]
    axes.plot(ks, values, "o-")
    for k, v in zip(ks, values):
        axes.annotate(f"{best[k]['beta_start']:.2g}→{best[k]['beta_end']:.3g}", (k, v), fontsize=7,
                      textcoords="offset points", xytext=(0, 6), ha="center")
    if len(ks) > 1:
        axes.set_xscale("log")
    axes.set_xticks(ks, labels=[str(k) for k in ks])
    axes.minorticks_off()
    axes.set_xlabel("refinement steps K")
    axes.set_ylabel(f"best {metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
    axes.set_title("best linear schedule per step budget")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def _finish_parent(uri: str, run_id: str, result: SearchResult, start_range, gamma_range, grid_n: int) -> None:
    from mlflow import MlflowClient

    logger = tracking.RunLogger(uri, run_id)
    for k, chosen in sorted(result.best.items()):
        logger.log_metrics({f"best_{result.metric}": chosen["value"], "best_beta_start": chosen["beta_start"],
                            "best_beta_end": chosen["beta_end"]}, step=k)
    if result.stored:
        tracking.set_tags(uri, run_id, {"sr3.sampling_stored": result.stored})
    document = {"metric": result.metric, "lower_is_better": result.metric in LOWER_IS_BETTER,
                "sampler": result.sampler, "grid": grid_n, "start_range": list(start_range),
                "gamma_k_range": list(gamma_range), "best": {str(k): v for k, v in sorted(result.best.items())},
                "stored": result.stored, "notes": result.notes,
                "trials": [asdict(t) for t in result.trials]}
    with report.staged(result.report) as folder:
        (folder / "search.json").write_text(json.dumps(report.finite(document), indent=2, allow_nan=False))
        if result.best:
            plot(result.best, result.metric, folder / "metric_vs_steps.png")
        MlflowClient(uri).log_artifacts(run_id, str(folder), artifact_path="search")
    tracking.end_run(uri, run_id)
