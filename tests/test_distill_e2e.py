"""End to end on a real local Ray and a real `mlflow server`: jobs/distill.py distils a registered
teacher into a 2-step student (its outputs sampled by the upscale job's Ray Data actors and committed
as a dataset version, the student trained on Ray Train and registered with its lineage); a rerun
reuses the teacher's outputs and the finished run; jobs/upscale.py looks the student up by alias and
samples it with no sampling flags, its manifest treating the teacher's outputs as stale; the pyfunc
gives the job's picture; jobs/evaluate.py scores it beside its teacher."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job_support import load_job
from model_support import register_tiny, save_tiny
from pictures import assert_same_picture, picture_psnr
from pipelines.infer import manifest
from test_train_e2e import mlflow_server  # noqa: F401  (a real `mlflow server` on loopback, this module's own)
from train_support import write_pairs

pytestmark = pytest.mark.slow


def _distill(pairs: str, root: Path, capsys) -> tuple[int, str]:
    code = load_job("distill").main([
        "--teacher", "models:/teacher-e2e@champion", "--pairs", pairs, "--student-steps", "2",
        "--register", "student-e2e", "--storage", str(root / "runs"), "--steps", "4", "--batch-size", "4",
        "--num-workers", "2", "--teacher-steps", "4", "--outputs-per-pair", "1", "--device", "cpu",
        "--val-images", "2", "--log-every", "1", "--checkpoint-every", "2"])
    out = capsys.readouterr().out
    return code, out


def test_distil_register_rerun_upscale_serve_and_evaluate_a_student(
        ray_local, mlflow_server, photo_arrays, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: F811
    import mlflow
    import pandas as pd
    import torch
    from mlflow import MlflowClient

    from pipelines.pairs.store import read_part, read_summary
    from pipelines.registry.models import resolve_model
    from sr3model.imageio import decode_png, to_tensor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    pairs = write_pairs(tmp_path / "pairs", n_train=16, n_val=2)
    # v-prediction: the random tiny network with the presets' x0-prediction gives nearly the same
    # picture for any start noise (61 dB apart), so the name-seeds-the-noise check below could not fail
    teacher_uri, _ = register_tiny(save_tiny(tmp_path / "teacher", "residual", 0, "diffusion.prediction=v"),
                                   mlflow_server, "teacher-e2e")

    code, out = _distill(pairs, tmp_path, capsys)
    assert code == 0, out
    assert "model: models:/student-e2e@champion (version 1)" in out
    outputs = str(tmp_path / "runs" / "teacher-outputs" / "teacher-e2e-v1-dpmpp-2m-4-seed0")
    summary = read_summary(outputs)
    assert (summary["teacher"], summary["sampler"], summary["steps"], summary["train"], summary["noise_device"]) == (
        "models:/teacher-e2e/1", "dpmpp-2m", 4, 16, "cpu")
    assert summary["consistency"] is True is summary["teacher_spec"]["consistency"]  # the teacher as served
    # a stored output is the teacher's picture for the start noise of its stored seed
    row = read_part(outputs, "train", columns=["lr", "seed", "teacher"]).slice(0, 1).to_pylist()[0]
    teacher = resolve_model(teacher_uri, mlflow_server).load()
    again = teacher.super_resolve(to_tensor(decode_png(row["lr"]))[None], sampler="dpmpp-2m",
                                  schedule=teacher.inference_schedule(4),
                                  generator=[torch.Generator().manual_seed(row["seed"])])[0, 0]
    stored = np.asarray(decode_png(row["teacher"]))
    assert_same_picture(((again.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy(), stored)

    version = client.get_model_version_by_alias("student-e2e", "champion")
    assert version.tags["sr3.teacher"] == "models:/teacher-e2e/1" and version.tags["sr3.student_steps"] == "2"
    assert version.tags["sr3.teacher_outputs"] == f"{outputs}@{summary['version']}"
    run = client.get_run(version.run_id)
    assert run.data.params["distill.teacher"] == "models:/teacher-e2e/1" == run.data.params["run.teacher"]
    assert run.data.tags["sr3.teacher"] == "models:/teacher-e2e/1"
    assert {"val_psnr", "val_lr_psnr", "loss"} <= set(run.data.metrics)
    student = resolve_model("models:/student-e2e@champion", mlflow_server).config()
    assert (student.distill.student_steps, student.diffusion.sample_sampler) == (2, "distilled")

    code, again_out = _distill(pairs, tmp_path, capsys)  # the same command again: nothing is redone
    assert code == 0, again_out
    assert "reusing the teacher's outputs" in again_out and f"version {summary['version']} (reused)" in again_out
    assert "already reached step 4" in again_out
    assert read_summary(outputs)["version"] == summary["version"]
    assert [v.version for v in client.search_model_versions("name='student-e2e'")] == ["1"]

    # upscaling: the teacher's outputs first, then the student's — another model, so stale until redone
    inputs, output = tmp_path / "photos", str(tmp_path / "x4")
    inputs.mkdir()
    Image.fromarray(photo_arrays["coffee"][:16, :16]).save(inputs / "a.png")
    Image.fromarray(photo_arrays["chelsea"][:16, :28]).save(inputs / "wide.png")  # tiled
    upscale = load_job("upscale").main
    assert upscale(["--model", "models:/teacher-e2e@champion", "--input", str(inputs), "--output", output]) == 0
    assert upscale(["--model", "models:/student-e2e@champion", "--input", str(inputs), "--output", output]) == 0
    said = capsys.readouterr().out
    assert "0 done" in said and "2 stale" in said
    assert upscale(["--model", "models:/student-e2e@champion", "--input", str(inputs), "--output", output,
                    "--redo-stale"]) == 0
    rows = manifest.latest(manifest.read_table(output, manifest.MANIFEST_DIR), "output").to_pylist()
    assert {(r["model_uri"], r["sampler"], r["steps"], r["schedule"], r["consistency"]) for r in rows} == {
        ("models:/student-e2e/1", "distilled", 2, "student", True)}  # LR-consistent, as its teacher
    assert "drop --steps 20" in _upscale_error(["--model", "models:/student-e2e@champion", "--input", str(inputs),
                                                "--output", str(tmp_path / "other"), "--steps", "20"], capsys)

    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model("models:/student-e2e@champion")
    names = ["a.png", "wide.png"]
    frame = pd.DataFrame({"lr": [(inputs / n).read_bytes() for n in names], "name": names})
    got = served.predict(frame, params={"seed": 0})
    for name, png in zip(names, got["sr"]):
        assert_same_picture(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(Path(output) / name)), name)
    renamed = served.predict(frame.assign(name=["b.png", "x.png"]), params={"seed": 0})
    assert picture_psnr(np.asarray(Image.open(io.BytesIO(renamed["sr"][0]))),
                        np.asarray(Image.open(Path(output) / "a.png"))) < 45  # the name seeds the noise

    report = tmp_path / "report"
    assert load_job("evaluate").main(["--model", "models:/student-e2e@champion", "--pairs", pairs, "--limit", "2",
                                      "--baseline", "models:/teacher-e2e@champion", "--report", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert {"bicubic", "student-e2e v1", "teacher-e2e v1"} <= set(metrics)
    methods = metrics["_meta"]["methods"]
    assert (methods["student-e2e v1"]["sampler"], methods["student-e2e v1"]["steps"]) == ("distilled", 2)
    assert methods["teacher-e2e v1"]["sampler"] != "distilled"


def _upscale_error(argv: list[str], capsys) -> str:
    """The job's one error line (stderr also holds MLflow's download progress for the model)."""
    capsys.readouterr()
    assert load_job("upscale").main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("upscale: error: ") and "Traceback" not in err, err[-2000:]
    return lines[0]
