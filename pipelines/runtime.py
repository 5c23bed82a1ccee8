"""Connecting a job to Ray: the cluster named by --ray-address or RAY_ADDRESS (as under
`ray job submit`), else a local Ray started for the run; storage endpoints travel to workers."""

from __future__ import annotations

import os

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


def add_sampling_worker_flags(parser) -> None:
    """The flags that place the sampling actors of jobs/upscale.py and jobs/cascade.py."""
    parser.add_argument("--format", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--num-gpus-per-worker", type=float, help="default: 1 if the cluster has GPUs, else 0")
    parser.add_argument("--workers", type=int, help="sampling actors (default: the GPUs, or 1 on CPU)")
    parser.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, else a local Ray")


def sampling_workers(num_gpus_per_worker: float | None, workers: int | None) -> tuple[float, int, int]:
    """(GPUs per actor, actors, torch threads per CPU actor) on the connected Ray cluster: one GPU
    per actor and as many actors as GPUs when there are GPUs; else one actor per request with the
    cluster's CPUs shared between them (threads 0 = leave torch's default, for GPU actors)."""
    import ray

    init_ray()
    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    gpus = num_gpus_per_worker if num_gpus_per_worker is not None else (1 if cluster_gpus else 0)
    workers = workers or (max(1, int(cluster_gpus / gpus)) if gpus else 1)
    return gpus, workers, 0 if gpus else max(1, cluster_cpus // workers)
