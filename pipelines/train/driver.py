"""The Ray Train driver: committed pairs → TorchTrainer (DDP) → checkpoints, MLflow run, registry, gate.

    PAIRS/_SUMMARY.json ──pin the version──> its train files + row groups, its val files
        └─ LoopConfig → every worker reads its own batches (pipelines.train.data)
    TorchTrainer(loop.train_loop, ScalingConfig(K workers, fractional CPU), RunConfig(storage, name))
        └─ global batch B: B / K images per worker and step, in micro-batches of `micro_batch`
           (gradient accumulation; default one micro-batch)
        └─ checkpoints under STORAGE/RUN_NAME every N steps or M minutes (+ the last), the last K kept;
           rerun with the same name/storage resumes from the latest one; FailureConfig(max_failures)
           replaces dead workers and resumes the same way
    MLflow (pipelines.tracking): the driver finds or creates the run by name and logs all params and
        the dataset's identity (`data.*` params, `sr3.data.*` tags); rank 0 logs metrics and
        validation; at the end the driver logs the pyfunc model from the final checkpoint and, with
        `register`, registers it (once per run and step) and runs the promotion gate
        (pipelines.train.promote) that decides whether `alias` moves to it.

A run that already reached `steps` (tags `sr3.final_step`, `sr3.final_checkpoint`) starts no workers:
it only finishes what is missing (model, version, gate decision).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import storage, tracking
from pipelines.pairs import store as pair_store
from pipelines.cli import UserError
from pipelines.train.data import decode_pairs  # noqa: F401  (public here, as before)

if TYPE_CHECKING:  # keep torch (via sr3model) out of modules that only need the driver's names
    from sr3model.config import SR3Config

    from pipelines.train.promote import Decision, GateConfig

DEFAULT_STORAGE = str(Path.home() / "ray_results")
DEFAULT_CHECKPOINT_STEPS = 5000  # without --checkpoint-every: every 5000 steps ...
DEFAULT_CHECKPOINT_MINUTES = 30.0  # ... or every 30 minutes, whichever comes first
DEFAULT_KEEP_CHECKPOINTS = 3
FAILURE_MARKER = "_injected_failure"
FINAL_STEP_TAG, FINAL_CHECKPOINT_TAG, MODEL_TAG = "sr3.final_step", "sr3.final_checkpoint", "sr3.model_uri"


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
    promotion: Decision | None = None  # with `register`: whether the alias moved, and why
    finished_before: bool = False  # the run had already reached `steps`: no worker was started


@dataclass(frozen=True)
class Cadence:
    """When checkpoints are written: every `steps` steps or `minutes` minutes (0: off) + the last."""

    steps: int
    minutes: float
    keep: int | None

    @classmethod
    def of(cls, every: int | None, minutes: float | None, keep: int | None) -> Cadence:
        """`every` given: by steps only (unless `minutes` too); else the defaults, by both."""
        if every is not None and every < 1 or minutes is not None and minutes < 0 or keep is not None and keep < 1:
            raise UserError("--checkpoint-every and --keep-checkpoints must be positive, --checkpoint-minutes ≥ 0")
        if every is not None:
            return cls(every, minutes or 0.0, keep)
        return cls(DEFAULT_CHECKPOINT_STEPS, DEFAULT_CHECKPOINT_MINUTES if minutes is None else minutes, keep)


def check_pairs(pairs: str, config: SR3Config, summary: dict[str, Any] | None = None, split: str = "train") -> int:
    """Number of `split` rows of the committed dataset; a clear error when it is not committed, holds
    no such pairs, or its sizes disagree with the config."""
    from pipelines.pairs.store import read_part

    summary = summary if summary is not None else pair_store.read_summary(pairs)
    if {"version", split, "hr_size", "scale"} <= set(summary):  # a versioned build says it: no reading
        rows, sizes = int(summary[split]), {(int(summary["hr_size"]), int(summary["scale"]))}
    else:
        table = read_part(pairs, split, columns=["hr_size", "scale"], version=summary.get("version"))
        rows = table.num_rows
        sizes = set(zip(table.column("hr_size").to_pylist(), table.column("scale").to_pylist()))
    if rows == 0:
        raise UserError(f"{pairs}: the committed dataset holds no {'training' if split == 'train' else split} pairs")
    if sizes != {(config.hr_size, config.scale)}:
        raise UserError(f"{pairs}: pairs have (hr_size, scale) {sorted(sizes)} but the config wants "
                        f"({config.hr_size}, {config.scale}); pick another preset or --set hr_size/lr_size")
    return rows


def train_files(pairs: str, summary: dict[str, Any]) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """The pinned version's train file URIs and their row-group sizes (read from the footers when
    the summary does not list them)."""
    import pyarrow.parquet as pq

    files = pair_store.part_files(pairs, "train", summary=summary)
    groups = []
    for f in files:
        if f.row_groups is None:
            fs, path = storage.resolve(f.uri)
            meta = pq.read_metadata(path, filesystem=storage.to_pyarrow(fs))
            groups.append(tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
        else:
            groups.append(tuple(f.row_groups))
    return tuple(f.uri for f in files), tuple(groups)


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
          checkpoint_minutes: float | None = None, register: str | None = None, alias: str = "champion",
          gate: GateConfig | None = None, cpus_per_worker: float | None = None,
          val_every: int = 0, val_images: int = 4, val_steps: int = 10, log_every: int = 1,
          max_failures: int = 3, keep_checkpoints: int | None = DEFAULT_KEEP_CHECKPOINTS,
          shuffle_buffer: int = 0, resume_from: str | None = None, val_pairs: str | None = None,
          tracking_uri: str | None = None, fail_once_at: tuple[int, int] | None = None, log_pyfunc: bool = True,
          micro_batch: int | None = None, compile: bool = False, channels_last: bool = False,
          say=print) -> TrainResult:
    """Train (or resume) a run on the current Ray cluster; see the module docstring.

    `config.train.batch_size` is the global batch, split evenly over `num_workers`. Checkpoints:
    `Cadence.of(checkpoint_every, checkpoint_minutes, keep_checkpoints)`. `gate`: how the promotion
    gate compares (default `GateConfig()`: lr_psnr). `fail_once_at=(rank, step)` is a test hook:
    that rank's process is killed after that step, once per run. `resume_from`: a checkpoint URI of
    another run that this run starts from (weights, EMA, optimizer, step, RNG, data position) when
    it has no checkpoint of its own. `val_pairs`: another committed pairs dataset whose val/ split
    validation and the promotion gate use instead of `pairs`' own (e.g. held-out photos).
    `micro_batch`: images per micro-batch on each worker (gradient accumulation: the update is the
    whole batch's; default the whole per-worker batch). `compile`, `channels_last`: CUDA speed-ups
    (torch.compile of the U-Net, channels_last memory), a note and no-op on CPU.
    """
    tick = time.time()
    if config.train.batch_size % num_workers:
        raise UserError(f"batch size {config.train.batch_size} is not divisible by {num_workers} workers")
    per_worker = config.train.batch_size // num_workers
    if micro_batch is not None and not 1 <= micro_batch <= per_worker:
        raise UserError(f"--micro-batch {micro_batch}: must be between 1 and the per-worker batch {per_worker} "
                        f"(batch size {config.train.batch_size} / {num_workers} workers)")
    micro_batch = micro_batch or per_worker
    cadence = Cadence.of(checkpoint_every, checkpoint_minutes, keep_checkpoints)
    summary = pair_store.read_summary(pairs)
    rows = check_pairs(pairs, config, summary)
    if rows < config.train.batch_size:
        raise UserError(f"{pairs}: {rows} train pairs, fewer than one batch of {config.train.batch_size}")
    data = pair_store.identity(pairs, summary)
    val_source = val_pairs or pairs
    val_version = summary.get("version") if val_source == pairs else pair_store.read_summary(val_source).get("version")
    run_name = run_name or default_run_name(config)
    storage_uri = storage_uri or DEFAULT_STORAGE
    uri = tracking.tracking_uri(tracking_uri)
    run_id, resumed = tracking.start_or_resume(uri, experiment, run_name,
                                               tags={"sr3.storage": storage.join(storage_uri, run_name)})
    if resume_from and not storage.exists(storage.join(resume_from, "trainer_state.pt")):
        raise UserError(f"--resume-from {resume_from}: no checkpoint there (no trainer_state.pt)")
    run_params = {"run.steps": steps, "run.num_workers": num_workers, "run.use_gpu": use_gpu,
                  "run.batch_per_worker": per_worker, "run.micro_batch": micro_batch,
                  "run.accumulation_steps": -(-per_worker // micro_batch),
                  "run.compile": compile, "run.channels_last": channels_last,
                  "run.checkpoint_every": cadence.steps, "run.checkpoint_minutes": cadence.minutes,
                  "run.pairs": pairs, "run.val_pairs": val_source, "run.train_rows": rows, **({"run.resume_from": resume_from} if resume_from else {})}
    conflicts = tracking.log_params(uri, run_id, {**config.flat(), **run_params})
    conflicts |= tracking.log_dataset(uri, run_id, data)
    for key, (old, new) in sorted(conflicts.items()):
        say(f"note: param {key} was {old} in this run and is now {new} (MLflow keeps {old})")

    tags = tracking.run_tags(uri, run_id) if resumed else {}
    done_before = int(tags.get(FINAL_STEP_TAG, -1)) >= steps and storage.exists(tags.get(FINAL_CHECKPOINT_TAG, ""))
    if done_before:
        say(f"run {run_name} already reached step {tags[FINAL_STEP_TAG]} (≥ --steps {steps}): nothing to train")
        checkpoint, metrics = tags[FINAL_CHECKPOINT_TAG], tracking.run_latest_metrics(uri, run_id)
        final_step = int(tags[FINAL_STEP_TAG])
    else:
        checkpoint, metrics = _fit(pairs, config, summary, data, steps=steps, num_workers=num_workers,
                                   use_gpu=use_gpu, storage_uri=storage_uri, run_name=run_name, cadence=cadence,
                                   cpus_per_worker=cpus_per_worker, val_every=val_every, val_images=val_images,
                                   val_steps=val_steps, log_every=log_every, max_failures=max_failures,
                                   shuffle_buffer=shuffle_buffer, resume_from=resume_from or "", uri=uri,
                                   val=(val_source, val_version), run_id=run_id, fail_once_at=fail_once_at,
                                   speed=(micro_batch, compile, channels_last))
        final_step = int(metrics.get("step", steps))
        tracking.set_tags(uri, run_id, {FINAL_STEP_TAG: final_step, FINAL_CHECKPOINT_TAG: checkpoint})

    model_uri = version = decision = None
    if log_pyfunc or register:
        from pipelines.train.publish import publish

        model_uri, version, decision = publish(
            checkpoint, uri, run_id, final_step, register=register, alias=alias, pairs=val_source,
            gate=gate, report_root=storage.join(storage_uri, run_name, "promotion"),
            logged=tags.get(MODEL_TAG) if done_before else None, say=say)
        if model_uri and not register:
            tracking.set_tags(uri, run_id, {MODEL_TAG: model_uri})
    tracking.end_run(uri, run_id)
    return TrainResult(
        run_name=run_name, run_id=run_id, tracking_uri=uri, experiment=experiment, resumed=resumed,
        steps=final_step, checkpoint=checkpoint, metrics=metrics, model_uri=model_uri,
        registered_version=version, seconds=time.time() - tick, promotion=decision, finished_before=done_before)


def _fit(pairs: str, config: SR3Config, summary: dict[str, Any], data: dict[str, Any], *, steps: int,
         num_workers: int, use_gpu: bool, storage_uri: str, run_name: str, cadence: Cadence,
         cpus_per_worker: float | None, val_every: int, val_images: int, val_steps: int, log_every: int,
         max_failures: int, shuffle_buffer: int, resume_from: str, uri: str, run_id: str,
         fail_once_at: tuple[int, int] | None, val: tuple[str, str | None],
         speed: tuple[int, bool, bool]) -> tuple[str, dict[str, Any]]:
    """Run the TorchTrainer to `steps`; (final checkpoint URI, its reported metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.loop import LoopConfig, train_loop

    files, groups = train_files(pairs, summary)
    fail_rank, fail_step = fail_once_at or (-1, -1)
    cpus = cpus_per_worker if cpus_per_worker is not None else (1.0 if use_gpu else 0.5)
    loop = LoopConfig(
        config=config.to_json(), threads=max(1, int(cpus)), steps=steps, batch_per_worker=config.train.batch_size // num_workers,
        checkpoint_every=cadence.steps, checkpoint_minutes=cadence.minutes, train_files=files,
        train_row_groups=groups, shuffle_buffer=shuffle_buffer, resume_from=resume_from, pairs=val[0],
        data_id=f"{data['id']}/{num_workers}x{config.train.batch_size // num_workers}/{shuffle_buffer or 'auto'}",
        pairs_version=val[1], val_every=val_every, val_images=val_images,
        val_steps=val_steps, log_every=log_every, tracking_uri=uri, run_id=run_id,
        micro_batch=speed[0], compile=speed[1], channels_last=speed[2], fail_rank=fail_rank, fail_step=fail_step,
        fail_marker=storage.join(storage_uri, run_name, FAILURE_MARKER) if fail_once_at else "")
    storage_path, storage_fs = _storage(storage_uri)
    env = {**storage.worker_env(), tracking.TRACKING_ENV: uri}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dataclasses.asdict(loop),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cadence.keep),
            worker_runtime_env={"env_vars": env}),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        tracking.end_run(uri, run_id, status="FAILED")
        raise RuntimeError(f"run {run_name} ended without a checkpoint")
    return _checkpoint_uri(storage_uri, result.checkpoint.path), dict(result.metrics or {})


def _checkpoint_uri(storage_uri: str, path: str) -> str:
    protocol = storage.protocol(storage_uri)
    return path if protocol in ("file", "local") else f"{protocol}://{path.lstrip('/')}"
