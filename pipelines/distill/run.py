"""`distill`: a registered teacher → a registered K-step student (jobs/distill.py).

    --teacher models:/NAME@ALIAS ──resolve (pinned to NAME/VERSION)──> the teacher's config and weights
        checks: a conditional v/x0 diffusion teacher, K ∈ {1, 2, 4}, a deterministic teacher sampler;
        the student's training run pre-flighted (pipelines.train.driver.preflight) before any sampling
    PAIRS (train split) ──pipelines.distill.teacher (Ray Data, the upscale job's sampling actors)──>
        the teacher's outputs as it is served (`sampling_for`: --teacher-sampler/--teacher-steps, its
        stored or configured LR consistency), a committed dataset version (reused when the same
        teacher, sampler, steps, consistency, seed and pairs made it)
    ──pipelines.train.train (Ray Train: MLflow run, checkpoints, resume, validation, registry, gate)──>
        the student: `sr3model.distill.student_config` (the teacher's network and weights, sampled by
        `distilled` at K levels), its loss fed the stored outputs and seeds (`extra_columns`),
        validated with `distilled` on the source pairs' val split (or --val-pairs)
    lineage: the teacher's models:/NAME/VERSION as param `distill.teacher` (the config's) and
        `run.teacher`, and as tags `sr3.teacher` / `sr3.teacher_outputs` on the run and the version.

The student is then served like any model: its config says `distilled`, K steps, so the upscale,
evaluation and study jobs and the pyfunc sample it with no extra flags, and manifests record it
as another model version (outputs of the teacher count as stale under it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines import storage, tracking
from pipelines.cli import UserError
from pipelines.distill.teacher import EXTRA_COLUMNS, teacher_outputs
from pipelines.pairs import store as pair_store
from pipelines.registry.models import ModelRef, resolve_model, sampling_for
from pipelines.train import TrainOptions, TrainResult, build_config, train
from pipelines.train.driver import DEFAULT_STORAGE, preflight

TEACHER_SAMPLERS = ("dpmpp-2m", "ddim")  # deterministic: the output is a function of (x, z)
TEACHER_TAG, OUTPUTS_TAG, STEPS_TAG = "sr3.teacher", "sr3.teacher_outputs", "sr3.student_steps"


@dataclass(frozen=True)
class DistillOptions:
    """What `jobs/distill.py` adds to the training flags (field names are its flags)."""

    student_steps: int = 4  # K ∈ sr3model.config.STUDENT_STEPS
    teacher_steps: int = 20
    teacher_sampler: str = "dpmpp-2m"
    teacher_outputs: str | None = None  # URI of the teacher-output dataset; default under --storage
    outputs_per_pair: int = 2  # teacher outputs (start noises) per train pair
    seed: int = 0  # of the teacher outputs' noise (pipelines.sampling.image_seed)
    hr_weight: float | None = None  # default: sr3model.config.DistillConfig's
    lr: float | None = None  # the student's learning rate (default DEFAULT_LR)
    warmup_steps: int | None = None  # default DEFAULT_WARMUP
    batch_size: int | None = None  # global batch (default: the teacher's)
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE on the student's config
    sample_batch: int = 16  # outputs per sampling call of the teacher
    device: str = "auto"  # where the teacher's sampling actors run
    workers: int | None = None
    num_gpus_per_worker: float | None = None
    limit: int | None = None  # only the first N train pairs (trials)


DEFAULT_LR, DEFAULT_WARMUP = 1e-3, 50  # benchmarks/bench_distill.py (README "Distil a fast student")


@dataclass(frozen=True)
class DistillResult:
    teacher: str  # pinned models:/NAME/VERSION
    outputs: str  # the teacher-output dataset URI
    outputs_version: str
    reused_outputs: bool
    training: TrainResult


def check_teacher(ref: ModelRef, uri: str) -> None:
    config = ref.config()
    if config.student:
        raise UserError(f"--teacher {uri}: {ref.label} is itself a distilled {config.distill.student_steps}-step "
                        f"student (of {config.distill.teacher}); distil from its teacher")
    if not config.conditional:
        raise UserError(f"--teacher {uri}: {ref.label} is an unconditional model (the cascade's base); a student "
                        "learns super-resolution from a conditional teacher (objective sr3 or residual)")
    if config.objective == "regression":
        raise UserError(f"--teacher {uri}: {ref.label} is a regression model: it already takes one pass")


def default_outputs_uri(storage_uri: str, ref: ModelRef, o: DistillOptions) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{ref.name}-v{ref.version}" if ref.name else ref.digest)
    return storage.join(storage_uri, "teacher-outputs", f"{name}-{o.teacher_sampler}-{o.teacher_steps}-seed{o.seed}")


def student_of(ref: ModelRef, o: DistillOptions, noise_device: str):
    """The student's SR3Config: `sr3model.distill.student_config`, then the run's learning rate,
    warm-up, --set and batch as jobs/train.py applies them (`pipelines.train.build_config`)."""
    from sr3model.distill import student_config

    config = student_config(ref.config(), o.student_steps, teacher_uri=ref.pinned, teacher_sampler=o.teacher_sampler,
                            teacher_steps=o.teacher_steps, hr_weight=o.hr_weight, noise_device=noise_device)
    rate = [f"train.lr={o.lr or DEFAULT_LR}",
            f"train.warmup_steps={DEFAULT_WARMUP if o.warmup_steps is None else o.warmup_steps}"]
    return build_config(config, overrides=(*rate, *o.overrides), batch_size=o.batch_size)


def distill(teacher_uri: str, pairs: str, options: DistillOptions, training: TrainOptions,
            say: Callable[[str], None] = print) -> DistillResult:
    """Teacher outputs, then the student's training run (see the module docstring)."""
    from sr3model.config import STUDENT_STEPS

    o = options
    if o.student_steps not in STUDENT_STEPS:
        raise UserError(f"--student-steps {o.student_steps}: choose from {', '.join(map(str, STUDENT_STEPS))}")
    if o.teacher_sampler not in TEACHER_SAMPLERS:
        raise UserError(f"--teacher-sampler {o.teacher_sampler}: choose a deterministic one "
                        f"({', '.join(TEACHER_SAMPLERS)}): the student learns the output of a given start noise")
    if o.outputs_per_pair < 1 or o.teacher_steps < 1:
        raise UserError("--outputs-per-pair and --teacher-steps must be at least 1")
    if not training.register:
        raise UserError("--register NAME: the student is registered (and looked up by alias) like any model")
    ref = resolve_model(teacher_uri, training.tracking_uri)
    check_teacher(ref, teacher_uri)
    sampling = sampling_for(ref, sampler=o.teacher_sampler, steps=o.teacher_steps)
    if not training.val_pairs and not int(pair_store.read_summary(pairs).get("val", 1) or 0):
        raise UserError(f"{pairs} has no val split: pass --val-pairs URI (validation and the promotion gate score "
                        "the student on its val pairs; the teacher's outputs have none)")
    storage_uri = training.storage_uri or DEFAULT_STORAGE
    run_name = training.run_name or f"{training.register}-student{o.student_steps}-of-{ref.name or 'model'}-v{ref.version or ref.digest}"
    training = training.with_(storage_uri=storage_uri, run_name=run_name, val_pairs=training.val_pairs or pairs,
                              val_steps=o.student_steps, val_sampler="distilled", extra_columns=EXTRA_COLUMNS)
    # everything that needs no sampling is checked before the teacher samples a single output
    planned = student_of(ref, o, "cuda" if training.use_gpu else "cpu")
    preflight(pairs, planned, training)

    outputs_uri = o.teacher_outputs or default_outputs_uri(storage_uri, ref, o)
    summary, reused = teacher_outputs(ref, sampling, pairs, outputs_uri, seed=o.seed, samples=o.outputs_per_pair,
                                      batch_size=o.sample_batch, device=o.device, workers=o.workers,
                                      num_gpus_per_worker=o.num_gpus_per_worker, limit=o.limit, say=say)
    noise_device = summary["noise_device"]
    if noise_device == "cuda" and not training.use_gpu:
        raise UserError(f"{outputs_uri}: the teacher's outputs were sampled on GPU actors, whose generators draw "
                        "other noise than the CPU's from the same seeds: train with --use-gpu, or sample them "
                        "on CPU (--device cpu --teacher-outputs <another URI>)")
    student = student_of(ref, o, noise_device)
    say(f"student: {student.name}, {o.student_steps} step(s) ({student.distill.hr_weight:g} × HR term, "
        f"L{student.distill.loss}), lr {student.train.lr:g}, batch {student.train.batch_size}; run {run_name}")
    result = train(outputs_uri, student, training, say=say)
    lineage(result, ref, outputs_uri, summary, o, training.register)
    return DistillResult(ref.pinned, outputs_uri, summary["version"], reused, result)


def lineage(result: TrainResult, ref: ModelRef, outputs_uri: str, summary: dict[str, Any], o: DistillOptions,
            register: str | None) -> None:
    """The teacher and its outputs as params and tags of the run, and as tags of the registered version."""
    from mlflow import MlflowClient

    tags = {TEACHER_TAG: ref.pinned, OUTPUTS_TAG: f"{outputs_uri}@{summary['version']}",
            STEPS_TAG: str(o.student_steps), "sr3.teacher_digest": ref.digest}
    tracking.log_params(result.tracking_uri, result.run_id, {
        "run.teacher": ref.pinned, "run.teacher_outputs": outputs_uri, "run.teacher_outputs_version": summary["version"],
        "run.teacher_sampler": o.teacher_sampler, "run.teacher_steps": o.teacher_steps,
        "run.outputs_per_pair": o.outputs_per_pair})
    tracking.set_tags(result.tracking_uri, result.run_id, tags)
    if register and result.registered_version:
        client = MlflowClient(result.tracking_uri)
        for key, value in tags.items():
            client.set_model_version_tag(register, result.registered_version, key, value)
