"""Ray Train training on a real local Ray: 2 DDP workers, checkpoints, resume, a killed worker.

Runs `pipelines.train.train` on the session's local Ray (`ray_local`, 2 CPUs) with the `tiny`
preset shrunk further (tests/train_support.py) and an MLflow store in a sqlite file.

Resume equals not stopping: a run resumed from step 3's checkpoint must reach what a run that went
straight to 6 reached — the loss at steps 4-6 within a relative 1e-4 and every weight (model and
EMA) within 1e-5 absolute, while the weights move by far more than that in those 3 steps (the check
can fail). Float sums are not promised bit-exact across runs, hence tolerances.
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
from pipelines.train.checkpoints import STATE_FILE
from pipelines.train.loop import image_grid
from train_support import HR, SCALE, tiny_config, write_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def _state(checkpoint: str) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, weights_only=True)


# -- without Ray ----------------------------------------------------------------------------------

def test_decode_pairs_gives_uint8_batches(pairs: str) -> None:
    from pipelines.pairs.store import read_part

    table = read_part(pairs, "train", columns=["hr", "lr"]).slice(0, 3)
    out = decode_pairs({name: np.array(table.column(name).to_pylist(), dtype=object) for name in ("hr", "lr")})
    assert out["hr"].shape == (3, 3, HR, HR) and out["lr"].shape == (3, 3, HR // SCALE, HR // SCALE)
    assert out["hr"].dtype == np.uint8 and out["hr"].flags.c_contiguous
    assert out["hr"].std() > 25  # real photo content, not a constant


def test_decode_pairs_on_the_device_match_the_science_core_pixels(pairs: str) -> None:
    """What the loop trains on (uint8 batch → `to_device`) is exactly `to_tensor`'s [-1, 1] pixels."""
    from pipelines.pairs.store import read_part
    from pipelines.train.loop import to_device
    from sr3model.imageio import decode_png, to_tensor

    table = read_part(pairs, "val", columns=["hr", "lr"])
    out = decode_pairs({name: np.array(table.column(name).to_pylist(), dtype=object) for name in ("hr", "lr")})
    for name in ("hr", "lr"):
        expected = torch.stack([to_tensor(decode_png(b)) for b in table.column(name).to_pylist()])
        got = to_device(out[name], torch.device("cpu"))
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_check_pairs_names_a_size_mismatch_and_refuses_uncommitted_pairs(pairs: str, tmp_path: Path) -> None:
    from pipelines.cli import UserError

    assert check_pairs(pairs, tiny_config()) == 16
    with pytest.raises(ValueError, match=r"\(hr_size, scale\) \[\(64, 4\)\]"):
        check_pairs(pairs, tiny_config("hr_size=128", "lr_size=32"))
    uncommitted = Path(write_pairs(tmp_path / "half"))
    (uncommitted / "_SUMMARY.json").unlink()  # as if its build died before the commit
    with pytest.raises(UserError, match="not a committed pairs dataset"):
        check_pairs(str(uncommitted), tiny_config())


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


def test_run_logger_in_the_background_sends_in_order_and_never_blocks_the_caller(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Training's rank 0 buffers its MLflow calls (a tracking server that restarts must not stall a
    step): everything arrives, in order; against a server that is not there, a call returns at once
    and is dropped, with a warning, after its tries. The server restart itself:
    tests/test_cluster_faults.py."""
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id, _ = tracking.start_or_resume(uri, "exp", "buffered")
    logger = tracking.RunLogger(uri, run_id, background=True)
    for step in range(1, 21):
        logger.log_metrics({"loss": 1.0 / step}, step=step)
    logger.set_tag("sr3.note", "after the metrics")
    assert logger.close(timeout_s=120) and logger.dropped == 0
    assert tracking.run_metrics(uri, run_id, "loss") == [(s, 1.0 / s) for s in range(1, 21)]
    assert tracking.run_tags(uri, run_id)["sr3.note"] == "after the metrics"

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking.RunLogger, "PAUSE_S", 0.0)
    said: list[str] = []
    away = tracking.RunLogger("http://127.0.0.1:9", run_id, background=True, say=said.append)  # nothing listens
    tick = time.perf_counter()
    away.log_metrics({"loss": 1.0}, step=1)
    assert time.perf_counter() - tick < 0.5  # the caller goes on
    assert away.close(timeout_s=120) and away.dropped == 1
    assert said and said[0].startswith("warning: MLflow call dropped after 3 tries")
    blocking = tracking.RunLogger("http://127.0.0.1:9", run_id)  # a driver's logger: the call itself fails
    with pytest.raises(Exception):
        blocking.log_metrics({"loss": 1.0}, step=1)


# -- on a real local Ray ---------------------------------------------------------------------------

def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{name}/{key}": value for name in ("model", "ema")
            for key, value in load_file(Path(checkpoint) / f"{name}.safetensors").items()}


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run_and_a_rerun_registers_nothing_new(
        ray_local: str, pairs: str, tmp_path: Path) -> None:
    """Run A goes straight to step 6 (checkpoints at 3 and 6). Run B starts from A's step-3
    checkpoint (`resume_from`: the same restore a rerun or a restart does, from that checkpoint) and
    must reach A's state. Rerunning the same name resuming from storage is checked in
    tests/test_train_s3.py and, after a killed worker, below."""
    from mlflow import MlflowClient

    from pipelines.pairs import store as pair_store
    from pipelines.train import train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = dict(num_workers=2, storage_uri=str(tmp_path / "runs"), experiment="t", checkpoint_every=3,
                  val_images=2, val_steps=2, tracking_uri=uri, log_pyfunc=False)
    straight = train(pairs, tiny_config(), steps=6, run_name="straight", **common)
    checkpoints = sorted(p for p in (tmp_path / "runs" / "straight").glob("checkpoint_*") if p.is_dir())
    assert [_state(str(c))["step"] for c in checkpoints] == [3, 6]
    names = {p.name for p in checkpoints[0].iterdir()}
    assert {"config.json", "model.safetensors", "ema.safetensors", STATE_FILE,
            "rng_rank0.pt", "rng_rank1.pt"} <= names
    assert json.loads((checkpoints[0] / "config.json").read_text())["unet"]["channels"] == 8
    halfway = _state(str(checkpoints[0]))
    # 16 rows over 2 ranks, 2 per rank and step: 4 steps per epoch; 3 done
    assert (halfway["data_epoch"], halfway["data_position"], halfway["ema_updates"]) == (0, 3, 3)
    assert halfway["data_id"] == pair_store.read_summary(pairs)["id"] + "/2x2/auto"

    resumed = train(pairs, tiny_config(), steps=6, run_name="resumed", resume_from=str(checkpoints[0]),
                    register="sr3-resume", **common)
    assert not resumed.resumed and resumed.steps == 6
    state = _state(resumed.checkpoint)
    assert state["step"] == 6 and state["ema_updates"] == 6  # 3 restored + 3 new updates
    assert (state["data_epoch"], state["data_position"]) == (1, 2)  # into the second epoch

    # resumed == uninterrupted: losses and weights within the tolerances of the module docstring
    losses = [tracking.run_metrics(uri, run, "loss") for run in (straight.run_id, resumed.run_id)]
    assert [s for s, _ in losses[0]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in losses[1]] == [4, 5, 6]
    np.testing.assert_allclose([v for _, v in losses[1]], [v for _, v in losses[0][3:]], rtol=1e-4)
    after, uninterrupted, before = (_weights(str(c)) for c in (resumed.checkpoint, straight.checkpoint,
                                                                 checkpoints[0]))
    assert after.keys() == uninterrupted.keys()
    worst = max(float((after[k] - uninterrupted[k]).abs().max()) for k in after)
    moved = max(float((uninterrupted[k] - before[k]).abs().max()) for k in uninterrupted)
    assert worst <= 1e-5 < 1e-3 < moved, (worst, moved)

    client = MlflowClient(uri)
    run = client.get_run(straight.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["unet.channels"] == "8" and run.data.params["run.steps"] == "6"
    assert set(tiny_config().flat()) <= set(run.data.params)
    identity = pair_store.identity(pairs)
    assert run.data.params["data.id"] == identity["id"] and run.data.params["data.train"] == "16"
    assert run.data.tags["sr3.data.fingerprint"] == identity["fingerprint"]
    for key in ("loss", "grad_norm", "lr", "images_per_s", "step_time_s", "epoch", "val_ssim", "val_consistency"):
        assert key in run.data.metrics, key
    assert [s for s, _ in tracking.run_metrics(uri, resumed.run_id, "val_psnr")] == [6]
    grids = [a.path for a in client.list_artifacts(straight.run_id, "validation")]
    assert grids == ["validation/step_00000006.png"]

    # registered once, alias moved (no holder); a rerun of the finished run starts no worker and
    # registers nothing new
    assert resumed.registered_version == "1" and resumed.promotion.moved
    assert resumed.model_uri == "models:/sr3-resume@champion"
    again = train(pairs, tiny_config(), steps=6, run_name="resumed", register="sr3-resume", **common)
    assert again.finished_before and again.steps == 6 and again.checkpoint == resumed.checkpoint
    assert again.registered_version == "1" and again.promotion.moved
    assert [str(v.version) for v in client.search_model_versions("name='sr3-resume'")] == ["1"]


@pytest.mark.slow
def test_default_cadence_leaves_checkpoints_and_a_killed_worker_resumes_from_one(
        ray_local: str, gcs_bucket: str, pairs: str, tmp_path: Path) -> None:
    """Pairs and checkpoints in a real GCS emulator bucket; no checkpoint_every (the cadence is time:
    a checkpoint is due at every logged step); rank 1's process is SIGKILLed once after step 4."""
    from pipelines import storage
    from pipelines.train import FAILURE_MARKER, train

    fs, bucket = storage.resolve(gcs_bucket)
    fs.put(pairs, f"{bucket}/pairs", recursive=True)
    remote_pairs = storage.join(gcs_bucket, "pairs")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = storage.join(gcs_bucket, "runs")
    result = train(remote_pairs, tiny_config(), steps=6, num_workers=2, storage_uri=runs, run_name="killed-once",
                   checkpoint_minutes=1e-4, val_images=1, val_steps=1, tracking_uri=uri,
                   fail_once_at=(1, 4), max_failures=1, log_pyfunc=False)
    marker = storage.read_bytes(storage.join(runs, "killed-once", FAILURE_MARKER))
    assert marker.decode().startswith("rank 1 killed at step 4")  # the kill did happen
    assert result.steps == 6 and result.checkpoint.startswith(f"{runs}/killed-once/checkpoint_")
    kept = sorted(item.uri.rsplit("/", 1)[0] for item in storage.list_files(storage.join(runs, "killed-once"))
                  if item.relpath.endswith(STATE_FILE))
    steps = sorted(torch.load(io.BytesIO(storage.read_bytes(storage.join(c, STATE_FILE))), weights_only=True)["step"]
                   for c in kept)
    # intermediate checkpoints, the last 3 kept (default); Ray deletes older ones in the background
    # and keeps the one it resumed from until newer ones replace it
    assert steps[-3:] == [4, 5, 6] and len(steps) <= 4, steps
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(result.checkpoint, STATE_FILE))), weights_only=True)
    assert state["step"] == 6 and state["ema_updates"] == 6
    logged = [s for s, _ in tracking.run_metrics(uri, result.run_id, "loss")]
    assert sorted(set(logged)) == [1, 2, 3, 4, 5, 6] and logged.count(4) == 1  # step 4 was never logged twice
    # it restarted from an intermediate checkpoint (step 2 or 3: a report still in flight when a
    # worker is killed may be lost), not from step 0: step 1 ran once
    assert logged.count(1) == 1
