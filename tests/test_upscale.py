"""Batch upscaling end to end on a local Ray (the policies without Ray: test_infer.py): registry
lookups, odd inputs, any size, batches capped by output pixels, incremental reruns, a driver killed
midway (then stale outputs reported and redone), gs:// on the GCS emulator, the schedule stored by
the search, model-aware reruns with two registered versions (and the pyfunc giving the job's
picture), a failing image isolated, and the cascade."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job_support import load_job
from model_support import register_tiny, save_tiny
from train_support import tiny_config
from pictures import assert_same_picture, picture_psnr
from pipelines import storage
from pipelines.infer import layout, manifest
from pipelines.registry.models import resolve_model, store_sampling

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


def _manifest(output: str, *, every: bool = False) -> list[dict]:
    """The manifest's rows: the latest per output (`every`: all rows ever written)."""
    rows = manifest.read_table(output, manifest.MANIFEST_DIR)
    return (rows if every else manifest.latest(rows, "output")).to_pylist()


def _rejects(output: str) -> list[dict]:
    return manifest.latest(manifest.read_table(output, manifest.REJECTS_DIR), "source").to_pylist()


def _summary(output: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(output, layout.SUMMARY_NAME)))


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
                    "--batch-size", "2", "--samples", "2", "--max-batch-pixels", "9000") == 0
    rows = _manifest(output)
    by_output = {row["output"]: row for row in rows}
    expected = {f"patches/p0{i}_s{k}.png" for i in range(3) for k in range(2)} | {
        f"{name}_s{k}.png" for name in ("wide", "odd/rgba", "odd/tiny") for k in range(2)}
    assert set(by_output) == expected and len(rows) == len(expected)
    assert all(row["model_name"] == "tiny-up" and row["model_version"] == "1" and row["model_uri"] == "models:/tiny-up/1"
               for row in rows)

    assert all(row["steps"] == 2 and row["sampler"] == tiny_config().diffusion.sample_sampler for row in rows)
    wide = by_output["wide_s0.png"]
    assert (wide["output_width"], wide["output_height"], wide["tiles"]) == (144, 80, 6)
    # Batches are capped by output pixels: two 64×64 outputs (8192 px) fit under 9000 and are sampled
    # together; one 144×80 output (11520 px) exceeds the cap alone, so each sample of it runs alone.
    assert {row["batch_pixels"] for name, row in by_output.items() if name.startswith("patches/")} == {8192}
    assert by_output["wide_s0.png"]["batch_pixels"] == by_output["wide_s1.png"]["batch_pixels"] == 11520
    assert all(row["batch_pixels"] <= 9000 or row["batch_pixels"] == row["output_width"] * row["output_height"]
               for row in rows)
    for name, row in by_output.items():
        with Image.open(Path(output) / name) as image:
            assert image.size == (row["output_width"], row["output_height"]) == (4 * row["input_width"], 4 * row["input_height"])
    assert by_output["wide_s0.png"]["seed"] != by_output["wide_s1.png"]["seed"]
    reasons = {Path(row["source"]).name: row["reason"] for row in _rejects(output)}
    assert reasons == {"empty.jpg": "empty", "text_named.jpg": "not_an_image", "truncated.jpg": "truncated",
                       "corrupt.png": "corrupt", "bomb.png": "decompression_bomb"}
    parts = sorted(p.name for p in (Path(output) / manifest.MANIFEST_DIR).iterdir())
    assert len(parts) == 1 and parts[0].startswith("run-")  # the run's batch parts, compacted into one file
    assert all(len(row["input_hash"]) == 32 for row in rows)

    # Rerun: nothing new — one input rewritten with the same bytes (a new mtime: local files have no
    # checksum, its content hash says it is unchanged); then one new image: only it is done.
    touched = inputs / "patches" / "p00.png"
    touched.write_bytes(touched.read_bytes())
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 5))
    assert _upscale("--model", model_uri, "--input", str(inputs), "--output", output, "--steps", "2",
                    "--samples", "2", "--max-batch-pixels", "9000") == 0
    summary = _summary(output)
    assert (summary["done"], summary["skipped"], summary["touched"], summary["skipped_rejected"],
            summary["stale"]) == (0, 6, 1, 5, 0)
    stamps = {row["input_fingerprint"] for row in _manifest(output) if row["source"] == str(touched)}
    assert stamps == {f"{touched.stat().st_size}:mtime={touched.stat().st_mtime}"}  # recorded: not re-read next time
    assert len(list((Path(output) / manifest.MANIFEST_DIR).iterdir())) == 2  # one file per run
    _patches(inputs / "new", photo_arrays["coffee"], 1)
    assert _upscale("--model", model_uri, "--input", str(inputs), "--output", output, "--steps", "2",
                    "--samples", "2", "--max-batch-pixels", "9000") == 0
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
        if len(list((output / manifest.MANIFEST_DIR).glob("*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    before = {row["output"] for row in _manifest(str(output))}
    assert 2 <= len(before) < 12

    # The rerun samples with 2 steps: it finishes the rest, and reports the 60-step outputs as stale
    # (other settings) without redoing them; --redo-stale then redoes exactly those.
    again = ["--model", str(directory), "--input", str(tmp_path / "in"), "--output", str(output), "--steps", "2",
             "--batch-size", "4"]
    assert _upscale(*again) == 0
    rows = _manifest(str(output), every=True)
    assert sorted(row["output"] for row in rows) == [f"p{i:02d}.png" for i in range(12)]  # each once
    assert {row["output"] for row in rows if row["steps"] == 60} == before
    summary = _summary(str(output))
    assert (summary["done"], summary["stale"], summary["skipped"]) == (12 - len(before), len(before), 0)
    assert _upscale(*again, "--redo-stale") == 0
    assert (_summary(str(output))["done"], _summary(str(output))["redone_stale"]) == (len(before), len(before))
    assert {row["steps"] for row in _manifest(str(output))} == {2}
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

    sampler = tiny_config().diffusion.sample_sampler  # stored for the model's own sampler, so it is used
    store_sampling(resolve_model(model_uri, uri), {3: {"sampler": sampler, "beta_start": 2e-3, "beta_end": 0.99995,
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
    summary = _summary(output)  # another schedule: the three outputs are stale, not redone
    assert (summary["listed"], summary["stale"], summary["skipped"], summary["done"]) == (4, 3, 0, 0)


def test_model_aware_reruns_with_two_registered_versions_and_the_pyfunc_gives_the_jobs_picture(
        ray_local, gcs_bucket: str, photo_arrays, tmp_path: Path, monkeypatch) -> None:
    """On gs://: outputs record the model version, settings and the input's fingerprint (crc32c).
    Moving @champion to version 2 makes them stale (reported, not redone: --redo-stale is tested
    with the killed run); an input replaced by another picture of the same byte size is redone; a `too_large` reject is
    retried once the limit is raised; a file that is not an image is not. Then mlflow.pyfunc of
    version 2 gives the job's pictures (its stored schedule, tiling, per-image noise)."""
    import mlflow
    import pandas as pd

    root = tmp_path / "registry"
    uri = f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_uri, _ = register_tiny(save_tiny(root / "v1"), uri, "tiny-rerun")
    photos = storage.join(gcs_bucket, "photos")

    def put(name: str, pixels: np.ndarray) -> None:  # uncompressed PNG: the byte size depends only on the shape
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
        storage.write_bytes(storage.join(photos, name), buffer.getvalue())

    put("p00.png", photo_arrays["coffee"][:16, :16])
    put("p01.png", photo_arrays["coffee"][16:32, :16])
    put("wide.png", photo_arrays["coffee"][:16, :30])
    storage.write_bytes(storage.join(photos, "notes.png"), b"not an image at all")
    output = storage.join(gcs_bucket, "x4")
    run = ["--model", model_uri, "--input", photos, "--output", output, "--steps", "3"]
    assert _upscale(*run, "--max-output-pixels", "5000") == 0  # wide: 64×120 = 7680 output pixels
    assert sorted(r["reason"] for r in _rejects(output)) == ["not_an_image", "too_large"]
    assert {row["model_version"] for row in _manifest(output)} == {"1"}
    assert all(row["input_fingerprint"].startswith(f"{row['input_bytes']}:crc32c=") for row in _manifest(output))

    register_tiny(save_tiny(root / "v2", "sr3", 1), uri, "tiny-rerun")  # @champion → version 2
    ref = resolve_model(model_uri, uri)
    assert ref.version == "2"
    store_sampling(ref, {3: {"sampler": tiny_config().diffusion.sample_sampler, "beta_start": 3e-3, "beta_end": 0.99993, "metric": "ssim", "value": 0.5}},
                   uri)
    put("p01.png", photo_arrays["coffee"][32:48, :16])  # another picture, the same number of bytes
    assert _upscale(*run) == 0
    summary = _summary(output)
    assert {k: summary[k] for k in ("done", "changed", "retried", "stale", "skipped_rejected")} == {
        "done": 2, "changed": 1, "retried": 1, "stale": 1, "skipped_rejected": 1}
    rows = {row["output"]: row for row in _manifest(output)}
    assert {name: row["model_version"] for name, row in rows.items()} == {"p00.png": "1", "p01.png": "2",
                                                                          "wide.png": "2"}
    assert {(rows[n]["schedule"], rows[n]["schedule_source"]) for n in ("p01.png", "wide.png")} == {("0.003,0.99993",
                                                                                                   "search")}

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(model_uri)
    names = ["p01.png", "wide.png"]  # made by version 2: the model's size, and one sampled over blended tiles
    frame = pd.DataFrame({"lr": [storage.read_bytes(storage.join(photos, n)) for n in names], "name": names})
    out = served.predict(frame, params={"steps": 3, "seed": 0})
    for name, png in zip(names, out["sr"]):
        mine = np.asarray(Image.open(io.BytesIO(png)))
        fs, path = storage.resolve(storage.join(output, name))
        theirs = np.asarray(Image.open(fs.open(path)))
        assert mine.shape == theirs.shape
        assert np.abs(mine.astype(int) - theirs.astype(int)).max() <= 1, name  # within one level
    renamed = served.predict(frame.assign(name=["p00.png", "x.png"]), params={"steps": 3, "seed": 0})
    first, second = (np.asarray(Image.open(io.BytesIO(f["sr"][0]))) for f in (out, renamed))
    assert picture_psnr(first, second) < 40  # the name seeds the noise: the comparison above can fail


def test_a_failing_image_is_rejected_and_retried_while_the_others_are_written(ray_local, photo_arrays,
                                                                              tmp_path: Path, capsys) -> None:
    """A real sampling failure for one size: with a U-Net that halves four times (factor 8), tiles
    of 5 LR pixels (20 HR) cannot run. Images of the model's own size are sampled whole and are
    written; the one needing tiles fails alone — in a batch with the others — and is retried
    (without the bad tile) by the next run."""
    directory = save_tiny(tmp_path / "model", "sr3", 0, "unet.channel_mult=1,1,1,1")
    inputs = tmp_path / "in"
    _patches(inputs, photo_arrays["rocket"], 2)
    Image.fromarray(photo_arrays["rocket"][:20, :36]).save(inputs / "wide.png")
    output = tmp_path / "out"
    args = ["--model", str(directory), "--input", str(inputs), "--output", str(output), "--steps", "2",
            "--batch-size", "4", "--workers", "1"]
    assert _upscale(*args, "--tile", "5") == 1
    assert "1 failed (sample_failed 1)" in capsys.readouterr().out
    assert sorted(row["output"] for row in _manifest(str(output))) == ["p00.png", "p01.png"]
    (reject,) = _rejects(str(output))
    assert reject["source"].endswith("wide.png") and reject["reason"] == "sample_failed"
    assert "not divisible by the U-Net's down-sampling factor 8" in reject["detail"]
    summary = _summary(str(output))
    assert (summary["done"], summary["failed"], summary["failed_by_reason"]) == (2, 1, {"sample_failed": 1})

    assert _upscale(*args) == 0
    summary = _summary(str(output))
    assert (summary["retried"], summary["done"], summary["skipped"], summary["stale"]) == (1, 1, 2, 0)
    with Image.open(output / "wide.png") as image:
        assert image.size == (144, 80)

    assert _upscale("--model", str(directory), "--input", str(tmp_path / "nowhere"), "--output",
                    str(output)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("upscale: error: --input") and "nowhere" in line


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


def test_a_mixed_folder_keeps_what_each_input_had_and_the_pyfunc_writes_the_same_files(
        ray_local, photo_arrays, tmp_path: Path, monkeypatch, capsys) -> None:
    """jobs/upscale.py on a folder of every input kind (tests/fidelity_support.py) with SR3's
    untrained regression model (output = bicubic x), registered in MLflow: each output has the
    mode, depth, profile and tags tests/test_fidelity.py's table says, the manifest records it, and
    mlflow.pyfunc of the same version gives the same files. --format jpeg refuses what it cannot
    hold (one error line, exit 2, the rest written; again on the rerun), --fallback convert then
    writes those converted; another --alpha makes the outputs stale."""
    import mlflow
    import pandas as pd

    from fidelity_support import TABLE, corpus, file_kind, zero_model
    from pipelines.images import codecs
    from sr3model.weights import save_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_uri, _ = register_tiny(save_model(tmp_path / "zero", zero_model()), uri, "zero-up")
    inputs = corpus(photo_arrays["coffee"][150:190, 250:290])
    for name, data in inputs.items():
        (tmp_path / "in" / "kinds").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "kinds" / name).write_bytes(data)
    run = ["--model", model_uri, "--input", str(tmp_path / "in"), "--workers", "1"]

    output = tmp_path / "png"
    assert _upscale(*run, "--output", str(output)) == 0
    rows = {Path(row["source"]).name: row for row in _manifest(str(output))}
    assert len(rows) == len(inputs)
    for name, expected in TABLE.items():
        written = (output / rows[name]["output"]).read_bytes()
        assert file_kind(written) == ("png", *expected[:2]), name
        assert (rows[name]["output_mode"], rows[name]["output_bits"]) == expected[:2], name
        assert (rows[name]["format"], rows[name]["alpha_mode"], rows[name]["colour_mode"], rows[name]["fallback"]) == (
            "png", "keep", "keep", "refuse")
    assert (rows["rgba.png"]["alpha"], rows["scan16.tif"]["input_bits"], rows["grey16.png"]["input_mode"]) == (
        "kept", 16, "I;16")
    assert rows["adobe.png"]["output_profile"] == rows["adobe.png"]["input_profile"] == "Adobe RGB (1998)-like (test)"
    assert (rows["camera.jpg"]["metadata"], rows["camera.jpg"]["conversions"]) == ("exif,xmp", "orientation 6 → 1")

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(model_uri)
    names = sorted(inputs)
    frame = pd.DataFrame({"lr": [inputs[n] for n in names], "name": [f"kinds/{n}" for n in names]})
    for fmt in ("png", "tiff"):
        if fmt == "tiff":
            assert _upscale(*run, "--output", str(tmp_path / "tiff"), "--format", "tiff") == 0
        out = served.predict(frame, params={"format": fmt, "steps": 1})
        for name, mine in zip(names, out["sr"]):
            theirs = (tmp_path / fmt / "kinds" / f"{Path(name).stem}.{'tif' if fmt == 'tiff' else 'png'}").read_bytes()
            assert file_kind(mine) == file_kind(theirs), (fmt, name)
            a, b = codecs.read(mine), codecs.read(theirs)
            assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1, (fmt, name)
            assert (a.icc, a.exif, a.xmp) == (b.icc, b.exif, b.xmp), (fmt, name)

    jpeg = ["--output", str(tmp_path / "jpeg"), "--format", "jpeg"]
    refused = {"rgba.png", "la.png", "rgb16.png", "scan16.tif", "grey16.png", "adobe16.tif", "palette.png"}
    for _ in range(2):  # the rerun with the same flags refuses them again without reading them
        capsys.readouterr()
        assert _upscale(*run, *jpeg) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert line.startswith("upscale: error: 7 input(s) hold what --format jpeg cannot")
        assert "--fallback convert" in line
        rejects = _rejects(str(tmp_path / "jpeg"))
        assert {Path(r["source"]).name for r in rejects if r["reason"] == "would_lose"} == refused
    assert {Path(r["source"]).name for r in _manifest(str(tmp_path / "jpeg"))} == set(inputs) - refused
    assert _upscale(*run, *jpeg, "--fallback", "convert") == 0
    summary = _summary(str(tmp_path / "jpeg"))
    assert (summary["retried"], summary["done"], summary["refused"]) == (7, 7, 0)
    converted = {Path(r["source"]).name: r for r in _manifest(str(tmp_path / "jpeg"))}
    assert converted["rgb16.png"]["conversions"] == "16 → 8 bits (jpeg)" and converted["rgba.png"]["alpha"] == (
        "composited on white")

    assert _upscale(*run, "--output", str(output), "--alpha", "drop") == 0
    assert (_summary(str(output))["stale"], _summary(str(output))["done"]) == (len(inputs), 0)
    capsys.readouterr()
    assert _upscale(*run, "--output", str(output), "--strip-metadata", "--colour", "keep") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("upscale: error: --strip-metadata") and "--colour keep" in line
