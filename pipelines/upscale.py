"""Batch super-resolution of a bucket with Ray Data: list → decode → sample → encode + write.

    driver: resolve --model (pinned version, weights → object store), list INPUT, plan against
            OUTPUT/_manifest and OUTPUT/_rejects (pipelines.upscale_io.plan)
    from_items(to do) ─map_batches(decode_batch)───────── CPU tasks: fetch (threads) + decode
      ─map_batches(Upscaler, ActorPoolStrategy(W))─────── actors: the model loaded once per actor,
                                                          one GPU each, else one CPU each
                                                          (pipelines.runtime.place_sampling_actors)
      ─map_batches(write_batch)───────────────────────── CPU tasks: encode, atomic writes, manifest
    driver: iterates the small status rows (progress), writes OUTPUT/_SUMMARY.json

Memory stays bounded on large buckets: Ray Data streams blocks between the stages with
backpressure, and only the status rows come back to the driver.

Sampling: `pipelines.models.sampling_for` (flags, else the schedule stored by the search job for
these steps, else the model config). Each output's noise comes from its own generator, seeded by
`upscale_io.image_seed(seed, relpath, sample)`: reruns reproduce an image whatever its batch.
Images of the model's LR size are batched straight through; any other size (non-square too) goes
through `sr3model.tiling.super_resolve_any` (joint denoising of blended tiles; exact output size).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from pipelines import storage, upscale_io
from pipelines.models import ModelRef, Sampling, parse_schedule, resolve_model, sampling_for
from pipelines.runtime import WRITE_CPUS, WRITE_TASKS, input_blocks, sampling_workers

DEFAULT_MAX_OUTPUT_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class UpscaleOptions:
    samples: int = 1
    seed: int = 0
    batch_size: int = 8
    tile: int | None = None  # LR pixels; default the model's lr_size
    overlap: int | None = None  # LR pixels; default tile // 4
    threads: int = 0  # torch threads per CPU actor; 0 = the node's CPUs / actors on it


class Upscaler:
    """The actor of the sampling stage: holds one model; super-resolves batches of decoded rows."""

    def __init__(self, model: list, sampling: dict[str, Any], options: dict[str, Any]) -> None:
        import ray
        import torch

        config_json, weights = ray.get(model[0])
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.options = UpscaleOptions(**options)
        if self.device == "cpu" and self.options.threads:
            torch.set_num_threads(self.options.threads)
        from sr3model.weights import load_model_bytes

        self.model = load_model_bytes(config_json, weights, device=self.device)
        self.sampling = Sampling(**sampling)
        self.schedule = self.sampling.schedule(self.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = len(batch["source"])
        out = {"out": [b""] * rows, "seeds": [b""] * rows, "samples": [0] * rows, "out_height": [0] * rows,
               "out_width": [0] * rows, "tiles": [0] * rows, "seconds": [0.0] * rows}
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(rows):
            if not batch["reason"][i]:
                groups.setdefault((int(batch["height"][i]), int(batch["width"][i])), []).append(i)
        for (height, width), members in groups.items():
            for start in range(0, len(members), self.options.batch_size):
                self._run(batch, members[start:start + self.options.batch_size], height, width, out)
        return {**{k: list(v) for k, v in batch.items() if k != "pixels"}, **out}

    def _run(self, batch, members: list[int], height: int, width: int, out: dict[str, list]) -> None:
        import torch

        from sr3model.imageio import to_uint8_batch
        from sr3model.tiling import super_resolve_any, tile_starts

        opts, cfg = self.options, self.model.config
        started = time.perf_counter()
        pixels = np.stack([np.frombuffer(batch["pixels"][i], np.uint8).reshape(height, width, 3) for i in members])
        lr = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
        seeds = [[upscale_io.image_seed(opts.seed, str(batch["relpath"][i]), k) for k in range(opts.samples)]
                 for i in members]
        generators = [torch.Generator(device=self.device).manual_seed(s) for row in seeds for s in row]
        sr = super_resolve_any(self.model, lr, tile=opts.tile, overlap=opts.overlap, tile_batch=opts.batch_size,
                               sampler=self.sampling.sampler, schedule=self.schedule, samples=opts.samples,
                               generator=generators)  # (B, N, 3, H, W)
        images = to_uint8_batch(sr.flatten(0, 1).cpu()).reshape(len(members), opts.samples, *sr.shape[-2:], 3)
        tile = opts.tile or cfg.lr_size
        overlap = tile // 4 if opts.overlap is None else opts.overlap
        tiles = len(tile_starts(max(height, tile), tile, overlap)) * len(tile_starts(max(width, tile), tile, overlap))
        seconds = (time.perf_counter() - started) / len(members)
        for j, i in enumerate(members):
            out["out"][i] = np.ascontiguousarray(images[j]).tobytes()
            out["seeds"][i] = np.asarray(seeds[j], dtype=np.int64).tobytes()
            out["samples"][i], out["out_height"][i], out["out_width"][i] = opts.samples, *sr.shape[-2:]
            out["tiles"][i], out["seconds"][i] = tiles, seconds


def upscale(model_uri: str, input_uri: str, output_uri: str, *, steps: int | None = None,
            sampler: str | None = None, schedule: str | None = None, batch_size: int = 8, samples: int = 1,
            seed: int = 0, tile: int | None = None, overlap: int | None = None, fmt: str = "png",
            num_gpus_per_worker: float | None = None, workers: int | None = None,
            max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS, tracking_uri: str | None = None,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Super-resolve every new image under `input_uri` into `output_uri`; returns the summary."""
    started = time.perf_counter()
    if fmt not in upscale_io.FORMATS:
        raise ValueError(f"--format {fmt!r}: choose from {sorted(upscale_io.FORMATS)}")
    if samples < 1 or batch_size < 1:
        raise ValueError("--samples and --batch-size must be ≥ 1")
    ref = resolve_model(model_uri, tracking_uri)
    config = ref.config()
    if not config.conditional:
        raise ValueError(f"{model_uri} is an unconditional model: use jobs/cascade.py --base")
    chosen = sampling_for(ref, sampler=sampler, steps=steps, schedule=parse_schedule(schedule))
    progress(f"model {ref.label} ({config.name}, {config.objective}, ×{config.scale}); "
             f"{chosen.sampler}, {chosen.steps} steps, schedule {chosen.schedule_text} "
             f"(from {chosen.source})")

    listed = storage.list_files(input_uri)
    exclude = _listed_style(output_uri) if _inside(output_uri, input_uri) else None
    todo, rejects, counts = upscale_io.plan(listed, output_uri, fmt, samples, exclude)
    upscale_io.write_parts(output_uri, [], rejects)
    progress(f"listed {counts['listed']} files under {input_uri}: {len(todo)} to do, "
             f"{counts['skipped_done']} already done, {counts['skipped_rejected']} rejected before, "
             f"{len(rejects)} rejected by name")
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter(r["reason"] for r in rejects)
    if todo:
        gpus, workers, threads = sampling_workers(num_gpus_per_worker, workers, model_bytes=len(ref.weights),
                                                  blocks=input_blocks(len(todo), batch_size))
        options = UpscaleOptions(samples, seed, batch_size, tile, overlap, threads)
        statuses, more = _stream(ref, chosen, options, todo, output_uri, fmt, gpus, workers, max_output_pixels,
                                 progress)
        reasons.update(more)
    summary = {
        "model": ref.pinned, "model_name": ref.name, "model_version": ref.version, **chosen.record(),
        "input": input_uri, "output": output_uri, "format": fmt, "samples": samples, "seed": seed,
        "listed": counts["listed"], "done": statuses["done"], "skipped": counts["skipped_done"],
        "skipped_rejected": counts["skipped_rejected"], "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "elapsed_s": round(time.perf_counter() - started, 3),
        "finished_at": upscale_io.now(),
    }
    storage.write_bytes(storage.join(output_uri, upscale_io.SUMMARY_NAME), json.dumps(summary, indent=2).encode())
    return summary


def _stream(ref: ModelRef, chosen: Sampling, options: UpscaleOptions, todo: list[dict[str, Any]], output: str,
            fmt: str, gpus: float, workers: int, max_output_pixels: int,
            progress: Callable[[str], None]) -> tuple[Counter, Counter]:
    import ray
    import ray.data

    scale = ref.config().scale
    model = ray.put((ref.config_json, ref.weights))
    record = {**ref.record(), **chosen.record()}  # the manifest's model and sampling columns
    batch = options.batch_size
    dataset = (
        ray.data.from_items(todo, override_num_blocks=input_blocks(len(todo), batch))
        .map_batches(upscale_io.decode_batch, fn_kwargs={"max_output_pixels": max_output_pixels, "scale": scale},
                     batch_size=batch, batch_format="numpy", num_cpus=1)
        .map_batches(Upscaler, fn_constructor_kwargs={"model": [model], "sampling": asdict(chosen),
                                                      "options": asdict(options)},
                     compute=ray.data.ActorPoolStrategy(size=workers), batch_size=batch, batch_format="numpy",
                     num_gpus=gpus or None, num_cpus=0 if gpus else 1)
        .map_batches(upscale_io.write_batch, fn_kwargs={"output": output, "fmt": fmt, "record": record},
                     batch_size=batch, batch_format="numpy", num_cpus=WRITE_CPUS,
                     compute=ray.data.TaskPoolStrategy(size=WRITE_TASKS))
    )
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    shown = time.perf_counter()
    for rows in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        statuses.update(str(s) for s in rows["status"])
        reasons.update(str(r) for r in rows["reason"] if r)
        for source, reason in zip(rows["source"], rows["reason"]):
            if reason and reasons[str(reason)] <= 3:
                progress(f"rejected {source}: {reason}")
        if time.perf_counter() - shown > 10:
            progress(f"{sum(statuses.values())}/{len(todo)} processed ({statuses['done']} written)")
            shown = time.perf_counter()
    return statuses, reasons


def _listed_style(uri: str) -> str:
    """`uri` as `storage.list_files` spells its files (absolute local paths)."""
    return os.path.abspath(storage.resolve(uri)[1]) if storage.protocol(uri) in ("file", "local") else uri


def _inside(output: str, input_uri: str) -> bool:
    """Whether the output prefix lies inside the input (then its files are not inputs)."""
    if storage.protocol(output) != storage.protocol(input_uri):
        return False
    out, inp = storage.resolve(output)[1].rstrip("/"), storage.resolve(input_uri)[1].rstrip("/")
    if storage.protocol(output) in ("file", "local"):
        out, inp = os.path.abspath(out), os.path.abspath(inp)
    return out == inp or out.startswith(inp + "/")
