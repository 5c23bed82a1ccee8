"""Ray Train checkpoints in S3 (moto's S3 server on loopback): 1 worker, 2 steps, then a resume.

The endpoint reaches the Ray Train workers through `pipelines.storage.worker_env` (as on a cluster);
the (dummy) credentials are set here at import, before the session's local Ray starts, because
credentials are left to the cluster and Ray workers inherit the environment Ray started in.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipelines import storage, tracking
from pipelines.train.checkpoints import STATE_FILE
from train_support import tiny_config, write_pairs

for _name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.setdefault(_name, "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        fs, _ = storage.resolve("s3://train-test")
        fs.mkdir("train-test")
        try:
            yield "s3://train-test"
        finally:
            server.stop()


@pytest.mark.slow
def test_checkpoints_go_to_s3_and_a_rerun_resumes(ray_local: str, s3_bucket: str, tmp_path: Path) -> None:
    from pipelines.train import train

    pairs = write_pairs(tmp_path / "pairs")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = dict(num_workers=1, storage_uri=storage.join(s3_bucket, "runs"), run_name="on-s3", experiment="t",
                  checkpoint_every=2, val_images=1, val_steps=1, tracking_uri=uri, log_pyfunc=False)
    first = train(pairs, tiny_config(), steps=2, **common)
    assert first.steps == 2 and not first.resumed
    assert first.checkpoint.startswith(f"{s3_bucket}/runs/on-s3/checkpoint_")
    names = {f.relpath for f in storage.list_files(first.checkpoint)}
    assert {"config.json", "model.safetensors", "ema.safetensors", STATE_FILE, "rng_rank0.pt"} <= names

    second = train(pairs, tiny_config(), steps=3, **common)
    assert second.resumed and second.run_id == first.run_id and second.steps == 3
    assert second.checkpoint.startswith(f"{s3_bucket}/runs/on-s3/checkpoint_") and second.checkpoint != first.checkpoint
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(second.checkpoint, STATE_FILE))), weights_only=True)
    assert state["step"] == 3 and state["ema_updates"] == 3  # 2 restored from S3 + 1 new
    assert [s for s, _ in tracking.run_metrics(uri, first.run_id, "loss")] == [1, 2, 3]
