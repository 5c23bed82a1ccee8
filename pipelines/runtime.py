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
    parser.add_argument("--workers", type=int,
                        help="sampling actors (default: one per GPU; on CPU one single-threaded actor per CPU, "
                             "fewer for few batches or a model too large to copy that often)")
    parser.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, else a local Ray")


# Encoding and writing a batch is light next to sampling it: those tasks reserve no CPU (so CPU
# actors may hold every core without starving the writes) and run one at a time (one extra process).
WRITE_CPUS, WRITE_TASKS = 0, 1


def input_blocks(items: int, batch: int) -> int:
    """Blocks of a sampling job's input dataset: one per batch, at most 1000."""
    return max(1, min(-(-items // batch), 1000))


def sampling_workers(num_gpus_per_worker: float | None, workers: int | None, *, model_bytes: int = 0,
                     blocks: int | None = None) -> tuple[float, int, int]:
    """`place_sampling_actors` on the connected Ray cluster's resources."""
    import ray

    init_ray()
    return place_sampling_actors(ray.cluster_resources(), num_gpus_per_worker, workers,
                                 model_bytes=model_bytes, blocks=blocks)


def place_sampling_actors(resources: dict[str, float], num_gpus_per_worker: float | None, workers: int | None,
                          *, model_bytes: int = 0, blocks: int | None = None) -> tuple[float, int, int]:
    """(GPUs per actor, actors, torch threads per CPU actor) for a cluster's `resources`.

    With GPUs: one GPU per actor and as many actors as GPUs (threads 0 = torch's default). On CPU:
    one actor per CPU, each single-threaded — for these convolution sizes data parallelism beats a
    multi-threaded forward (benchmarks/bench_upscale.py: 2 actors × 1 thread sampled 1.2× faster
    than 1 actor × 2 threads on 2 cores) — but no more actors than `blocks` of work, nor than half
    the cluster's memory holds at 4× `model_bytes` each; the CPUs are shared out as torch threads."""
    cluster_gpus, cluster_cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    gpus = num_gpus_per_worker if num_gpus_per_worker is not None else (1 if cluster_gpus else 0)
    if gpus:
        return gpus, workers or max(1, int(cluster_gpus / gpus)), 0
    if not workers:
        by_memory = int(resources.get("memory", 0) / 2 // (4 * model_bytes)) if model_bytes else cluster_cpus
        workers = max(1, min(cluster_cpus, by_memory, blocks or cluster_cpus))
    return 0, workers, max(1, cluster_cpus // workers)
