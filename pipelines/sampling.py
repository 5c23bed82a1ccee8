"""The one sampling path: LR pixels → SR samples, for every consumer of a model.

    pipelines.infer.actors.Upscaler  (jobs/upscale.py)          ┐
    pipelines.infer.actors.PairScorer (evaluate, search_schedule) ├─ plan_batches ─ sample_batches ─┐
    pipelines.registry.pyfunc (mlflow.pyfunc, `mlflow models serve`)      ┘                                 │
        model.super_resolve (the model's LR size) | sr3model.tiling.super_resolve_any (any other) <─┘

Only torch, numpy and sr3model are imported here — no Ray, MLflow or fsspec — so the pyfunc can
ship this file and a GPU machine without Ray can run it.

- Settings: `Sampling` (sampler, K, β_1, β_K, LR consistency) is chosen once per run by
  `choose_sampling`: flags, else what is stored with the model version for (K, sampler), else the
  model config's (`diffusion.sample_*`; `sample_consistency`: every step's ŷ0 projected onto the
  images whose downsampling is the LR input, `sr3model.consistency`). A distilled K-step student
  (`sr3model.distill`) samples only as it was trained: `distilled` at its K levels (LR consistency
  is a denoiser wrapper, so it applies to the student as to any sampler: flag, else its config's);
  other settings are refused with one line, and `distilled` is refused for other models.
- Noise: output k of the image named `name` draws from its own generator seeded by
  `image_seed(seed, name, k)`, so an output is the same whatever its batch, worker or run.
- Size: an image of the model's LR size goes straight through the network (tiling it would only
  narrow the network's view); any other size, non-square too, through `super_resolve_any`: tiles
  of `tile` LR pixels sharing `overlap`, blended at every step; the output is exactly scale × it.
- Memory: the work is (image, sample) units, grouped by size and packed into batches of at most
  `batch_size` outputs and `max_batch_pixels` output pixels (`plan_batches`); a unit larger than
  the cap runs alone. The default cap (`default_max_batch_pixels`) gives a quarter of the device's
  memory to the canvases, ~`BYTES_PER_OUTPUT_PIXEL` each; `batch_size` also bounds the tiles per
  network call, hence the activations.
- Budget: an actor that knows its memory budget (its share of its node's memory on CPU, of its
  GPU's memory with a fractional GPU: `memory_budget`) caps its batches by it, and an output that
  alone would need more than ALONE_FRACTION of it (`largest_output_pixels`) is not sampled at all:
  the caller rejects it as `too_large` before it can exhaust the actor's memory.
- Failures: a batch that raises is split in halves and each half retried, down to single units
  (`sample_batches`); a unit that fails alone comes back with its reason — `out_of_memory` or
  `sample_failed` — and the detail, and the rest go on.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

Unit = tuple[int, int]  # (image index, sample index)
BYTES_PER_OUTPUT_PIXEL = 10 * 3 * 4  # ~10 live fp32 RGB canvases per output while sampling
MEMORY_FRACTION = 0.25  # of the device's memory given to one actor's canvases by default
ALONE_FRACTION = 0.5  # of an actor's budget one output sampled alone may take (weights, activations: the rest)
TRANSIENT_FAILURES = ("out_of_memory", "sample_failed")


@dataclass(frozen=True)
class Sampling:
    """How to sample: sampler, number of steps K and, for a linear schedule, its β_1, β_K (None:
    the config's default schedule, K levels uniform in log-SNR; `sr3model.schedules`), and whether
    each step's ŷ0 is made consistent with the LR input (`sr3model.consistency`)."""

    sampler: str
    steps: int
    beta_start: float | None
    beta_end: float | None
    source: str  # "flags", "search" or "config": where the schedule came from
    consistency: bool = False
    levels: str = "log-snr"  # the config's default schedule when β_1, β_K are None ("student": its K levels)

    def schedule(self, model):
        """The K-step schedule; an explicit linear one that starts above the training schedule's
        last γ raises ValueError naming γ_K (`sr3model.schedules.check_start`)."""
        return model.inference_schedule(self.steps, self.beta_start, self.beta_end)

    @property
    def schedule_text(self) -> str:
        return self.levels if self.beta_start is None else f"{self.beta_start:g},{self.beta_end:g}"

    def record(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "schedule": self.schedule_text,
                "schedule_source": self.source, "consistency": self.consistency}


def choose_sampling(config, stored: dict[int, dict[str, Any]], *, sampler: str | None = None,
                    steps: int | None = None, schedule: tuple[float, float] | None = None,
                    consistency: bool | None = None, lenient: bool = False) -> Sampling:
    """Flags win; else the schedule stored for (steps, sampler) by the search; else the config's.
    An explicit schedule is checked here, so a bad one is an input error before any work starts.
    `consistency` likewise: the flag, else the stored entry's, else `diffusion.sample_consistency`
    (false for configs written before it existed).

    A distilled student samples only with `distilled` at its K levels, and only a student with
    `distilled`: other flags are a ValueError — unless `lenient` (flags given for other models of
    the same run, e.g. an evaluation's baselines), where a student keeps its own way and another
    model asked for `distilled` its config's sampler. `consistency` applies to a student too."""
    from sr3model.schedules import check_start, linear_schedule

    diffusion = config.diffusion
    if config.distill.student_steps:
        chosen = _student_sampling(config, *((None, None, None) if lenient else (sampler, steps, schedule)))
        consistency = diffusion.sample_consistency if consistency is None else consistency
        return replace(chosen, consistency=bool(consistency))
    if sampler == "distilled":
        if not lenient:
            _student_sampling(config, sampler, steps, schedule)  # raises: not a student
        sampler = None
    sampler = sampler or diffusion.sample_sampler
    steps = steps or diffusion.sample_steps
    found = stored.get(steps)
    found = found if found and found.get("sampler", sampler) == sampler else None
    if consistency is None:
        consistency = bool(found.get("consistency", diffusion.sample_consistency) if found
                           else diffusion.sample_consistency)
    if schedule is not None:
        check_start(linear_schedule(steps, float(schedule[0]), float(schedule[1])), diffusion)
        return Sampling(sampler, steps, float(schedule[0]), float(schedule[1]), "flags", consistency)
    if found and "beta_start" in found:
        start, end = float(found["beta_start"]), float(found["beta_end"])
        check_start(linear_schedule(steps, start, end), diffusion)  # stored by an older search: may be invalid
        return Sampling(sampler, steps, start, end, "search", consistency)
    if diffusion.sample_schedule == "linear":
        return Sampling(sampler, steps, diffusion.sample_beta_start, diffusion.sample_beta_end, "config", consistency)
    return Sampling(sampler, steps, None, None, "config", consistency)


def _student_sampling(config, sampler: str | None, steps: int | None,
                      schedule: tuple[float, float] | None) -> Sampling:
    """A distilled student's one way to sample, or ValueError naming what does not fit."""
    k = config.distill.student_steps
    if not k:
        raise ValueError(f"sampler 'distilled' runs distilled students (jobs/distill.py); this "
                         f"{config.objective} model is not one: choose ddpm, ddim or dpmpp-2m")
    wrong = []
    if sampler not in (None, "distilled"):
        wrong.append(f"--sampler {sampler}")
    if steps not in (None, k):
        wrong.append(f"--steps {steps}")
    if schedule is not None:
        wrong.append("--schedule")
    if wrong:
        raise ValueError(f"a {k}-step distilled student samples with 'distilled' at its own {k} levels only "
                         f"(its teacher: {config.distill.teacher or '?'}); drop {', '.join(wrong)}")
    return Sampling("distilled", k, None, None, "config", levels=config.diffusion.sample_schedule)


@dataclass(frozen=True)
class Layout:
    """How outputs are batched and tiled (LR pixels for `tile` and `overlap`)."""

    batch_size: int = 8  # outputs per sampling call, and tiles per network call
    max_batch_pixels: int | None = None  # output pixels per sampling call; None: the device's default
    tile: int | None = None  # default: the model's lr_size
    overlap: int | None = None  # default: tile // 4

    def tiling(self, config) -> tuple[int, int]:
        """(tile, overlap) resolved against the model config."""
        tile = self.tile or config.lr_size
        return tile, tile // 4 if self.overlap is None else self.overlap


@dataclass
class Sampled:
    """One sampling call's outcome: outputs (U, 3, H, W) in [-1, 1] on the CPU for `units`, or the
    reason they failed (then `outputs` is None)."""

    units: list[Unit]
    outputs: torch.Tensor | None
    reason: str = ""
    detail: str = ""
    pixels: int = 0  # output pixels sampled together in the call that made (or failed) these
    seconds: float = 0.0


def image_seed(seed: int, name: str, sample: int) -> int:
    """The noise seed of one output: a hash of (run seed, input name, sample index), so an image's
    sample does not depend on batching, workers or which run wrote it."""
    digest = hashlib.blake2b(f"{seed}:{name}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def default_max_batch_pixels(device: str, actors_per_node: int | None = None) -> int:
    """Output pixels per sampling call that keep the canvases within MEMORY_FRACTION of the
    device: a GPU's memory, or on CPU the node's memory shared by its actors (one per CPU)."""
    if str(device).startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, actors_per_node or os.cpu_count() or 1)
    return max(1, int(total * MEMORY_FRACTION) // BYTES_PER_OUTPUT_PIXEL)


def memory_budget(device: str, gpus: float = 1.0, memory_bytes: int = 0) -> int:
    """Bytes one sampling actor may use: on a GPU `gpus` (its fraction) × the device's memory; on
    CPU `memory_bytes` (its share of its node, from the placement), else this machine's memory."""
    if str(device).startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return int(total * min(1.0, gpus or 1.0))
    return int(memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def budget_max_batch_pixels(budget: int) -> int:
    """The default canvas cap of an actor with `budget` bytes: MEMORY_FRACTION of it."""
    return max(1, int(budget * MEMORY_FRACTION) // BYTES_PER_OUTPUT_PIXEL)


def largest_output_pixels(budget: int) -> int:
    """Output pixels of the largest output an actor with `budget` bytes samples (alone)."""
    return max(1, int(budget * ALONE_FRACTION) // BYTES_PER_OUTPUT_PIXEL)


def plan_batches(sizes: Sequence[tuple[int, int]], samples: int, scale: int, batch_size: int,
                 max_batch_pixels: int) -> list[list[Unit]]:
    """Units (image, sample) of LR images of `sizes` (h, w), grouped by size in order of first
    appearance, packed into batches of ≤ `batch_size` units and ≤ `max_batch_pixels` output pixels."""
    groups: dict[tuple[int, int], list[Unit]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).extend((i, k) for k in range(samples))
    batches = []
    for (h, w), units in groups.items():
        per_batch = max(1, min(batch_size, max_batch_pixels // (h * w * scale * scale)))
        batches.extend(units[start:start + per_batch] for start in range(0, len(units), per_batch))
    return batches


def lr_tensor(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 or uint16 (h, w, 3) images of one size → float (B, 3, h, w) in [-1, 1]: each image
    by its own depth (0 → -1, its maximum → 1), so a 16-bit input gives the model its float values,
    not an 8-bit quantisation, and a batch may mix depths."""
    tensors = [torch.from_numpy(np.asarray(p, np.float32)).div(np.iinfo(p.dtype).max / 2).sub(1) for p in pixels]
    return torch.stack(tensors).permute(0, 3, 1, 2)


def quantise(outputs: torch.Tensor, bits: int) -> np.ndarray:
    """Model outputs (B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8 (`bits` 8, as
    `sr3model.imageio.to_uint8_batch`) or uint16 (`bits` 16: 16-bit outputs from the float output)."""
    from sr3model.imageio import to_uint8_batch

    if bits == 8:
        return to_uint8_batch(outputs)
    pixels = ((outputs.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 32767.5).round()
    return pixels.to(torch.int32).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint16)


def failure_reason(error: BaseException) -> str:
    """`out_of_memory` for an allocation failure (CUDA or CPU), else `sample_failed`."""
    text = str(error).lower()
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "out_of_memory"
    return "sample_failed"


def sample_units(model, images: Sequence[np.ndarray], names: Sequence[str], units: Sequence[Unit], *,
                 sampling: Sampling, schedule, seed: int, layout: Layout) -> torch.Tensor:
    """Outputs (U, 3, H, W) on the CPU for `units` of same-size uint8/uint16 LR `images` named `names`."""
    from sr3model.tiling import super_resolve_any

    cfg = model.config
    device = next(model.parameters()).device
    lr = lr_tensor([images[i] for i, _ in units]).to(device)
    generators = [torch.Generator(device=device).manual_seed(image_seed(seed, names[i], k)) for i, k in units]
    kwargs = dict(sampler=sampling.sampler, schedule=schedule, generator=generators, consistency=sampling.consistency)
    if tuple(lr.shape[-2:]) == (cfg.lr_size, cfg.lr_size):
        out = model.super_resolve(lr, **kwargs)
    else:
        tile, overlap = layout.tiling(cfg)
        out = super_resolve_any(model, lr, tile=tile, overlap=overlap, tile_batch=layout.batch_size, **kwargs)
    return out[:, 0].cpu()  # (U, 3, H, W)


def sample_batches(model, images: Sequence[np.ndarray], names: Sequence[str], *, sampling: Sampling,
                   schedule=None, samples: int = 1, seed: int = 0, layout: Layout = Layout()) -> Iterator[Sampled]:
    """Sample `samples` outputs of every uint8 or uint16 (h, w, 3) LR image; yields one `Sampled` per call
    (or per failed unit) as it finishes. Any mix of sizes; failures are isolated (module docstring)."""
    cfg = model.config
    device = str(next(model.parameters()).device)
    schedule = schedule if schedule is not None else sampling.schedule(model)
    cap = layout.max_batch_pixels or default_max_batch_pixels(device)
    sizes = [tuple(image.shape[:2]) for image in images]
    scale = cfg.scale

    def run(units: list[Unit]) -> Sampled:
        started = time.perf_counter()
        outputs = sample_units(model, images, names, units, sampling=sampling, schedule=schedule, seed=seed,
                               layout=layout)
        return Sampled(units, outputs, pixels=_pixels(units), seconds=time.perf_counter() - started)

    def _pixels(units: list[Unit]) -> int:
        return sum(sizes[i][0] * sizes[i][1] for i, _ in units) * scale * scale

    for batch in plan_batches(sizes, samples, scale, layout.batch_size, cap):
        yield from isolate(run, batch, lambda units, error: Sampled(
            units, None, failure_reason(error), f"{type(error).__name__}: {error}"[:500], _pixels(units)))


def isolate(run: Callable[[list[Unit]], Sampled], units: list[Unit],
            failed: Callable[[list[Unit], Exception], Sampled]) -> Iterator[Sampled]:
    """`run(units)`; if it raises, run each half of `units` the same way, down to single units."""
    try:
        yield run(units)
        return
    except Exception as error:  # noqa: BLE001 — one image's failure must not stop the others
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(units) == 1:
            yield failed(units, error)
            return
    half = len(units) // 2
    yield from isolate(run, units[:half], failed)
    yield from isolate(run, units[half:], failed)
