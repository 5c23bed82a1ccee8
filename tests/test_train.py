"""Ray Train training on a real local Ray: 2 DDP workers, checkpoints, resume, a worker failure.

Runs `pipelines.train.train` on the session's local Ray (`ray_local`, 2 CPUs) with the `tiny`
preset shrunk further (tests/train_support.py) and an MLflow store in a sqlite file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import tracking
from pipelines.train import check_pairs, decode_pairs
from pipelines.train_loop import STATE_FILE, image_grid
from train_support import HR, SCALE, tiny_config, write_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def _state(checkpoint: str) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, weights_only=True)


# -- without Ray ----------------------------------------------------------------------------------

def test_decode_pairs_gives_float_arrays_in_range(pairs: str) -> None:
    from pipelines.pairs import read_part

    table = read_part(pairs, "train", columns=["hr", "lr"]).slice(0, 3)
    out = decode_pairs({name: np.array(table.column(name).to_pylist(), dtype=object) for name in ("hr", "lr")})
    assert out["hr"].shape == (3, 3, HR, HR) and out["lr"].shape == (3, 3, HR // SCALE, HR // SCALE)
    assert out["hr"].dtype == np.float32 and out["hr"].min() >= -1 and out["hr"].max() <= 1
    assert out["hr"].std() > 0.1  # real photo content, not a constant


def test_decode_pairs_matches_the_science_core_pixels(pairs: str) -> None:
    from pipelines.pairs import read_part
    from sr3model.imageio import decode_png, to_tensor

    table = read_part(pairs, "val", columns=["hr", "lr"])
    out = decode_pairs({name: np.array(table.column(name).to_pylist(), dtype=object) for name in ("hr", "lr")})
    for name in ("hr", "lr"):
        expected = torch.stack([to_tensor(decode_png(b)) for b in table.column(name).to_pylist()])
        assert torch.equal(torch.from_numpy(out[name]), expected)


def test_check_pairs_names_a_size_mismatch(pairs: str) -> None:
    assert check_pairs(pairs, tiny_config()) == 16
    with pytest.raises(ValueError, match=r"\(hr_size, scale\) \[\(64, 4\)\]"):
        check_pairs(pairs, tiny_config("hr_size=128", "lr_size=32"))


def test_image_grid_columns() -> None:
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    hr = torch.full((2, 3, 16, 16), 1.0)
    sr = torch.full((2, 3, 16, 16), -1.0)
    grid = image_grid(lr, sr, hr)
    assert grid.shape == (32, 64, 3) and grid.dtype == np.uint8
    assert (grid[:, 32:48] == 0).all() and (grid[:, 48:] == 255).all()


def test_tracking_uri_is_absolute_and_params_do_not_change(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tracking.TRACKING_ENV, raising=False)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    run_id, resumed = tracking.start_or_resume(uri, "exp", "r1")
    assert not resumed
    assert tracking.log_params(uri, run_id, {"a": 1, "b": "x"}) == {}
    again, resumed = tracking.start_or_resume(uri, "exp", "r1")
    assert (again, resumed) == (run_id, True)
    assert tracking.log_params(uri, run_id, {"a": 2, "c": 3}) == {"a": ("1", "2")}
    from mlflow import MlflowClient

    assert MlflowClient(uri).get_run(run_id).data.params == {"a": "1", "b": "x", "c": "3"}
    assert MlflowClient(uri).get_experiment_by_name("exp").artifact_location == f"file://{tmp_path}/mlartifacts"


# -- on a real local Ray ---------------------------------------------------------------------------

@pytest.mark.slow
def test_two_workers_checkpoint_then_resume_same_run(ray_local: str, pairs: str, tmp_path: Path) -> None:
    from pipelines.train import train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = dict(num_workers=2, storage_uri=str(tmp_path / "runs"), run_name="resume-me", experiment="t",
                  checkpoint_every=2, val_images=2, val_steps=2, tracking_uri=uri, log_pyfunc=False)
    first = train(pairs, tiny_config(), steps=3, **common)
    assert first.steps == 3 and not first.resumed and first.metrics["loss"] > 0
    checkpoints = sorted(p for p in (tmp_path / "runs" / "resume-me").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # steps 2 and 3
    names = {p.name for p in checkpoints[-1].iterdir()}
    assert {"config.json", "model.safetensors", "ema.safetensors", STATE_FILE,
            "rng_rank0.pt", "rng_rank1.pt"} <= names
    assert json.loads((checkpoints[-1] / "config.json").read_text())["unet"]["channels"] == 8
    assert _state(first.checkpoint)["step"] == 3

    second = train(pairs, tiny_config(), steps=5, **common)
    assert second.resumed and second.run_id == first.run_id and second.steps == 5
    state = _state(second.checkpoint)
    assert state["step"] == 5 and state["ema_updates"] == 5  # 3 restored + 2 new updates
    # metrics continue in step: each step logged exactly once across both runs
    assert [s for s, _ in tracking.run_metrics(uri, first.run_id, "loss")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in tracking.run_metrics(uri, first.run_id, "val_psnr")] == [3, 5]

    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["unet.channels"] == "8" and run.data.params["run.steps"] == "3"
    assert set(tiny_config().flat()) <= set(run.data.params)
    for key in ("loss", "grad_norm", "lr", "images_per_s", "step_time_s", "val_ssim", "val_consistency"):
        assert key in run.data.metrics, key
    grids = [a.path for a in MlflowClient(uri).list_artifacts(first.run_id, "validation")]
    assert grids == ["validation/step_00000003.png", "validation/step_00000005.png"]


@pytest.mark.slow
def test_worker_failure_on_gcs_is_replaced_and_run_completes(ray_local: str, gcs_bucket: str, pairs: str,
                                                            tmp_path: Path) -> None:
    """Pairs and checkpoints in a real GCS emulator bucket; rank 1 dies once after step 3."""
    from pipelines import storage
    from pipelines.train import FAILURE_MARKER, train

    fs, bucket = storage.resolve(gcs_bucket)
    fs.put(pairs, f"{bucket}/pairs", recursive=True)
    remote_pairs = storage.join(gcs_bucket, "pairs")
    assert len(storage.list_files(remote_pairs)) == 2
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train(remote_pairs, tiny_config(), steps=4, num_workers=2, storage_uri=storage.join(gcs_bucket, "runs"),
                   run_name="fails-once", checkpoint_every=1, val_images=1, val_steps=1, tracking_uri=uri,
                   fail_once_at=(1, 3), max_failures=1, log_pyfunc=False)
    marker = storage.read_bytes(storage.join(gcs_bucket, "runs", "fails-once", FAILURE_MARKER))
    assert marker.decode().startswith("rank 1 failed at step 3")  # the failure did happen
    assert result.steps == 4 and result.checkpoint.startswith(gcs_bucket + "/runs/fails-once/checkpoint_")
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(result.checkpoint, STATE_FILE))), weights_only=True)
    assert state["step"] == 4 and state["ema_updates"] == 4  # resumed from step 2's checkpoint, not from 0
    steps = [s for s, _ in tracking.run_metrics(uri, result.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4] and steps.count(3) <= 2  # step 3 ran again after the restart
    assert steps.count(1) == steps.count(2) == 1  # ... but steps 1-2 did not: it restarted from step 2
