"""What an output prefix already holds, and what a run must do: manifest, rejects, planning, compaction.

    OUTPUT/_manifest/*.parquet   one row per written image (MANIFEST_SCHEMA), the latest row per
                                 output name counts
    OUTPUT/_rejects/*.parquet    one row per rejected input (REJECT_SCHEMA), the latest per source

Write tasks add small `part-*` files (one per written batch); `compact` folds a run's parts into
one `run-*` file at the end of the run (the latest row per output / source: a batch written twice,
by a task retried after its node died, leaves one row), and merges all files into one `compact-*` file when more
than MAX_FILES accumulate, so planning reads a handful of files however many runs came before.
Compaction writes the merged file before deleting what it merged: a crash in between leaves
duplicate rows, which readers resolve (latest `finished_at` wins).

Rerun rules (`plan`), given each listed input's fingerprint (size + the storage's crc32c / md5 /
etag / generation / mtime, `input_fingerprint`) and this run's model and settings (`Current`):

| the input's outputs are in the manifest and …              | this run                               |
| ---------------------------------------------------------- | -------------------------------------- |
| same input, same model version and settings                | skipped (done)                         |
| the input changed (fingerprint; where the stamp is only an | redone                                 |
| mtime, a file rewritten with the same bytes — `input_hash` |                                        |
| — is not a change: its new stamp is recorded)              |                                        |
| another model (version / weights) or settings (sampler,    | reported as stale; redone with         |
| steps, schedule, seed, tile, overlap, LR consistency,     | `--redo-stale`                         |
| format, alpha, colour, strip_metadata, fallback)           |                                        |

| the input was rejected before (same fingerprint) with …    | this run                               |
| ---------------------------------------------------------- | -------------------------------------- |
| empty, not_an_image, truncated, corrupt, decompression_bomb, | skipped                              |
| unsupported_mode, unsafe_name (PERMANENT)                  |                                        |
| read_error, out_of_memory, sample_failed, write_failed,    | retried                                |
| crashed                                                    |                                        |
| too_large                                                  | retried if --max-output-pixels was raised |
|                                                            | (or above an actor's budget: its limit) |
| would_lose (the format cannot hold what the input has)     | retried if --format or --fallback changed; |
|                                                            | else skipped, counted as `refused_before` |
| output_collision                                           | decided again from the listing         |

Rows written before these columns existed (no fingerprint, model digest, seed, tile, fidelity
settings) are compared on what they have (size, model URI, sampler, steps, schedule): an output
written before outputs kept alpha, depth and profiles is not reported stale for it. Rows from
before the consistency column were sampled without it (`BEFORE_THE_COLUMN`), so a run with it on
redoes them as stale.

Per output, the manifest also records what it kept or converted (`pipelines.images.fidelity`):
input and output mode, bit depth and profile, what happened to alpha, which metadata it carries,
and the conversions made.
"""

from __future__ import annotations

import hashlib
import posixpath
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.infer.layout import MANIFEST_DIR, REJECTS_DIR, UnsafeName, output_names

MAX_FILES = 8  # run files kept before they are merged into one
MANIFEST_SCHEMA = pa.schema([
    ("source", pa.string()), ("output", pa.string()), ("sample", pa.int32()),
    ("model_uri", pa.string()), ("model_name", pa.string()), ("model_version", pa.string()),
    ("model_digest", pa.string()),
    ("sampler", pa.string()), ("steps", pa.int32()), ("schedule", pa.string()),
    ("schedule_source", pa.string()), ("run_seed", pa.int64()), ("tile", pa.int32()), ("overlap", pa.int32()),
    ("consistency", pa.bool_()), ("seed", pa.int64()),
    ("input_width", pa.int32()), ("input_height", pa.int32()),
    ("output_width", pa.int32()), ("output_height", pa.int32()),
    ("input_bytes", pa.int64()), ("input_fingerprint", pa.string()), ("input_hash", pa.string()),
    ("tiles", pa.int32()), ("batch_pixels", pa.int64()), ("seconds", pa.float64()),
    ("finished_at", pa.string()),
    # settings that change the bytes (pipelines.images.fidelity.Fidelity.record)
    ("format", pa.string()), ("alpha_mode", pa.string()), ("colour_mode", pa.string()),
    ("strip_metadata", pa.bool_()), ("fallback", pa.string()),
    # what this output kept or converted (fidelity.assemble)
    ("input_mode", pa.string()), ("input_bits", pa.int32()), ("input_profile", pa.string()),
    ("output_mode", pa.string()), ("output_bits", pa.int32()), ("output_profile", pa.string()),
    ("alpha", pa.string()), ("metadata", pa.string()), ("conversions", pa.string()),
])
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                           ("input_bytes", pa.int64()), ("input_fingerprint", pa.string()),
                           ("max_output_pixels", pa.int64()), ("finished_at", pa.string()),
                           ("settings", pa.string())])  # what decided a would_lose (Fidelity.settings)
PERMANENT = frozenset({"empty", "not_an_image", "truncated", "corrupt", "decompression_bomb", "unsupported_mode",
                       "unsafe_name"})
RELISTED = frozenset({"output_collision"})  # decided again from each run's listing
# Columns that make an output stale when they differ from this run's (compared when both are set).
MODEL_COLUMNS = ("model_uri", "model_digest")
SETTING_COLUMNS = ("sampler", "steps", "schedule", "run_seed", "tile", "overlap", "consistency",
                   "format", "alpha_mode", "colour_mode", "strip_metadata", "fallback")
# A setting that rows written before its column existed had, whatever they say (null there)
BEFORE_THE_COLUMN = {"consistency": False}
REFUSED = "would_lose"  # the chosen output cannot hold what the input has (fidelity._refuse)


@dataclass(frozen=True)
class Current:
    """This run's model and settings, as the manifest records them."""

    record: dict[str, Any]  # MODEL_COLUMNS + SETTING_COLUMNS (+ model_name, model_version, schedule_source)
    max_output_pixels: int
    refusal: str | None = None  # Fidelity.settings: a would_lose reject made under them still holds


@dataclass
class Plan:
    todo: list[dict[str, Any]]
    rejects: list[dict[str, Any]]  # rejected now, by name
    counts: dict[str, int]  # listed, skipped_done, stale, redone_stale, changed, skipped_rejected, retried, touched,
    # refused_before (of skipped_rejected: would_lose under these settings)
    refresh: list[dict[str, Any]] = field(default_factory=list)  # manifest rows with a new fingerprint, same content


def now() -> str:
    """UTC time with microseconds: the order of rows written by successive runs."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def fingerprint(item: storage.ListedFile) -> str:
    return f"{item.size}:{item.version}" if item.version else str(item.size)


def content_hash(data: bytes) -> str:
    """The input's own hash, kept in the manifest: where the storage's stamp is only an mtime, a
    file rewritten with the same bytes is recognised by it (and not sampled again)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def parquet_files(output: str, folder: str) -> list[str]:
    """The Parquet files under OUTPUT/`folder` (`_manifest` or `_rejects`), sorted."""
    fs, path = storage.resolve(storage.join(output, folder))
    return sorted(name for name in (fs.find(path) if fs.exists(path) else []) if name.endswith(".parquet"))


def _read(output: str, names: Sequence[str], schema: pa.Schema, columns: Sequence[str]) -> pa.Table:
    """Columns of parquet files `names`; columns a file lacks (older layouts) come back as nulls."""
    fs, _ = storage.resolve(output)
    filesystem = storage.to_pyarrow(fs)
    wanted = pa.schema([schema.field(c) for c in columns])
    tables = []
    for name in names:
        with filesystem.open_input_file(name) as handle:
            found = pq.ParquetFile(handle)
            present = [c for c in columns if c in found.schema_arrow.names]
            table = found.read(columns=present)
        for column in columns:
            if column not in present:
                table = table.append_column(column, pa.nulls(len(table), wanted.field(column).type))
        tables.append(table.select(list(columns)).cast(wanted))
    return pa.concat_tables(tables) if tables else wanted.empty_table()


def read_table(output: str, folder: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Every row of `_manifest` or `_rejects` (duplicates included; empty table when none)."""
    schema = MANIFEST_SCHEMA if folder == MANIFEST_DIR else REJECT_SCHEMA
    return _read(output, parquet_files(output, folder), schema, columns or schema.names)


def latest(table: pa.Table, key: str) -> pa.Table:
    """The row with the latest `finished_at` for each value of `key`."""
    if len(table) == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[(key, "ascending"), ("finished_at", "descending")])
    table = table.take(order)
    keys = table.column(key).combine_chunks()
    first = pc.or_(pc.not_equal(keys[1:], keys[:-1]), pc.is_null(keys[1:]))  # a new key starts at i + 1
    return table.filter(pa.concat_arrays([pa.array([True]), pc.fill_null(first, True)]))


def plan(listed: Iterable[storage.ListedFile], output: str, fmt: str, samples: int, current: Current, *,
         exclude: str | None = None, redo_stale: bool = False) -> Plan:
    """What to do with the listed inputs against what OUTPUT holds (rules: module docstring).
    `exclude`: a URI prefix (the output, when it lies inside the input) whose files are not inputs."""
    columns = ["output", "input_bytes", "input_fingerprint", "input_hash", "finished_at", *MODEL_COLUMNS,
               *SETTING_COLUMNS]
    table = latest(read_table(output, MANIFEST_DIR, columns), "output")
    stale = _stale_mask(table, current.record).to_pylist()
    done = {name: {"input_fingerprint": fp, "input_bytes": size, "input_hash": digest, "stale": old}
            for name, fp, size, digest, old in zip(
                table.column("output").to_pylist(), table.column("input_fingerprint").to_pylist(),
                table.column("input_bytes").to_pylist(), table.column("input_hash").to_pylist(), stale)}
    listed = sorted(listed, key=lambda f: f.relpath)
    same = _same_content(listed, done, fmt, samples)
    rejected = {row["source"]: row for row in latest(read_table(output, REJECTS_DIR), "source").to_pylist()}
    todo, rejects, claimed = [], [], {}
    counts = dict.fromkeys(("listed", "skipped_done", "stale", "redone_stale", "changed", "skipped_rejected",
                            "retried", "touched", "refused_before"), 0)
    prefix = exclude.rstrip("/") + "/" if exclude else None
    refresh: dict[str, str] = {}  # output → the new fingerprint of its unchanged input
    for item in listed:
        if prefix and (item.uri + "/").startswith(prefix):
            continue
        counts["listed"] += 1
        fp = fingerprint(item)
        before = rejected.get(item.uri)
        if before and (_changed(before, item, fp) or before["reason"] in RELISTED):
            before = None  # a new file under the old name, or a reject the listing decides again
        if before and _final(before, current):
            counts["skipped_rejected"] += 1
            counts["refused_before"] += before["reason"] == REFUSED
            continue
        try:
            names = output_names(item.relpath, fmt, samples)
        except UnsafeName as error:
            rejects.append(reject_row(item.uri, "unsafe_name", str(error), item.size, fp))
            continue
        if names[0] in claimed:
            rejects.append(reject_row(item.uri, "output_collision",
                                      f"{claimed[names[0]]} already writes {names[0]}", item.size, fp))
            continue
        claimed[names[0]] = item.uri
        rows = [done.get(name) for name in names]
        if all(rows):
            touched = item.uri in same  # rewritten with the same bytes: only its stamp is new
            if touched:
                counts["touched"] += 1
                refresh.update(dict.fromkeys(names, fp))
            if not touched and any(_changed(row, item, fp) for row in rows):
                counts["changed"] += 1
            elif not any(row["stale"] for row in rows):
                counts["skipped_done"] += 1
                continue
            elif redo_stale:
                counts["redone_stale"] += 1
            else:
                counts["stale"] += 1
                continue
        elif before:
            counts["retried"] += 1  # a transient reject: read_error, out_of_memory, sample_failed, ...
        todo.append({"source": item.uri, "relpath": item.relpath, "input_bytes": item.size, "input_fingerprint": fp})
    return Plan(todo, rejects, counts, _refreshed(output, refresh))


def _same_content(listed: list[storage.ListedFile], done: dict[str, dict[str, Any]], fmt: str,
                  samples: int) -> set[str]:
    """URIs of inputs whose only change is an mtime (same size) and whose bytes still have the
    hash the manifest recorded: read here, a few files after a copy or a restore."""
    candidates: dict[str, str] = {}
    for item in listed:
        if not item.version.startswith("mtime="):
            continue
        try:
            rows = [done.get(name) for name in output_names(item.relpath, fmt, samples)]
        except UnsafeName:
            continue
        hashes = {row["input_hash"] for row in rows if row}
        if all(rows) and len(hashes) == 1 and None not in hashes and any(
                _changed(row, item, fingerprint(item)) and row["input_bytes"] == item.size for row in rows):
            candidates[item.uri] = hashes.pop()

    def same(uri: str) -> bool:
        try:
            return content_hash(storage.read_bytes(uri)) == candidates[uri]
        except Exception:  # noqa: BLE001 — unreadable now: treat as changed, the run will say why
            return False

    with ThreadPoolExecutor(16) as pool:
        return {uri for uri, equal in zip(candidates, pool.map(same, candidates)) if equal}


def _refreshed(output: str, refresh: dict[str, str]) -> list[dict[str, Any]]:
    """The latest manifest rows of `refresh`'s outputs with their new fingerprint."""
    if not refresh:
        return []
    table = latest(read_table(output, MANIFEST_DIR), "output")
    rows = table.filter(pc.is_in(table.column("output"), pa.array(list(refresh)))).to_pylist()
    stamp = now()
    return [{**row, "input_fingerprint": refresh[row["output"]], "finished_at": stamp} for row in rows]


def _changed(row: dict[str, Any], item: storage.ListedFile, fp: str) -> bool:
    if row.get("input_fingerprint"):
        return row["input_fingerprint"] != fp
    return row.get("input_bytes") != item.size  # a row from before fingerprints: size only


def _stale_mask(table: pa.Table, record: dict[str, Any]) -> pa.ChunkedArray:
    """Per row: made by another model or settings (a column compared where row and run both set it)."""
    mask = pa.chunked_array([pa.array([False] * len(table), pa.bool_())])
    for column in (*MODEL_COLUMNS, *SETTING_COLUMNS):
        if record.get(column) is None:
            continue
        values = table.column(column)
        if column in BEFORE_THE_COLUMN:
            values = pc.fill_null(values, pa.scalar(BEFORE_THE_COLUMN[column], values.type))
        differs = pc.and_(pc.is_valid(values), pc.not_equal(values, pa.scalar(record[column], values.type)))
        mask = pc.or_(mask, pc.fill_null(differs, False))
    return mask


def _final(reject: dict[str, Any], current: Current) -> bool:
    """Whether an earlier reject still holds (not worth retrying this run)."""
    if reject["reason"] in PERMANENT:
        return True
    if reject["reason"] == "too_large":
        return (reject.get("max_output_pixels") or 0) >= current.max_output_pixels
    if reject["reason"] == REFUSED:
        return reject.get("settings") == current.refusal
    return False  # read_error, out_of_memory, sample_failed, write_failed, crashed: transient


def reject_row(source: str, reason: str, detail: str, size: int, fp: str = "",
               max_output_pixels: int | None = None, settings: str | None = None) -> dict[str, Any]:
    return {"source": source, "reason": reason, "detail": detail[:500], "input_bytes": int(size),
            "input_fingerprint": fp or None, "max_output_pixels": max_output_pixels, "finished_at": now(),
            "settings": settings}


def _write(output: str, folder: str, name: str, table: pa.Table) -> None:
    storage.write_parquet(storage.join(output, folder, name), table)


def _stamp(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"


def write_parts(output: str, manifest: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> None:
    """A manifest part and a rejects part, each one atomic parquet file with a unique name."""
    for folder, rows, schema in ((MANIFEST_DIR, manifest, MANIFEST_SCHEMA), (REJECTS_DIR, rejects, REJECT_SCHEMA)):
        if rows:
            _write(output, folder, _stamp("part"), pa.Table.from_pylist(rows, schema=schema))


def compact(output: str, max_files: int = MAX_FILES) -> dict[str, int]:
    """Fold `part-*` files into one `run-*` file per folder; merge everything into one `compact-*`
    file (latest row per output / source) once more than `max_files` files remain. Returns the
    number of files per folder afterwards."""
    left = {}
    for folder, schema, key in ((MANIFEST_DIR, MANIFEST_SCHEMA, "output"), (REJECTS_DIR, REJECT_SCHEMA, "source")):
        names = parquet_files(output, folder)
        parts = [n for n in names if posixpath.basename(n).startswith("part-")]
        if len(parts) > 1 or (parts and len(names) > max_files):
            _merge(output, folder, parts, schema, "run", key)
            names = parquet_files(output, folder)
        if len(names) > max_files:
            _merge(output, folder, names, schema, "compact", key)
        left[folder] = len(parquet_files(output, folder))
    return left


def _merge(output: str, folder: str, names: list[str], schema: pa.Schema, kind: str, key: str | None) -> None:
    table = _read(output, names, schema, schema.names)
    if key:
        table = latest(table, key)
    _write(output, folder, _stamp(kind), table)
    fs, _ = storage.resolve(output)
    fs.rm(names)
