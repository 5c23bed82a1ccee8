"""The Ray Train driver: committed pairs → TorchTrainer (DDP) → checkpoints, MLflow run, registry, gate.

    PAIRS/_SUMMARY.json ──pin the version──> its train files + row groups, its val files
        └─ LoopConfig → every worker reads its own batches (pipelines.train.data)
    TrainOptions (the job's flags) ──`preflight`──> Plan: every check that needs no Ray (dataset committed
        and of the config's sizes, batch split, cadence, the inference schedules validation and the
        gate will sample with) ──`loop_config`──> LoopConfig for the workers
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

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import storage, tracking
from pipelines.cli import UserError
from pipelines.pairs import store as pair_store
from pipelines.runtime import init_ray, refuse_node_local
from pipelines.train.data import decode_pairs  # noqa: F401  (public here, as before)
from pipelines.train.options import Cadence, LoopConfig, TrainOptions

if TYPE_CHECKING:  # keep torch (via sr3model) out of modules that only need the driver's names
    from sr3model.config import SR3Config

    from pipelines.train.promote import Decision

DEFAULT_STORAGE = str(Path.home() / "ray_results")
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
class Plan:
    """What the pre-flight checks found (no Ray, no MLflow): the pinned dataset and the run's shape."""

    summary: dict[str, Any]  # the committed `_SUMMARY.json` of the train pairs
    rows: int  # train pairs
    per_worker: int  # images per worker and step
    micro_batch: int
    cadence: Cadence
    val_source: str  # the pairs whose val/ split validation and the gate use
    val_version: str | None
    storage_uri: str


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


def check_schedules(config: SR3Config, options: TrainOptions) -> None:
    """Every inference schedule the run will sample with — validation (`--val-steps`), the config's
    default (`diffusion.sample_steps`), the gate's (`--promote-steps`) — can be made; else one error
    naming the flag (a schedule that fails at the end of a run would fail its last validation)."""
    from sr3model.schedules import inference_schedule

    wanted = [("--val-steps", options.val_steps), ("diffusion.sample_steps", config.diffusion.sample_steps)]
    if options.register and not options.gate.force:
        wanted.append(("--promote-steps", options.gate.steps or config.diffusion.sample_steps))
    for flag, steps in wanted:
        if steps is None or steps < 1:
            raise UserError(f"{flag} {steps}: must be at least 1")
        if config.objective == "regression":
            continue
        try:
            inference_schedule(config.diffusion, steps)
        except ValueError as error:
            raise UserError(f"{flag} {steps}: {error}") from None


def preflight(pairs: str, config: SR3Config, options: TrainOptions) -> Plan:
    """Every check of a run that needs neither Ray nor MLflow; a `UserError` names what to fix."""
    from pipelines.train.promote import metric_names

    o = options
    if o.num_workers < 1:
        raise UserError(f"--num-workers {o.num_workers}: must be at least 1")
    if config.train.batch_size % o.num_workers:
        raise UserError(f"batch size {config.train.batch_size} is not divisible by {o.num_workers} workers")
    per_worker = config.train.batch_size // o.num_workers
    if o.micro_batch is not None and not 1 <= o.micro_batch <= per_worker:
        raise UserError(f"--micro-batch {o.micro_batch}: must be between 1 and the per-worker batch {per_worker} "
                        f"(batch size {config.train.batch_size} / {o.num_workers} workers)")
    if o.gate.metric is not None and o.gate.metric not in metric_names():
        raise UserError(f"--promote-metric {o.gate.metric!r}: choose from {', '.join(metric_names())}")
    cadence = Cadence.of(o.checkpoint_every, o.checkpoint_minutes, o.keep_checkpoints)
    summary = pair_store.read_summary(pairs)
    rows = check_pairs(pairs, config, summary)
    if rows < config.train.batch_size:
        raise UserError(f"{pairs}: {rows} train pairs, fewer than one batch of {config.train.batch_size}")
    val_source = o.val_pairs or pairs
    if o.val_pairs:
        check_pairs(o.val_pairs, config, split="val")
        val_version = pair_store.read_summary(o.val_pairs).get("version")
    else:
        val_version = summary.get("version")
    check_schedules(config, o)
    if o.resume_from and not storage.exists(storage.join(o.resume_from, "trainer_state.pt")):
        raise UserError(f"--resume-from {o.resume_from}: no checkpoint there (no trainer_state.pt)")
    return Plan(summary, rows, per_worker, o.micro_batch or per_worker, cadence, val_source, val_version,
                o.storage_uri or DEFAULT_STORAGE)


def check_shared(pairs: str, options: TrainOptions, plan: Plan, uri: str) -> None:
    """On a multi-node cluster every worker must reach the same pairs, checkpoint root and tracking
    store: a plain local path among them is refused (`pipelines.runtime.refuse_node_local`) unless
    `shared_fs`; the default --storage (~/ray_results) and the default tracking store
    (./mlflow.db, which rank 0 would write on its own node) always."""
    o = options
    database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    defaulted = {"--storage"} if o.storage_uri is None else set()
    if not o.tracking_uri and not os.environ.get(tracking.TRACKING_ENV):
        defaulted.add("MLFLOW_TRACKING_URI")
    refuse_node_local({"--storage": plan.storage_uri, "--pairs": pairs, "--val-pairs": o.val_pairs,
                       "--resume-from": o.resume_from, "MLFLOW_TRACKING_URI": database},
                      shared_fs=o.shared_fs, defaulted=defaulted)


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


def cpus_per_worker(options: TrainOptions) -> float:
    return options.cpus_per_worker if options.cpus_per_worker is not None else (1.0 if options.use_gpu else 0.5)


def loop_config(pairs: str, config: SR3Config, options: TrainOptions, plan: Plan, data: dict[str, Any], *,
                run_name: str, run_id: str, tracking_uri: str) -> LoopConfig:
    """The workers' `LoopConfig`, derived from the run's options and its pre-flight plan."""
    o = options
    files, groups = train_files(pairs, plan.summary)
    fail_rank, fail_step = o.fail_once_at or (-1, -1)
    return LoopConfig(
        config=config.to_json(), threads=max(1, int(cpus_per_worker(o))), steps=o.steps,
        batch_per_worker=plan.per_worker, checkpoint_every=plan.cadence.steps,
        checkpoint_minutes=plan.cadence.minutes, train_files=files, train_row_groups=groups,
        shuffle_buffer=o.shuffle_buffer, resume_from=o.resume_from or "", pairs=plan.val_source,
        data_id=f"{data['id']}/{o.num_workers}x{plan.per_worker}/{o.shuffle_buffer or 'auto'}",
        pairs_version=plan.val_version, val_every=o.val_every, val_images=o.val_images, val_steps=o.val_steps,
        log_every=o.log_every, tracking_uri=tracking_uri, run_id=run_id, micro_batch=plan.micro_batch,
        compile=o.compile, channels_last=o.channels_last, fail_rank=fail_rank, fail_step=fail_step,
        fail_validation=o.fail_validation,
        fail_marker=storage.join(plan.storage_uri, run_name, FAILURE_MARKER) if o.fail_once_at else "",
        val_sampler=o.val_sampler, extra_columns=tuple(o.extra_columns))


def run_params(pairs: str, options: TrainOptions, plan: Plan) -> dict[str, Any]:
    """The run's own choices as MLflow params (`run.*`; the config's are logged beside them)."""
    o = options
    return {"run.steps": o.steps, "run.num_workers": o.num_workers, "run.use_gpu": o.use_gpu,
            "run.batch_per_worker": plan.per_worker, "run.micro_batch": plan.micro_batch,
            "run.accumulation_steps": -(-plan.per_worker // plan.micro_batch),
            "run.compile": o.compile, "run.channels_last": o.channels_last,
            "run.checkpoint_every": plan.cadence.steps, "run.checkpoint_minutes": plan.cadence.minutes,
            "run.pairs": pairs, "run.val_pairs": plan.val_source, "run.train_rows": plan.rows,
            **({"run.resume_from": o.resume_from} if o.resume_from else {})}


def train(pairs: str, config: SR3Config, options: TrainOptions | None = None, *, say=print,
          **fields: Any) -> TrainResult:
    """Train (or resume) a run on the Ray cluster (`options.ray_address`, else RAY_ADDRESS, else a
    local one; a process already connected keeps its connection); see the module docstring.

    `options` (keyword `fields` override it, e.g. `train(pairs, config, steps=6)`): `TrainOptions`.
    `config.train.batch_size` is the global batch, split evenly over the workers. A run that already
    has checkpoints under `storage_uri/run_name` resumes from the latest one."""
    tick = time.time()
    o = (options or TrainOptions()).with_(**fields)
    plan = preflight(pairs, config, o)
    init_ray(o.ray_address)
    uri = tracking.tracking_uri(o.tracking_uri)
    check_shared(pairs, o, plan, uri)
    data = pair_store.identity(pairs, plan.summary)
    run_name = o.run_name or default_run_name(config)
    run_id, resumed = tracking.start_or_resume(uri, o.experiment, run_name,
                                               tags={"sr3.storage": storage.join(plan.storage_uri, run_name)})
    conflicts = tracking.log_params(uri, run_id, {**config.flat(), **run_params(pairs, o, plan)})
    conflicts |= tracking.log_dataset(uri, run_id, data)
    for key, (old, new) in sorted(conflicts.items()):
        say(f"note: param {key} was {old} in this run and is now {new} (MLflow keeps {old})")

    with contextlib.ExitStack() as leases:  # the pinned versions outlive any rebuild while this run lives
        holder = f"train run {run_name} ({run_id})"
        leases.enter_context(pair_store.Lease(pairs, plan.summary.get("version"), holder))
        if plan.val_source != pairs:
            leases.enter_context(pair_store.Lease(plan.val_source, plan.val_version, holder))
        checkpoint, metrics, final_step, model_uri, version, decision, done_before = _run(
            pairs, config, o, plan, data, run_name=run_name, run_id=run_id, uri=uri, resumed=resumed, say=say)
    tracking.end_run(uri, run_id)
    return TrainResult(
        run_name=run_name, run_id=run_id, tracking_uri=uri, experiment=o.experiment, resumed=resumed,
        steps=final_step, checkpoint=checkpoint, metrics=metrics, model_uri=model_uri,
        registered_version=version, seconds=time.time() - tick, promotion=decision, finished_before=done_before)


def _run(pairs: str, config: SR3Config, o: TrainOptions, plan: Plan, data: dict[str, Any], *, run_name: str,
         run_id: str, uri: str, resumed: bool, say) -> tuple:
    """Fit (unless the run already reached its steps), then log, register and gate the model."""
    tags = tracking.run_tags(uri, run_id) if resumed else {}
    done_before = int(tags.get(FINAL_STEP_TAG, -1)) >= o.steps and storage.exists(tags.get(FINAL_CHECKPOINT_TAG, ""))
    if done_before:
        say(f"run {run_name} already reached step {tags[FINAL_STEP_TAG]} (≥ --steps {o.steps}): nothing to train")
        checkpoint, metrics = tags[FINAL_CHECKPOINT_TAG], tracking.run_latest_metrics(uri, run_id)
        final_step = int(tags[FINAL_STEP_TAG])
    else:
        lc = loop_config(pairs, config, o, plan, data, run_name=run_name, run_id=run_id, tracking_uri=uri)
        checkpoint, metrics = _fit(lc, o, plan, run_name=run_name, uri=uri, run_id=run_id)
        final_step = int(metrics.get("step", o.steps))
        tracking.set_tags(uri, run_id, {FINAL_STEP_TAG: final_step, FINAL_CHECKPOINT_TAG: checkpoint})

    model_uri = version = decision = None
    if o.log_pyfunc or o.register:
        from pipelines.train.publish import publish

        model_uri, version, decision = publish(
            checkpoint, uri, run_id, final_step, register=o.register, alias=o.alias, pairs=plan.val_source,
            gate=o.gate, report_root=storage.join(plan.storage_uri, run_name, "promotion"),
            logged=tags.get(MODEL_TAG) if done_before else None, say=say)
        if model_uri and not o.register:
            tracking.set_tags(uri, run_id, {MODEL_TAG: model_uri})
    return checkpoint, metrics, final_step, model_uri, version, decision, done_before


def _fit(lc: LoopConfig, options: TrainOptions, plan: Plan, *, run_name: str, uri: str,
         run_id: str) -> tuple[str, dict[str, Any]]:
    """Run the TorchTrainer to `lc.steps`; (final checkpoint URI, its reported metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.loop import train_loop

    o = options
    storage_path, storage_fs = _storage(plan.storage_uri)
    env = {**storage.worker_env(), tracking.TRACKING_ENV: uri}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dataclasses.asdict(lc),
        scaling_config=ScalingConfig(num_workers=o.num_workers, use_gpu=o.use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker(o),
                                                           **({"GPU": 1} if o.use_gpu else {})}),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=o.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=plan.cadence.keep),
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
    return _checkpoint_uri(plan.storage_uri, result.checkpoint.path), dict(result.metrics or {})


def _checkpoint_uri(storage_uri: str, path: str) -> str:
    protocol = storage.protocol(storage_uri)
    return path if protocol in ("file", "local") else f"{protocol}://{path.lstrip('/')}"
