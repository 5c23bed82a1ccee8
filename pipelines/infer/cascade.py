"""Cascaded generation (SR3 §4.3 / the paper's cascade): an unconditional base model samples
low-resolution images from noise, then each SR stage super-resolves the previous stage's output.

    driver: resolve --base and every --stage (pinned versions, weights → object store), plan the
            sample indices whose final image is not in OUTPUT/_manifest yet
    from_items(indices) ─map_batches(CascadeSampler, ActorPoolStrategy(W))─ all models in each
                          actor; base DDPM from noise, then stage by stage (any size: tiled)
      ─map_batches(infer.bucket.write_batch)─ the same atomic writes and manifest as jobs/upscale.py

Between stages the image is quantised to 8 bits, exactly as if it had been saved and upscaled by
`jobs/upscale.py`. Output: `OUTPUT/sample_<i>.<format>` (the last stage) and, with
`keep_intermediate`, `OUTPUT/intermediate/stage<k>_<size>px/sample_<i>.<format>`; one manifest row per
written image, naming the model, sampler, steps and schedule of the stage that made it (`source`
is the previous stage's image, `noise` for the base). Noise: stage k of sample i draws from its
own generator seeded by `image_seed(seed, "sample_<i>", k)`, so reruns reproduce a sample.
Steps may differ per stage (the paper uses more steps at low resolution).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

from pipelines import storage
from pipelines.infer import bucket, manifest
from pipelines.infer.layout import EXTENSIONS, SUMMARY_NAME
from pipelines.infer.placement import setup_actor, input_blocks, sampling_placement
from pipelines.sampling import Sampling, image_seed
from pipelines.registry.models import resolve_model, sampling_for
from pipelines.runtime import init_ray

SAMPLE_NAME = "sample_{:06d}"


class CascadeSampler:
    """Actor: the base and every stage model; one batch of sample indices → every stage's images."""

    def __init__(self, models: list, samplings: list[dict[str, Any]], records: list[dict[str, str]],
                 options: dict[str, Any]) -> None:
        import ray

        from sr3model.weights import load_model_bytes

        self.device = setup_actor(options["device"], options["threads"])
        self.models = [load_model_bytes(*ray.get(ref), device=self.device) for ref in models]
        self.samplings = [Sampling(**s) for s in samplings]
        self.schedules = [s.schedule(m) for s, m in zip(self.samplings, self.models)]
        self.records, self.options = records, options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        from sr3model.imageio import to_uint8_batch
        from sr3model.tiling import super_resolve_any

        names = [SAMPLE_NAME.format(int(i)) for i in batch["index"]]
        seed, keep, last = self.options["seed"], self.options["keep_intermediate"], len(self.models) - 1
        rows: dict[str, list] = {}
        images = None  # (B, h, w, 3) uint8 of the previous stage
        for k, (model, sampling, schedule) in enumerate(zip(self.models, self.samplings, self.schedules)):
            started = time.perf_counter()
            seeds = [image_seed(seed, name, k) for name in names]
            generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
            if images is None:
                out = model.super_resolve(None, batch=len(names), sampler=sampling.sampler, schedule=schedule,
                                          generator=generators)
            else:
                lr = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
                out = super_resolve_any(model, lr, sampler=sampling.sampler, schedule=schedule,
                                        generator=generators, tile_batch=self.options["batch_size"],
                                        consistency=sampling.consistency)
            previous = images
            images = to_uint8_batch(out[:, 0].cpu())
            seconds = (time.perf_counter() - started) / len(names)
            if k == last or keep:
                folder = "" if k == last else f"intermediate/stage{k}_{images.shape[1]}px/"
                before = "noise" if k == 0 else f"intermediate/stage{k - 1}_{previous.shape[1]}px/"
                for j, name in enumerate(names):
                    self._add(rows, {
                        **self.records[k], **sampling.record(),
                        "source": "noise" if k == 0 else f"{before}{name}.{self.options['ext']}", "relpath": f"{folder}{name}",
                        "input_bytes": 0, "reason": "", "detail": "", "samples": 1,
                        "height": 0 if previous is None else previous.shape[1],
                        "width": 0 if previous is None else previous.shape[2],
                        "out": np.ascontiguousarray(images[j]).tobytes(),
                        "seeds": np.asarray([seeds[j]], np.int64).tobytes(),
                        "out_height": images.shape[1], "out_width": images.shape[2], "tiles": 0,
                        "batch_pixels": len(names) * images.shape[1] * images.shape[2], "seconds": seconds})
        return rows

    @staticmethod
    def _add(rows: dict[str, list], row: dict[str, Any]) -> None:
        for key, value in row.items():
            rows.setdefault(key, []).append(value)


def cascade(base_uri: str, stage_uris: list[str], num_samples: int, output_uri: str, *,
            steps: list[int] | None = None, seed: int = 0, batch_size: int = 4, fmt: str = "png",
            keep_intermediate: bool = False, workers: int | None = None,
            num_gpus_per_worker: float | None = None, tracking_uri: str | None = None,
            progress: Callable[[str], None] = print, device: str = "auto",
            ray_address: str | None = None, consistency: bool | None = None) -> dict[str, Any]:
    """Generate `num_samples` images through the cascade into `output_uri`; returns the summary.
    Connects to Ray (`pipelines.runtime.init_ray`) once the models are resolved and checked.
    `consistency`: the SR stages' LR-consistent sampling (None: each model's default)."""
    import ray
    import ray.data

    started = time.perf_counter()
    refs = [resolve_model(uri, tracking_uri) for uri in [base_uri, *stage_uris]]
    if refs[0].config().conditional:
        raise ValueError(f"--base {base_uri} is a {refs[0].config().objective!r} model; the base of a cascade "
                         "is trained with --objective unconditional")
    for uri, ref in zip(stage_uris, refs[1:]):
        if not ref.config().conditional:
            raise ValueError(f"--stage {uri} is unconditional; stages are super-resolution models")
    steps = steps or []
    if len(steps) not in (0, 1, len(refs)):
        raise ValueError(f"--steps: give one value, or one per model ({len(refs)}: base + {len(stage_uris)} stages)")
    per_model = [steps[0] if len(steps) == 1 else (steps[k] if steps else None) for k in range(len(refs))]
    samplings = [sampling_for(ref, steps=k, consistency=consistency) for ref, k in zip(refs, per_model)]
    size = refs[0].config().hr_size
    for k, (ref, sampling) in enumerate(zip(refs, samplings)):
        size = size if k == 0 else size * ref.config().scale
        progress(f"stage {k}: {ref.label} → {size}px, {sampling.sampler} {sampling.steps} steps "
                 f"({sampling.source} schedule {sampling.schedule_text})")

    init_ray(ray_address)
    final = [f"{SAMPLE_NAME.format(i)}.{EXTENSIONS[fmt]}" for i in range(num_samples)]
    done = set(manifest.read_table(output_uri, manifest.MANIFEST_DIR, ["output"]).column("output").to_pylist())
    todo = [{"index": i} for i, name in enumerate(final) if name not in done]
    progress(f"{num_samples} samples: {len(todo)} to do, {num_samples - len(todo)} already done")
    statuses: Counter[str] = Counter()
    if todo:
        placement = sampling_placement(num_gpus_per_worker, workers, device=device,
                                       model_bytes=sum(len(ref.weights) for ref in refs),
                                       blocks=input_blocks(len(todo), batch_size))
        models = [ray.put((ref.config_json, ref.weights)) for ref in refs]
        record = {**refs[-1].record(), **samplings[-1].record()}  # columns; rows carry their stage's values
        dataset = (
            ray.data.from_items(todo, override_num_blocks=input_blocks(len(todo), batch_size))
            .map_batches(CascadeSampler, fn_constructor_kwargs={
                "models": models, "samplings": [asdict(s) for s in samplings],
                "records": [ref.record() for ref in refs],
                "options": {"seed": seed, "keep_intermediate": keep_intermediate, "batch_size": batch_size,
                            "threads": placement.threads, "device": placement.device, "ext": EXTENSIONS[fmt]}},
                batch_size=batch_size, batch_format="numpy", udf_modifying_row_count=True, **placement.map_kwargs())
            .map_batches(bucket.write_batch, fn_kwargs={"output": output_uri, "fmt": fmt, "record": record},
                         batch_size=None, batch_format="numpy", **placement.write_kwargs())
        )
        for rows in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            statuses.update(str(s) for s in rows["status"])
    summary = {
        "base": refs[0].pinned, "stages": [ref.pinned for ref in refs[1:]],
        "sampling": [s.record() for s in samplings], "output": output_uri, "format": fmt, "seed": seed,
        "num_samples": num_samples, "done": len(todo), "skipped": num_samples - len(todo),
        "images_written": statuses["done"], "elapsed_s": round(time.perf_counter() - started, 3),
        "finished_at": manifest.now(),
    }
    manifest.compact(output_uri)
    storage.write_bytes(storage.join(output_uri, SUMMARY_NAME), json.dumps(summary, indent=2).encode())
    return summary
