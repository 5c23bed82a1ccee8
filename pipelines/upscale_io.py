"""The Ray-free parts of batch upscaling: output names, incremental planning, decode, encode+write.

Layout under OUTPUT (the contract of `jobs/upscale.py` and `jobs/cascade.py`):

    OUTPUT/a/b/name.<format>               INPUT/a/b/name.ext super-resolved (N = 1)
    OUTPUT/a/b/name_s<k>.<format>          sample k when N > 1
    OUTPUT/_manifest/part-<id>.parquet     one row per written image (MANIFEST_SCHEMA)
    OUTPUT/_rejects/part-<id>.parquet      one row per rejected input (REJECT_SCHEMA)
    OUTPUT/_SUMMARY.json                   the last run's counts

Durability: every image is written atomically (`storage.write_bytes`), and a batch's manifest part
is written only after all of that batch's images, so an output listed in the manifest is complete.
A rerun plans from the manifest and the rejects: a source whose every output is in the manifest,
with the same input size, is skipped; so is a source rejected before with the same size. A run
killed midway leaves at most images without manifest rows: the rerun writes them again (same
seed, same name) and then records them, so nothing is duplicated and nothing partial is visible.

Object names cannot escape OUTPUT: a relative path that is absolute, has `..` or empty segments,
or backslashes is rejected (`unsafe_name`); two inputs that map to one output name (`a.jpg`,
`a.png` → `a.png`) keep the first by key order and reject the others (`output_collision`).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

FORMATS = {"png": ("PNG", {"compress_level": 1}), "jpeg": ("JPEG", {"quality": 95}),
           "webp": ("WEBP", {"quality": 95, "method": 4})}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
MANIFEST_DIR, REJECTS_DIR, SUMMARY_NAME = "_manifest", "_rejects", "_SUMMARY.json"
RESERVED = (MANIFEST_DIR, REJECTS_DIR, SUMMARY_NAME)
FETCH_THREADS = 16
MANIFEST_SCHEMA = pa.schema([
    ("source", pa.string()), ("output", pa.string()), ("sample", pa.int32()),
    ("model_uri", pa.string()), ("model_name", pa.string()), ("model_version", pa.string()),
    ("sampler", pa.string()), ("steps", pa.int32()), ("schedule", pa.string()),
    ("schedule_source", pa.string()), ("seed", pa.int64()),
    ("input_width", pa.int32()), ("input_height", pa.int32()),
    ("output_width", pa.int32()), ("output_height", pa.int32()),
    ("input_bytes", pa.int64()), ("tiles", pa.int32()), ("seconds", pa.float64()),
    ("finished_at", pa.string()),
])
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                           ("input_bytes", pa.int64()), ("finished_at", pa.string())])


class UnsafeName(ValueError):
    pass


def safe_relpath(relpath: str) -> str:
    """`relpath` if it stays inside its root once joined; else UnsafeName."""
    if not relpath or relpath.startswith("/") or "\\" in relpath or "\x00" in relpath:
        raise UnsafeName(f"{relpath!r} is empty, absolute or has backslashes")
    parts = relpath.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeName(f"{relpath!r} has empty, '.' or '..' segments")
    if parts[0] in RESERVED:
        raise UnsafeName(f"{relpath!r} would land in the output's reserved {parts[0]}/")
    return relpath


def output_names(relpath: str, fmt: str, samples: int) -> list[str]:
    """Output names (relative to OUTPUT) of one input: the extension becomes the format's."""
    stem, _ = posixpath.splitext(safe_relpath(relpath))
    ext = EXTENSIONS[fmt]
    if samples == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}_s{k}.{ext}" for k in range(samples)]


def image_seed(seed: int, name: str, sample: int) -> int:
    """The noise seed of one output: a hash of (run seed, input name, sample index), so an image's
    sample does not depend on batching, workers or which run wrote it."""
    digest = hashlib.blake2b(f"{seed}:{name}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_table(output: str, folder: str, columns: Sequence[str]) -> pa.Table:
    """All parts of `_manifest` or `_rejects` (empty table when there are none)."""
    schema = MANIFEST_SCHEMA if folder == MANIFEST_DIR else REJECT_SCHEMA
    fs, path = storage.resolve(storage.join(output, folder))
    names = [name for name in (fs.find(path) if fs.exists(path) else []) if name.endswith(".parquet")]
    if not names:
        return pa.schema([schema.field(c) for c in columns]).empty_table()
    filesystem = storage.to_pyarrow(fs)
    return pa.concat_tables([pq.read_table(name, filesystem=filesystem, columns=list(columns)) for name in names])


def plan(listed: Iterable[storage.ListedFile], output: str, fmt: str, samples: int,
         exclude: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(to do, rejected now, counts) for the listed inputs against what OUTPUT already holds.

    `exclude`: a URI prefix (the output, when it lies inside the input) whose files are not inputs."""
    manifest = read_table(output, MANIFEST_DIR, ["output", "input_bytes"])
    done = dict(zip(manifest.column("output").to_pylist(), manifest.column("input_bytes").to_pylist()))
    previous = read_table(output, REJECTS_DIR, ["source", "input_bytes"])
    rejected_before = set(zip(previous.column("source").to_pylist(), previous.column("input_bytes").to_pylist()))
    todo, rejects, claimed = [], [], {}
    counts = {"listed": 0, "skipped_done": 0, "skipped_rejected": 0}
    prefix = exclude.rstrip("/") + "/" if exclude else None
    for item in sorted(listed, key=lambda f: f.relpath):
        if prefix and (item.uri + "/").startswith(prefix):
            continue
        counts["listed"] += 1
        if (item.uri, item.size) in rejected_before:
            counts["skipped_rejected"] += 1
            continue
        try:
            names = output_names(item.relpath, fmt, samples)
        except UnsafeName as error:
            rejects.append(reject_row(item.uri, "unsafe_name", str(error), item.size))
            continue
        if names[0] in claimed:
            rejects.append(reject_row(item.uri, "output_collision",
                                      f"{claimed[names[0]]} already writes {names[0]}", item.size))
            continue
        claimed[names[0]] = item.uri
        if all(done.get(name) == item.size for name in names):
            counts["skipped_done"] += 1
            continue
        todo.append({"source": item.uri, "relpath": item.relpath, "input_bytes": item.size})
    return todo, rejects, counts


def reject_row(source: str, reason: str, detail: str, size: int) -> dict[str, Any]:
    return {"source": source, "reason": reason, "detail": detail[:500], "input_bytes": int(size),
            "finished_at": now()}


def decode_batch(batch: dict[str, np.ndarray], max_output_pixels: int, scale: int) -> dict[str, list]:
    """Fetch and decode a batch of sources (Ray Data task): RGB pixels as raw bytes + size, or a
    reject reason. Fetches run in threads ahead of decoding."""
    from sr3model.imageio import ImageRejected, decode_image

    sources = list(batch["source"])

    def fetch(uri: str) -> bytes | Exception:
        try:
            return storage.read_bytes(uri)
        except Exception as error:  # noqa: BLE001 — one unreadable object must not stop the job
            return error

    with ThreadPoolExecutor(min(FETCH_THREADS, max(1, len(sources)))) as pool:
        blobs = list(pool.map(fetch, sources))
    out: dict[str, list] = {k: [] for k in ("source", "relpath", "input_bytes", "pixels", "height",
                                            "width", "reason", "detail")}
    for source, relpath, size, blob in zip(sources, batch["relpath"], batch["input_bytes"], blobs):
        pixels, height, width, reason, detail = b"", 0, 0, "", ""
        try:
            if isinstance(blob, Exception):
                raise ImageRejected("read_error", f"{type(blob).__name__}: {blob}")
            image = decode_image(blob)
            width, height = image.size
            if width * height * scale * scale > max_output_pixels:
                raise ImageRejected("too_large", f"{width}×{height} → {width * scale}×{height * scale} "
                                                 f"exceeds {max_output_pixels} output pixels")
            pixels = np.asarray(image, dtype=np.uint8).tobytes()
        except ImageRejected as error:
            reason, detail, width, height = error.reason, error.detail, 0, 0
        for key, value in (("source", str(source)), ("relpath", str(relpath)), ("input_bytes", int(size)),
                           ("pixels", pixels), ("height", height), ("width", width), ("reason", reason),
                           ("detail", detail)):
            out[key].append(value)
    return out


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    name, options = FORMATS[fmt]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=name, **options)
    return buffer.getvalue()


def write_batch(batch: dict[str, np.ndarray], output: str, fmt: str, record: dict[str, Any]) -> dict[str, list]:
    """Encode and write a batch of results, then its manifest and rejects parts (Ray Data task).

    Rows hold `samples` outputs packed in `out` (N × H × W × 3 uint8 bytes) and their noise seeds
    in `seeds` (N int64 bytes), or a reject `reason`. `record` holds the model and sampling
    columns of the manifest; a batch column of the same name overrides it per row (the cascade).
    Returns one small row per source: status ("done" | "rejected") and reason."""
    manifest, rejects, status = [], [], {"source": [], "status": [], "reason": []}
    stamp = now()
    for i, source in enumerate(batch["source"]):
        reason = str(batch["reason"][i])
        status["source"].append(str(source))
        status["reason"].append(reason)
        if reason:
            rejects.append(reject_row(str(source), reason, str(batch["detail"][i]), int(batch["input_bytes"][i])))
            status["status"].append("rejected")
            continue
        samples, height, width = int(batch["samples"][i]), int(batch["out_height"][i]), int(batch["out_width"][i])
        images = np.frombuffer(batch["out"][i], dtype=np.uint8).reshape(samples, height, width, 3)
        names = output_names(str(batch["relpath"][i]), fmt, samples)
        seeds = np.frombuffer(batch["seeds"][i], dtype=np.int64)
        for k, (name, image) in enumerate(zip(names, images)):
            storage.write_bytes(storage.join(output, name), encode(image, fmt))
            row_record = {k: (_plain(batch[k][i]) if k in batch else v) for k, v in record.items()}  # per-row
            manifest.append({
                **row_record, "source": str(source), "output": name, "sample": k,
                "seed": int(seeds[k]),
                "input_width": int(batch["width"][i]), "input_height": int(batch["height"][i]),
                "output_width": width, "output_height": height, "input_bytes": int(batch["input_bytes"][i]),
                "tiles": int(batch["tiles"][i]), "seconds": float(batch["seconds"][i]), "finished_at": stamp})
        status["status"].append("done")
    write_parts(output, manifest, rejects)
    return status


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def write_parts(output: str, manifest: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> None:
    """A manifest part and a rejects part, each one atomic parquet file with a unique name."""
    part = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    for folder, rows, schema in ((MANIFEST_DIR, manifest, MANIFEST_SCHEMA), (REJECTS_DIR, rejects, REJECT_SCHEMA)):
        if rows:
            table = pa.Table.from_pylist(rows, schema=schema)
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            storage.write_bytes(storage.join(output, folder, part), buffer.getvalue())
