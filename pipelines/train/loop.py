"""The per-worker Ray Train loop: glue between Ray and `sr3model.training.train_step`.

    restore (ray.train.get_checkpoint) → prepare_model (DDP) → repeat over this rank's batches
    (pipelines.train.data: its own units of the committed train files, a new order every epoch):
        train_step (Algorithm 1, Adam + warm-up, clipping, EMA)      every step
        all-reduced loss etc. → MLflow (rank 0, pipelines.tracking)  every `log_every` steps
        DDIM validation on val pairs → metrics + image grid          every `val_every` steps (rank 0)
        checkpoint → ray.train.report                                every `checkpoint_every` steps,
                                                                     or `checkpoint_minutes` (rank 0's
                                                                     clock, agreed at log steps), + last

A run starts from its own latest checkpoint (a rerun or a restart after a failure), else from
`resume_from` (another run's checkpoint: a fork that continues exactly where that run was), else
from scratch. A checkpoint directory holds `config.json`, `model.safetensors`, `ema.safetensors` (sr3model.weights),
`trainer_state.pt` (step, optimizer, EMA update count, MLflow run id, the data position: epoch,
batches of it done, dataset id) written by rank 0, and one `rng_rank{r}.pt` per rank (its sampling
generator and torch RNG): Ray merges the ranks' directories. Resuming restores all of it, so the
resumed run sees the batches, noise and dropout an uninterrupted run would have (validation runs
on forked RNG streams and changes nothing). `loop_config` keys are documented in `LoopConfig`;
the driver (`pipelines.train`) builds it.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
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
from pipelines.train.data import BatchStream
from sr3model.config import SR3Config
from sr3model.ema import EMA
from sr3model.imageio import decode_png, to_tensor, to_uint8_batch
from sr3model.model import SR3
from sr3model.resample import upsample
from sr3model.training import make_optimizer, train_step
from sr3model.weights import EMA_FILE, MODEL_FILE, save_model

STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class LoopConfig:
    """What the driver passes to every worker (as a dict: `LoopConfig(**loop_config)`)."""

    config: str  # SR3Config JSON
    steps: int  # total optimiser steps of the run (a resumed run continues up to this)
    batch_per_worker: int
    checkpoint_every: int  # steps; 0: not by steps
    train_files: tuple[str, ...] = ()  # URIs of the committed train files of the pinned version
    train_row_groups: tuple[tuple[int, ...], ...] = ()  # rows per row group of each train file
    data_id: str = ""  # dataset id / workers x batch / buffer: a checkpoint's data position is kept
    # only for the same data order (the same dataset version, world size, batch and buffer)
    shuffle_buffer: int = 0  # rows; 0: pipelines.train.data.shuffle_buffer_rows(batch)
    checkpoint_minutes: float = 0.0  # 0: not by time
    resume_from: str = ""  # a checkpoint URI of another run to start from when this run has none
    pairs: str = ""  # the pairs URI whose val/ split feeds validation (the train pairs or --val-pairs)
    pairs_version: str | None = None  # its committed version read (None: an unversioned dataset)
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
    checkpoint = ray.train.get_checkpoint() or (from_uri(lc.resume_from) if lc.resume_from else None)
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
    val = load_val(lc, device) if rank == 0 and lc.pairs and lc.val_images else None

    epoch, position = (0, 0) if state is None else (int(state.get("data_epoch", 0)), int(state.get("data_position", 0)))
    if state is not None and state.get("data_id") != lc.data_id:  # another dataset: a fresh epoch
        position = 0
        if rank == 0:
            print(f"note: the data order changed since the checkpoint ({state.get('data_id')!r} → {lc.data_id!r}: "
                  f"dataset id / workers x batch / buffer): epoch {epoch} starts over")
    batches = train_batches(lc, cfg.train.seed, rank, world, context.get_local_world_size())(epoch, position)
    window: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    last_saved = time.monotonic()
    if start >= lc.steps:  # already done (a rerun of a finished run): re-report its last state
        save_and_report(model, ema, optimizer, generator, rank, start, lc, {"step": start}, (epoch, position))
    for step in range(start, lc.steps):
        tick = time.perf_counter()
        epoch, position, hr, lr = next(batches)
        hr, lr = torch.from_numpy(hr).to(device), torch.from_numpy(lr).to(device)
        waited = time.perf_counter() - tick  # > 0 for long: training waits for its data
        stats = train_step(model, optimizer, hr, None if not cfg.conditional else lr, step=step,
                           config=cfg.train, ema=ema, generator=generator)
        stats["step_time_s"] = time.perf_counter() - tick
        stats["data_wait_s"] = waited
        window.append(stats)
        done = step + 1
        if rank == lc.fail_rank and done == lc.fail_step and lc.fail_marker:
            inject_failure_once(lc.fail_marker, rank, done)

        last = done == lc.steps
        if done % lc.log_every == 0 or last:
            summary = reduce_window(window, device)
            summary["images_per_s"] = lc.batch_per_worker * world / summary["step_time_s"]
            summary["epoch"] = float(epoch)
            window = []
            if logger is not None:
                logger.log_metrics(summary, step=done)
        report: dict[str, Any] = {**summary, "step": done}  # latest logged stats, to Ray too
        if val is not None and ((lc.val_every and done % lc.val_every == 0) or last):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                report.update(validate(unwrap(model), ema, val, lc, done, logger))
        due = last or bool(lc.checkpoint_every and done % lc.checkpoint_every == 0)
        if not due and lc.checkpoint_minutes > 0 and done % lc.log_every == 0:  # the same steps on every rank
            due = agree(rank == 0 and time.monotonic() - last_saved >= 60 * lc.checkpoint_minutes, device)
        if due:
            save_and_report(model, ema, optimizer, generator, rank, done, lc, report, (epoch, position))
            last_saved = time.monotonic()
    batches.close()


# -- data -----------------------------------------------------------------------------------------

def train_batches(lc: LoopConfig, seed: int, rank: int, world: int, local_world: int) -> BatchStream:
    """This rank's batch stream over the pinned train files (see pipelines.train.data)."""
    from pipelines import storage

    if not lc.train_files:
        raise ValueError("no train files were given to the loop")
    fs, _ = storage.resolve(lc.train_files[0])
    paths = [storage.resolve(uri)[1] for uri in lc.train_files]
    threads = max(1, min(4, (os.cpu_count() or 2) // max(1, local_world)))
    return BatchStream(paths, lc.train_row_groups, storage.to_pyarrow(fs), seed=seed, rank=rank, world=world,
                       batch=lc.batch_per_worker, buffer=lc.shuffle_buffer or None, threads=threads)


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank says so (one tiny all-reduce; every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def load_val(lc: LoopConfig, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The first `val_images` val pairs (by key) of the pinned version as tensors in [-1, 1];
    None if there are none."""
    from pipelines.pairs import read_part

    table = read_part(lc.pairs, "val", columns=["key", "hr", "lr"], version=lc.pairs_version)
    table = table.sort_by("key").slice(0, lc.val_images)
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

def from_uri(uri: str) -> Checkpoint:
    """A checkpoint directory at any storage URI as a Ray Train Checkpoint."""
    from pipelines import storage

    fs, path = storage.resolve(uri)
    return Checkpoint(path=path, filesystem=storage.to_pyarrow(fs))


def reseed(generator: torch.Generator, seed: int, rank: int, step: int) -> None:
    """Seed per rank (and per resume step, when a checkpoint holds no RNG state for this rank)."""
    generator.manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    torch.manual_seed(seed * 1_000_003 + rank * 10_007 + step + 1)


def save_and_report(model, ema: EMA, optimizer, generator: torch.Generator, rank: int, step: int,
                    lc: LoopConfig, metrics: dict[str, Any], data: tuple[int, int]) -> None:
    """Every rank writes its RNG state; rank 0 adds weights + trainer state (with the data position
    `data` = (epoch, batches of it done)); all call report."""
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
                        "run_id": lc.run_id or "", "data_epoch": data[0], "data_position": data[1],
                        "data_id": lc.data_id}, path / STATE_FILE)
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
    """Test hook: this worker process dies by SIGKILL, once (the marker file records that it did),
    as a preempted node's would: no exception, no clean-up."""
    import signal

    from pipelines import storage

    if not storage.exists(marker):
        storage.write_bytes(marker, f"rank {rank} killed at step {step}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)

