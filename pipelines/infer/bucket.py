"""The Ray Data task functions around the sampling actors: fetch + decode before, encode + write after.

    decode_batch   sources → the model's input (sRGB RGB pixels, uint8 or uint16 as `bits`, raw
                   bytes) + size, and what the output gets back (`alpha` bytes, `carried` JSON,
                   `icc`/`exif`/`xmp` bytes: `pipelines.images.fidelity.split`), or a reject reason
                   (read_error after `storage.read_bytes`' retries, too_large, would_lose, the
                   decoder's reasons)
    write_batch    sampled rows → images encoded by `encode_row` (`fidelity.assemble`) and written
                   atomically, PUT_THREADS rows at a time (object-store PUTs are latency-bound: one
                   task keeps that many in flight), then one manifest part and one rejects part for
                   the batch; a row whose encoding or writing fails is rejected (`write_failed`) and
                   the others are still written

Durability: a batch's manifest part is written only after all of that batch's images, so an output
listed in the manifest is complete. A run killed midway leaves at most images without manifest
rows: the rerun writes them again (same seed, same name) and then records them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.infer import manifest
from pipelines.images.fidelity import Carried, Fidelity, assemble, split
from pipelines.infer.layout import output_names

FETCH_THREADS = 16
PUT_THREADS = 8  # rows encoded and PUT at once in one write task (benchmarks/bench_write.py)
FAILED = frozenset({"out_of_memory", "sample_failed", "write_failed", "crashed"})  # the job's own failures


def decode_batch(batch: dict[str, np.ndarray], max_output_pixels: int, scale: int,
                 fidelity: Fidelity = Fidelity()) -> dict[str, list]:
    """Fetch and decode a batch of sources (Ray Data task): the model's input as raw bytes + size
    and what its output keeps (module docstring), or a reject reason. Fetches run in threads ahead
    of decoding."""
    from sr3model.imageio import ImageRejected

    sources = list(batch["source"])

    def fetch(uri: str) -> bytes | Exception:
        try:
            return storage.read_bytes(uri)
        except Exception as error:  # noqa: BLE001 — one unreadable object must not stop the job
            return error

    with ThreadPoolExecutor(min(FETCH_THREADS, max(1, len(sources)))) as pool:
        blobs = list(pool.map(fetch, sources))
    keys = ("source", "relpath", "input_bytes", "input_fingerprint", "input_hash", "pixels", "bits", "height",
            "width", "alpha", "carried", "icc", "exif", "xmp", "reason", "detail")
    out: dict[str, list] = {k: [] for k in keys}
    empty = {"pixels": b"", "bits": 8, "height": 0, "width": 0, "alpha": b"", "carried": "", "icc": b"",
             "exif": b"", "xmp": b""}
    for i, (source, blob) in enumerate(zip(sources, blobs)):
        row, reason, detail, digest = dict(empty), "", "", ""
        try:
            if isinstance(blob, Exception):
                raise ImageRejected("read_error", f"{type(blob).__name__}: {blob}")
            digest = manifest.content_hash(blob)
            found = split(blob, fidelity)
            height, width = found.rgb.shape[:2]
            if width * height * scale * scale > max_output_pixels:
                raise ImageRejected("too_large", f"{width}×{height} → {width * scale}×{height * scale} "
                                                 f"exceeds {max_output_pixels} output pixels")
            row.update(pixels=found.rgb.tobytes(), bits=found.carried.bits, height=height, width=width,
                       alpha=b"" if found.alpha is None else np.ascontiguousarray(found.alpha).tobytes(),
                       **found.carried.to_row())
        except ImageRejected as error:
            row, reason, detail = dict(empty), error.reason, error.detail
        for key, value in (("source", str(source)), ("relpath", str(batch["relpath"][i])),
                           ("input_bytes", int(batch["input_bytes"][i])),
                           ("input_fingerprint", str(batch["input_fingerprint"][i])), ("input_hash", digest),
                           *row.items(), ("reason", reason), ("detail", detail)):
            out[key].append(value)
    return out


def encode_row(batch: dict[str, np.ndarray], i: int, fidelity: Fidelity) -> list[tuple[bytes, dict[str, Any]]]:
    """Row `i`'s outputs (one per sample) encoded with what its input had: (bytes, the manifest's
    fidelity columns) each. Rows without `carried` (the cascade) are 8-bit sRGB RGB."""
    samples, height, width = int(batch["samples"][i]), int(batch["out_height"][i]), int(batch["out_width"][i])
    dtype = np.uint16 if "bits" in batch and int(batch["bits"][i]) == 16 else np.uint8
    images = np.frombuffer(batch["out"][i], dtype=dtype).reshape(samples, height, width, 3)
    alpha = None
    if "alpha" in batch and len(batch["alpha"][i]):
        alpha = np.frombuffer(batch["alpha"][i], dtype=dtype).reshape(int(batch["height"][i]), int(batch["width"][i]))
    carried = Carried.from_row(batch, i)
    return [assemble(image, alpha, carried, fidelity) for image in images]


def write_batch(batch: dict[str, np.ndarray], output: str, fmt: str, record: dict[str, Any],
                max_output_pixels: int | None = None, fidelity: Fidelity | None = None,
                put_threads: int = PUT_THREADS) -> dict[str, list]:
    """Encode and write a batch of results, then its manifest and rejects parts (Ray Data task).

    Rows hold `samples` outputs packed in `out` (N × H × W × 3 uint8 bytes, uint16 where `bits` is
    16) and their noise seeds in `seeds` (N int64 bytes), or a reject `reason`; `fidelity`: what
    outputs keep (default: `fmt` with the defaults of `Fidelity`); `tiled` False: sampled whole (the manifest's
    tile and overlap stay empty, so another --tile does not make the output stale). `record` holds the model and sampling
    columns of the manifest; a batch column of the same name overrides it per row (the cascade).
    Returns one small row per source: status ("done" | "rejected" | "failed"), reason and detail.
    A `limit` column (an actor's budget in output pixels) is the limit a `too_large` row records."""
    rows, rejects, status = [], [], {"source": [], "status": [], "reason": [], "detail": []}
    fidelity = fidelity or Fidelity(fmt)
    stamp = manifest.now()
    count = len(batch["source"])

    def fingerprint(i: int) -> str:
        return str(batch["input_fingerprint"][i]) if "input_fingerprint" in batch else ""

    def write(i: int) -> tuple[list[dict[str, Any]], str, str]:
        reason, detail = str(batch["reason"][i]), str(batch["detail"][i])
        if reason:
            return [], reason, detail
        try:
            return _write_row(batch, i, output, fidelity, record, fingerprint(i), stamp), "", ""
        except Exception as error:  # noqa: BLE001 — e.g. an output too wide for WebP; the rest go on
            return [], "write_failed", f"{type(error).__name__}: {error}"

    with ThreadPoolExecutor(max(1, min(put_threads, count))) as pool:
        written = list(pool.map(write, range(count)))
    for i, (done, reason, detail) in enumerate(written):
        source = str(batch["source"][i])
        rows.extend(done)
        if reason:
            limit = None
            if reason == "too_large":
                limit = int(batch["limit"][i]) if "limit" in batch and int(batch["limit"][i]) else max_output_pixels
            rejects.append(manifest.reject_row(source, reason, detail, int(batch["input_bytes"][i]), fingerprint(i),
                                               limit, fidelity.settings if reason == "would_lose" else None))
        status["source"].append(source)
        status["reason"].append(reason)
        status["detail"].append(detail if reason else "")
        status["status"].append("done" if not reason else "failed" if reason in FAILED else "rejected")
    manifest.write_parts(output, rows, rejects)  # after every image of the batch: listed means complete
    return status


def _write_row(batch, i: int, output: str, fidelity: Fidelity, record: dict[str, Any], fp: str,
               stamp: str) -> list[dict[str, Any]]:
    height, width = int(batch["out_height"][i]), int(batch["out_width"][i])
    names = output_names(str(batch["relpath"][i]), fidelity.format, int(batch["samples"][i]))
    seeds = np.frombuffer(batch["seeds"][i], dtype=np.int64)
    encoded = encode_row(batch, i, fidelity)  # all encode before any is written
    row_record = {k: (_plain(batch[k][i]) if k in batch else v) for k, v in record.items()}  # per-row override
    if "tiled" in batch and not batch["tiled"][i]:
        row_record.update(tile=None, overlap=None)  # sampled whole: the tiling cannot have changed it
    rows = []
    for k, (name, (data, kept)) in enumerate(zip(names, encoded)):
        storage.write_bytes(storage.join(output, name), data)
        rows.append({
            **row_record, **kept, "source": str(batch["source"][i]), "output": name, "sample": k, "seed": int(seeds[k]),
            "input_width": int(batch["width"][i]), "input_height": int(batch["height"][i]),
            "output_width": width, "output_height": height, "input_bytes": int(batch["input_bytes"][i]),
            "input_fingerprint": fp or None, "input_hash": str(batch["input_hash"][i]) if "input_hash" in batch else None,
            "tiles": int(batch["tiles"][i]),
            "batch_pixels": int(batch["batch_pixels"][i]), "seconds": float(batch["seconds"][i]),
            "finished_at": stamp})
    return rows


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
