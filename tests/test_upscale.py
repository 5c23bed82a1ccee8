"""Batch upscaling end to end on a local Ray: registry lookups, odd inputs, any size, incremental
reruns, a driver killed midway, gs:// on the GCS emulator, and the schedule stored by the search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from job_support import load_job
from model_support import register_tiny, save_tiny
from pictures import assert_same_picture, picture_psnr
from pipelines import storage, upscale_io
from pipelines.models import resolve_model, store_sampling

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """(tracking URI, models:/tiny-up@champion, model directory)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    directory = save_tiny(root / "model")
    model_uri, _ = register_tiny(directory, uri, "tiny-up")
    return uri, model_uri, directory


def _upscale(*argv: str) -> int:
    return load_job("upscale").main(list(argv))


def _manifest(output: str) -> list[dict]:
    return upscale_io.read_table(output, upscale_io.MANIFEST_DIR, upscale_io.MANIFEST_SCHEMA.names).to_pylist()


def _rejects(output: str) -> list[dict]:
    return upscale_io.read_table(output, upscale_io.REJECTS_DIR, upscale_io.REJECT_SCHEMA.names).to_pylist()


def _patches(directory: Path, photo: np.ndarray, count: int, size: int = 16) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(photo[8 * i:8 * i + size, 8 * i:8 * i + size]).save(directory / f"p{i:02d}.png")


def test_folder_odd_inputs_any_size_and_incremental_rerun(ray_local, registry, odd_files, photo_arrays,
                                                          tmp_path: Path, monkeypatch) -> None:
    uri, model_uri, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    inputs = tmp_path / "in"
    _patches(inputs / "patches", photo_arrays["astronaut"], 3)
    Image.fromarray(photo_arrays["chelsea"][:20, :36]).save(inputs / "wide.jpg")  # non-square, 2 × 3 tiles
    (inputs / "odd").mkdir()
    for name in ("empty.jpg", "text_named.jpg", "truncated.jpg", "corrupt.png", "bomb.png", "tiny.png"):
        (inputs / "odd" / name).write_bytes((odd_files.directory / name).read_bytes())
    rgba = np.dstack([photo_arrays["coffee"][:16, :16], np.full((16, 16), 128, np.uint8)])
    Image.fromarray(rgba).save(inputs / "odd" / "rgba.png")  # alpha: composited on white, kept
    output = str(tmp_path / "out")

    assert _upscale("--model", model_uri, "--input", str(inputs), "--output", output, "--steps", "2",
                    "--batch-size", "2", "--samples", "2") == 0
    rows = _manifest(output)
    by_output = {row["output"]: row for row in rows}
    expected = {f"patches/p0{i}_s{k}.png" for i in range(3) for k in range(2)} | {
        f"{name}_s{k}.png" for name in ("wide", "odd/rgba", "odd/tiny") for k in range(2)}
    assert set(by_output) == expected and len(rows) == len(expected)
    assert all(row["model_name"] == "tiny-up" and row["model_version"] == "1" and row["model_uri"] == "models:/tiny-up/1"
               for row in rows)
    assert all(row["steps"] == 2 and row["sampler"] == "ddpm" for row in rows)
    wide = by_output["wide_s0.png"]
    assert (wide["output_width"], wide["output_height"], wide["tiles"]) == (144, 80, 6)
    for name, row in by_output.items():
        with Image.open(Path(output) / name) as image:
            assert image.size == (row["output_width"], row["output_height"]) == (4 * row["input_width"], 4 * row["input_height"])
    assert by_output["wide_s0.png"]["seed"] != by_output["wide_s1.png"]["seed"]
    reasons = {Path(row["source"]).name: row["reason"] for row in _rejects(output)}
    assert reasons == {"empty.jpg": "empty", "text_named.jpg": "not_an_image", "truncated.jpg": "truncated",
                       "corrupt.png": "corrupt", "bomb.png": "decompression_bomb"}
    parts = sorted(p.name for p in (Path(output) / upscale_io.MANIFEST_DIR).iterdir())

    # Rerun: nothing new; one new image in the bucket: only it is done.
    assert _upscale("--model", model_uri, "--input", str(inputs), "--output", output, "--steps", "2",
                    "--samples", "2") == 0
    summary = storage.read_bytes(storage.join(output, upscale_io.SUMMARY_NAME)).decode()
    assert '"done": 0' in summary and '"skipped": 6' in summary and '"skipped_rejected": 5' in summary
    assert sorted(p.name for p in (Path(output) / upscale_io.MANIFEST_DIR).iterdir()) == parts
    _patches(inputs / "new", photo_arrays["coffee"], 1)
    assert _upscale("--model", model_uri, "--input", str(inputs), "--output", output, "--steps", "2",
                    "--samples", "2") == 0
    assert len(_manifest(output)) == len(expected) + 2 and len(_rejects(output)) == 5
    assert not list(Path(output).rglob("*.tmp-*"))


def test_same_seed_same_image_whatever_the_batch(ray_local, registry, photo_arrays, tmp_path: Path) -> None:
    """Each image's noise is its own: batches of 1 and 3 give the same pictures, up to the last-bit
    float differences batch shapes may cause (`pictures.assert_same_picture`); a shared noise
    stream would give other pictures altogether."""
    _, _, directory = registry
    _patches(tmp_path / "in", photo_arrays["chelsea"], 3)
    outputs = []
    for batch, seed in (("1", "7"), ("3", "7"), ("3", "8")):
        output = tmp_path / f"out{batch}-{seed}"
        assert _upscale("--model", str(directory), "--input", str(tmp_path / "in"), "--output", str(output),
                        "--steps", "3", "--batch-size", batch, "--seed", seed, "--workers", "1") == 0
        outputs.append({p.name: np.asarray(Image.open(p)) for p in sorted(output.glob("*.png"))})
    assert outputs[0].keys() == outputs[1].keys() == outputs[2].keys() and len(outputs[0]) == 3
    for name in outputs[0]:
        assert_same_picture(outputs[0][name], outputs[1][name], name)
        # the tolerance still tells noise apart: another seed gives another picture
        assert picture_psnr(outputs[1][name], outputs[2][name]) < 40, name


def test_driver_killed_midway_then_rerun_finishes_the_rest(ray_local, registry, photo_arrays,
                                                           tmp_path: Path) -> None:
    _, _, directory = registry
    _patches(tmp_path / "in", photo_arrays["astronaut"], 12)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO / "jobs" / "upscale.py"), "--model", str(directory), "--input",
               str(tmp_path / "in"), "--output", str(output), "--steps", "60", "--batch-size", "1",
               "--ray-address", ray_local]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((output / upscale_io.MANIFEST_DIR).glob("*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    before = {row["output"] for row in _manifest(str(output))}
    assert 2 <= len(before) < 12

    assert _upscale("--model", str(directory), "--input", str(tmp_path / "in"), "--output", str(output),
                    "--steps", "60", "--batch-size", "4") == 0
    rows = _manifest(str(output))
    assert sorted(row["output"] for row in rows) == [f"p{i:02d}.png" for i in range(12)]  # each once
    assert not list(output.rglob("*.tmp-*"))


def test_gcs_bucket_and_the_schedule_stored_by_the_search(ray_local, registry, gcs_bucket: str, photo_arrays,
                                                          tmp_path: Path, monkeypatch) -> None:
    uri, model_uri, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _patches(tmp_path / "in", photo_arrays["coffee"], 2)
    Image.fromarray(photo_arrays["coffee"][:16, :30]).save(tmp_path / "in" / "wide.png")
    for path in (tmp_path / "in").iterdir():
        storage.write_bytes(storage.join(gcs_bucket, "photos", "x", path.name), path.read_bytes())
    storage.write_bytes(storage.join(gcs_bucket, "photos", "x", "broken.png"), b"\x89PNG\r\n\x1a\n broken")
    store_sampling(resolve_model(model_uri, uri), {3: {"sampler": "ddpm", "beta_start": 2e-3, "beta_end": 0.99995,
                                                       "metric": "ssim", "value": 0.5}}, uri)
    output = storage.join(gcs_bucket, "photos", "x4")  # inside the input prefix: its files are not inputs

    assert _upscale("--model", model_uri, "--input", storage.join(gcs_bucket, "photos"), "--output", output,
                    "--steps", "3", "--format", "webp") == 0
    rows = _manifest(output)
    assert sorted(row["output"] for row in rows) == ["x/p00.webp", "x/p01.webp", "x/wide.webp"]
    assert {(row["schedule"], row["schedule_source"]) for row in rows} == {("0.002,0.99995", "search")}
    assert [row["reason"] for row in _rejects(output)] == ["not_an_image"]
    fs, path = storage.resolve(storage.join(output, "x", "wide.webp"))
    with Image.open(fs.open(path)) as image:
        assert image.size == (120, 64)
    assert _upscale("--model", model_uri, "--input", storage.join(gcs_bucket, "photos"), "--output", output,
                    "--steps", "3", "--format", "webp", "--schedule", "1e-4,0.99995") == 0
    summary = storage.read_bytes(storage.join(output, upscale_io.SUMMARY_NAME)).decode()
    assert '"listed": 4' in summary and '"skipped": 3' in summary


def test_names_cannot_escape_the_output_prefix(tmp_path: Path) -> None:
    for bad in ("../x.png", "a/../../x.png", "/etc/x.png", "a//b.png", "a\\..\\b.png", "_manifest/x.png", "./a.png"):
        with pytest.raises(upscale_io.UnsafeName):
            upscale_io.safe_relpath(bad)
    listed = [storage.ListedFile(f"gs://b/in/{name}", "gs://b/in", name, 10)
              for name in ("a.jpg", "a.png", "../up.png", "ok/b.png")]
    todo, rejects, counts = upscale_io.plan(listed, str(tmp_path / "out"), "png", 1)
    assert [item["relpath"] for item in todo] == ["a.jpg", "ok/b.png"]
    assert sorted(r["reason"] for r in rejects) == ["output_collision", "unsafe_name"]
    assert counts["listed"] == 4


def test_cascade_of_a_tiny_base_and_one_stage(ray_local, registry, tmp_path: Path, monkeypatch) -> None:
    uri, stage_uri, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = save_tiny(tmp_path / "base", "unconditional", 1, "hr_size=16", "lr_size=4")
    output = tmp_path / "cascade"
    job = load_job("cascade")
    assert job.main(["--base", str(base), "--stage", stage_uri, "--num-samples", "3", "--output", str(output),
                     "--steps", "4,2", "--batch-size", "2", "--keep-intermediate"]) == 0
    rows = {row["output"]: row for row in _manifest(str(output))}
    finals = [f"sample_{i:06d}.png" for i in range(3)]
    middles = [f"intermediate/stage0_16px/sample_{i:06d}.png" for i in range(3)]
    assert sorted(rows) == sorted(finals + middles)
    for name in finals:
        with Image.open(output / name) as image:
            assert image.size == (64, 64)
        assert rows[name]["model_name"] == "tiny-up" and rows[name]["steps"] == 2
        assert rows[name]["source"] == f"intermediate/stage0_16px/{name}"
    for name in middles:
        with Image.open(output / name) as image:
            assert image.size == (16, 16)
        assert rows[name]["source"] == "noise" and rows[name]["steps"] == 4 and rows[name]["model_uri"] == str(base)
    assert len({rows[name]["seed"] for name in finals + middles}) == 6
    first = np.asarray(Image.open(output / finals[0]))

    # Two more samples: only they are generated; the first ones are not redone.
    assert job.main(["--base", str(base), "--stage", stage_uri, "--num-samples", "5", "--output", str(output),
                     "--steps", "4,2"]) == 0
    assert sorted(r["output"] for r in _manifest(str(output))) == sorted(
        finals + middles + ["sample_000003.png", "sample_000004.png"])
    np.testing.assert_array_equal(np.asarray(Image.open(output / finals[0])), first)
    assert job.main(["--base", stage_uri, "--stage", stage_uri, "--num-samples", "1", "--output",
                     str(tmp_path / "bad")]) == 2


def test_sampling_actors_one_per_gpu_else_one_single_threaded_per_cpu_within_work_and_memory() -> None:
    from pipelines.runtime import place_sampling_actors

    gib = 2 ** 30
    assert place_sampling_actors({"CPU": 16, "GPU": 4, "memory": 64 * gib}, None, None) == (1, 4, 0)
    assert place_sampling_actors({"CPU": 16, "GPU": 4}, 0.5, None) == (0.5, 8, 0)
    cpu = {"CPU": 8, "memory": 64 * gib}
    assert place_sampling_actors(cpu, None, None, model_bytes=10 ** 6, blocks=100) == (0, 8, 1)
    assert place_sampling_actors(cpu, None, None, model_bytes=10 ** 6, blocks=3) == (0, 3, 2)  # few batches
    assert place_sampling_actors(cpu, None, None, model_bytes=4 * gib, blocks=100) == (0, 2, 4)  # 32 GiB / 16 GiB
    assert place_sampling_actors(cpu, None, None, model_bytes=40 * gib, blocks=100) == (0, 1, 8)  # never 0
    assert place_sampling_actors(cpu, None, 3, model_bytes=10 ** 6, blocks=100) == (0, 3, 2)  # --workers wins
    assert place_sampling_actors({"CPU": 0}, None, None) == (0, 1, 1)  # autoscaling head without CPUs
