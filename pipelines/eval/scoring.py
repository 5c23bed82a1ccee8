"""The driver side of evaluation and schedule search: work items out to the actor pool, metric
values back, in item order.

    driver: val pairs (PNG bytes) and every model's weights → object store once
    from_items(work items) ─map_batches(PairScorer, actor pool, one item per call)─> payloads
    driver: iterates the payloads in item order (preserve_order) and only aggregates: `grouped`
            folds each method's (or trial's) consecutive items into one `Running`

A work item is (method, pairs start:stop, sampler, K, β_1, β_K, keep): pairs are sampled with the
noise of `image_seed(seed, pair key, k)`, so results do not depend on which actor took the item.
`PairScorer` is the actor; `on_cluster=False` runs the same `score_item` in this process (no Ray).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.eval.measures import Running
from pipelines.infer.placement import setup_actor
from pipelines.sampling import Layout, Sampling, sample_batches

ITEM_FIELDS = ("method", "trial", "start", "stop", "sampler", "steps", "beta_start", "beta_end", "consistency",
               "keep")


def work_item(method: int, trial: int, start: int, stop: int, sampling, keep: bool) -> dict[str, Any]:
    """A work item as plain columns; a default (log-SNR) schedule travels as NaN β (`item_sampling`)."""
    def beta(value: float | None) -> float:
        return float("nan") if value is None else float(value)
    return {"method": method, "trial": trial, "start": start, "stop": stop, "sampler": sampling.sampler,
            "steps": int(sampling.steps), "beta_start": beta(sampling.beta_start),
            "beta_end": beta(sampling.beta_end), "consistency": bool(sampling.consistency), "keep": bool(keep)}


def item_sampling(item: dict[str, Any]):
    """The `Sampling` of a work item (the inverse of `work_item`'s columns)."""
    import math

    start, end = float(item["beta_start"]), float(item["beta_end"])
    explicit = not (math.isnan(start) or math.isnan(end))
    return Sampling(str(item["sampler"]), int(item["steps"]), start if explicit else None, end if explicit else None, "",
                    bool(item.get("consistency", False)))


@dataclass
class Group:
    """One method's (or schedule trial's) results, folded from its consecutive work items."""

    id: int  # the items' `key` value (method or trial index)
    running: Running
    kept: list = field(default_factory=list)  # outputs (b, N, 3, H, W) of the first `keep` pairs
    workers: set = field(default_factory=set)  # the processes that sampled it
    gamma_k: float = 0.0  # the first (noisiest) level of its schedule

    @property
    def outputs(self):
        import torch

        return torch.cat(self.kept) if self.kept else None


def grouped(stream: Iterator[tuple[dict[str, Any], dict[str, Any]]], key: str, data, perceptual, *,
            keep: int = 0, on_item=None) -> Iterator[Group]:
    """Fold an ordered stream of (item, result) — `score`'s — into one `Group` per run of equal
    `item[key]`: the per-output values into a `Running` (with the outputs and their HR for the
    perceptual metrics when `perceptual` has any), the outputs of the first `keep` pairs kept.
    `on_item(item)` is called after each item (progress)."""
    import torch

    whole = perceptual is not None and bool(perceptual.available)  # FID/IS/LPIPS need every output
    group = None
    for item, result in stream:
        if group is None or item[key] != group.id:
            if group is not None:
                yield group
            group = Group(item[key], Running(perceptual))
        images = torch.from_numpy(result["images"]) if result["images"] is not None else None
        hr = data.batch(item["start"], item["stop"])[0] if whole else None
        group.running.add_values({k: torch.from_numpy(v) for k, v in result["values"].items()}, images, hr)
        if item["start"] < keep:
            group.kept.append(images[:keep - item["start"]])
        group.workers.add(tuple(sorted(result["worker"].items())))
        group.gamma_k = float(result.get("gamma_K", 0.0))
        if on_item is not None:
            on_item(item)
    if group is not None:
        yield group


def ray_connected() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def score(refs: Sequence, data, items: list[dict[str, Any]], *, samples: int, seed: int, batch_size: int,
          on_cluster: bool | None = None, device: str = "auto", workers: int | None = None,
          num_gpus_per_worker: float | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(item, result of `score_item`) for every item, in order. `on_cluster` None: on the Ray
    cluster when this process is connected to one, else here."""
    options = {"samples": samples, "seed": seed, "batch_size": batch_size}
    if on_cluster is None:
        on_cluster = ray_connected()
    if not on_cluster:
        yield from _here(refs, data, items, options, device)
        return
    import ray
    import ray.data

    from pipelines.infer.placement import sampling_placement

    placement = sampling_placement(num_gpus_per_worker, workers, device=device,
                                   model_bytes=sum(len(ref.weights) for ref in refs), blocks=len(items))
    models = [ray.put((ref.config_json, ref.weights)) for ref in refs]
    pairs = ray.put((data.keys, data.hr_png, data.lr_png, data.shapes))
    rows = [{**item, "index": i} for i, item in enumerate(items)]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 1000))).map_batches(
        PairScorer, fn_constructor_kwargs={"models": models, "pairs": [pairs], "options": {
            **options, "device": placement.device, "threads": placement.threads}},
        batch_size=1, batch_format="numpy", **placement.map_kwargs())
    dataset.context.execution_options.preserve_order = True
    for row in dataset.iter_rows():
        yield items[int(row["index"])], pickle.loads(row["payload"])


def _here(refs, data, items, options: dict[str, Any], device: str) -> Iterator[tuple[dict, dict]]:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device
    models: dict[int, Any] = {}
    for item in items:
        method = item["method"]
        if method not in models:
            models.clear()  # one model in memory at a time
            models[method] = refs[method].load(device)
        model = models[method]
        sampling = item_sampling(item)
        result = score_item(model, data, item["start"], item["stop"], sampling=sampling,
                            schedule=sampling.schedule(model), samples=options["samples"], seed=options["seed"],
                            batch_size=options["batch_size"], keep_images=item["keep"])
        result["worker"] = {"pid": os.getpid(), "node": "driver", "device": device}
        yield item, result


class PairScorer:
    """Actor of evaluation and schedule search: the models and the val pairs; work items → metric
    values per output (and the outputs when asked), one pickled payload per item."""

    def __init__(self, models: list, pairs: list, options: dict[str, Any]) -> None:
        import ray

        from pipelines.eval.data import EvalSet
        from sr3model.weights import load_model_bytes

        self.device = setup_actor(options["device"], options["threads"])
        self.models = [load_model_bytes(*ray.get(ref), device=self.device) for ref in models]
        self.data = EvalSet(*ray.get(pairs[0]))
        self.options = options
        self.schedules: dict[tuple, Any] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import ray

        payloads = []
        for i in range(len(batch["start"])):
            item = {k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()}
            model = self.models[int(item["method"])]
            sampling = item_sampling(item)
            key = (int(item["method"]), sampling.steps, sampling.beta_start, sampling.beta_end)  # the schedule's
            if key not in self.schedules:
                self.schedules[key] = sampling.schedule(model)
            result = score_item(model, self.data, int(item["start"]), int(item["stop"]), sampling=sampling,
                                schedule=self.schedules[key], samples=self.options["samples"],
                                seed=self.options["seed"], batch_size=self.options["batch_size"],
                                keep_images=bool(item["keep"]))
            result["worker"] = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                                "device": self.device}
            payloads.append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return {"index": list(batch["index"]), "payload": payloads}


def score_item(model, data, start: int, stop: int, *, sampling: Sampling, schedule, samples: int, seed: int,
               batch_size: int, keep_images: bool) -> dict[str, Any]:
    """Sample pairs start..stop-1 of `data` (N = 1 for a regression model) and score them with
    `sr3model.metrics.per_image`: {"values": {metric: per-output array}, "images": (b, N, 3, H, W)
    float32 or None, "seconds"}. A sampling failure raises: an evaluation cannot skip pairs."""
    import torch

    from sr3model.metrics import per_image

    started = time.perf_counter()
    hr, lr = data.batch(start, stop)
    n = 1 if model.config.objective == "regression" else samples
    pixels = ((lr + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # the decoded PNGs
    keys = data.keys[start:stop]
    images = torch.empty(len(keys), n, 3, *hr.shape[-2:])
    for sampled in sample_batches(model, list(pixels), keys, sampling=sampling, schedule=schedule, samples=n,
                                  seed=seed, layout=Layout(batch_size)):
        if sampled.outputs is None:
            raise RuntimeError(f"sampling pair {keys[sampled.units[0][0]]} failed: {sampled.detail}")
        for u, (j, k) in enumerate(sampled.units):
            images[j, k] = sampled.outputs[u]
    values = {k: v.detach().cpu().numpy() for k, v in per_image(images, hr, lr).items()}
    return {"values": values, "images": images.numpy() if keep_images else None,
            "gamma_K": float(schedule.gammas[-1]), "seconds": time.perf_counter() - started}
