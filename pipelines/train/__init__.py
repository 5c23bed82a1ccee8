"""Training (Ray Train, DDP, MLflow), one module per step of the stage:

| module           | what                                                                                 |
| ---------------- | ------------------------------------------------------------------------------------ |
| `options.py`     | `TrainOptions` (the job's flags), `LoopConfig` (what workers get), `build_config`, `Cadence` |
| `driver.py`      | `train()`: pre-flight checks, pins the committed pairs version, runs the TorchTrainer  |
| `loop.py`        | the per-worker loop: restore, `sr3model.training.train_step`, metrics, validation     |
| `checkpoints.py` | what a checkpoint holds, its save + asynchronous upload, restore, orphan clean-up      |
| `data.py`        | each worker's batches: per-epoch seeded order over row-group units, shuffle buffer, exact resume |
| `publish.py`     | the final checkpoint as a pyfunc, one registered version per (run, step)              |
| `promote.py`     | the promotion gate: does the new version take the alias from its holder?              |
"""

from pipelines.train.driver import (  # noqa: F401
    DEFAULT_STORAGE,
    FAILURE_MARKER,
    Plan,
    TrainResult,
    check_pairs,
    decode_pairs,
    preflight,
    train,
)
from pipelines.train.options import Cadence, LoopConfig, TrainOptions, build_config  # noqa: F401
