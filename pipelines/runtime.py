"""Connecting a stage to Ray: the cluster named by --ray-address or RAY_ADDRESS (as under
`ray job submit`), else a local Ray started for the run; storage endpoints travel to workers.
Stages call `init_ray` (or `init_ray_if_named`) themselves once their flags are checked; jobs never do.

Also what every sampling job shares: its flags (`add_sampling_worker_flags`) and the options they
fill (`SamplingOptions`, the base of the upscale, evaluation and study options).

On a cluster of several nodes (or one whose autoscaler can add nodes) a plain local path is a
different folder on every node: `refuse_node_local` turns such a `--storage`, `--output`,
`--pairs`, `--input` into one input error naming the flag, unless the user says every node mounts
it at that path (`--shared-fs`); a local default (`--storage`'s ~/ray_results) is refused either way.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pipelines import storage
from pipelines.cli import UserError


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


def cluster_scalable() -> dict[str, float]:
    """The most of each resource the autoscaler can provide ({} without an autoscaler config).
    Ray Data reads the same node-group config for its own scaling (ray._private.state)."""
    try:
        import ray._private.state

        return dict(ray._private.state.state.get_max_resources_from_cluster_config() or {})
    except Exception:  # noqa: BLE001 — no autoscaler, or an older Ray: plan on what is there now
        return {}


def node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected cluster (CPU, GPU, memory, …)."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def node_count() -> int:
    """Alive nodes of the connected cluster; 2 for a one-node cluster whose autoscaler can add more
    (its work will run on nodes that do not exist yet)."""
    alive = len(node_resources())
    return 2 if alive < 2 and cluster_scalable() else alive


def refuse_node_local(flags: Mapping[str, str | None], *, shared_fs: bool = False,
                      defaulted: Collection[str] = (), nodes: int | None = None) -> None:
    """On a multi-node cluster, a `UserError` for the first plain local path among `flags`
    (flag → URI; None: not given) unless `shared_fs`; a flag in `defaulted` holds a local default
    the user did not choose and is refused even with `shared_fs`. `nodes`: the cluster's node
    count (default: `node_count()` of the connected cluster)."""
    local = {flag: uri for flag, uri in flags.items() if uri and storage.protocol(uri) in ("file", "local")}
    if not local:
        return
    nodes = node_count() if nodes is None else nodes
    if nodes < 2:
        return
    for flag, uri in local.items():
        if flag in defaulted:
            raise UserError(f"{flag} not given: its default {uri} is a local path, on whichever node uses it, and "
                            f"this cluster has {nodes} nodes; give {flag} a URI that every node reaches")
        if not shared_fs:
            raise UserError(f"{flag} {uri}: a local path on a {nodes}-node cluster is a different folder on every "
                            f"node; use a gs:// or s3:// URI, or pass --shared-fs if every node mounts it at this path")


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


def add_shared_fs_flag(parser, paths: str) -> None:
    """--shared-fs: the job's local `paths` (e.g. "--input/--output") are on a file system that
    every node mounts at the same path; without it they are refused on a multi-node cluster."""
    parser.add_argument("--shared-fs", action="store_true",
                        help=f"local {paths} paths are on a file system every node of the cluster mounts at the same "
                             f"path (NFS, a bucket mounted with FUSE); without it a local path is refused on a "
                             f"multi-node cluster")


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
