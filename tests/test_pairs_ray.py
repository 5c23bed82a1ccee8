"""build_pairs end to end on a real local Ray: local folders, fake-gcs-server buckets, the CLI;
committed versions (a refused build and a build killed at its commit leave the previous dataset as
it was), and the order training reads pairs of class-grouped folders in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import storage
from pipelines.pairs import store as pair_store
from pipelines.cli import UserError
from pipelines.pairs.transforms import PAIR_COLUMNS, REJECT_COLUMNS, PairSpec, split_for
from pipelines.pairs.build import build_listed, build_pairs, list_sources
from pipelines.pairs.store import read_part
from sr3model.imageio import decode_png

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def check_output(output: str, summary: dict, listed: list[str], hr_size: int, scale: int) -> pa.Table:
    """Assert the output contract; return all pair rows."""
    train, val, rejects = (read_part(output, part) for part in ("train", "val", "rejects"))
    assert train.column_names == list(PAIR_COLUMNS) == val.column_names
    assert rejects.column_names == list(REJECT_COLUMNS)
    pairs = pa.concat_tables([train, val])

    pair_sources, reject_sources = set(pairs["source"].to_pylist()), set(rejects["source"].to_pylist())
    assert pair_sources | reject_sources == set(listed), "every listed file is accounted for"
    assert not pair_sources & reject_sources
    assert rejects.num_rows == len(reject_sources), "one reject row per rejected file"
    assert len(set(pairs["key"].to_pylist())) == pairs.num_rows, "no duplicated rows"

    assert summary == json.loads(storage.read_bytes(storage.join(output, "_SUMMARY.json")))
    assert summary == json.loads(storage.read_bytes(storage.join(output, "versions", summary["version"], "_SUMMARY.json")))
    assert (summary["listed"], summary["accepted"]) == (len(listed), len(pair_sources))
    assert (summary["train"], summary["val"], summary["pairs"]) == (train.num_rows, val.num_rows, pairs.num_rows)
    assert summary["rejected"] == rejects.num_rows
    assert summary["rejected_by_reason"] == dict(Counter(rejects["reason"].to_pylist()))

    source_keys = [key.split("#p")[0] for key in pairs["key"].to_pylist()]
    expected_splits = [split_for(key, summary["val_fraction"]) for key in source_keys]
    assert pairs["split"].to_pylist() == expected_splits
    assert train["split"].to_pylist() == ["train"] * train.num_rows
    assert set(pairs["recipe"].to_pylist()) == {summary["recipe"]}
    assert set(pairs["hr_size"].to_pylist()) == {hr_size} and set(pairs["scale"].to_pylist()) == {scale}
    for row in pairs.select(["hr", "lr"]).to_pylist():
        hr, lr = decode_png(row["hr"]), decode_png(row["lr"])
        assert hr.size == (hr_size, hr_size) and lr.size == (hr_size // scale,) * 2
        np.testing.assert_array_equal(np.asarray(lr), np.asarray(hr.resize(lr.size, Image.BICUBIC)))
    fs, path = storage.resolve(storage.join(output, "versions"))
    kept = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}
    assert kept == {summary["version"], *summary["history"]}, "only committed versions are kept"
    assert all(name.startswith(f"versions/{summary['version']}/") for part in summary["files"].values()
               for name in (f["path"] for f in part))
    return pairs


def test_local_build_accounts_for_every_file_and_reruns_cleanly(
    ray_local: str, photo_dir: Path, odd_files, tmp_path: Path
) -> None:
    inputs = [str(photo_dir), str(odd_files.directory)]
    listed = [item.uri for uri in inputs for item in storage.list_files(uri)]
    output = str(tmp_path / "pairs")
    summary = build_pairs(inputs, output, "imagenet", 64, 4, val_fraction=0.3)
    pairs = check_output(output, summary, listed, 64, 4)
    assert summary["found"] == len(listed) == 22 and summary["limit"] is None
    assert summary["files_per_s"] > 0 and summary["elapsed_s"] > 0

    rejects = read_part(output, "rejects").to_pylist()
    got = {Path(row["source"]).name: row["reason"] for row in rejects}
    assert got == {name: reason for name, reason in odd_files.expected.items() if reason}
    assert all(row["key"] == f"{odd_files.directory.name}/{Path(row['source']).name}" for row in rejects)
    assert 0 < summary["val"] < summary["pairs"]  # both splits are present at val_fraction 0.3

    again = build_pairs(inputs, output, "imagenet", 64, 4, val_fraction=0.3, files_per_task=5)
    repeat = check_output(output, again, listed, 64, 4)
    splits = dict(zip(pairs["key"].to_pylist(), pairs["split"].to_pylist()))
    assert dict(zip(repeat["key"].to_pylist(), repeat["split"].to_pylist())) == splits
    assert again["tasks"] == 5 and again["pairs"] == summary["pairs"]

    limited = build_pairs(inputs, output, "imagenet", 64, 4, val_fraction=0.3, limit=4)
    first_four = [row["source"] for row in list_sources(inputs)[:4]]
    check_output(output, limited, first_four, 64, 4)
    assert (limited["found"], limited["listed"]) == (22, 4)
    assert limited["history"] == [again["version"]]  # the previous version is kept, the first pruned

    # every read fails (the files vanished after listing, as in a storage outage): nothing committed
    gone = tmp_path / "gone"
    gone.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (gone / name).write_bytes((photo_dir / "astronaut.jpg").read_bytes())
    listing = list_sources([str(gone)])
    for name in ("a.jpg", "b.jpg"):
        (gone / name).unlink()
    with pytest.raises(UserError, match=r"none of the 2 files gave a pair \(read_error 2\); nothing committed"):
        build_listed(listing, output, PairSpec("imagenet", 64, 4, 0.3))
    assert json.loads((Path(output) / "_SUMMARY.json").read_text()) == limited  # the dataset is unchanged
    check_output(output, limited, first_four, 64, 4)


def test_patches_do_not_depend_on_task_layout(ray_local: str, photo_dir: Path, tmp_path: Path) -> None:
    listed = [item.uri for item in storage.list_files(str(photo_dir))]
    outputs = [str(tmp_path / "one"), str(tmp_path / "many")]
    rows = []
    for output, per_task in zip(outputs, (7, 1)):
        summary = build_pairs(
            [str(photo_dir)], output, "patches", 64, 2, val_fraction=0.4, patches_per_image=3, seed=11,
            files_per_task=per_task,
        )
        pairs = check_output(output, summary, listed, 64, 2)
        assert summary["pairs"] == 3 * 7 and summary["rejected"] == 0
        rows.append(dict(zip(pairs["key"].to_pylist(), pairs["hr"].to_pylist())))
    assert rows[0] == rows[1]
    assert {key.rsplit("#", 1)[1] for key in rows[0]} == {"p000", "p001", "p002"}


KILL_AT_COMMIT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pipelines import storage
write_bytes = storage.write_bytes
def killed_at_commit(uri, data):
    if uri == storage.join({output!r}, "_SUMMARY.json"):  # the one write that switches versions
        os.kill(os.getpid(), signal.SIGKILL)
    write_bytes(uri, data)
storage.write_bytes = killed_at_commit
sys.argv = ["build_pairs.py", *{args!r}]
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def test_gcs_to_gcs_and_a_build_killed_at_its_commit(ray_local: str, gcs_bucket: str, photo_dir: Path,
                                                     odd_files) -> None:
    for folder, name in [(photo_dir, "photos"), (odd_files.directory, "odd")]:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            storage.write_bytes(storage.join(gcs_bucket, "raw", name, str(path.relative_to(folder))), path.read_bytes())
    inputs = [storage.join(gcs_bucket, "raw", "photos"), storage.join(gcs_bucket, "raw", "odd")]
    listed = [item.uri for uri in inputs for item in storage.list_files(uri)]
    assert len(listed) == 22 and all(uri.startswith(f"{gcs_bucket}/raw/") for uri in listed)
    output = storage.join(gcs_bucket, "pairs", "imagenet-16-64")
    first = build_pairs(inputs, output, "imagenet", 64, 4, val_fraction=0.3)
    check_output(output, first, listed, 64, 4)
    assert first["pairs"] == 22 - 7  # 7 of the odd files are rejects

    args = [arg for uri in inputs for arg in ("--input", uri)] + [
        "--output", output, "--recipe", "imagenet", "--hr-size", "64", "--scale", "4", "--val-fraction", "0.3",
        "--limit", "5", "--ray-address", ray_local]
    code = KILL_AT_COMMIT.format(repo=str(REPO), output=output, args=args, script=str(REPO / "jobs" / "build_pairs.py"))
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    versions = storage.list_files(storage.join(output, "versions"))
    orphans = {item.relpath.split("/")[0] for item in versions} - {first["version"]}
    assert len(orphans) == 1  # the killed build wrote its whole version, but did not commit it
    assert json.loads(storage.read_bytes(storage.join(output, "_SUMMARY.json"))) == first  # readers see the old one
    assert read_part(output, "train").num_rows == first["train"]

    second = build_pairs(inputs, output, "imagenet", 64, 4, val_fraction=0.3)  # replaces the first, prunes the orphan
    pairs = check_output(output, second, listed, 64, 4)
    assert second["history"] == [first["version"]] and second["fingerprint"] == first["fingerprint"]
    assert "photos/cats/deeper/coffee.webp" in pairs["key"].to_pylist()
    reasons = {row["source"].rsplit("/", 1)[1]: row["reason"] for row in read_part(output, "rejects").to_pylist()}
    assert reasons == {name: reason for name, reason in odd_files.expected.items() if reason}


def test_training_order_mixes_class_grouped_folders(ray_local: str, photo_arrays: dict, tmp_path: Path) -> None:
    """4 class folders of 2 photos each → 16 patches per photo; two ranks' first batches each mix
    classes and photos, and the second epoch's order is another one."""
    import pyarrow.fs

    from pipelines.train.data import BatchStream
    from pipelines.train.driver import train_files

    classes = {"n01": "astronaut", "n02": "chelsea", "n03": "coffee", "n04": "rocket"}
    for folder, name in classes.items():
        for i, (y, x) in enumerate(((0, 0), (100, 100))):
            path = tmp_path / "photos" / folder / f"{name}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo_arrays[name][y:y + 256, x:x + 256]).save(path)
    output = str(tmp_path / "pairs")
    summary = build_pairs([str(tmp_path / "photos")], output, "patches", 64, 4, val_fraction=0.0, patches_per_image=16)
    assert summary["train"] == 4 * 2 * 16
    files, groups = train_files(output, pair_store.read_summary(output))
    row_keys = [k for f in files for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]
    photos_by_shard = [k.split("#")[0] for k in row_keys[::16]]  # one photo per task here (8 files, 2 CPUs)
    assert photos_by_shard != sorted(photos_by_shard)  # the shards do not follow the listing's folders
    starts = np.cumsum([0] + [sum(g) for g in groups])
    photos: set[str] = set()
    for rank in (0, 1):
        stream = BatchStream(list(files), groups, pyarrow.fs.LocalFileSystem(), seed=0, rank=rank, world=2, batch=4)
        epochs = [stream.plan(e) for e in (0, 1)]
        assert not np.array_equal(epochs[0], epochs[1])
        first = [[row_keys[starts[stream.units[u].file] + stream.units[u].start + r] for u, r in batch.tolist()]
                 for batch in epochs[0][:6]]
        for batch_keys in first:
            assert len({k.split("/")[1] for k in batch_keys}) >= 2, batch_keys  # classes mix in every batch
        photos |= {k.split("#")[0] for batch_keys in first for k in batch_keys}
    assert len(photos) == 8  # the two ranks' first 6 batches together hold patches of every photo
    by_key = sorted(row_keys)  # the listing order a sorted reader would give: one class per batch
    assert all(len({k.split("/")[1] for k in by_key[i:i + 4]}) == 1 for i in range(0, 24, 4))


def test_cli_prints_a_summary_line_and_respects_limit(
    ray_local: str, photo_dir: Path, odd_files, tmp_path: Path
) -> None:
    output = tmp_path / "cli"
    command = [
        sys.executable, str(REPO / "jobs" / "build_pairs.py"),
        "--input", str(photo_dir), "--input", str(odd_files.directory), "--output", str(output),
        "--recipe", "faces", "--hr-size", "64", "--scale", "4", "--val-fraction", "0.2",
        "--limit", "20", "--ray-address", ray_local,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("build_pairs: 20 files -> 2 pairs") and last.endswith(f"output: {output}")
    summary = json.loads((output / "_SUMMARY.json").read_text())
    listed = [row["source"] for row in list_sources([str(photo_dir), str(odd_files.directory)])[:20]]
    pairs = check_output(str(output), summary, listed, 64, 4)
    assert sorted(Path(source).name for source in pairs["source"].to_pylist()) == ["astronaut.jpg", "camera.png"]
    assert summary["rejected_by_reason"]["not_square"] == 8 + 3  # faces wants aligned squares
    assert f"rejected {odd_files.directory / 'bomb.png'}: decompression_bomb" in result.stdout
