"""The Ray Train driver: pairs → Ray Data → TorchTrainer (DDP) → checkpoints, MLflow run, registry.

    train/*.parquet ─read_parquet(hr, lr)─map_batches(decode_pairs)─> {"hr", "lr"} float32 arrays
        └─ datasets={"train": ds} → every worker's `get_dataset_shard("train")` (equal split)
    TorchTrainer(train_loop, ScalingConfig(K workers, fractional CPU), RunConfig(storage, name))
        └─ checkpoints under STORAGE/RUN_NAME; rerun with the same name/storage resumes from the
           latest one; FailureConfig(max_failures) replaces dead workers and resumes the same way
    MLflow (pipelines.tracking): the driver finds or creates the run by name and logs all params;
        rank 0 logs metrics and validation; at the end the driver logs the pyfunc model from the
        final checkpoint and, with `register`, registers it and sets the alias.

`decode_pairs` is a module-level numpy/PIL function (runs and tests without Ray).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import storage, tracking

if TYPE_CHECKING:  # decode tasks import this module: keep torch (via sr3model) out of them
    from sr3model.config import SR3Config

DEFAULT_STORAGE = str(Path.home() / "ray_results")
DECODE_BATCH = 32  # rows per decode task batch
FAILURE_MARKER = "_injected_failure"


@dataclass(frozen=True)
class TrainResult:
    """Where a run's results went."""

    run_name: str
    run_id: str
    tracking_uri: str
    experiment: str
    resumed: bool
    steps: int
    checkpoint: str  # URI of the final checkpoint
    metrics: dict[str, Any]
    model_uri: str | None
    registered_version: str | None
    seconds: float


def decode_pairs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PNG bytes columns `hr`, `lr` → float32 (B, 3, H, W) arrays in [-1, 1] (Ray Data task).

    Decodes with `sr3model.imageio.decode_png`, which loads without torch."""
    from sr3model.imageio import decode_png

    def stack(column: np.ndarray) -> np.ndarray:
        pixels = np.stack([np.asarray(decode_png(bytes(b)), dtype=np.uint8) for b in column])  # (B, H, W, 3)
        return (pixels.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)  # (B, 3, H, W)

    return {"hr": stack(batch["hr"]), "lr": stack(batch["lr"])}


def check_pairs(pairs: str, config: SR3Config) -> int:
    """Number of train rows; a clear error when sizes disagree with the config or rows are missing."""
    from pipelines.pairs import read_part

    table = read_part(pairs, "train", columns=["hr_size", "scale"])
    if table.num_rows == 0:
        raise ValueError(f"{storage.join(pairs, 'train')} holds no training pairs")
    sizes = set(zip(table.column("hr_size").to_pylist(), table.column("scale").to_pylist()))
    if sizes != {(config.hr_size, config.scale)}:
        raise ValueError(f"{pairs}: pairs have (hr_size, scale) {sorted(sizes)} but the config wants "
                         f"({config.hr_size}, {config.scale}); pick another preset or --set hr_size/lr_size")
    return table.num_rows


def train_dataset(pairs: str):
    """The streaming train dataset: decoded (hr, lr) float32 arrays; other columns never read."""
    import ray.data

    fs, path = storage.resolve(storage.join(pairs, "train"))
    ds = ray.data.read_parquet(path, filesystem=storage.to_pyarrow(fs)).select_columns(["hr", "lr"])
    return ds.map_batches(decode_pairs, batch_format="numpy", batch_size=DECODE_BATCH)


def _storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: explicit pyarrow fs for object stores."""
    fs, path = storage.resolve(uri)
    if storage.protocol(uri) in ("file", "local"):
        return os.path.abspath(path), None
    return path, storage.to_pyarrow(fs)


def default_run_name(config: SR3Config) -> str:
    return f"sr3-{config.name}-{config.objective}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(pairs: str, config: SR3Config, *, steps: int, num_workers: int = 2, use_gpu: bool = False,
          storage_uri: str | None = None, run_name: str | None = None,
          experiment: str = tracking.DEFAULT_EXPERIMENT, checkpoint_every: int | None = None,
          register: str | None = None, alias: str = "champion", cpus_per_worker: float | None = None,
          val_every: int = 0, val_images: int = 4, val_steps: int = 10, log_every: int = 1,
          max_failures: int = 3, keep_checkpoints: int | None = 2, tracking_uri: str | None = None,
          fail_once_at: tuple[int, int] | None = None, log_pyfunc: bool = True) -> TrainResult:
    """Train (or resume) a run on the current Ray cluster; see the module docstring.

    `config.train.batch_size` is the global batch, split evenly over `num_workers`.
    `fail_once_at=(rank, step)` is a test hook: that rank raises after that step, once per run.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train_loop import LoopConfig, train_loop

    tick = time.time()
    if config.train.batch_size % num_workers:
        raise ValueError(f"batch size {config.train.batch_size} is not divisible by {num_workers} workers")
    rows = check_pairs(pairs, config)
    if rows < config.train.batch_size:
        raise ValueError(f"{pairs}: {rows} train pairs, fewer than one batch of {config.train.batch_size}")
    run_name = run_name or default_run_name(config)
    storage_uri = storage_uri or DEFAULT_STORAGE
    checkpoint_every = checkpoint_every or steps
    uri = tracking.tracking_uri(tracking_uri)
    run_id, resumed = tracking.start_or_resume(uri, experiment, run_name,
                                               tags={"sr3.storage": storage.join(storage_uri, run_name)})
    run_params = {"run.steps": steps, "run.num_workers": num_workers, "run.use_gpu": use_gpu,
                  "run.batch_per_worker": config.train.batch_size // num_workers,
                  "run.checkpoint_every": checkpoint_every, "run.pairs": pairs, "run.train_rows": rows}
    conflicts = tracking.log_params(uri, run_id, {**config.flat(), **run_params})
    for key, (old, new) in sorted(conflicts.items()):
        print(f"note: param {key} was {old} in this run and is now {new} (MLflow keeps {old})")

    fail_rank, fail_step = fail_once_at or (-1, -1)
    loop = LoopConfig(
        config=config.to_json(), steps=steps, batch_per_worker=config.train.batch_size // num_workers,
        checkpoint_every=checkpoint_every, pairs=pairs, val_every=val_every, val_images=val_images,
        val_steps=val_steps, log_every=log_every, tracking_uri=uri, run_id=run_id,
        fail_rank=fail_rank, fail_step=fail_step,
        fail_marker=storage.join(storage_uri, run_name, FAILURE_MARKER) if fail_once_at else "")
    storage_path, storage_fs = _storage(storage_uri)
    cpus = cpus_per_worker if cpus_per_worker is not None else (1.0 if use_gpu else 0.5)
    env = {**storage.worker_env(), tracking.TRACKING_ENV: uri}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dataclasses.asdict(loop),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": env}),
        datasets={"train": train_dataset(pairs)},
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        tracking.end_run(uri, run_id, status="FAILED")
        raise RuntimeError(f"run {run_name} ended without a checkpoint")
    model_uri = version = None
    if log_pyfunc:
        from pipelines.pyfunc import log_model

        with result.checkpoint.as_directory() as directory:
            model_uri, version = log_model(directory, run_id, uri, register=register, alias=alias)
    tracking.end_run(uri, run_id)
    metrics = dict(result.metrics or {})
    return TrainResult(
        run_name=run_name, run_id=run_id, tracking_uri=uri, experiment=experiment, resumed=resumed,
        steps=int(metrics.get("step", steps)), checkpoint=_checkpoint_uri(storage_uri, result.checkpoint.path),
        metrics=metrics, model_uri=model_uri, registered_version=version, seconds=time.time() - tick)


def _checkpoint_uri(storage_uri: str, path: str) -> str:
    protocol = storage.protocol(storage_uri)
    return path if protocol in ("file", "local") else f"{protocol}://{path.lstrip('/')}"
