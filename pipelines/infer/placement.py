"""Where the sampling actors and the write tasks run: a pure placement policy, and the Ray Data
arguments it becomes.

`place_sampling_actors(resources, …, scalable=…, nodes=…)` decides from the cluster's nodes now
(each node's own CPUs, GPUs and memory: an actor lives on one node, so sizes come from nodes, not
cluster totals) and the most its autoscaler can add (`scalable`, from the autoscaler's node-group
config, which Ray Data itself reads; empty when there is none):

| --device | the cluster                          | actors                                               |
| -------- | ------------------------------------ | ---------------------------------------------------- |
| auto     | GPUs now, or GPU node groups that    | GPU actors (`--num-gpus-per-worker`, default 1): at  |
|          | can scale up from zero               | least one (so an empty GPU group scales up), as many |
|          |                                      | as the nodes' GPUs hold now, growing to as many as   |
|          |                                      | the cluster can hold (or `--workers`), ≤ batches     |
| auto     | no GPU now or ever                   | CPU actors: one single-threaded actor per CPU, fewer |
|          |                                      | for few batches or where a node's memory cannot hold |
|          |                                      | that many model copies; fewer actors get more torch  |
|          |                                      | threads, and reserve as many CPUs on their node      |
| cuda     | any                                  | GPU actors as above, even if none is visible yet     |
| cpu      | any                                  | CPU actors as above                                  |

Each actor's memory budget (`Placement.memory_bytes`, or on a GPU its share of the device:
`gpus` × the device's memory, measured in the actor) sets its default canvas cap and the largest
input it accepts: one whose output alone would need more is rejected as `too_large` before
sampling (`pipelines.sampling.memory_budget`). A CPU actor's budget is its share of its node's
memory (threads / the node's CPUs), on the smallest node it could land on.

Failures are bounded: an actor is restarted at most ACTOR_RESTARTS times, a batch whose actor died
is not retried by Ray (TASK_RETRIES), and a decode or write task at most TASK_MAX_RETRIES times
(Ray Data's defaults, -1 everywhere, let an input that kills its process crash-loop a job forever,
and a batch waits for its actor's restart, which never comes when its node is gone and the other
nodes are full); what is lost goes back to the driver (`pipelines.infer.upscale`), which retries
those inputs once, each alone, and rejects what still fails. (Ray 2.60 takes `max_restarts`,
`max_task_retries` and `max_retries` only through `map_batches`' `**ray_remote_args`, which it
calls deprecated; no named parameter replaces them yet.) Before CPU actors the decode tasks reserve
no CPU (`decode_kwargs`), as the write tasks do.

Writing scales with sampling: `write_tasks` encode-and-write tasks (one per WRITE_ACTORS sampling
actors), each PUTting its outputs in `bucket.PUT_THREADS` threads (`pipelines.infer.bucket.write_batch`);
they reserve no CPU (WRITE_CPUS), so CPU actors may hold every core without starving the writes.

On CPU one actor per CPU, each single-threaded, beats fewer multi-threaded ones for these
convolution sizes (benchmarks/bench_upscale.py: 2 actors × 1 thread sampled 1.2× faster than
1 actor × 2 threads on 2 cores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
ACTOR_RESTARTS = 3  # restarts of one sampling actor (its process or node died) over a job
TASK_RETRIES = 0  # retries by Ray of a batch whose actor died: none, the driver retries its inputs alone
TASK_MAX_RETRIES = 3  # retries by Ray of a decode or write task whose process or node died (Ray Data: forever)
WRITE_CPUS = 0  # CPUs a write task reserves
WRITE_ACTORS = 2  # sampling actors per write task (benchmarks/bench_write.py)


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "cpu"
    gpus: float  # per actor
    min_actors: int
    initial_actors: int
    max_actors: int
    threads: int  # torch threads (and reserved CPUs) per CPU actor (0: torch's default)
    memory_bytes: int = 0  # a CPU actor's share of its node's memory (0: a GPU actor's share of its device)

    def map_kwargs(self, alone: bool = False) -> dict[str, Any]:
        """`compute`, `num_gpus`, `num_cpus` and the bounded restarts for `Dataset.map_batches` of a
        sampling actor class. `alone`: an actor holds one task at a time (by default Ray Data
        queues two per actor), so an input whose process dies takes no other input's task
        with it: what the driver's one-by-one retry of lost inputs needs to blame only the one."""
        import ray.data

        queue = {"max_tasks_in_flight_per_actor": 1} if alone else {}
        if self.min_actors == self.max_actors:
            compute = ray.data.ActorPoolStrategy(size=self.max_actors, **queue)
        else:
            compute = ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                                 initial_size=self.initial_actors, **queue)
        return {"compute": compute, "num_gpus": self.gpus or None,
                "num_cpus": 0 if self.gpus else max(1, self.threads),
                "max_restarts": ACTOR_RESTARTS, "max_task_retries": TASK_RETRIES}

    def decode_kwargs(self) -> dict[str, Any]:
        """`num_cpus`, `compute` and bounded retries for the decode tasks before the actors. Before
        CPU actors (which hold every CPU) they reserve none, `max_actors` at a time (a task that
        reserved a CPU would wait forever for one; Ray Data cannot fuse them into the actors, whose
        `max_restarts` a task refuses); before GPU actors, one CPU each."""
        import ray.data

        if self.device == "cpu":
            return {"compute": ray.data.TaskPoolStrategy(size=max(1, self.max_actors)), "num_cpus": 0,
                    "max_retries": TASK_MAX_RETRIES}
        return {"num_cpus": 1, "max_retries": TASK_MAX_RETRIES}

    @property
    def write_tasks(self) -> int:
        """Encode-and-write tasks that keep up with `max_actors` sampling actors."""
        return max(1, math.ceil(self.max_actors / WRITE_ACTORS))

    def write_kwargs(self) -> dict[str, Any]:
        """`compute`, `num_cpus` and bounded retries for `Dataset.map_batches` of `bucket.write_batch`."""
        import ray.data

        return {"compute": ray.data.TaskPoolStrategy(size=self.write_tasks), "num_cpus": WRITE_CPUS,
                "max_retries": TASK_MAX_RETRIES}


def place_sampling_actors(resources: Mapping[str, float], num_gpus_per_worker: float | None = None,
                          workers: int | None = None, *, device: str = "auto",
                          scalable: Mapping[str, float] | None = None, model_bytes: int = 0,
                          blocks: int | None = None, nodes: Sequence[Mapping[str, float]] | None = None) -> Placement:
    """The placement of sampling actors for a cluster's `resources` (totals) and `nodes` (each alive
    node's resources; default: one node holding the totals) now, and the most its autoscaler can
    provide (`scalable`); see the module docstring."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: choose from {list(DEVICES)}")
    if device == "cpu" and num_gpus_per_worker:
        raise ValueError("--device cpu with --num-gpus-per-worker > 0: choose one")
    nodes = list(nodes) if nodes else [resources]
    gpus_max = max(float(resources.get("GPU", 0)), float((scalable or {}).get("GPU", 0)))
    use_gpu = device == "cuda" or (device == "auto" and (bool(num_gpus_per_worker) or gpus_max > 0))
    if use_gpu:
        per_actor = num_gpus_per_worker or 1
        now = sum(int(float(n.get("GPU", 0)) / per_actor + 1e-9) for n in nodes)  # an actor's GPUs lie on one node
        most = workers or max(1, now, int(float((scalable or {}).get("GPU", 0)) / per_actor + 1e-9))
        most = max(1, min(most, blocks)) if blocks else most
        initial = max(1, min(most, now))
        return Placement("cuda", per_actor, 1, initial, most, 0)
    cpu_nodes = [n for n in nodes if float(n.get("CPU", 0)) >= 1] or [{**resources, "CPU": 1}]
    copies = [_copies(n, model_bytes) for n in cpu_nodes]  # actors each node can hold by CPUs and memory
    if not workers:
        workers = max(1, min(sum(copies), blocks or sum(copies)))
    threads = max([1] + [t for t in range(1, 1 + max(int(n["CPU"]) for n in cpu_nodes))
                         if sum(int(float(n["CPU"])) // t for n in cpu_nodes) >= workers])
    used = [n for n, k in zip(cpu_nodes, copies) if k and int(float(n["CPU"])) >= threads] or cpu_nodes
    memory = min(int(float(n.get("memory", 0)) * threads / float(n["CPU"])) for n in used)
    return Placement("cpu", 0, workers, workers, workers, threads, memory)


def _copies(node: Mapping[str, float], model_bytes: int) -> int:
    """CPU actors a node holds: one per CPU, as many model copies (×4: weights, EMA-free model,
    activations) as half its memory takes."""
    cpus = int(float(node.get("CPU", 0)))
    if not model_bytes:
        return cpus
    return min(cpus, int(float(node.get("memory", 0)) / 2 // (4 * model_bytes)))


def sampling_placement(num_gpus_per_worker: float | None, workers: int | None, *, device: str = "auto",
                       model_bytes: int = 0, blocks: int | None = None) -> Placement:
    """`place_sampling_actors` on the connected Ray cluster's nodes."""
    import ray

    from pipelines.runtime import cluster_scalable, init_ray, node_resources

    init_ray()
    return place_sampling_actors(ray.cluster_resources(), num_gpus_per_worker, workers, device=device,
                                 scalable=cluster_scalable(), model_bytes=model_bytes, blocks=blocks,
                                 nodes=node_resources())


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


def input_blocks(items: int, batch: int) -> int:
    """Blocks of a sampling job's input dataset: one per batch, at most 1000."""
    return max(1, min(-(-items // batch), 1000))
