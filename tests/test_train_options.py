"""The training loop's speed options (#14): --micro-batch, --compile, --channels-last (what they do, not how fast).

- The flags parse and reach `pipelines.train.train` (jobs/train.py with the pipeline replaced by a
  recorder); on CPU the CUDA-only ones print a note and leave the model as it was.
- On a real local Ray (2 workers, gloo DDP): a run with micro-batches of 1 (2 per worker and step,
  `no_sync` on the first) logs the same global batch as a run without, and — the noise being drawn
  for the whole batch and sliced — the same losses within float tolerance. Its MLflow params
  record the micro-batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from job_support import load_job
from pipelines import tracking
from train_support import tiny_config, write_pairs


def test_speed_flags_parse_and_reach_the_pipeline(monkeypatch, tmp_path: Path) -> None:
    import ray

    import pipelines.train

    job = load_job("train")
    args = job.parse_args(["--pairs", "p", "--preset", "tiny"])
    assert (args.micro_batch, args.compile, args.channels_last) == (None, False, False)
    args = job.parse_args(["--pairs", "p", "--preset", "tiny", "--micro-batch", "2", "--compile", "--channels-last"])
    assert (args.micro_batch, args.compile, args.channels_last) == (2, True, True)

    seen = {}

    class Stop(Exception):
        pass

    def record(pairs, config, options):  # the job hands the stage one TrainOptions
        seen.update(vars(options), batch_size=config.train.batch_size)
        raise Stop

    monkeypatch.setattr(pipelines.train, "check_pairs", lambda *a, **k: 16)
    monkeypatch.setattr(pipelines.train, "train", record)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with pytest.raises(Stop):
        job._main(["--pairs", "p", "--preset", "tiny", "--batch-size", "8", "--num-workers", "2",
                   "--micro-batch", "2", "--compile", "--channels-last"])
    assert (seen["batch_size"], seen["num_workers"]) == (8, 2)  # the global batch, as before
    assert (seen["micro_batch"], seen["compile"], seen["channels_last"]) == (2, True, True)


def test_cuda_speed_ups_are_a_note_on_cpu(capsys) -> None:
    from pipelines.train.loop import LoopConfig, speed_ups
    from sr3model.model import SR3

    torch.manual_seed(0)
    model = SR3(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lc = LoopConfig(config="", steps=1, batch_per_worker=1, checkpoint_every=0, compile=True, channels_last=True)
    speed_ups(model, lc, torch.device("cpu"), rank=0)
    assert "--channels-last and --compile apply on CUDA only" in capsys.readouterr().out
    assert type(model.net).forward is type(SR3(tiny_config()).net).forward  # not compiled
    assert all(v.is_contiguous() and torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_micro_batch_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    from pipelines.cli import UserError
    from pipelines.train import train

    pairs = write_pairs(tmp_path / "pairs", n_train=8, n_val=1)
    with pytest.raises(UserError, match="--micro-batch 3: must be between 1 and the per-worker batch 2"):
        train(pairs, tiny_config(), steps=1, num_workers=2, micro_batch=3, tracking_uri=f"sqlite:///{tmp_path}/m.db")


@pytest.mark.slow
def test_a_micro_batched_run_logs_the_same_global_batch_and_losses(ray_local: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pipelines.train import train

    pairs = write_pairs(tmp_path / "pairs")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = dict(steps=3, num_workers=2, storage_uri=str(tmp_path / "runs"), experiment="t", checkpoint_every=3,
                  val_images=0, tracking_uri=uri, log_pyfunc=False)
    whole = train(pairs, tiny_config(), run_name="whole", **common)
    micro = train(pairs, tiny_config(), run_name="micro", micro_batch=1, compile=True, channels_last=True, **common)
    params = MlflowClient(uri).get_run(micro.run_id).data.params
    assert (params["train.batch_size"], params["run.batch_per_worker"]) == ("4", "2")  # global 4 = 2 workers x 2
    assert (params["run.micro_batch"], params["run.accumulation_steps"]) == ("1", "2")
    assert (params["run.compile"], params["run.channels_last"]) == ("True", "True")  # recorded (no-ops on CPU)
    assert MlflowClient(uri).get_run(whole.run_id).data.params["run.micro_batch"] == "2"
    assert micro.steps == 3 and torch.load(Path(micro.checkpoint) / "trainer_state.pt", weights_only=True)["step"] == 3

    for key, rtol in (("loss", 1e-4), ("grad_norm", 1e-3)):
        runs = [tracking.run_metrics(uri, run.run_id, key) for run in (whole, micro)]
        assert [s for s, _ in runs[0]] == [s for s, _ in runs[1]] == [1, 2, 3]
        np.testing.assert_allclose([v for _, v in runs[1]], [v for _, v in runs[0]], rtol=rtol, err_msg=key)
    speed = tracking.run_metrics(uri, micro.run_id, "images_per_s")
    assert len(speed) == 3 and all(v > 0 for _, v in speed)


def test_checkpoints_a_failure_left_unregistered_are_deleted_on_resume(tmp_path: Path) -> None:
    """Async uploads of a worker that died can leave checkpoint directories Ray never registered;
    on resuming from its latest registered one, rank 0 deletes those after it (later step or no
    weights) and keeps everything else."""
    import pyarrow.fs
    from safetensors.torch import save_file

    from pipelines.train.checkpoints import MODEL_FILE, drop_unregistered
    from ray.train import Checkpoint

    def directory(name: str, step: int | None) -> Path:
        path = tmp_path / "run" / name
        path.mkdir(parents=True)
        if step is not None:
            save_file({"w": torch.zeros(2)}, path / MODEL_FILE, metadata={"format": "sr3", "step": str(step)})
        return path

    stamp = "checkpoint_2026-12-02_12-10-{:02d}.000000"
    kept = [directory(stamp.format(1), 1), directory(stamp.format(5), 2), directory("checkpoint_other", 9)]
    restored = directory(stamp.format(3), 3)
    dropped = [directory(stamp.format(4), 4), directory(stamp.format(6), None)]
    (dropped[1] / "rng_rank1.pt").write_bytes(b"partial upload")
    checkpoint = Checkpoint(path=str(restored), filesystem=pyarrow.fs.LocalFileSystem())
    assert sorted(drop_unregistered(checkpoint, 3)) == sorted(str(p) for p in dropped)
    assert all(p.exists() for p in [*kept, restored]) and not any(p.exists() for p in dropped)
    assert drop_unregistered(checkpoint, 3) == []
