"""build_pairs end to end on a real local Ray: local folders, fake-gcs-server buckets, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines import storage
from pipelines.pair_transforms import PAIR_COLUMNS, REJECT_COLUMNS, split_for
from pipelines.pairs import build_pairs, list_sources, read_part
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
    fs, path = storage.resolve(output)
    assert not [name for name in fs.find(path) if "_staging-" in name], "staging is cleaned up"
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


def test_gcs_to_gcs(ray_local: str, gcs_bucket: str, photo_dir: Path, odd_files) -> None:
    for folder, name in [(photo_dir, "photos"), (odd_files.directory, "odd")]:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            storage.write_bytes(storage.join(gcs_bucket, "raw", name, str(path.relative_to(folder))), path.read_bytes())
    inputs = [storage.join(gcs_bucket, "raw", "photos"), storage.join(gcs_bucket, "raw", "odd")]
    listed = [item.uri for uri in inputs for item in storage.list_files(uri)]
    assert len(listed) == 22 and all(uri.startswith(f"{gcs_bucket}/raw/") for uri in listed)
    output = storage.join(gcs_bucket, "pairs", "imagenet-16-64")
    for _ in range(2):  # the second run replaces the first
        summary = build_pairs(inputs, output, "imagenet", 64, 4, val_fraction=0.3)
        pairs = check_output(output, summary, listed, 64, 4)
        assert summary["pairs"] == 22 - 7  # 7 of the odd files are rejects
    assert "photos/cats/deeper/coffee.webp" in pairs["key"].to_pylist()
    reasons = {row["source"].rsplit("/", 1)[1]: row["reason"] for row in read_part(output, "rejects").to_pylist()}
    assert reasons == {name: reason for name, reason in odd_files.expected.items() if reason}


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
