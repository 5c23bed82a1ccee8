"""Build LR/HR training pairs from image buckets with Ray Data, once, into Parquet shards.

    list inputs (driver, fsspec), in hashed order  →  from_items(files, one block per task)
      → map_batches(pairs_batch)  1 CPU per task: fetch (16 threads, ahead of decoding),
                                  decode (JPEG draft), crop/resize, LR, PNG encode
      → write_datasink(PairsDatasink)  fused into the same task: one shard per part,
                                       train/, val/, rejects/ of a new version
      → pair_store.commit  (driver): OUTPUT/_SUMMARY.json names the version and lists its files

Layout (`pipelines.pairs.store`): `OUTPUT/versions/<version>/{train,val,rejects}/part-<task>.parquet`
(PAIR_COLUMNS / REJECT_COLUMNS; row groups of ROW_GROUP_ROWS rows, the unit training reads and
shuffles) and `OUTPUT/_SUMMARY.json`, written last: the commit. A custom datasink writes the three
parts in the same pass, each with its own columns (one `write_parquet` would need one schema, or a
second decode pass).

Reruns: a run writes a new version next to the current one and commits it only when every task
succeeded and the build made pairs: when no file gave a pair, or more than `max_read_errors` of
the files could not be read (a storage outage), nothing is committed, the new version is deleted,
and the previous dataset stays as it was. Readers (`read_part`) read what the summary lists only.
Keys, splits, order and patch seeds are documented in `pipelines.pairs.transforms`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from pipelines import storage
from pipelines.pairs import store as pair_store
from pipelines.cli import UserError
from pipelines.runtime import init_ray, refuse_node_local
from pipelines.pairs.transforms import (
    PAIR_COLUMNS,
    REJECT_COLUMNS,
    ROW_SCHEMA,
    PairSpec,
    order_key,
    pairs_batch,
    rows_digest,
    source_key,
    split_rows,
)

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext

PARTS = pair_store.PARTS
SUMMARY_NAME = pair_store.SUMMARY_NAME
ROW_GROUP_ROWS = 64  # rows per Parquet row group: what a training worker reads at once
DEFAULT_MAX_READ_ERRORS = 0.05  # fraction of files that may fail to read before a build is refused
TARGET_SHARD_BYTES = 64 * 2**20  # PNG bytes per train shard (one shard per task)
PNG_BYTES_PER_PIXEL = 1.5  # rough PNG size of an RGB photo pixel, to size tasks
MAX_FILES_PER_TASK = 256
TASKS_PER_CPU = 4  # enough tasks to keep every CPU busy to the end on small runs


class PairsDatasink(Datasink[dict[str, Any]]):
    """Writes each task's rows as `<version>/{train,val,rejects}/part-<task>.parquet`."""

    def __init__(self, output: str, version: str) -> None:
        self.output, self.version = output, version
        self.counts: dict[str, Any] | None = None

    def write(self, blocks: Iterable[Block], ctx: "TaskContext") -> dict[str, Any]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        counts: dict[str, Any] = {part: 0 for part in PARTS} | {"by_reason": {}, "files": {}, "digest": 0}
        if not tables:
            return counts
        root = pair_store.version_uri(self.output, self.version)
        for part, table in split_rows(pa.concat_tables(tables)).items():
            counts[part] = table.num_rows
            if table.num_rows:
                relative = f"{part}/part-{ctx.task_idx:05d}.parquet"
                storage.write_parquet(storage.join(root, relative), table, row_group_size=ROW_GROUP_ROWS)
                groups = [min(ROW_GROUP_ROWS, table.num_rows - start) for start in range(0, table.num_rows, ROW_GROUP_ROWS)]
                path = f"{pair_store.VERSIONS_DIR}/{self.version}/{relative}"
                counts["files"][part] = {"path": path, "rows": table.num_rows, "row_groups": groups}
            if part == "rejects":
                reasons = pc.value_counts(table["reason"]).to_pylist()
                counts["by_reason"] = {item["values"]: item["counts"] for item in reasons}
            else:
                counts["digest"] = (counts["digest"] + rows_digest(table)) % 2**64
        return counts

    def on_write_complete(self, write_result: WriteResult[dict[str, Any]]) -> None:
        totals: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        files: dict[str, list[dict[str, Any]]] = {part: [] for part in PARTS}
        digest = 0
        for counts in write_result.write_returns:
            totals.update({part: counts[part] for part in PARTS})
            reasons.update(counts["by_reason"])
            for part, described in counts["files"].items():
                files[part].append(described)
            digest = (digest + counts["digest"]) % 2**64
        self.counts = ({part: totals[part] for part in PARTS} | {"by_reason": dict(sorted(reasons.items()))}
                       | {"files": files, "fingerprint": f"{digest:016x}"})


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
    max_read_errors: float = DEFAULT_MAX_READ_ERRORS,
    keep_versions: int = pair_store.DEFAULT_KEEP,
    progress: Callable[[str], None] = print,
    ray_address: str | None = None,
    shared_fs: bool = False,
) -> dict[str, Any]:
    """Build pairs from every file under `inputs` into a new version of `output` and commit it;
    returns the committed `_SUMMARY.json` dict.

    Checks the flags and inputs first, then connects to the Ray cluster (`pipelines.runtime.init_ray`:
    `ray_address`, else RAY_ADDRESS, else a local Ray; a process already connected keeps its connection).
    On a multi-node cluster a plain local --input or --output is refused unless `shared_fs`."""
    spec = PairSpec(recipe, hr_size, scale, val_fraction, patches_per_image, seed)
    if keep_versions < 1 or not 0 <= max_read_errors <= 1:
        raise UserError("--keep-versions must be at least 1 and --max-read-errors in [0, 1]")
    for uri in inputs:
        if not storage.exists(uri):
            raise UserError(f"--input {uri}: nothing there")
    init_ray(ray_address)
    for uri in inputs:
        refuse_node_local({"--input": uri}, shared_fs=shared_fs)
    refuse_node_local({"--output": output}, shared_fs=shared_fs)
    started = time.perf_counter()
    files = list_sources(inputs)
    found = len(files)
    files = files[:limit] if limit is not None else files
    if not files:
        raise ValueError("nothing to do: --limit selected no files")
    return build_listed(files, output, spec, inputs=inputs, found=found, limit=limit, started=started,
                        files_per_task=files_per_task, max_read_errors=max_read_errors,
                        keep_versions=keep_versions, progress=progress)


def build_listed(files: list[dict[str, Any]], output: str, spec: PairSpec, *, inputs: Sequence[str] = (),
                 found: int | None = None, limit: int | None = None, started: float | None = None,
                 files_per_task: int | None = None, max_read_errors: float = DEFAULT_MAX_READ_ERRORS,
                 keep_versions: int = pair_store.DEFAULT_KEEP,
                 progress: Callable[[str], None] = print) -> dict[str, Any]:
    """`build_pairs` on an already listed set of files ({key, source, size}, as `list_sources`)."""
    started = time.perf_counter() if started is None else started
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1
    tasks = plan_tasks(len(files), spec, cpus, files_per_task)
    version = pair_store.new_version()
    progress(f"listed {found if found is not None else len(files)} files under {len(inputs)} input(s); "
             f"building {len(files)} in {tasks} tasks as version {version}")

    ordered = sorted(files, key=lambda item: order_key(item["key"]))  # shards do not follow the listing
    dataset = (
        ray.data.from_items(ordered, override_num_blocks=tasks)
        .map_batches(pairs_batch, fn_kwargs={"spec": spec}, batch_size=None, num_cpus=1)
    )
    # One fused operator: per-operator reservations have nothing to protect and, measured on
    # 2 CPUs, keep the second CPU idle for the first second of every run.
    dataset.context.op_resource_reservation_enabled = False
    sink = PairsDatasink(output, version)
    committed = False
    try:
        dataset.write_datasink(sink)
        assert sink.counts is not None
        counts = sink.counts
        refusal = _refusal(counts, len(files), max_read_errors)
        if refusal:
            raise UserError(f"{refusal}; nothing committed, {output} is left as it was")
        elapsed = time.perf_counter() - started
        pairs = counts["train"] + counts["val"]
        summary = {
            "output": output,
            "inputs": list(inputs),
            **asdict(spec),
            "limit": limit,
            "found": found if found is not None else len(files),
            "listed": len(files),
            "accepted": len(files) - counts["rejects"],
            "pairs": pairs,
            "train": counts["train"],
            "val": counts["val"],
            "rejected": counts["rejects"],
            "rejected_by_reason": counts["by_reason"],
            "fingerprint": counts["fingerprint"],
            "row_group_rows": ROW_GROUP_ROWS,
            "tasks": tasks,
            "elapsed_s": round(elapsed, 3),
            "files_per_s": round(len(files) / elapsed, 2),
            "pairs_per_s": round(pairs / elapsed, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        document = pair_store.commit(output, version, counts["files"], summary, keep=keep_versions)
        committed = True
    finally:
        if not committed:
            pair_store.discard(output, version)
    return document


def _refusal(counts: dict[str, Any], listed: int, max_read_errors: float) -> str | None:
    """Why a finished build must not replace the current dataset, or None."""
    reasons = counts["by_reason"]
    said = ", ".join(f"{reason} {count}" for reason, count in reasons.items())
    if counts["train"] + counts["val"] == 0:
        return f"none of the {listed} files gave a pair ({said})"
    unread = reasons.get("read_error", 0)
    if unread > max_read_errors * listed:
        return (f"{unread} of {listed} files could not be read (more than --max-read-errors "
                f"{max_read_errors:g}); storage trouble?")
    return None
