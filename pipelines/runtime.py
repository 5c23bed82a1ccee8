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
