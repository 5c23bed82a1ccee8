"""Row and batch transforms of the pair builder: plain functions on dicts / numpy / PIL that run and
test without Ray (DESIGN.md convention 6). `pipelines.pairs` only chains them with Ray Data.

Keys and splits:
- key = "<last folder name of the input root>/<path relative to the root>", e.g. input
  `gs://bkt/ffhq` and file `gs://bkt/ffhq/00000/00042.png` → `ffhq/00000/00042.png`. It does not
  depend on the bucket, the scheme, the listing order or the other inputs, so a rerun, a grown
  bucket or a copy of the data elsewhere gives every file the same key. Patch rows add `#p<index>`.
- split = "val" when blake2b(source key) mapped to [0, 1) is below val_fraction, else "train";
  all patches of a photo share their source's split (no train/val leakage between crops).
- reject reasons: those of `sr3model.imageio.REASONS`, plus `read_error` (storage still failing
  after retries) and `error` (anything unexpected while processing one file).
- patch positions come from a numpy Generator seeded by blake2b(seed, source key): the same
  photo always gives the same crops, whatever task or order it is processed in.
- order: files reach the tasks in `order_key` order (blake2b of the key with its own salt), not
  in listing order, so a shard holds photos from all over the bucket (an ImageNet shard is not
  one synset); inside a shard, pair rows are in `order_key` order too, so the patches of one photo
  are spread over the shard's row groups. Training shuffles on top of that (pipelines.train.data).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipelines import storage
from sr3model.imageio import (
    ImageRejected,
    decode_image,
    encode_png,
    faces_hr,
    imagenet_hr,
    lr_from_hr,
    random_patches,
)

RECIPES = ("faces", "imagenet", "patches")
READ_THREADS = 16  # concurrent fetches per task: object stores are latency bound
PAIR_COLUMNS = ("key", "source", "split", "recipe", "hr_size", "scale", "hr", "lr")
REJECT_COLUMNS = ("key", "source", "reason", "detail")
ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("recipe", pa.string()),
        ("hr_size", pa.int32()),
        ("scale", pa.int32()),
        ("hr", pa.binary()),
        ("lr", pa.binary()),
        ("reason", pa.string()),  # set on reject rows only
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class PairSpec:
    """What one build makes: recipe, HR side, scale factor, val fraction, patches, seed."""

    recipe: str
    hr_size: int
    scale: int
    val_fraction: float = 0.05
    patches_per_image: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.scale < 1 or self.hr_size < self.scale or self.hr_size % self.scale:
            raise ValueError(f"hr_size {self.hr_size} must be a positive multiple of scale {self.scale}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {self.val_fraction}")
        if self.patches_per_image < 1:
            raise ValueError(f"patches_per_image must be >= 1, got {self.patches_per_image}")

    @property
    def pairs_per_source(self) -> int:
        return self.patches_per_image if self.recipe == "patches" else 1

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """JPEG reduced-size decoding bound: HR on both sides for area-resize recipes, none for
        patches (crops must be at full resolution)."""
        return None if self.recipe == "patches" else (self.hr_size, self.hr_size)


def source_key(root: str, relpath: str) -> str:
    """The stable key of a listed file: last folder name of its input root + relative path."""
    name = posixpath.basename(root.rstrip("/"))
    return f"{name}/{relpath}" if name else relpath


def unit_hash(text: str) -> float:
    """blake2b of the text → a number uniform in [0, 1), the same on every machine and run."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def order_key(key: str) -> float:
    """Where a file or row goes in the written order: a hash salted apart from the split's."""
    return unit_hash(f"order:{key}")


def split_for(key: str, val_fraction: float) -> str:
    return "val" if unit_hash(key) < val_fraction else "train"


def patch_rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def hr_images(image: Image.Image, key: str, spec: PairSpec) -> list[tuple[str, Image.Image]]:
    """The recipe's HR images of one decoded photo, with their row keys."""
    if spec.recipe == "faces":
        return [(key, faces_hr(image, spec.hr_size))]
    if spec.recipe == "imagenet":
        return [(key, imagenet_hr(image, spec.hr_size))]
    patches = random_patches(image, spec.hr_size, spec.patches_per_image, patch_rng(spec.seed, key))
    return [(f"{key}#p{index:03d}", patch) for index, patch in enumerate(patches)]


def rows_for_file(
    key: str, source: str, data: bytes | None, error: str | None, spec: PairSpec
) -> list[dict[str, Any]]:
    """All output rows of one file: its pair rows, or exactly one reject row."""
    if error is not None:
        return [reject_row(key, source, "read_error", error)]
    try:
        image = decode_image(data or b"", draft_size=spec.draft_size)
        pairs = [
            (row_key, encode_png(hr), encode_png(lr_from_hr(hr, spec.scale)))
            for row_key, hr in hr_images(image, key, spec)
        ]
    except ImageRejected as rejected:
        return [reject_row(key, source, rejected.reason, rejected.detail)]
    except Exception as unexpected:  # a file that breaks the pipeline still must not fail the job
        return [reject_row(key, source, "error", f"{type(unexpected).__name__}: {unexpected}")]
    split = split_for(key, spec.val_fraction)
    return [
        {
            "key": row_key,
            "source": source,
            "split": split,
            "recipe": spec.recipe,
            "hr_size": spec.hr_size,
            "scale": spec.scale,
            "hr": hr,
            "lr": lr,
            "reason": None,
            "detail": None,
        }
        for row_key, hr, lr in pairs
    ]


def reject_row(key: str, source: str, reason: str, detail: str) -> dict[str, Any]:
    row = dict.fromkeys(ROW_SCHEMA.names)
    row.update(key=key, source=source, reason=reason, detail=detail)
    return row


def read_file(source: str) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, "ExceptionType: message") once storage retries are spent."""
    try:
        return storage.read_bytes(source), None
    except Exception as error:  # one unreadable file never fails the job: it becomes a reject
        return None, f"{type(error).__name__}: {error}"


def read_files(sources: Sequence[str]) -> Iterator[tuple[bytes | None, str | None]]:
    """read_file over all sources with READ_THREADS fetches in flight, yielded in order: the
    caller decodes file i while files i+1... are still being fetched."""
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(sources)))) as pool:
        yield from pool.map(read_file, sources)


def pairs_batch(batch: dict[str, np.ndarray], spec: PairSpec) -> pa.Table:
    """Batch of listed files {key, source, ...} → pair rows and reject rows (ROW_SCHEMA; `reason`
    marks rejects). Reads the files itself (see read_files)."""
    keys, sources = [str(key) for key in batch["key"]], [str(source) for source in batch["source"]]
    rows: list[dict[str, Any]] = []
    for key, source, (data, error) in zip(keys, sources, read_files(sources)):
        rows.extend(rows_for_file(key, source, data, error, spec))
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def split_rows(table: pa.Table) -> dict[str, pa.Table]:
    """ROW_SCHEMA rows → {"train", "val", "rejects"} tables with their own columns: pair rows in
    `order_key` order, rejects sorted by key (for people to read)."""
    rejected = table["reason"].is_valid()
    pairs = table.filter(pc.invert(rejected)).select(list(PAIR_COLUMNS))
    parts = {
        "train": pairs.filter(pc.equal(pairs["split"], "train")),
        "val": pairs.filter(pc.equal(pairs["split"], "val")),
    }
    parts = {name: part.take(np.argsort([order_key(k) for k in part["key"].to_pylist()], kind="stable"))
             for name, part in parts.items()}
    return parts | {"rejects": table.filter(rejected).select(list(REJECT_COLUMNS)).sort_by("key")}


def rows_digest(table: pa.Table) -> int:
    """An order-free digest of pair rows: the sum mod 2^64 of blake2b(split, key, hr, lr) per row.
    Sums of shards add up to the dataset's, so a build's fingerprint needs no second pass."""
    total = 0
    for split, key, hr, lr in zip(*(table[c].to_pylist() for c in ("split", "key", "hr", "lr"))):
        digest = hashlib.blake2b(digest_size=8)
        for piece in (split.encode(), b"\0", key.encode(), b"\0", hr, lr):
            digest.update(piece)
        total = (total + int.from_bytes(digest.digest(), "big")) % 2**64
    return total
