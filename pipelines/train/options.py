"""The training stage's options: one dataclass from the job's flags down to every worker.

    jobs/train.py flags ──`build_config`──> SR3Config (preset, objective, --set, --batch-size)
                        ──`cli.from_args`──> TrainOptions ──driver.train──> `Plan` (pre-flight)
                                                                └─`loop_config`─> LoopConfig (workers)

`TrainOptions` holds what a user chooses for a run (its fields are the job's flags, by name);
`LoopConfig` is what the driver derives from it for the workers (files, versions, run id), built in
one place, `loop_config`. Neither imports Ray or torch, so the job checks its flags before Ray starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.cli import UserError
from pipelines.train.promote import GateConfig

if TYPE_CHECKING:
    from sr3model.config import SR3Config

DEFAULT_CHECKPOINT_STEPS = 5000  # without --checkpoint-every: every 5000 steps ...
DEFAULT_CHECKPOINT_MINUTES = 30.0  # ... or every 30 minutes, whichever comes first
DEFAULT_KEEP_CHECKPOINTS = 3


@dataclass(frozen=True)
class TrainOptions:
    """A training run's choices; field names are `jobs/train.py`'s flags."""

    steps: int = 1000  # total optimiser steps of the run (a resumed run continues up to this)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default 0.5 on CPU, 1 with GPUs
    storage_uri: str | None = None  # checkpoint root; default `DEFAULT_STORAGE` (single node only)
    shared_fs: bool = False  # a plain local --storage/--pairs is on a file system every node sees
    run_name: str | None = None  # rerun with the same name (and storage) to resume
    experiment: str = "sr3"
    checkpoint_every: int | None = None  # steps; None: every 5000 steps or 30 minutes
    checkpoint_minutes: float | None = None
    keep_checkpoints: int | None = DEFAULT_KEEP_CHECKPOINTS
    shuffle_buffer: int = 0  # rows; 0: 16 batches, at least 256
    val_every: int = 0  # steps; 0: validate at the end only
    val_images: int = 4
    val_steps: int = 10  # refinement steps of validation sampling
    val_pairs: str | None = None  # another committed dataset whose val/ split validation and the gate use
    log_every: int = 1
    max_failures: int = 3
    resume_from: str | None = None  # another run's checkpoint to start from (a fork)
    register: str | None = None  # registered model name
    alias: str = "champion"
    gate: GateConfig = field(default_factory=GateConfig)
    micro_batch: int | None = None  # gradient accumulation: images per micro-batch on each worker
    compile: bool = False  # CUDA only
    channels_last: bool = False  # CUDA only
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    ray_address: str | None = None  # default: RAY_ADDRESS, else a local Ray
    log_pyfunc: bool = True
    fail_once_at: tuple[int, int] | None = None  # test hook: (rank, step) whose process is killed once
    fail_validation: bool = False  # test hook: every validation raises

    def with_(self, **fields: Any) -> TrainOptions:
        return dataclasses.replace(self, **fields)


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


@dataclass(frozen=True)
class LoopConfig:
    """What the driver passes to every worker (as a dict: `LoopConfig(**loop_config)`); built by
    `pipelines.train.driver.loop_config` from the run's `TrainOptions` and its pre-flight `Plan`."""

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
    val_steps: int = 10  # steps of the validation sampler
    val_sampler: str = "ddim"
    log_every: int = 1
    micro_batch: int = 0  # images per micro-batch (gradient accumulation); 0: the whole batch_per_worker
    compile: bool = False  # torch.compile the U-Net (CUDA only; a note and no-op on CPU)
    channels_last: bool = False  # channels_last weights and batches (CUDA only; a note and no-op on CPU)
    threads: int = 0  # torch threads of a worker: its CPUs (at least 1); 0: leave torch's default
    tracking_uri: str | None = None  # None: no MLflow
    run_id: str | None = None
    fail_rank: int = -1  # failure injection for tests: rank `fail_rank` raises after step
    fail_step: int = -1  # `fail_step` once, while the marker file `fail_marker` is absent
    fail_marker: str = ""
    fail_validation: bool = False  # test hook: validation raises (it must not cost the run)


def build_config(preset_name: str, objective: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                 batch_size: int | None = None, *, paper: bool = False) -> SR3Config:
    """The run's model config: a preset (with `paper`, the paper's method: `papers_method`),
    optionally another objective, `--set` overrides and the global batch size."""
    from sr3model.config import override, preset

    config = override(preset(preset_name, objective, paper=paper), overrides)
    if batch_size:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch_size))
    return config
