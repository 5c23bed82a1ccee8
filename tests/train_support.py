"""Helpers shared by the training tests: a tiny pairs dataset with the build_pairs column contract,
committed as a version the way build_pairs commits one (pipelines.pairs.store), and a tiny config
that trains in seconds on 2 CPU cores."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from skimage import data as skdata

from sr3model.config import SR3Config, override, preset

HR, SCALE = 64, 4
FAST = ["unet.channels=8", "unet.norm_groups=4", "unet.attention_head_channels=8",
        "train.batch_size=4", "train.warmup_steps=2", "diffusion.sample_steps=4"]


def tiny_config(*extra: str, consistency: bool = True) -> SR3Config:
    """The fast tiny config with `extra` overrides; `consistency=False` samples without the LR
    projection (which would undo a colour shift or blur a test sets out to show)."""
    return override(preset("tiny"), [*FAST, *extra, *([] if consistency else ["diffusion.sample_consistency=false"])])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo_crops(count: int, rng: np.random.Generator | int = 0) -> list[Image.Image]:
    """HR 64×64 crops of skimage photos (128² crops, area-resized), cycling through 4 photos."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - 2 * HR))
        x = int(rng.integers(0, photo.shape[1] - 2 * HR))
        crops.append(Image.fromarray(photo[y:y + 2 * HR, x:x + 2 * HR]).resize((HR, HR), Image.BOX))
    return crops


def write_pairs(root: Path, n_train: int = 16, n_val: int = 4, seed: int = 0,
                val: list[tuple[Image.Image, Image.Image]] | None = None) -> str:
    """HR 64×64 crops of skimage photos (area-resized), LR = Pillow bicubic ÷4; one shard (of one
    row group) per split, committed as a new version of `root`. `val`: (HR, LR) images to use as the
    val split instead."""
    from pipelines.pairs import store as pair_store

    rng = np.random.default_rng(seed)
    version = pair_store.new_version()
    files = {}

    def with_lr(crops: list[Image.Image]) -> list[tuple[Image.Image, Image.Image]]:
        return [(hr, hr.resize((HR // SCALE, HR // SCALE), Image.BICUBIC)) for hr in crops]
    given = {"train": with_lr(photo_crops(n_train, rng))}
    given["val"] = val if val is not None else with_lr(photo_crops(n_val, rng))
    n_val = len(given["val"])
    for split, count in (("train", n_train), ("val", n_val)):
        rows = []
        for i, (hr, lr) in enumerate(given[split]):
            rows.append({"key": f"{split}-{i:04d}", "source": f"skimage/{i % 4}", "split": split,
                         "recipe": "patches", "hr_size": HR, "scale": SCALE, "hr": _png(hr), "lr": _png(lr)})
        folder = root / pair_store.VERSIONS_DIR / version / split
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / "part-00000.parquet")
        files[split] = [{"path": f"{pair_store.VERSIONS_DIR}/{version}/{split}/part-00000.parquet",
                         "rows": count, "row_groups": [count]}]
    pair_store.commit(str(root), version, files, {"recipe": "patches", "hr_size": HR, "scale": SCALE,
                                                  "pairs": n_train + n_val, "train": n_train, "val": n_val,
                                                  "fingerprint": f"test-{seed}-{n_train}-{n_val}"})
    return str(root)
