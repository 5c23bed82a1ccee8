"""The teacher's outputs on the train pairs, as a committed dataset version (what a student learns).

    PAIRS (committed; its train files pinned) ──one item per Parquet row group (≤ 64 pairs)──>
      ─map_batches(read_pairs)─────────── CPU tasks: the row group's pairs, LR PNG → uint8 pixels,
                                           each row named by its key
      ─map_batches(actors.Upscaler)────── the upscale job's sampling actors (pipelines.infer.actors:
                                           the model loaded once per actor, pipelines.sampling;
                                           GPU actors when the cluster has or can scale to GPUs)
      ─write_datasink(TeacherSink)──────── rows × outputs: the pair's columns + `sample`, `seed`,
                                           `teacher` (PNG of the output), one Parquet part per task
      ─pipelines.pairs.store.commit─────── OUTPUT/_SUMMARY.json, written last: the commit

Output k of the pair with key `key` was sampled from the start noise of a generator seeded by
`pipelines.sampling.image_seed(seed, key, k)` — its `seed` column — on the actors' device type
(`noise_device` in the summary: CPU and CUDA generators draw different noise from one seed), so
the student's loss regenerates the very z the teacher started from (`sr3model.distill`).

The layout is the pair builder's (`pipelines.pairs.store`): `OUTPUT/versions/<v>/train/part-*.parquet`
(row groups of 64 rows) listed by `OUTPUT/_SUMMARY.json`, so `pipelines.train` reads it like any
pairs dataset (train split; validation uses the source pairs). The summary records the teacher's
pinned `models:/NAME/VERSION` and weights digest, sampler, steps, schedule, LR consistency (the
teacher's served sampling: `--teacher-sampler`/`--teacher-steps`, the rest as the registry serves
it, `pipelines.registry.models.sampling_for`), seed, outputs per pair,
the source pairs' version and fingerprint (`spec`): a rerun whose spec matches the committed one
reuses it; any difference builds and commits a new version (the previous one is kept, as pairs).
Nothing is committed when an output failed to sample (the error says which; a rerun retries).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pipelines import storage
from pipelines.cli import UserError
from pipelines.pairs import store as pair_store

if TYPE_CHECKING:
    from pipelines.registry.models import ModelRef
    from pipelines.sampling import Sampling

ROW_GROUP_ROWS = 64  # = pipelines.pairs.build.ROW_GROUP_ROWS: the unit training reads
TEACHER_COLUMNS = ("key", "source", "split", "recipe", "hr_size", "scale", "hr", "lr", "sample", "seed", "teacher")
SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("split", pa.string()), ("recipe", pa.string()),
                    ("hr_size", pa.int32()), ("scale", pa.int32()), ("hr", pa.binary()), ("lr", pa.binary()),
                    ("sample", pa.int32()), ("seed", pa.int64()), ("teacher", pa.binary())])
EXTRA_COLUMNS = ("teacher", "seed")  # what the training loop hands a student's loss


@dataclass(frozen=True)
class TeacherSpec:
    """What the outputs are a function of: equal specs, equal dataset (the reuse rule)."""

    teacher: str  # pinned models:/NAME/VERSION (or the model's URI)
    digest: str  # of the teacher's weights
    sampler: str
    steps: int
    schedule: str
    consistency: bool  # the teacher's served LR-consistency setting (`Sampling.consistency`)
    seed: int
    samples: int  # outputs (start noises) per pair
    pairs: str  # the source pairs URI
    pairs_id: str  # its committed version
    pairs_fingerprint: str
    noise_device: str  # cpu | cuda


PAIR_COLUMNS = [c for c in TEACHER_COLUMNS if c not in ("sample", "seed", "teacher")]


def row_group_items(files: tuple[str, ...], groups: tuple[tuple[int, ...], ...],
                    limit: int | None = None) -> list[dict[str, Any]]:
    """One work item per row group of the train files ({file, group, rows}), the first `limit`
    pairs only when given (the last item cut short)."""
    items, left = [], limit if limit else None
    for uri, sizes in zip(files, groups):
        for group, rows in enumerate(sizes):
            take = rows if left is None else min(rows, left)
            if take <= 0:
                return items
            items.append({"file": uri, "group": group, "rows": take})
            left = None if left is None else left - take
    return items


def read_pairs(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Work items → the pairs of their row groups, as the sampling actors take them: the LR image
    as uint8 pixels, each row named by its key (`image_seed`'s name)."""
    from sr3model.imageio import decode_png

    tables = []
    for uri, group, rows in zip(batch["file"], batch["group"], batch["rows"]):
        fs, path = storage.resolve(str(uri))
        with fs.open(path, "rb") as handle:
            tables.append(pq.ParquetFile(handle).read_row_group(int(group), columns=PAIR_COLUMNS).slice(0, int(rows)))
    table = pa.concat_tables(tables)
    out: dict[str, Any] = {name: table.column(name).to_pylist() for name in PAIR_COLUMNS}
    images = [np.ascontiguousarray(np.asarray(decode_png(bytes(b)), dtype=np.uint8)) for b in out["lr"]]
    n = len(images)
    return {**out, "relpath": out["key"], "pixels": [a.tobytes() for a in images],
            "height": [a.shape[0] for a in images], "width": [a.shape[1] for a in images],
            "reason": [""] * n, "detail": [""] * n}


class TeacherSink(Datasink[dict[str, Any]]):
    """Ray Data datasink: each write task's outputs as `versions/<v>/train/part-<task>.parquet`
    (failed rows are counted, not written)."""

    def __init__(self, output: str, version: str) -> None:
        self.output, self.version = output, version
        self.counts: dict[str, Any] | None = None

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, Any]:
        rows, failed, digest = [], [], 0
        for block in blocks:
            for row in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                if row["reason"]:
                    failed.append(f"{row['key']}: {row['reason']} ({str(row['detail'])[:200]})")
                    continue
                outputs = np.frombuffer(row["out"], np.uint8).reshape(int(row["samples"]), int(row["out_height"]),
                                                                     int(row["out_width"]), 3)
                seeds = np.frombuffer(row["seeds"], np.int64)
                for k, (pixels, seed) in enumerate(zip(outputs, seeds)):
                    png = _png(pixels)
                    rows.append({"key": row["key"], "source": row["source"], "split": row["split"],
                                 "recipe": row["recipe"], "hr_size": int(row["hr_size"]), "scale": int(row["scale"]),
                                 "hr": row["hr"], "lr": row["lr"], "sample": k, "seed": int(seed), "teacher": png})
                    digest = (digest + _row_digest(row["key"], k, int(seed), png)) % 2**64
        counts = {"rows": len(rows), "failed": failed, "digest": digest, "file": None}
        if rows:
            relative = f"train/part-{ctx.task_idx:05d}.parquet"
            storage.write_parquet(storage.join(pair_store.version_uri(self.output, self.version), relative),
                                  pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=ROW_GROUP_ROWS)
            groups = [min(ROW_GROUP_ROWS, len(rows) - s) for s in range(0, len(rows), ROW_GROUP_ROWS)]
            counts["file"] = {"path": f"{pair_store.VERSIONS_DIR}/{self.version}/{relative}", "rows": len(rows),
                              "row_groups": groups}
        return counts

    def on_write_complete(self, write_result) -> None:
        returns = list(write_result.write_returns)
        self.counts = {"rows": sum(c["rows"] for c in returns),
                       "failed": [f for c in returns for f in c["failed"]],
                       "fingerprint": f"{sum(c['digest'] for c in returns) % 2**64:016x}",
                       "files": [c["file"] for c in returns if c["file"]]}


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    from sr3model.imageio import encode_png

    return encode_png(Image.fromarray(np.ascontiguousarray(pixels)))


def _row_digest(key: str, sample: int, seed: int, png: bytes) -> int:
    digest = hashlib.blake2b(f"{key}\0{sample}\0{seed}\0".encode() + png, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def reusable(output: str, spec: TeacherSpec) -> dict[str, Any] | None:
    """The committed summary of `output` when it holds exactly these outputs, else None."""
    try:
        summary = pair_store.read_summary(output)
    except UserError:
        return None
    return summary if summary.get("teacher_spec") == asdict(spec) else None


def teacher_outputs(ref: ModelRef, sampling: Sampling, pairs: str, output: str, *, seed: int = 0, samples: int = 1,
                    batch_size: int = 16, device: str = "auto", workers: int | None = None,
                    num_gpus_per_worker: float | None = None, limit: int | None = None,
                    say: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """(the committed summary of the teacher's outputs at `output`, whether it was reused); see the
    module docstring. `limit`: only the first N train pairs by file order (tests, trials)."""
    import ray
    import ray.data

    from pipelines.infer.actors import Upscaler
    from pipelines.infer.placement import input_blocks, sampling_placement
    from pipelines.runtime import init_ray
    from pipelines.train.driver import train_files

    init_ray()
    source = pair_store.read_summary(pairs)
    rows_total = int(source.get("train", 0))
    if rows_total == 0:
        raise UserError(f"{pairs}: the committed dataset holds no train pairs")
    rows_total = min(rows_total, limit) if limit else rows_total
    placement = sampling_placement(num_gpus_per_worker, workers, device=device, model_bytes=len(ref.weights),
                                   blocks=input_blocks(rows_total, batch_size))
    spec = TeacherSpec(ref.pinned, ref.digest, sampling.sampler, sampling.steps, sampling.schedule_text,
                       sampling.consistency, seed,
                       samples, pairs, str(pair_store.identity(pairs, source)["id"]),
                       str(source.get("fingerprint", "")), placement.device)
    found = reusable(output, spec)
    if found is not None:
        say(f"reusing the teacher's outputs in {output} (version {found['version']}: {found['train']} outputs of "
            f"{spec.teacher}, {spec.sampler} {spec.steps} steps, seed {seed})")
        return found, True

    started = time.perf_counter()
    items = row_group_items(*train_files(pairs, source), limit=limit)
    version = pair_store.new_version()
    say(f"sampling the teacher's outputs: {rows_total} train pairs × {samples} of {spec.teacher}, "
        f"{spec.sampler} {spec.steps} steps, consistency {'on' if spec.consistency else 'off'}, "
        f"on {placement.device} ({placement.max_actors} actor(s)) → {output} "
        f"version {version}")
    model = ray.put((ref.config_json, ref.weights))
    options = {"samples": samples, "seed": seed, "batch_size": batch_size, "max_batch_pixels": None, "tile": None,
               "overlap": None, "device": placement.device, "threads": placement.threads, "gpus": placement.gpus,
               "memory_bytes": placement.memory_bytes}
    dataset = (ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
               # as the upscale job's decode: before CPU actors (which hold every CPU) a task reserving a CPU waits forever
               .map_batches(read_pairs, batch_size=1, batch_format="numpy", **placement.decode_kwargs())
               .map_batches(Upscaler, fn_constructor_kwargs={"model": [model], "sampling": asdict(sampling),
                                                             "options": options},
                            batch_size=batch_size, batch_format="numpy", **placement.map_kwargs()))
    sink = TeacherSink(output, version)
    committed = False
    try:
        dataset.write_datasink(sink)
        counts = sink.counts
        if counts["failed"]:
            raise RuntimeError(f"{len(counts['failed'])} teacher output(s) failed to sample (e.g. {counts['failed'][0]}); "
                               f"nothing committed, rerun to retry")
        summary = {"output": output, "kind": "teacher-outputs", "teacher_spec": asdict(spec),
                   "teacher": spec.teacher, "sampler": spec.sampler, "steps": spec.steps, "schedule": spec.schedule,
                   "consistency": spec.consistency, "sampling_source": sampling.source,
                   "seed": seed, "samples_per_pair": samples, "noise_device": spec.noise_device,
                   "source_pairs": pairs, "source_id": spec.pairs_id, "source_fingerprint": spec.pairs_fingerprint,
                   "recipe": source.get("recipe"), "hr_size": source.get("hr_size"), "scale": source.get("scale"),
                   "pairs": counts["rows"], "train": counts["rows"], "val": 0, "source_train": rows_total,
                   "fingerprint": counts["fingerprint"], "row_group_rows": ROW_GROUP_ROWS,
                   "elapsed_s": round(time.perf_counter() - started, 3),
                   "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        document = pair_store.commit(output, version, {"train": counts["files"]}, summary)
        committed = True
    finally:
        if not committed:
            pair_store.discard(output, version)
    say(f"committed {document['train']} teacher outputs as version {version} in {document['elapsed_s']:.0f} s")
    return document, False
