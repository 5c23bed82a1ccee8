"""Evaluate an SR model on held-out pairs (`jobs/evaluate.py`): bicubic, the model and baselines.

    PAIRS/val ──decode──> LR, HR ──bicubic (driver)──────────────────────────────┐
        ──model and baseline samples: sampling actors (pipelines.eval.scoring)──> per-output
          values of `per_image` (+ outputs for the grid / FID / LPIPS) ──> driver: `Running`,
          `summarise` ──> metrics per method ──> REPORT/metrics.json, REPORT/index.html + PNGs
          (pipelines.eval.report) ──> one MLflow run

Metrics: `pipelines.eval.measures` (means over the pairs, and over the samples of each pair;
FID/IS/LPIPS from local weight files only).

Sampling: the upscale job's path (`pipelines.sampling`) on the same actor pool — GPU actors
when the cluster has or can scale to GPUs (`pipelines.infer.placement`); `meta["sampled_by"]` names
the processes. Every output has its own generator, seeded by (seed, pair key, sample index)
(`image_seed`): a rerun reproduces each image whatever the batch or actor, and the schedule
search's trials all see the same noise. Regression models are deterministic: they
are sampled once per pair whatever N.

MLflow: one run per evaluation in experiment `sr3-eval`, linked to the model version by tags
(see `pipelines.eval.report.log_run`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines import tracking
from pipelines.eval import report, scoring
from pipelines.eval.data import EvalSet, bicubic, check_model, load_val
from pipelines.eval.measures import LOWER_IS_BETTER, Perceptual, Running, device_for
from pipelines.eval.report import metric_prefix
from pipelines.registry.models import ModelRef, parse_schedule, resolve_model, sampling_for
from pipelines.runtime import SamplingOptions, init_ray_if_named

DEFAULT_EXPERIMENT = "sr3-eval"
Say = Callable[[str], None]


@dataclass
class EvalResult:
    report: str
    metrics: dict[str, dict[str, float | None]]
    meta: dict[str, Any]
    notes: list[str]
    run_id: str | None = None
    tracking_uri: str | None = None
    per_pair: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method → `Running.per_pair`


def label_of(ref: ModelRef) -> str:
    """"NAME vN" for registry models, the folder name of a model directory, else the URI."""
    if ref.name:
        return ref.label
    if ref.directory:
        return Path(ref.directory.rstrip("/")).name or ref.uri
    return ref.uri


def _unique(label: str, taken: Iterable[str]) -> str:
    taken, candidate, i = set(taken), label, 2
    while candidate in taken:
        candidate, i = f"{label} #{i}", i + 1
    return candidate


def default_report_dir(kind: str = "eval") -> str:
    return f"reports/{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _method(label: str, produce: Callable, data: EvalSet, perceptual: Perceptual, batch_size: int,
            keep: int, say: Say | None) -> tuple[Running, torch.Tensor]:
    """Run one method over every batch: (its metrics so far, its outputs for the first `keep` pairs)."""
    running, kept = Running(perceptual), []
    for start, keys, hr, lr in data.batches(batch_size):
        images = produce(keys, lr, tuple(hr.shape[-2:]))  # (b, N, 3, H, W)
        running.add(images, hr, lr)
        if start < keep:
            kept.append(images[:keep - start])
        if say:
            say(f"{label}: {start + len(keys)}/{len(data)} pairs")
    return running, torch.cat(kept)


def sampled_methods(refs: Sequence[ModelRef], samplings: Sequence, labels: Sequence[str], data: EvalSet,
                    perceptual: Perceptual | None, *, samples: int, seed: int, batch_size: int, keep: int,
                    say: Say | None = None, **where: Any) -> Iterator[tuple[str, Running, torch.Tensor, list]]:
    """(label, its `Running`, outputs of the first `keep` pairs, workers) per model, sampled on the
    cluster's actors (`pipelines.eval.scoring`, keyword args `where`) and aggregated here."""
    whole = perceptual is not None and bool(perceptual.available)  # FID/IS/LPIPS need every output
    items = [scoring.work_item(m, m, start, min(start + batch_size, len(data)), how, whole or start < keep)
             for m, how in enumerate(samplings) for start in range(0, len(data), batch_size)]
    stream = scoring.score(refs, data, items, samples=samples, seed=seed, batch_size=batch_size, **where)
    progress = (lambda item: say(f"{labels[item['method']]}: {item['stop']}/{len(data)} pairs")) if say else None
    for group in scoring.grouped(stream, "method", data, perceptual, keep=keep, on_item=progress):
        yield labels[group.id], group.running, group.outputs, sorted(group.workers)


@dataclass(frozen=True)
class EvalOptions(SamplingOptions):
    """What `jobs/evaluate.py` lets a user choose (field names are its flags)."""

    batch_size: int = 16  # pairs per network call
    samples: int = 1  # samples per pair (N > 1 adds diversity σ)
    baselines: tuple[str, ...] = ()  # baseline model URIs (e.g. a regression model)
    limit: int | None = None  # the first N val pairs by key
    report_uri: str | None = None  # default: reports/eval-<timestamp>
    seed: int = 0
    metrics: tuple[str, ...] | None = None  # perceptual metrics wanted (default: those with weights)
    fid_weights: str | None = None
    lpips_weights: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    grid_rows: int = 8  # pairs shown in the report's grid
    log_mlflow: bool = True
    on_cluster: bool | None = None  # sample on Ray actors (None: when connected or a cluster is named)


def evaluate(model_uri: str, pairs: str, options: EvalOptions | None = None, *, say: Say = print,
             **fields: Any) -> EvalResult:
    """Evaluate `model_uri` (and `baselines`) on the val pairs; write the report; log the run.

    `fields` override `options` (e.g. `evaluate(m, p, steps=2, limit=4)`). Sampling runs on the Ray
    cluster's sampling actors (`device` auto|cpu|cuda, `workers`, `num_gpus_per_worker` as for
    upscaling) when a cluster is named (`ray_address`, RAY_ADDRESS) or this process is connected to
    one, or `on_cluster=True` connects; `on_cluster=False` samples in this process. Either way the
    metrics are aggregated here, from the same per-output values."""
    o = replace(options or EvalOptions(), **fields)
    steps, sampler, schedule, samples, baselines, limit = o.steps, o.sampler, o.schedule, o.samples, o.baselines, o.limit
    seed, batch_size, grid_rows = o.seed, o.batch_size, o.grid_rows
    if samples < 1:
        raise ValueError("--samples must be at least 1")
    if o.on_cluster is not False:
        init_ray_if_named(o.ray_address)
    uri = tracking.tracking_uri(o.tracking_uri)
    report_uri = o.report_uri or default_report_dir("eval")
    data = load_val(pairs, limit)
    say(f"{len(data)} val pairs from {pairs} ({data.shapes[1][-1]}→{data.shapes[0][-1]} px)")
    perceptual = Perceptual(o.metrics, fid_weights=o.fid_weights, lpips_weights=o.lpips_weights,
                            device=device_for(None), batch_size=batch_size)
    for note in perceptual.notes:
        say(note)
    ref = resolve_model(model_uri, uri)
    chosen = sampling_for(ref, sampler=sampler, steps=steps, schedule=parse_schedule(schedule),
                          consistency=o.consistency)
    models = [(ref, chosen)] + [(b, sampling_for(b, sampler=sampler, steps=steps, consistency=o.consistency))
                                for b in (resolve_model(u, uri) for u in baselines)]
    rows = max(1, min(grid_rows, len(data)))  # pairs shown in the report's grid

    results, shown, per_pair = {}, {}, {}
    running, shown["bicubic"] = _method("bicubic", lambda keys, lr, size: bicubic(lr, size), data, perceptual,
                                        batch_size, rows, None)
    results["bicubic"], per_pair["bicubic"] = running.result(), running.per_pair(len(data))
    described: dict[str, dict[str, Any]] = {"bicubic": {}}
    labels = []
    for current, how in models:
        label = _unique(label_of(current), [*results, *labels])
        labels.append(label)
        check_model(current, data, label)
        regression = current.config().objective == "regression"
        say(f"{label}: " + ("regression, one pass" if regression else
                            f"{how.sampler}, {how.steps} steps, schedule {how.schedule_text} "
                            f"({how.source}), LR consistency {'on' if how.consistency else 'off'}, "
                            f"{samples} sample(s) per pair"))
        described[label] = {**current.record(), **({"objective": "regression"} if regression else how.record())}
    model_label, sampled_by = labels[0], []
    for label, running, images, workers_seen in sampled_methods(
            [r for r, _ in models], [h for _, h in models], labels, data, perceptual, samples=samples, seed=seed,
            batch_size=batch_size, keep=rows, say=say, on_cluster=o.on_cluster, device=o.device or "auto",
            workers=o.workers, num_gpus_per_worker=o.num_gpus_per_worker):
        results[label], shown[label], per_pair[label] = running.result(), images, running.per_pair(len(data))
        sampled_by.extend(dict(w) for w in workers_seen)
    for label, values in results.items():
        say(f"{label:>16}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items() if v is not None))

    meta = {"model": model_label, **ref.record(), "model_given": model_uri, "pairs": pairs,
            "n_images": len(data), "samples": samples, "seed": seed, **chosen.record(), "sampled_by": sampled_by,
            "methods": described, "lower_is_better": sorted(LOWER_IS_BETTER),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    hr, lr = data.batch(0, rows)
    columns = [("LR", torch.nn.functional.interpolate(lr, size=tuple(hr.shape[-2:]), mode="nearest")),
               ("bicubic", shown["bicubic"][:, 0])]
    columns += [(label, imgs[:, 0]) for label, imgs in shown.items() if label not in ("bicubic", model_label)]
    main = shown[model_label]
    columns += [(f"{model_label} s{k + 1}" if main.shape[1] > 1 else model_label, main[:, k])
                for k in range(main.shape[1])]
    columns.append(("HR", hr))

    result = EvalResult(report_uri, results, meta, perceptual.notes, tracking_uri=uri, per_pair=per_pair)
    with report.staged(report_uri) as folder:
        report.write_report(folder, title=f"SR3 evaluation: {model_label}", results=results, meta=meta,
                            notes=perceptual.notes, columns=columns, keys=data.keys[:rows])
        if o.log_mlflow:
            name = o.run_name or f"eval-{metric_prefix(model_label)}-{time.strftime('%Y%m%d-%H%M%S')}"
            result.run_id = report.log_run(uri, o.experiment, name, ref, report_uri, meta, results,
                                           notes=perceptual.notes, folder=folder)
    return result
