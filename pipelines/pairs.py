"""Build LR/HR training pairs from image buckets with Ray Data, once, into Parquet shards.

    list inputs (driver, fsspec)  →  from_items(files, one block per task)
      → map_batches(pairs_batch)  1 CPU per task: fetch (16 threads, ahead of decoding),
                                  decode (JPEG draft), crop/resize, LR, PNG encode
      → write_datasink(PairsDatasink)  fused into the same task: one shard per part,
                                       train/, val/, rejects/

Layout under OUTPUT: `train/*.parquet`, `val/*.parquet` (PAIR_COLUMNS), `rejects/*.parquet`
(REJECT_COLUMNS) and `_SUMMARY.json`. A custom datasink writes the three parts in the same pass,
each with its own columns (one `write_parquet` would need one schema, or a second decode pass).

Reruns: a run writes under `OUTPUT/_staging-<run id>/`; only after every task succeeded does it
delete `_SUMMARY.json` and the old parts, move the new parts in and write `_SUMMARY.json` last.
A failed run leaves the previous output untouched; `_SUMMARY.json` marks a complete output.
Keys, splits and patch seeds are documented in `pipelines.pair_transforms`.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from pipelines import storage
from pipelines.pair_transforms import (
    PAIR_COLUMNS,
    REJECT_COLUMNS,
    ROW_SCHEMA,
    PairSpec,
    pairs_batch,
    source_key,
    split_rows,
)

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext

PARTS = ("train", "val", "rejects")
SUMMARY_NAME = "_SUMMARY.json"
TARGET_SHARD_BYTES = 64 * 2**20  # PNG bytes per train shard (one shard per task)
PNG_BYTES_PER_PIXEL = 1.5  # rough PNG size of an RGB photo pixel, to size tasks
MAX_FILES_PER_TASK = 256
TASKS_PER_CPU = 4  # enough tasks to keep every CPU busy to the end on small runs


class PairsDatasink(Datasink[dict[str, Any]]):
    """Writes each task's rows as `<staging>/{train,val,rejects}/part-<task>.parquet`."""

    def __init__(self, staging: str) -> None:
        self.staging = staging
        self.counts: dict[str, Any] | None = None

    def write(self, blocks: Iterable[Block], ctx: "TaskContext") -> dict[str, Any]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        counts: dict[str, Any] = {part: 0 for part in PARTS} | {"by_reason": {}}
        if not tables:
            return counts
        fs, root = storage.resolve(self.staging)
        filesystem = storage.to_pyarrow(fs)
        for part, table in split_rows(pa.concat_tables(tables)).items():
            counts[part] = table.num_rows
            if table.num_rows:
                filesystem.create_dir(f"{root}/{part}", recursive=True)
                pq.write_table(table, f"{root}/{part}/part-{ctx.task_idx:05d}.parquet", filesystem=filesystem)
            if part == "rejects":
                reasons = pc.value_counts(table["reason"]).to_pylist()
                counts["by_reason"] = {item["values"]: item["counts"] for item in reasons}
        return counts

    def on_write_complete(self, write_result: WriteResult[dict[str, Any]]) -> None:
        totals: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for counts in write_result.write_returns:
            totals.update({part: counts[part] for part in PARTS})
            reasons.update(counts["by_reason"])
        self.counts = {part: totals[part] for part in PARTS} | {"by_reason": dict(sorted(reasons.items()))}


def list_sources(inputs: Sequence[str]) -> list[dict[str, Any]]:
    """Every file under the inputs as {key, source, size}, sorted by key.

    A file reached through two inputs is kept once; two files with the same key are an error."""
    by_key: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for uri in inputs:
        listed = storage.list_files(uri)
        if not listed:
            raise FileNotFoundError(f"no files under input {uri}")
        for item in listed:
            if item.uri in seen:
                continue
            seen.add(item.uri)
            key = source_key(item.root, item.relpath)
            if key in by_key:
                raise ValueError(
                    f"{item.uri} and {by_key[key]['source']} both have key {key!r}: "
                    "give the input folders distinct names"
                )
            by_key[key] = {"key": key, "source": item.uri, "size": item.size}
    return [by_key[key] for key in sorted(by_key)]


def plan_tasks(num_files: int, spec: PairSpec, cpus: int, files_per_task: int | None = None) -> int:
    """Number of tasks (= blocks = shards per part). Given files_per_task, exactly that; else
    shards near TARGET_SHARD_BYTES, with at least TASKS_PER_CPU tasks per CPU for small runs."""
    if files_per_task is not None:
        return math.ceil(num_files / files_per_task)
    pixels = spec.pairs_per_source * spec.hr_size**2 * (1 + 1 / spec.scale**2)
    per_task = max(1, min(MAX_FILES_PER_TASK, int(TARGET_SHARD_BYTES // (pixels * PNG_BYTES_PER_PIXEL))))
    return max(math.ceil(num_files / per_task), min(num_files, TASKS_PER_CPU * cpus))


def read_part(output: str, part: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One part ("train", "val", "rejects") of a built output as a pyarrow Table (empty if absent)."""
    names = list(REJECT_COLUMNS if part == "rejects" else PAIR_COLUMNS) if columns is None else list(columns)
    fs, path = storage.resolve(storage.join(output, part))
    if not fs.exists(path):  # a run without rejects (or without val rows) writes no files there
        return pa.schema([ROW_SCHEMA.field(name) for name in names]).empty_table()
    return pq.read_table(path, filesystem=storage.to_pyarrow(fs), columns=names)


def build_pairs(
    inputs: Sequence[str],
    output: str,
    recipe: str,
    hr_size: int,
    scale: int,
    val_fraction: float = 0.05,
    patches_per_image: int = 16,
    seed: int = 0,
    limit: int | None = None,
    *,
    files_per_task: int | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build pairs from every file under `inputs` into `output`; returns the `_SUMMARY.json` dict.

    Uses the Ray cluster this process is connected to (Ray Data starts a local one otherwise)."""
    spec = PairSpec(recipe, hr_size, scale, val_fraction, patches_per_image, seed)
    started = time.perf_counter()
    files = list_sources(inputs)
    found = len(files)
    files = files[:limit] if limit is not None else files
    if not files:
        raise ValueError("nothing to do: --limit selected no files")
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1
    tasks = plan_tasks(len(files), spec, cpus, files_per_task)
    progress(f"listed {found} files under {len(inputs)} input(s); building {len(files)} in {tasks} tasks")

    staging = storage.join(output, f"_staging-{uuid.uuid4().hex[:12]}")
    dataset = (
        ray.data.from_items(files, override_num_blocks=tasks)
        .map_batches(pairs_batch, fn_kwargs={"spec": spec}, batch_size=None, num_cpus=1)
    )
    # One fused operator: per-operator reservations have nothing to protect and, measured on
    # 2 CPUs, keep the second CPU idle for the first second of every run.
    dataset.context.op_resource_reservation_enabled = False
    sink = PairsDatasink(staging)
    try:
        dataset.write_datasink(sink)
        _commit(staging, output)
    finally:
        storage.remove(staging)
    assert sink.counts is not None

    elapsed = time.perf_counter() - started
    pairs = sink.counts["train"] + sink.counts["val"]
    summary = {
        "output": output,
        "inputs": list(inputs),
        **asdict(spec),
        "limit": limit,
        "found": found,
        "listed": len(files),
        "accepted": len(files) - sink.counts["rejects"],
        "pairs": pairs,
        "train": sink.counts["train"],
        "val": sink.counts["val"],
        "rejected": sink.counts["rejects"],
        "rejected_by_reason": sink.counts["by_reason"],
        "tasks": tasks,
        "elapsed_s": round(elapsed, 3),
        "files_per_s": round(len(files) / elapsed, 2),
        "pairs_per_s": round(pairs / elapsed, 2),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_bytes(storage.join(output, SUMMARY_NAME), json.dumps(summary, indent=2).encode())
    return summary


def _commit(staging: str, output: str) -> None:
    """Swap the staged parts in: summary out first, old parts out, new parts in."""
    storage.remove(storage.join(output, SUMMARY_NAME))
    for part in PARTS:
        storage.remove(storage.join(output, part))
        if storage.exists(storage.join(staging, part)):
            storage.move_tree(storage.join(staging, part), storage.join(output, part))
