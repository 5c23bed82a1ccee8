"""The driver side of evaluation and schedule search: work items out to the actor pool, metric
values back, in item order.

    driver: val pairs (PNG bytes) and every model's weights → object store once
    from_items(work items) ─map_batches(PairScorer, actor pool, one item per call)─> payloads
    driver: iterates the payloads in item order (preserve_order) and only aggregates

A work item is (method, pairs start:stop, sampler, K, β_1, β_K, keep): pairs are sampled with the
noise of `image_seed(seed, pair key, k)`, so results do not depend on which actor took the item.
`on_cluster=False` runs the same `score_item` in this process (no Ray).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from typing import Any

ITEM_FIELDS = ("method", "trial", "start", "stop", "sampler", "steps", "beta_start", "beta_end", "keep")


def work_item(method: int, trial: int, start: int, stop: int, sampling, keep: bool) -> dict[str, Any]:
    """A work item as plain columns; a default (log-SNR) schedule travels as NaN β (`item_sampling`)."""
    def beta(value: float | None) -> float:
        return float("nan") if value is None else float(value)
    return {"method": method, "trial": trial, "start": start, "stop": stop, "sampler": sampling.sampler,
            "steps": int(sampling.steps), "beta_start": beta(sampling.beta_start),
            "beta_end": beta(sampling.beta_end), "keep": bool(keep)}


def item_sampling(item: dict[str, Any]):
    """The `Sampling` of a work item (the inverse of `work_item`'s columns)."""
    import math

    from pipelines.sampling import Sampling

    start, end = float(item["beta_start"]), float(item["beta_end"])
    explicit = not (math.isnan(start) or math.isnan(end))
    return Sampling(str(item["sampler"]), int(item["steps"]), start if explicit else None, end if explicit else None, "")


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

    from pipelines.infer.actors import PairScorer
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
    import os

    import torch

    from pipelines.infer.actors import score_item

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
