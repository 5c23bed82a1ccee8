"""Training (Ray Train, DDP, MLflow), one module per step of the stage:

| module       | what                                                                                     |
| ------------ | ---------------------------------------------------------------------------------------- |
| `driver.py`  | `train()`: pins the committed pairs version, runs the TorchTrainer, checkpoint cadence    |
| `loop.py`    | the per-worker loop: restore, `sr3model.training.train_step`, metrics, validation, checkpoints |
| `data.py`    | each worker's batches: per-epoch seeded order over row-group units, shuffle buffer, exact resume |
| `publish.py` | the final checkpoint as a pyfunc, one registered version per (run, step), the promotion gate |

`pipelines.train.promote` holds the gate itself (it only needs the registry and `pipelines.eval`).
"""

from pipelines.train.driver import (  # noqa: F401
    DEFAULT_STORAGE,
    FAILURE_MARKER,
    Cadence,
    TrainResult,
    check_pairs,
    decode_pairs,
    train,
)
