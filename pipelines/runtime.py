"""Connecting a stage to Ray: the cluster named by --ray-address or RAY_ADDRESS (as under
`ray job submit`), else a local Ray started for the run; storage endpoints travel to workers.
Stages call `init_ray` (or `init_ray_if_named`) themselves once their flags are checked; jobs never do.

Also what every sampling job shares: its flags (`add_sampling_worker_flags`) and the options they
fill (`SamplingOptions`, the base of the upscale, evaluation and study options).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines import storage


def init_ray(address: str | None = None) -> None:
    """Connect (once) to the job's Ray cluster; a caller that connected already (a test, a
    notebook) keeps its connection."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    env = storage.worker_env()
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local",
             runtime_env={"env_vars": env} if env else None, logging_level="WARNING")


def init_ray_if_named(address: str | None = None) -> bool:
    """Connect when a cluster is named (`address`, else RAY_ADDRESS as under `ray job submit`;
    "local" starts one here); returns whether this process is connected to Ray. Evaluation and
    the schedule search sample on that cluster's actors, else in their own process."""
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        init_ray(address)
    return ray.is_initialized()


@dataclass(frozen=True)
class SamplingOptions:
    """How and where a job samples; fields are the sampling flags' names. None: the model's own
    (stored sampling, else its config) for `steps`/`sampler`/`schedule`; placement by the cluster."""

    steps: int | None = None  # refinement steps K
    sampler: str | None = None
    schedule: str | None = None  # "START,END": a linear β schedule
    consistency: bool | None = None  # LR-consistent sampling (sr3model.consistency); None: stored, else config
    batch_size: int = 8  # outputs (or tiles) per network call
    device: str = "auto"  # auto | cpu | cuda: where sampling actors run
    workers: int | None = None  # sampling actors
    num_gpus_per_worker: float | None = None
    ray_address: str | None = None  # default: RAY_ADDRESS, else a local Ray
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db


def add_sampling_worker_flags(parser, *, output_format: bool = True) -> None:
    """The flags that place the sampling actors of jobs/upscale.py, cascade.py, evaluate.py and
    search_schedule.py (`output_format`: also --format, for the jobs that write images; without
    it, a job samples in its own process unless a cluster is named)."""
    if output_format:
        parser.add_argument("--format", choices=("png", "jpeg", "webp", "tiff"), default="png",
                            help="output format (png and tiff hold 16 bits and alpha, webp alpha, jpeg neither)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where sampling actors run: auto = GPUs when the cluster has or can scale up GPU "
                             "workers, else CPUs")
    parser.add_argument("--num-gpus-per-worker", type=float, help="GPUs per GPU actor (default 1)")
    parser.add_argument("--workers", type=int,
                        help="sampling actors; on GPUs the most the pool grows to (default: as many as the cluster "
                             "has or can scale to); on CPU one single-threaded actor per CPU by default, fewer "
                             "for few batches or a model too large to copy that often")
    parser.add_argument("--ray-address", default=None,
                        help="default: RAY_ADDRESS, else a local Ray" if output_format else
                        "sample on this Ray cluster's actors (default: RAY_ADDRESS, as under ray job submit; "
                        "'local' starts one here); without one, sample in this process")
