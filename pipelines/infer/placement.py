"""Where the sampling actors run: a pure placement policy, and the Ray Data arguments it becomes.

`place_sampling_actors(resources, …, scalable=…)` decides from the cluster's resources now and
the most its autoscaler can add (`scalable`, from the autoscaler's node-group config, which Ray
Data itself reads; empty when there is none):

| --device | the cluster                          | actors                                               |
| -------- | ------------------------------------ | ---------------------------------------------------- |
| auto     | GPUs now, or GPU node groups that    | GPU actors (`--num-gpus-per-worker`, default 1): at  |
|          | can scale up from zero               | least one (so an empty GPU group scales up), as many |
|          |                                      | as there are GPUs now, growing to as many as the     |
|          |                                      | cluster can hold (or `--workers`), ≤ batches of work |
| auto     | no GPU now or ever                   | CPU actors: one single-threaded actor per CPU, fewer |
|          |                                      | for few batches or a model too large to copy that    |
|          |                                      | often; the CPUs shared out as torch threads          |
| cuda     | any                                  | GPU actors as above, even if none is visible yet     |
| cpu      | any                                  | CPU actors as above                                  |

On CPU one actor per CPU, each single-threaded, beats fewer multi-threaded ones for these
convolution sizes (benchmarks/bench_upscale.py: 2 actors × 1 thread sampled 1.2× faster than
1 actor × 2 threads on 2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "cpu"
    gpus: float  # per actor
    min_actors: int
    initial_actors: int
    max_actors: int
    threads: int  # torch threads per CPU actor (0: torch's default)

    def map_kwargs(self) -> dict[str, Any]:
        """`compute`, `num_gpus`, `num_cpus` for `Dataset.map_batches` of a sampling actor class."""
        import ray.data

        if self.min_actors == self.max_actors:
            compute = ray.data.ActorPoolStrategy(size=self.max_actors)
        else:
            compute = ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                                 initial_size=self.initial_actors)
        return {"compute": compute, "num_gpus": self.gpus or None, "num_cpus": 0 if self.gpus else 1}


def place_sampling_actors(resources: dict[str, float], num_gpus_per_worker: float | None = None,
                          workers: int | None = None, *, device: str = "auto",
                          scalable: dict[str, float] | None = None, model_bytes: int = 0,
                          blocks: int | None = None) -> Placement:
    """The placement of sampling actors for a cluster's `resources` now and the most its autoscaler
    can provide (`scalable`); see the module docstring."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: choose from {list(DEVICES)}")
    if device == "cpu" and num_gpus_per_worker:
        raise ValueError("--device cpu with --num-gpus-per-worker > 0: choose one")
    gpus_now = float(resources.get("GPU", 0))
    gpus_max = max(gpus_now, float((scalable or {}).get("GPU", 0)))
    cpus = max(1, int(resources.get("CPU", 1)))
    use_gpu = device == "cuda" or (device == "auto" and (bool(num_gpus_per_worker) or gpus_max > 0))
    if use_gpu:
        per_actor = num_gpus_per_worker or 1
        most = workers or max(1, int(gpus_max / per_actor))
        most = max(1, min(most, blocks)) if blocks else most
        initial = max(1, min(most, int(gpus_now / per_actor)))
        return Placement("cuda", per_actor, 1, initial, most, 0)
    if not workers:
        by_memory = int(resources.get("memory", 0) / 2 // (4 * model_bytes)) if model_bytes else cpus
        workers = max(1, min(cpus, by_memory, blocks or cpus))
    return Placement("cpu", 0, workers, workers, workers, max(1, cpus // workers))


def cluster_scalable() -> dict[str, float]:
    """The most of each resource the autoscaler can provide ({} without an autoscaler config).
    Ray Data reads the same node-group config for its own scaling (ray._private.state)."""
    try:
        import ray._private.state

        return dict(ray._private.state.state.get_max_resources_from_cluster_config() or {})
    except Exception:  # noqa: BLE001 — no autoscaler, or an older Ray: plan on what is there now
        return {}


def sampling_placement(num_gpus_per_worker: float | None, workers: int | None, *, device: str = "auto",
                       model_bytes: int = 0, blocks: int | None = None) -> Placement:
    """`place_sampling_actors` on the connected Ray cluster."""
    import ray

    from pipelines.runtime import init_ray

    init_ray()
    return place_sampling_actors(ray.cluster_resources(), num_gpus_per_worker, workers, device=device,
                                 scalable=cluster_scalable(), model_bytes=model_bytes, blocks=blocks)


def setup_actor(placement_device: str, threads: int) -> str:
    """Inside a sampling actor: its torch device (a GPU placement without a visible GPU is an
    error, not a silent CPU fallback) and, on CPU, its torch threads."""
    import ray
    import torch

    if placement_device == "cuda":
        if not (torch.cuda.is_available() and ray.get_gpu_ids()):
            raise RuntimeError("a GPU sampling actor found no CUDA device (check the node's drivers)")
        return "cuda"
    if threads:
        torch.set_num_threads(threads)
    return "cpu"


# Encoding and writing a batch is light next to sampling it: those tasks reserve no CPU (so CPU
# actors may hold every core without starving the writes) and run one at a time (one extra process).
WRITE_CPUS, WRITE_TASKS = 0, 1


def input_blocks(items: int, batch: int) -> int:
    """Blocks of a sampling job's input dataset: one per batch, at most 1000."""
    return max(1, min(-(-items // batch), 1000))
