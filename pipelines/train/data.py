"""Training batches in an order that is random, different every epoch, and exactly resumable.

    committed train files ──row groups──> units (≤ UNIT_ROWS rows each; a row group of a build)
    epoch e:  units permuted by rng(seed, e) ──dealt──> rank r takes units r, r+W, r+2W, …
              its rows ──shuffle buffer of `buffer` rows, rng(seed, e, r)──> its row order
              steps(e) = min over ranks of rows // batch  (every rank runs the same steps)
              batch k of rank r = rows [k·b, (k+1)·b) of its order
    reading:  threads read a unit's row group (pyarrow, columns hr/lr) when a batch that needs it
              enters the prefetch window; other threads decode the PNGs of upcoming batches into
              uint8 (B, 3, H, W) arrays (normalised to [-1, 1] on the device by the loop).

The order is a pure function of (files and their row groups, seed, epoch, world size, batch, buffer),
computed from metadata alone (`epoch_plan`), so a run resumed at (epoch, position) — what the
checkpoint records — continues with exactly the batches an uninterrupted run would have seen, and
no rank replays the start of the epoch. Every rank reads only its own units: no worker reads
another's data. Together with the build's hashed shard and row order (`pipelines.pairs.transforms`)
each batch mixes photos from all over the dataset.

Why not Ray Data's streaming split here: its coordinator hands blocks to whichever worker asks
first, so a rank's order depends on timing, and a resumed run could only skip by reading and
decoding what it skips. Ray Data still builds the pairs (`pipelines.pairs`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

UNIT_ROWS = 64  # rows per unit (= pipelines.pairs.build.ROW_GROUP_ROWS for datasets built by this project)
MIN_UNITS_PER_RANK = 4  # small datasets are cut into smaller units so that every rank gets some
PREFETCH_BATCHES = 4  # batches read and decoded ahead of the one being trained on
READ_ATTEMPTS = 4


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of row group `group` of train file number `file`."""

    file: int
    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def shuffle_buffer_rows(batch: int) -> int:
    """The local shuffle buffer for a per-worker batch: 16 batches, at least 4 units' rows."""
    return max(16 * batch, 4 * UNIT_ROWS)


def make_units(row_groups: Sequence[Sequence[int]], world: int) -> list[Unit]:
    """Units of files given their row-group sizes; units never span row groups."""
    total = sum(sum(groups) for groups in row_groups)
    size = min(UNIT_ROWS, max(1, total // (world * MIN_UNITS_PER_RANK)))
    return [Unit(f, g, start, min(start + size, rows))
            for f, groups in enumerate(row_groups) for g, rows in enumerate(groups)
            for start in range(0, rows, size)]


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of `size` emits a stream of n items: fill it, then each
    new item replaces a randomly chosen one that is emitted; the rest leave in random order."""
    if n <= size:
        return rng.permutation(n)
    picks = rng.integers(0, size, n - size)
    held = list(range(size))
    out = np.empty(n, dtype=np.int64)
    for i, (j, incoming) in enumerate(zip(picks.tolist(), range(size, n))):
        out[i] = held[j]
        held[j] = incoming
    out[n - size:] = np.asarray(held)[rng.permutation(size)]
    return out


def epoch_plan(units: Sequence[Unit], *, seed: int, epoch: int, rank: int, world: int, batch: int,
               buffer: int) -> np.ndarray:
    """This rank's batches of one epoch: (steps, batch, 2) int64 of (unit index, row in unit)."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(units))
    dealt = [perm[r::world] for r in range(world)]
    sizes = np.array([u.rows for u in units], dtype=np.int64)
    steps = min(int(sizes[d].sum()) for d in dealt) // batch
    mine = dealt[rank]
    unit_of = np.repeat(mine, sizes[mine])
    starts = np.repeat(np.cumsum(sizes[mine]) - sizes[mine], sizes[mine])
    row_of = np.arange(len(unit_of)) - starts
    order = buffer_order(len(unit_of), buffer, np.random.default_rng([seed, epoch, rank, 1]))[:steps * batch]
    return np.stack([unit_of[order], row_of[order]], axis=-1).reshape(steps, batch, 2)


def decode_pairs(batch: dict[str, Sequence[bytes]]) -> dict[str, np.ndarray]:
    """PNG bytes columns `hr`, `lr` → uint8 (B, 3, H, W) arrays, contiguous; no torch needed.

    Batches travel as uint8 (a quarter of float32's bytes to copy and to send to the device);
    the training loop maps them to [-1, 1] on the device (`sr3model.imageio.from_uint8`)."""
    return {"hr": png_stack(batch["hr"]), "lr": png_stack(batch["lr"])}


def png_stack(column: Sequence[bytes]) -> np.ndarray:
    """PNG bytes of same-size images → uint8 (B, 3, H, W), contiguous."""
    from sr3model.imageio import decode_png

    pixels = np.stack([np.asarray(decode_png(bytes(b)), dtype=np.uint8) for b in column])  # (B, H, W, 3)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


class UnitReader:
    """Reads units' hr/lr bytes from Parquet row groups, footers cached, reads retried."""

    def __init__(self, paths: Sequence[str], filesystem, extra: Sequence[str] = ()) -> None:
        self.paths, self.filesystem, self.extra = list(paths), filesystem, tuple(extra)
        self._footers: dict[int, object] = {}
        self._lock = threading.Lock()

    def read(self, unit: Unit, rows: Sequence[int]) -> dict[int, tuple]:
        """{row in unit: (hr PNG, lr PNG, *extra columns' values)} for the given rows of the unit."""
        import pyarrow.parquet as pq

        for attempt in range(READ_ATTEMPTS):
            try:
                with self.filesystem.open_input_file(self.paths[unit.file]) as handle:
                    footer = self._footers.get(unit.file)
                    parquet = pq.ParquetFile(handle, metadata=footer)
                    with self._lock:
                        self._footers.setdefault(unit.file, parquet.metadata)
                    table = parquet.read_row_group(unit.group, columns=["hr", "lr", *self.extra])
                break
            except (FileNotFoundError, PermissionError):
                raise
            except Exception:
                if attempt + 1 == READ_ATTEMPTS:
                    raise
                time.sleep(0.5 * 2**attempt)
        columns = [table.column(name) for name in ("hr", "lr", *self.extra)]
        return {r: tuple(c[unit.start + r].as_py() for c in columns) for r in rows}


class BatchStream:
    """One rank's endless stream of (epoch, position after the batch, hr, lr) uint8 arrays — and,
    when `extra` names more columns, a fifth item {column: array}: PNG columns (`teacher`: a
    distilled student's targets) decoded like hr/lr, others (`seed`) as int64 arrays."""

    def __init__(self, paths: Sequence[str], row_groups: Sequence[Sequence[int]], filesystem, *, seed: int,
                 rank: int, world: int, batch: int, buffer: int | None = None, threads: int = 2,
                 extra: Sequence[str] = ()) -> None:
        self.units = make_units(row_groups, world)
        self.extra = tuple(extra)
        self.reader = UnitReader(paths, filesystem, self.extra)
        self.seed, self.rank, self.world, self.batch = seed, rank, world, batch
        self.buffer = buffer or shuffle_buffer_rows(batch)
        self.threads = max(1, threads)

    def plan(self, epoch: int) -> np.ndarray:
        plan = epoch_plan(self.units, seed=self.seed, epoch=epoch, rank=self.rank, world=self.world,
                          batch=self.batch, buffer=self.buffer)
        if len(plan) == 0:
            rows = sum(u.rows for u in self.units)
            raise ValueError(f"{rows} train rows over {self.world} workers: fewer than one batch of "
                             f"{self.batch} per worker")
        return plan

    def _specs(self, epoch: int, position: int) -> Iterator[tuple[int, tuple[int, int], np.ndarray, dict]]:
        """(epoch, (epoch, position) after it, rows (b, 2), rows still needed per unit) per batch."""
        while True:
            plan = self.plan(epoch)
            needed: dict[int, list[int]] = {}
            for unit, row in plan[position:].reshape(-1, 2).tolist():
                needed.setdefault(unit, []).append(row)
            for k in range(position, len(plan)):
                yield epoch, ((epoch, k + 1) if k + 1 < len(plan) else (epoch + 1, 0)), plan[k], needed
            epoch, position = epoch + 1, 0

    def __call__(self, epoch: int = 0, position: int = 0) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Batches from (epoch, position) on: (epoch, position) after each batch, hr, lr."""
        loads: dict[tuple[int, int], Future] = {}  # (epoch, unit) → {row: (hr, lr)}
        left: dict[tuple[int, int], int] = {}  # rows of a loaded unit not yet handed to a batch
        window: deque[tuple[tuple[int, int], Future]] = deque()
        with ThreadPoolExecutor(4, thread_name_prefix="sr3-read") as io, \
                ThreadPoolExecutor(self.threads, thread_name_prefix="sr3-decode") as cpu:
            for batch_epoch, after, rows, needed in self._specs(epoch, position):
                parts = []
                for unit, row in rows.tolist():
                    key = (batch_epoch, unit)
                    if key not in loads:
                        loads[key] = io.submit(self.reader.read, self.units[unit], needed[unit])
                        left[key] = len(needed[unit])
                    parts.append((loads[key], row))
                    left[key] -= 1
                    if left[key] == 0:  # every row handed out: the batches hold the last references
                        del loads[key], left[key]
                window.append((after, cpu.submit(_assemble, parts, self.extra)))
                if len(window) > PREFETCH_BATCHES:
                    (done_epoch, done_position), future = window.popleft()
                    yield done_epoch, done_position, *future.result()


def _assemble(parts: list[tuple[Future, int]], extra: Sequence[str] = ()) -> tuple:
    """Pop each row's bytes out of its unit (so they can be freed) and decode the batch."""
    pairs = [future.result().pop(row) for future, row in parts]
    decoded = decode_pairs({"hr": [p[0] for p in pairs], "lr": [p[1] for p in pairs]})
    if not extra:
        return decoded["hr"], decoded["lr"]
    more = {}
    for i, name in enumerate(extra, start=2):
        values = [p[i] for p in pairs]
        more[name] = png_stack(values) if isinstance(values[0], bytes) else np.asarray(values, dtype=np.int64)
    return decoded["hr"], decoded["lr"], more
