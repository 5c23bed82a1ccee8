"""Evaluate an SR model on held-out pairs (`jobs/evaluate.py`): bicubic, the model and baselines.

    PAIRS/val ──decode──> LR, HR ──bicubic (driver)──────────────────────────────┐
        ──model and baseline samples: sampling actors (pipelines.infer.scoring)──> per-output
          values of `per_image` (+ outputs for the grid / FID / LPIPS) ──> driver: `Running`,
          `summarise` ──> metrics per method ──> REPORT/metrics.json, REPORT/index.html + PNGs
          (pipelines.report) ──> one MLflow run

Metrics (`sr3model.metrics`; means over the pairs, and over the samples of each pair):

| key           | what                                                                   | better |
| ------------- | ---------------------------------------------------------------------- | ------ |
| `psnr` `ssim` | against HR, on [0, 1] images (torchmetrics)                            | ↑      |
| `consistency` | MSE(bicubic-downsampled output, LR input) ×1e-5 (SR3 Table 2)          | ↓      |
| `lr_psnr`     | the same comparison in dB                                              | ↑      |
| `colour_error`| mean |Δ| of per-channel means against HR, in 8-bit levels            | ↓      |
| `detail_ratio`| high-frequency energy (image − bicubic round trip) over the HR's; 1 = as detailed as the photo; ratio of the set's means | → 1 |
| `diversity`   | σ across the N samples of one input (only when N > 1; SRDiff)          |        |
| `fid`, `is`   | Fréchet Inception distance to the HR set; Inception score (torchmetrics + torch-fidelity) | ↓ ↑ |
| `lpips`       | LPIPS-AlexNet against HR (`sr3model.metrics.LPIPS`, no torchvision)    | ↓      |

FID, IS and LPIPS never download weights. Inception weights (torch-fidelity's
`pt_inception-2015-12-05-6726825d.pth`): `--fid-weights PATH` or `SR3_FID_WEIGHTS`; AlexNet
weights (torchvision's `alexnet-owt-7be5be79.pth`): `--lpips-weights PATH` or `SR3_LPIPS_WEIGHTS`.
They are computed when their weights are given, or when asked for (`--metrics fid lpips`); a
metric that cannot run (no weights, no torch-fidelity, unreadable file) is one clear note in the
output, the report and the run, and everything else is still computed.

Sampling: the upscale job's path (`pipelines.sampling`) on the same actor pool — GPU actors
when the cluster has or can scale to GPUs (`pipelines.infer.placement`); `meta["sampled_by"]` names
the processes. Every output has its own generator, seeded by (seed, pair key, sample index)
(`image_seed`): a rerun reproduces each image whatever the batch or actor, and the schedule
search's trials all see the same noise. Regression models are deterministic: they
are sampled once per pair whatever N.

MLflow: one run per evaluation in experiment `sr3-eval`, linked to the model version by tags
(see `pipelines.report.log_run`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import report, tracking
from pipelines.infer import scoring
from pipelines.models import ModelRef, parse_schedule, resolve_model, sampling_for
from pipelines.pairs import read_part
from pipelines.report import metric_prefix
from sr3model import metrics as M

BASE_METRICS, LOWER_IS_BETTER = M.BASE_METRICS, M.LOWER_IS_BETTER
EXTRA_METRICS = ("fid", "is", "lpips")
FID_ENV, LPIPS_ENV = "SR3_FID_WEIGHTS", "SR3_LPIPS_WEIGHTS"
DEFAULT_EXPERIMENT = "sr3-eval"
Say = Callable[[str], None]


@dataclass(frozen=True)
class EvalSet:
    """Held-out pairs sorted by key, kept as PNG bytes and decoded one batch at a time."""

    keys: list[str]
    hr_png: list[bytes]
    lr_png: list[bytes]
    shapes: tuple[tuple[int, ...], tuple[int, ...]]  # (HR, LR) shape of one pair, (3, H, W)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """HR (b, 3, H, W) and LR (b, 3, h, w) in [-1, 1] of pairs start..stop-1."""
        from sr3model.imageio import decode_png, to_tensor

        hr = [to_tensor(decode_png(b)) for b in self.hr_png[start:stop]]
        lr = [to_tensor(decode_png(b)) for b in self.lr_png[start:stop]]
        for key, h, l in zip(self.keys[start:stop], hr, lr):
            if (tuple(h.shape), tuple(l.shape)) != self.shapes:
                raise ValueError(f"pair {key}: HR/LR shapes {tuple(h.shape)}/{tuple(l.shape)} differ from the "
                                 f"first pair's {self.shapes[0]}/{self.shapes[1]}; evaluate one size at a time")
        return torch.stack(hr), torch.stack(lr)

    def batches(self, size: int) -> Iterator[tuple[int, list[str], torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), size):
            yield (start, self.keys[start:start + size], *self.batch(start, start + size))


def load_val(pairs: str, limit: int | None = None) -> EvalSet:
    """The first `limit` pairs (by key) of the val/ split of a build_pairs output."""
    from sr3model.imageio import decode_png, to_tensor

    rows = sorted(read_part(pairs, "val", columns=["key", "source", "hr", "lr"]).to_pylist(),
                  key=lambda row: row["key"])[:limit]
    if not rows:
        raise ValueError(f"{pairs}: no val/ pairs (build them with jobs/build_pairs.py --val-fraction > 0)")
    shapes = tuple(tuple(to_tensor(decode_png(rows[0][c])).shape) for c in ("hr", "lr"))
    return EvalSet([r["key"] for r in rows], [r["hr"] for r in rows], [r["lr"] for r in rows], shapes)


def bicubic(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The bicubic baseline = the conditioning image x, (B, 1, 3, H, W)."""
    from sr3model.resample import upsample

    return upsample(lr, size).clamp(-1, 1)[:, None]


def check_model(model, data: EvalSet, label: str) -> None:
    """`model`: an SR3 or a ModelRef (anything with `.config` or `.config()`)."""
    cfg = model.config() if callable(getattr(model, "config", None)) else model.config
    if not cfg.conditional:
        raise ValueError(f"{label}: an unconditional model cannot be evaluated on LR/HR pairs")
    lr_px, hr_px = data.shapes[1][-1], data.shapes[0][-1]
    if cfg.scale * lr_px != hr_px:
        raise ValueError(f"{label}: the model upscales ×{cfg.scale}, the pairs are {lr_px}→{hr_px} px")


per_image, summarise = M.per_image, M.summarise  # the one table (sr3model.metrics)


def base_scores(images: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> dict[str, float]:
    """Set-level metrics (`summarise`) of outputs (B, N, 3, H, W)."""
    return M.scores(images, hr, lr)


def _weights(flag: str | None, env: str) -> str | None:
    return flag or os.environ.get(env) or None


class Perceptual:
    """FID / IS / LPIPS on local weight files; what cannot run becomes a note, never an error.

    Per method: `start()`, `update(outputs, hr)` for every batch, `compute()`. The real (HR)
    features of FID are collected during the first method's pass and kept for the others."""

    def __init__(self, wanted: Iterable[str] | None = None, *, fid_weights: str | None = None,
                 lpips_weights: str | None = None, device: str = "cpu", batch_size: int = 16):
        fid_path, lpips_path = _weights(fid_weights, FID_ENV), _weights(lpips_weights, LPIPS_ENV)
        wanted = set(wanted) if wanted is not None else (
            ({"fid", "is"} if fid_path else set()) | ({"lpips"} if lpips_path else set()))
        unknown = wanted - set(EXTRA_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(EXTRA_METRICS)}")
        self.notes: list[str] = []
        self.device, self.batch_size = device, batch_size
        self.fid = self.inception = self.lpips = None
        self.real_done, self.real, self.fake = False, 0, 0
        if wanted & {"fid", "is"}:
            self._load_inception(wanted & {"fid", "is"}, fid_path)
        if "lpips" in wanted:
            self._load_lpips(lpips_path)

    @property
    def available(self) -> list[str]:
        return [name for name, obj in (("fid", self.fid), ("is", self.inception), ("lpips", self.lpips)) if obj]

    def _skip(self, names: Iterable[str], why: str) -> None:
        self.notes.append(f"{'/'.join(n.upper() for n in sorted(names))} skipped: {why}")

    def _load_inception(self, names: set[str], path: str | None) -> None:
        if not path:
            return self._skip(names, f"no Inception weights; pass --fid-weights PATH or set {FID_ENV} "
                                     "(torch-fidelity's pt_inception-2015-12-05-6726825d.pth)")
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            return self._skip(names, "FID and IS need the torch-fidelity package (pip install torch-fidelity); "
                                     f"the Inception weights {path} are unused")
        if not Path(path).is_file():
            return self._skip(names, f"--fid-weights / {FID_ENV}: no such file {path}")
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
            from torchmetrics.image.inception import InceptionScore

            if "fid" in names:
                self.fid = FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                                    feature_extractor_weights_path=path).to(self.device)
            if "is" in names:
                net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                         feature_extractor_weights_path=path)
                self.inception = InceptionScore(feature=net, normalize=True).to(self.device)
        except Exception as error:  # a wrong or corrupt file: say so, go on with the rest
            self._skip(names, f"cannot load Inception weights {path}: {error}")

    def _load_lpips(self, path: str | None) -> None:
        if not path:
            return self._skip(["lpips"], f"no AlexNet weights; pass --lpips-weights PATH or set {LPIPS_ENV} "
                                         "(torchvision's alexnet-owt-7be5be79.pth)")
        try:
            self.lpips = M.load_lpips(path, self.device)
        except Exception as error:
            self._skip(["lpips"], f"cannot load AlexNet weights {path}: {error}")

    def _chunks(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), self.batch_size):
            yield images[start:start + self.batch_size].to(self.device)

    def start(self) -> None:
        self.fake = 0
        for metric in (self.fid, self.inception):
            if metric is not None:
                metric.reset()  # FID keeps its real features (reset_real_features=False)

    def update(self, images: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feed outputs (b, N, 3, H, W) and their HR; returns per-output LPIPS (b·N,) if available."""
        flat = images.reshape(-1, *images.shape[2:])
        self.fake += len(flat)
        if self.fid is not None:
            if not self.real_done:
                self.real += len(hr)
                for chunk in self._chunks(hr):
                    self.fid.update(M.to_unit(chunk), real=True)
            for chunk in self._chunks(flat):
                self.fid.update(M.to_unit(chunk), real=False)
        if self.inception is not None:
            for chunk in self._chunks(flat):
                self.inception.update(M.to_unit(chunk))
        if self.lpips is None:
            return {}
        hr_n = hr.repeat_interleave(images.shape[1], dim=0)
        return {"lpips": torch.cat([self.lpips(a, b).cpu() for a, b in zip(self._chunks(flat), self._chunks(hr_n))])}

    def compute(self) -> dict[str, float | None]:
        """FID and IS of everything fed since `start()` (None with fewer than 2 images)."""
        self.real_done = self.real_done or self.fid is not None
        out: dict[str, float | None] = {}
        if self.fid is not None:
            out["fid"] = float(self.fid.compute()) if min(self.real, self.fake) >= 2 else None
        if self.inception is not None:
            self.inception.splits = max(1, min(10, self.fake))
            out["is"] = float(self.inception.compute()[0]) if self.fake >= 2 else None
        return out


class Running:
    """One method's metrics, accumulated batch by batch (memory stays one batch)."""

    def __init__(self, perceptual: Perceptual | None = None):
        self.values: dict[str, list[torch.Tensor]] = {}
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.start()

    def add(self, images: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> None:
        self.add_values(per_image(images, hr, lr), images, hr)

    def add_values(self, found: dict[str, torch.Tensor], images: torch.Tensor | None = None,
                   hr: torch.Tensor | None = None) -> None:
        """Per-output values of `per_image` computed elsewhere (a sampling actor); the outputs and
        their HR are needed only for the perceptual metrics."""
        found = dict(found)
        if self.perceptual is not None and images is not None:
            found.update(self.perceptual.update(images, hr))
        for key, value in found.items():
            self.values.setdefault(key, []).append(value)

    def result(self) -> dict[str, float | None]:
        out: dict[str, float | None] = dict(summarise({k: torch.cat(v) for k, v in self.values.items()}))
        if self.perceptual is not None:
            out.update(self.perceptual.compute())
        return out


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
    cluster's actors (`pipelines.infer.scoring`, keyword args `where`) and aggregated here."""
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
             say: Say = print) -> EvalResult:
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
                            device=_device(None), batch_size=batch_size)
    for note in perceptual.notes:
        say(note)
    ref = resolve_model(model_uri, uri)
    chosen = sampling_for(ref, sampler=sampler, steps=steps, schedule=parse_schedule(schedule))
    models = [(ref, chosen)] + [(b, sampling_for(b, sampler=sampler, steps=steps))
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
                            f"({how.source}), {samples} sample(s) per pair"))
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
