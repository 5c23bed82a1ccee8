"""Training checkpoints in storage: what a worker writes, how it uploads, how a restart reads it.

A checkpoint directory holds `config.json`, `model.safetensors`, `ema.safetensors`
(sr3model.weights) and `trainer_state.pt` (step, optimizer, EMA update count, MLflow run id, data
position) written by rank 0, and one `rng_rank{r}.pt` per rank; Ray merges the ranks' directories.

    save_and_report: local files (the save) → ray.train.report, upload ASYNC in Ray's thread (`Uploads`)
    restore:         weights, EMA, this rank's RNG → (step, trainer state)
    drop_unregistered: on a restart, directories a dead worker's uploads left that Ray never registered
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import ray.train
from ray.train import Checkpoint, CheckpointUploadMode
from sr3model.ema import EMA
from sr3model.model import SR3
from sr3model.weights import EMA_FILE, MODEL_FILE, save_model
from pipelines.train.options import LoopConfig

STATE_FILE = "trainer_state.pt"


def from_uri(uri: str) -> Checkpoint:
    """A checkpoint directory at any storage URI as a Ray Train Checkpoint."""
    from pipelines import storage

    fs, path = storage.resolve(uri)
    return Checkpoint(path=path, filesystem=storage.to_pyarrow(fs))


_RAY_NAME = re.compile(r"checkpoint_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{6}")  # Ray's default, by time


def drop_unregistered(checkpoint: Checkpoint, step: int) -> list[str]:
    """Delete this run's checkpoint directories that Ray never registered; returns their paths.

    With asynchronous uploads a worker that dies can leave behind directories of checkpoints it
    had reported (and uploaded, fully or in part) that the controller never registered: Ray resumes
    from the latest registered one (`checkpoint`, at `step`) and its `num_to_keep` never sees the
    others, so they would stay in storage for good. They are the directories named (by Ray, by
    time) after `checkpoint` whose weights hold a later step, or none at all. Only a run's own
    checkpoint (`ray.train.get_checkpoint()`) may be passed: the siblings of `resume_from` belong
    to another run."""
    import pyarrow.fs as pafs

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    if not _RAY_NAME.fullmatch(name):
        return []
    dropped = []
    for info in fs.get_file_info(pafs.FileSelector(parent)):
        if info.type != pafs.FileType.Directory or not _RAY_NAME.fullmatch(info.base_name) or info.base_name <= name:
            continue
        saved = _saved_step(fs, f"{info.path}/{MODEL_FILE}")
        if saved is None or saved > step:  # (a later name with an earlier step: a clock change; kept)
            fs.delete_dir(info.path)
            dropped.append(info.path)
    return dropped


def _saved_step(fs, path: str) -> int | None:
    """The `step` of a model.safetensors' metadata, from its header alone (a ranged read); None if
    the file is missing or incomplete."""
    try:
        with fs.open_input_file(path) as handle:
            size = int.from_bytes(handle.read_at(8, 0), "little")
            header = json.loads(handle.read_at(size, 8))
        return int(header["__metadata__"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_and_report(model, ema: EMA, optimizer, generator: torch.Generator, rank: int, step: int,
                    lc: LoopConfig, metrics: dict[str, Any], data: tuple[int, int]) -> None:
    """Every rank writes its RNG state; rank 0 adds weights + trainer state (with the data position
    `data` = (epoch, batches of it done)); all call report.

    The files are complete on local disk before `report` returns (the save), so training may go on
    changing the weights; Ray uploads the directory in its background thread
    (`CheckpointUploadMode.ASYNC`, in report order; the last is flushed before the run ends) and
    then deletes it. Checkpoints less than a minute apart upload synchronously (`Uploads`)."""
    path = Path(tempfile.mkdtemp(prefix="sr3-ckpt-"))
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng_rank{rank}.pt")
    if rank == 0:
        save_model(path, getattr(model, "module", model), {k: v.cpu() for k, v in ema.state_dict().items()},
                   metadata={"step": str(step)})
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "ema_updates": ema.updates,
                    "run_id": lc.run_id or "", "data_epoch": data[0], "data_position": data[1],
                    "data_id": lc.data_id}, path / STATE_FILE)
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)), checkpoint_upload_mode=UPLOADS.mode(),
                     delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=UPLOADS.upload_fn())


class Uploads:
    """When and how this rank's checkpoints upload.

    ASYNC (the upload in Ray's background thread) when the previous checkpoint is at least
    `ASYNC_AFTER_S` old, after waiting for its upload if it still runs (one upload in flight).
    Checkpoints closer together upload synchronously, as before: Ray hands a rank's reports to
    its controller through a queue of one, and a synchronous report waits there, so training
    cannot run ahead of what the controller has registered. With asynchronous reports back to
    back, training races ahead and a worker that dies can take every unregistered checkpoint with
    it (seen: a restart from step 0 after 3 checkpoints 0.3 s apart). At the cadence of a real run
    (minutes apart) every checkpoint uploads asynchronously.

    The upload itself is Ray's (`StorageContext.persist_current_checkpoint`, what ASYNC calls
    without an upload function), wrapped to signal when it starts and ends. If Ray skipped the
    report (a barrier reset by a worker failure), the upload never starts: `wait` gives up on it
    after `START_TIMEOUT_S` instead of waiting forever."""

    START_TIMEOUT_S = 30.0
    ASYNC_AFTER_S = 60.0

    def __init__(self) -> None:
        self.started, self.finished = threading.Event(), threading.Event()
        self.expected = False
        self.last: float | None = None  # time.monotonic() of the previous checkpoint

    def mode(self) -> CheckpointUploadMode:
        """The upload mode of the checkpoint reported now (first waiting for an upload in flight)."""
        now, last = time.monotonic(), self.last
        self.last = now
        self.wait()
        return CheckpointUploadMode.SYNC if last is not None and now - last < self.ASYNC_AFTER_S else CheckpointUploadMode.ASYNC

    def upload_fn(self):
        storage = ray.train.get_context().get_storage()
        self.started.clear()
        self.finished.clear()
        self.expected = True

        def upload(checkpoint: Checkpoint, name: str) -> Checkpoint:
            self.started.set()
            try:
                return storage.persist_current_checkpoint(checkpoint, name)
            finally:
                self.finished.set()
        return upload

    def wait(self) -> None:
        if self.expected and self.started.wait(self.START_TIMEOUT_S):
            self.finished.wait()
        self.expected = False


UPLOADS = Uploads()  # one per worker process


def restore(directory: Path, model: SR3, ema: EMA, generator: torch.Generator,
            rank: int) -> tuple[int, dict[str, Any]]:
    """Load weights, EMA, RNG of this rank; return (step, trainer state incl. optimizer)."""
    from safetensors.torch import load_file

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    model.net.load_state_dict(load_file(directory / MODEL_FILE))
    ema.load_state_dict(load_file(directory / EMA_FILE), updates=int(state["ema_updates"]))
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        state["rng"] = True
    return int(state["step"]), state
