"""The per-worker Ray Train loop: glue between Ray and `sr3model.training.train_step`.

    restore (ray.train.get_checkpoint) → prepare_model (DDP) → repeat over the train shard:
        train_step (Algorithm 1, Adam + warm-up, clipping, EMA)      every step
        all-reduced loss etc. → MLflow (rank 0, pipelines.tracking)  every `log_every` steps
        DDIM validation on val pairs → metrics + image grid          every `val_every` steps (rank 0)
        checkpoint → ray.train.report                                every `checkpoint_every` steps + last

A checkpoint directory holds `config.json`, `model.safetensors`, `ema.safetensors` (sr3model.weights),
`trainer_state.pt` (step, optimizer, EMA update count, MLflow run id) written by rank 0, and one
`rng_rank{r}.pt` per rank (its sampling generator and torch RNG): Ray merges the ranks' directories.
`loop_config` keys are documented in `LoopConfig`; the driver (`pipelines.train`) builds it.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ray.train
import ray.train.torch
from ray.train import Checkpoint
from sr3model import metrics as sr_metrics
from sr3model.config import SR3Config
from sr3model.ema import EMA
from sr3model.imageio import decode_png, to_tensor, to_uint8_batch
from sr3model.model import SR3
from sr3model.resample import upsample
from sr3model.training import make_optimizer, train_step
from sr3model.weights import EMA_FILE, MODEL_FILE, save_model

STATE_FILE = "trainer_state.pt"
SHUFFLE_BUFFER = 256  # rows; per worker


@dataclass(frozen=True)
class LoopConfig:
    """What the driver passes to every worker (as a dict: `LoopConfig(**loop_config)`)."""

    config: str  # SR3Config JSON
    steps: int  # total optimiser steps of the run (a resumed run continues up to this)
    batch_per_worker: int
    checkpoint_every: int
    pairs: str = ""  # pairs URI; its val/ split feeds validation
    val_every: int = 0  # 0: validate only at the end
    val_images: int = 4
    val_steps: int = 10  # DDIM steps of the validation sampler
    val_sampler: str = "ddim"
    log_every: int = 1
    tracking_uri: str | None = None  # None: no MLflow
    run_id: str | None = None
    fail_rank: int = -1  # failure injection for tests: rank `fail_rank` raises after step
    fail_step: int = -1  # `fail_step` once, while the marker file `fail_marker` is absent
    fail_marker: str = ""


def unwrap(model: torch.nn.Module) -> SR3:
    return getattr(model, "module", model)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    lc = LoopConfig(**loop_config)
    cfg = SR3Config.from_json(lc.config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.train.seed)  # identical init everywhere (DDP also broadcasts rank 0's)
    model = SR3(cfg)
    ema = EMA(model.net, cfg.train.ema_decay)
    generator = torch.Generator(device=device)
    start, state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # A private download per rank: `as_directory()` shares one download between the processes
        # of a node, and ranks reading it while another rank fetches it read torn files (seen on GCS).
        with tempfile.TemporaryDirectory(prefix=f"sr3-restore-{rank}-") as directory:
            start, state = restore(Path(checkpoint.to_directory(directory)), model, ema, generator, rank)
    if state is None or "rng" not in state:
        reseed(generator, cfg.train.seed, rank, start)

    model = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    optimizer = make_optimizer(model, cfg.train)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    logger = None
    if rank == 0 and lc.tracking_uri and lc.run_id:
        from pipelines.tracking import RunLogger

        logger = RunLogger(lc.tracking_uri, lc.run_id)
    val = load_val(lc.pairs, lc.val_images, device) if rank == 0 and lc.pairs and lc.val_images else None

    batches = iterate(ray.train.get_dataset_shard("train"), lc.batch_per_worker, device)
    window: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    if start >= lc.steps:  # already done (a rerun of a finished run): re-report its last state
        save_and_report(model, ema, optimizer, generator, rank, start, lc, {"step": start})
    for step in range(start, lc.steps):
        tick = time.perf_counter()
        hr, lr = next(batches)
        stats = train_step(model, optimizer, hr, None if not cfg.conditional else lr, step=step,
                           config=cfg.train, ema=ema, generator=generator)
        stats["step_time_s"] = time.perf_counter() - tick
        window.append(stats)
        done = step + 1
        if rank == lc.fail_rank and done == lc.fail_step and lc.fail_marker:
            inject_failure_once(lc.fail_marker, rank, done)

        last = done == lc.steps
        if done % lc.log_every == 0 or last:
            summary = reduce_window(window, device)
            summary["images_per_s"] = lc.batch_per_worker * world / summary["step_time_s"]
            window = []
            if logger is not None:
                logger.log_metrics(summary, step=done)
        report: dict[str, Any] = {**summary, "step": done}  # latest logged stats, to Ray too
        if val is not None and ((lc.val_every and done % lc.val_every == 0) or last):
            report.update(validate(unwrap(model), ema, val, lc, done, logger))
        if done % lc.checkpoint_every == 0 or last:
            save_and_report(model, ema, optimizer, generator, rank, done, lc, report)


# -- data -----------------------------------------------------------------------------------------

def iterate(shard, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (hr, lr) batches: the shard is re-read for as many epochs as the steps need."""
    while True:
        count = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                              dtypes=torch.float32,
                                              local_shuffle_buffer_size=SHUFFLE_BUFFER):
            count += 1
            yield batch["hr"], batch["lr"]
        if count == 0:
            raise RuntimeError(f"the train shard holds fewer than batch size {batch_size} rows")


def load_val(pairs: str, limit: int, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The first `limit` val pairs (by key) as tensors in [-1, 1]; None if there are none."""
    from pipelines.pairs import read_part

    table = read_part(pairs, "val", columns=["key", "hr", "lr"]).sort_by("key").slice(0, limit)
    if table.num_rows == 0:
        return None
    hr = torch.stack([to_tensor(decode_png(b)) for b in table.column("hr").to_pylist()])
    lr = torch.stack([to_tensor(decode_png(b)) for b in table.column("lr").to_pylist()])
    return {"hr": hr.to(device), "lr": lr.to(device)}


# -- metrics and validation ---------------------------------------------------------------------

def reduce_window(window: list[dict[str, float]], device: torch.device) -> dict[str, float]:
    """Mean of the window's stats, averaged over ranks (all ranks call this at the same steps)."""
    keys = sorted(window[0])
    values = torch.tensor([[s[k] for k in keys] for s in window], dtype=torch.float64).mean(0)
    if dist.is_available() and dist.is_initialized():
        values = values.to(device)
        dist.all_reduce(values)
        values = values.cpu() / dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, values)}


@torch.no_grad()
def validate(model: SR3, ema: EMA, val: dict[str, torch.Tensor], lc: LoopConfig, step: int,
             logger) -> dict[str, float]:
    """EMA weights, a fast sampler: PSNR, SSIM, consistency, LR-PSNR, colour error, detail ratio;
    grid LR | bicubic | output | HR."""
    tick = time.perf_counter()
    sampler_model = copy.deepcopy(model).eval()
    ema.copy_to(sampler_model.net)
    lr, hr = val["lr"], val["hr"]
    generator = torch.Generator(device=hr.device).manual_seed(sampler_model.config.train.seed)
    conditional = sampler_model.config.conditional
    sr = sampler_model.super_resolve(
        lr if conditional else None, batch=hr.shape[0], sampler=lc.val_sampler,
        schedule=sampler_model.inference_schedule(steps=lc.val_steps), generator=generator)[:, 0]
    lr_size = tuple(lr.shape[-2:])
    results = {
        "val_psnr": float(sr_metrics.psnr(sr, hr).mean()),
        "val_ssim": float(sr_metrics.ssim(sr, hr).mean()),
        "val_consistency": float(sr_metrics.consistency(sr, lr).mean()),
        "val_lr_psnr": float(sr_metrics.lr_psnr(sr, lr).mean()),
        "val_colour_error": float(sr_metrics.colour_error(sr, hr).mean()),
        "val_detail_ratio": float(sr_metrics.detail_energy(sr, lr_size).mean()
                                  / sr_metrics.detail_energy(hr, lr_size).mean().clamp_min(1e-12)),
    }
    results["val_time_s"] = time.perf_counter() - tick
    if logger is not None:
        logger.log_metrics(results, step=step)
        logger.log_image(image_grid(lr, sr, hr), f"validation/step_{step:08d}.png")
    return results


def image_grid(lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor) -> np.ndarray:
    """One row per image: LR (nearest, enlarged) | bicubic x | output | HR, as (H, W, 3) uint8."""
    size = hr.shape[-2:]
    columns = [F.interpolate(lr.float(), size=size, mode="nearest"), upsample(lr, size), sr, hr]
    tiles = to_uint8_batch(torch.cat([c.float().cpu() for c in columns], dim=3))  # (B, H, 4W, 3)
    return np.concatenate(list(tiles), axis=0)


# -- checkpoints ----------------------------------------------------------------------------------

def reseed(generator: torch.Generator, seed: int, rank: int, step: int) -> None:
    """Seed per rank (and per resume step, when a checkpoint holds no RNG state for this rank)."""
    generator.manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    torch.manual_seed(seed * 1_000_003 + rank * 10_007 + step + 1)


def save_and_report(model, ema: EMA, optimizer, generator: torch.Generator, rank: int, step: int,
                    lc: LoopConfig, metrics: dict[str, Any]) -> None:
    """Every rank writes its RNG state; rank 0 adds weights + trainer state; all call report."""
    with tempfile.TemporaryDirectory(prefix="sr3-ckpt-") as directory:
        path = Path(directory)
        rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, path / f"rng_rank{rank}.pt")
        if rank == 0:
            save_model(path, unwrap(model), {k: v.cpu() for k, v in ema.state_dict().items()},
                       metadata={"step": str(step)})
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "ema_updates": ema.updates,
                        "run_id": lc.run_id or ""}, path / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


def restore(directory: Path, model: SR3, ema: EMA, generator: torch.Generator,
            rank: int) -> tuple[int, dict[str, Any]]:
    """Load weights, EMA, RNG of this rank; return (step, trainer state incl. optimizer)."""
    from safetensors.torch import load_file

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    model.net.load_state_dict(load_file(directory / MODEL_FILE))
    ema.load_state_dict(load_file(directory / EMA_FILE), updates=int(state["ema_updates"]))
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        state["rng"] = True
    return int(state["step"]), state


def inject_failure_once(marker: str, rank: int, step: int) -> None:
    """Test hook: raise once (the marker file records that the failure happened)."""
    from pipelines import storage

    if not storage.exists(marker):
        storage.write_bytes(marker, f"rank {rank} failed at step {step}\n".encode())
        raise RuntimeError(f"injected failure on rank {rank} after step {step}")

