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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import tracking
from pipelines.eval import report, scoring
from pipelines.eval.data import EvalSet, bicubic, check_model, load_val
from pipelines.eval.measures import LOWER_IS_BETTER, Perceptual, Running, device_for
from pipelines.eval.report import metric_prefix
from pipelines.registry.models import ModelRef, parse_schedule, resolve_model, sampling_for

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


def _device(device: str | None) -> str:
    """The driver's device for the perceptual metrics (sampling runs where `--device` says)."""
    return device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")


def _method(label: str, produce: Callable, data: EvalSet, perceptual: Perceptual, batch_size: int,
            keep: int, say: Say | None) -> tuple[dict[str, float | None], torch.Tensor]:
    """Run one method over every batch: (its metrics, its outputs for the first `keep` pairs)."""
    running, kept = Running(perceptual), []
    for start, keys, hr, lr in data.batches(batch_size):
        images = produce(keys, lr, tuple(hr.shape[-2:]))  # (b, N, 3, H, W)
        running.add(images, hr, lr)
        if start < keep:
            kept.append(images[:keep - start])
        if say:
            say(f"{label}: {start + len(keys)}/{len(data)} pairs")
    return running.result(), torch.cat(kept)


def sampled_methods(refs: Sequence[ModelRef], samplings: Sequence, labels: Sequence[str], data: EvalSet,
                    perceptual: Perceptual | None, *, samples: int, seed: int, batch_size: int, keep: int,
                    say: Say | None = None, **where: Any) -> Iterator[tuple[str, dict, torch.Tensor, list]]:
    """(label, metrics, outputs of the first `keep` pairs, workers) per model, sampled on the
    cluster's actors (`pipelines.eval.scoring`, keyword args `where`) and aggregated here."""
    whole = perceptual is not None and bool(perceptual.available)  # FID/IS/LPIPS need every output
    items = [scoring.work_item(m, m, start, min(start + batch_size, len(data)), how, whole or start < keep)
             for m, how in enumerate(samplings) for start in range(0, len(data), batch_size)]
    running, kept, workers, method = None, [], set(), -1
    for item, result in scoring.score(refs, data, items, samples=samples, seed=seed, batch_size=batch_size,
                                      **where):
        if item["method"] != method:
            if running is not None:
                yield labels[method], running.result(), torch.cat(kept), sorted(workers)
            method, running, kept, workers = item["method"], Running(perceptual), [], set()
        images = torch.from_numpy(result["images"]) if result["images"] is not None else None
        hr = data.batch(item["start"], item["stop"])[0] if whole else None
        running.add_values({k: torch.from_numpy(v) for k, v in result["values"].items()}, images, hr)
        if item["start"] < keep:
            kept.append(images[:keep - item["start"]])
        workers.add(tuple(sorted(result["worker"].items())))
        if say:
            say(f"{labels[method]}: {item['stop']}/{len(data)} pairs")
    if running is not None:
        yield labels[method], running.result(), torch.cat(kept), sorted(workers)


def evaluate(model_uri: str, pairs: str, *, steps: int | None = None, sampler: str | None = None,
             schedule: str | None = None, samples: int = 1, baselines: Sequence[str] = (),
             limit: int | None = None, report_uri: str | None = None, seed: int = 0,
             metrics: Sequence[str] | None = None, fid_weights: str | None = None,
             lpips_weights: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
             run_name: str | None = None, tracking_uri: str | None = None, device: str | None = None,
             batch_size: int = 16, grid_rows: int = 8, log_mlflow: bool = True, on_cluster: bool | None = None,
             workers: int | None = None, num_gpus_per_worker: float | None = None,
             say: Say = print, consistency: bool | None = None) -> EvalResult:
    """Evaluate `model_uri` (and `baselines`) on the val pairs; write the report; log the run.

    Sampling runs on the Ray cluster's sampling actors (`device` auto|cpu|cuda, `workers`,
    `num_gpus_per_worker` as for upscaling) when this process is connected to one, or
    `on_cluster=True` connects; `on_cluster=False` samples in this process. Either way the
    metrics are aggregated here, from the same per-output values."""
    if samples < 1:
        raise ValueError("--samples must be at least 1")
    uri = tracking.tracking_uri(tracking_uri)
    report_uri = report_uri or default_report_dir("eval")
    data = load_val(pairs, limit)
    say(f"{len(data)} val pairs from {pairs} ({data.shapes[1][-1]}→{data.shapes[0][-1]} px)")
    perceptual = Perceptual(metrics, fid_weights=fid_weights, lpips_weights=lpips_weights,
                            device=device_for(None), batch_size=batch_size)
    for note in perceptual.notes:
        say(note)
    ref = resolve_model(model_uri, uri)
    chosen = sampling_for(ref, sampler=sampler, steps=steps, schedule=parse_schedule(schedule), consistency=consistency)
    models = [(ref, chosen)] + [(b, sampling_for(b, sampler=sampler, steps=steps, consistency=consistency))
                                for b in (resolve_model(u, uri) for u in baselines)]
    rows = max(1, min(grid_rows, len(data)))  # pairs shown in the report's grid

    results, shown = {}, {}
    results["bicubic"], shown["bicubic"] = _method("bicubic", lambda keys, lr, size: bicubic(lr, size), data,
                                                   perceptual, batch_size, rows, None)
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
    for label, values, images, workers_seen in sampled_methods(
            [r for r, _ in models], [h for _, h in models], labels, data, perceptual, samples=samples, seed=seed,
            batch_size=batch_size, keep=rows, say=say, on_cluster=on_cluster, device=device or "auto",
            workers=workers, num_gpus_per_worker=num_gpus_per_worker):
        results[label], shown[label] = values, images
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

    result = EvalResult(report_uri, results, meta, perceptual.notes, tracking_uri=uri)
    with report.staged(report_uri) as folder:
        report.write_report(folder, title=f"SR3 evaluation: {model_label}", results=results, meta=meta,
                            notes=perceptual.notes, columns=columns, keys=data.keys[:rows])
        if log_mlflow:
            name = run_name or f"eval-{metric_prefix(model_label)}-{time.strftime('%Y%m%d-%H%M%S')}"
            result.run_id = report.log_run(uri, experiment, name, ref, report_uri, meta, results,
                                           notes=perceptual.notes, folder=folder)
    return result
