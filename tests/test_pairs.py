"""Pair-building transforms without Ray: keys, splits, recipes, rejects, batches, task planning."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.pairs.transforms import (
    PAIR_COLUMNS,
    REJECT_COLUMNS,
    PairSpec,
    pairs_batch,
    rows_for_file,
    source_key,
    split_for,
    split_rows,
    unit_hash,
)
from pipelines.pairs.build import list_sources, plan_tasks
from sr3model.imageio import decode_png

IMAGENET = PairSpec("imagenet", hr_size=64, scale=4, val_fraction=0.5)


def test_keys_come_from_the_input_folder_and_relative_path() -> None:
    assert source_key("gs://bkt/ffhq", "00000/00042.png") == "ffhq/00000/00042.png"
    assert source_key("/data/ffhq/", "00000/00042.png") == "ffhq/00000/00042.png"
    assert source_key("s3://bucket", "a.jpg") == "bucket/a.jpg"


def test_split_hash_is_pinned_and_uniform() -> None:
    # Pinned: changing the hash would move images between train and val in existing datasets.
    assert unit_hash("ffhq/00000/00042.png") == pytest.approx(0.8332485, abs=1e-7)
    keys = [f"imagenet/n{index:08d}.JPEG" for index in range(20_000)]
    fraction = np.mean([split_for(key, 0.05) == "val" for key in keys])
    assert 0.045 < fraction < 0.055
    assert all(split_for(key, 0.0) == "train" for key in keys[:100])
    assert all(split_for(key, 1.0) == "val" for key in keys[:100])


def test_spec_validates_its_fields() -> None:
    for bad in (
        dict(recipe="celeba", hr_size=64, scale=4),
        dict(recipe="faces", hr_size=66, scale=4),
        dict(recipe="faces", hr_size=64, scale=4, val_fraction=1.5),
        dict(recipe="patches", hr_size=64, scale=4, patches_per_image=0),
    ):
        with pytest.raises(ValueError):
            PairSpec(**bad)
    assert PairSpec("patches", 64, 4).draft_size is None  # crops need full resolution
    assert PairSpec("faces", 64, 4).draft_size == (64, 64)


def test_every_odd_file_gives_pairs_or_one_reject(odd_files) -> None:
    for name, reason in odd_files.expected.items():
        data = (odd_files.directory / name).read_bytes()
        rows = rows_for_file(f"odd/{name}", f"/in/odd/{name}", data, None, IMAGENET)
        if reason is None:
            (row,) = rows
            assert row["reason"] is None and row["split"] == split_for(f"odd/{name}", 0.5)
            hr, lr = decode_png(row["hr"]), decode_png(row["lr"])
            assert hr.size == (64, 64) and lr.size == (16, 16) and hr.mode == lr.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(lr), np.asarray(hr.resize((16, 16), Image.BICUBIC)))
        else:
            assert [(row["reason"], row["source"], row["hr"]) for row in rows] == [(reason, f"/in/odd/{name}", None)]


def test_read_and_processing_errors_become_rejects(photo_dir: Path) -> None:
    (row,) = rows_for_file("k", "gs://b/k", None, "TimeoutError: gave up", IMAGENET)
    assert (row["reason"], row["detail"]) == ("read_error", "TimeoutError: gave up")
    broken = PairSpec("imagenet", hr_size=64, scale=4)
    object.__setattr__(broken, "scale", 3)  # bypass validation: LR of 64 px by 3 cannot be made
    (row,) = rows_for_file("k", "src", (photo_dir / "astronaut.jpg").read_bytes(), None, broken)
    assert row["reason"] == "error" and row["detail"].startswith("ValueError")


def test_patches_are_deterministic_and_share_their_source_split(photo_dir: Path) -> None:
    data = (photo_dir / "lab" / "hubble.jpg").read_bytes()
    spec = PairSpec("patches", hr_size=64, scale=2, val_fraction=0.5, patches_per_image=5, seed=3)
    rows = rows_for_file("photos/lab/hubble.jpg", "src", data, None, spec)
    again = rows_for_file("photos/lab/hubble.jpg", "src", data, None, spec)
    reseeded = rows_for_file("photos/lab/hubble.jpg", "src", data, None, PairSpec("patches", 64, 2, 0.5, 5, seed=4))
    assert [row["key"] for row in rows] == [f"photos/lab/hubble.jpg#p{index:03d}" for index in range(5)]
    assert {row["split"] for row in rows} == {split_for("photos/lab/hubble.jpg", 0.5)}
    assert [row["hr"] for row in rows] == [row["hr"] for row in again]
    assert [row["hr"] for row in rows] != [row["hr"] for row in reseeded]
    assert decode_png(rows[0]["lr"]).size == (32, 32)


def test_batches_read_decode_and_split_into_parts(photo_dir: Path, odd_files) -> None:
    files = [photo_dir / "astronaut.jpg", photo_dir / "cats" / "chelsea.png", odd_files.directory / "corrupt.png"]
    sources = [str(path) for path in files] + [str(photo_dir / "missing.jpg")]
    listed = {"key": np.array([f"k{index}" for index in range(4)]), "source": np.array(sources)}
    parts = split_rows(pairs_batch(listed, IMAGENET))
    assert set(parts) == {"train", "val", "rejects"}
    assert parts["train"].column_names == list(PAIR_COLUMNS) == parts["val"].column_names
    assert parts["rejects"].column_names == list(REJECT_COLUMNS)
    assert parts["rejects"].to_pydict()["reason"] == ["corrupt", "read_error"]
    assert parts["rejects"]["detail"][1].as_py().startswith("FileNotFoundError")
    pairs = pa.concat_tables([parts["train"], parts["val"]])
    assert sorted(pairs["key"].to_pylist()) == ["k0", "k1"]
    assert set(pairs["split"].to_pylist()) <= {"train", "val"}
    assert parts["train"]["split"].to_pylist() == ["train"] * parts["train"].num_rows


def test_listing_keys_dedupes_overlaps_and_refuses_collisions(tmp_path: Path, photo_dir: Path) -> None:
    listed = list_sources([str(photo_dir), str(photo_dir / "cats"), str(photo_dir / "astronaut.jpg")])
    keys = [row["key"] for row in listed]
    assert len(listed) == 7 and keys == sorted(keys)
    assert f"{photo_dir.name}/cats/deeper/coffee.webp" in keys  # first input wins an overlap
    clone = tmp_path / "elsewhere" / photo_dir.name
    shutil.copytree(photo_dir, clone)
    with pytest.raises(ValueError, match="distinct names"):
        list_sources([str(photo_dir), str(clone)])
    with pytest.raises(FileNotFoundError):
        list_sources([str(tmp_path / "nothing-here")])


def test_task_planning_fills_cpus_and_caps_shards() -> None:
    faces = PairSpec("faces", hr_size=1024, scale=4)
    assert plan_tasks(10, faces, cpus=2) == 8  # small run: 4 tasks per CPU
    assert plan_tasks(3, faces, cpus=2) == 3  # never more tasks than files
    assert 1500 <= plan_tasks(70_000, faces, cpus=2) <= 2000  # ~64 MiB shards of 1024² PNGs
    assert plan_tasks(70_000, PairSpec("imagenet", 64, 4), cpus=2) == 274  # capped at 256 files/task
    assert plan_tasks(100, faces, cpus=64, files_per_task=10) == 10


# -- committed versions (pipelines.pairs.store) on local files --------------------------------------

def _version(root: Path, rows: int) -> tuple[str, dict]:
    """Write one version's train file as a build would (not yet committed)."""
    import pyarrow.parquet as pq

    from pipelines.pairs import store as pair_store

    version = pair_store.new_version()
    folder = root / pair_store.VERSIONS_DIR / version / "train"
    folder.mkdir(parents=True)
    table = pa.table({"key": [f"k{i}" for i in range(rows)], "hr_size": [64] * rows})
    pq.write_table(table, folder / "part-00000.parquet")
    return version, {"train": [{"path": f"versions/{version}/train/part-00000.parquet", "rows": rows,
                                "row_groups": [rows]}]}


def test_versions_commit_in_one_write_keep_the_previous_and_prune_the_rest(tmp_path: Path) -> None:
    from pipelines.pairs import store as pair_store
    from pipelines.cli import UserError
    from pipelines.pairs.store import read_part

    root = tmp_path / "pairs"
    with pytest.raises(UserError, match="not a committed pairs dataset"):
        read_part(str(root), "train", columns=["key"])
    committed: list[str] = []
    for rows in (3, 5, 7):
        version, files = _version(root, rows)
        orphan, _ = _version(root, 1)  # a build that died before its commit: never read, pruned later
        if committed:  # written but not committed: readers still see the previous version
            assert read_part(str(root), "train", columns=["key"]).num_rows == rows - 2
        summary = pair_store.commit(str(root), version, files, {"recipe": "patches", "fingerprint": "f"}, keep=2)
        committed.append(version)
        assert summary["history"] == committed[-2:-1] and summary["id"] == version
        assert read_part(str(root), "train", columns=["key"]).num_rows == rows
        assert orphan not in {p.name for p in (root / "versions").iterdir()}
    assert sorted(p.name for p in (root / "versions").iterdir()) == sorted(committed[-2:])
    assert read_part(str(root), "train", columns=["key"], version=committed[-2]).num_rows == 5  # kept, readable
    with pytest.raises(UserError, match="is gone"):
        read_part(str(root), "train", version=committed[0])
    assert read_part(str(root), "val", columns=["key"]).num_rows == 0  # listed nothing: empty
    rollback = (root / "versions" / committed[-2] / "_SUMMARY.json").read_bytes()  # the README's rollback
    (root / "_SUMMARY.json").write_bytes(rollback)
    assert read_part(str(root), "train", columns=["key"]).num_rows == 5
    identity = pair_store.identity(str(root))
    assert (identity["id"], identity["recipe"], identity["uri"]) == (committed[-2], "patches", str(root))


def test_a_summary_from_before_versions_is_still_read(tmp_path: Path) -> None:
    import json

    import pyarrow.parquet as pq

    from pipelines.pairs.store import read_part

    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"key": ["a", "b"]}), tmp_path / "train" / "part-00000.parquet")
    (tmp_path / "_SUMMARY.json").write_text(json.dumps({"pairs": 2, "finished_at": "2026-11-01T00:00:00"}))
    assert read_part(str(tmp_path), "train", columns=["key"]).num_rows == 2


def test_pair_rows_are_written_in_hashed_order_and_digested() -> None:
    from pipelines.pairs.transforms import ROW_SCHEMA, order_key, rows_digest

    rows = [{"key": f"n0{c}/img{i}.jpg#p{p:03d}", "source": "s", "split": "train", "recipe": "patches",
             "hr_size": 64, "scale": 4, "hr": bytes([c, i, p]), "lr": b"l", "reason": None, "detail": None}
            for c in range(4) for i in range(4) for p in range(4)]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    train = split_rows(table)["train"]
    keys = train["key"].to_pylist()
    assert keys == sorted(keys, key=order_key) and keys != sorted(keys)
    assert len({k.split("/")[0] for k in keys[:8]}) >= 3  # the first rows come from several folders
    assert len({k.split("#")[0] for k in keys[:8]}) >= 6  # ... and from different photos
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    assert rows_digest(train) == rows_digest(shuffled) != rows_digest(table.slice(1))
