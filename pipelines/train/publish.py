"""After training: the final checkpoint as an MLflow pyfunc, one registered version per (run, step),
and the promotion gate that decides whether the alias moves to it.

    final checkpoint (any storage URI) ──pipelines.registry.pyfunc.log_model──> the run's model
        with `register`: registered without the alias, tagged sr3.step in the call that creates the
        version (a crash cannot leave an untagged one); a version of this run at this step already
        there (a rerun of a finished run, or one that crashed after registering) is reused
    ──pipelines.train.promote.gate──> alias moved or kept, with the reason on the version and the run
       (a decision already recorded on the version is reported, not taken again, unless forced)
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines import storage
from pipelines.train import promote


@contextmanager
def local_checkpoint(uri: str) -> Iterator[str]:
    """The checkpoint as a local folder: itself when local, else a temporary copy of its files."""
    if storage.protocol(uri) in ("file", "local"):
        yield storage.resolve(uri)[1]
        return
    fs, _ = storage.resolve(uri)
    with tempfile.TemporaryDirectory(prefix="sr3-final-") as directory:
        for item in storage.list_files(uri):
            target = Path(directory) / item.relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(storage.resolve(item.uri)[1], str(target))
        yield directory


def publish(checkpoint: str, tracking_uri: str, run_id: str, step: int, *, register: str | None, alias: str,
            pairs: str, gate: promote.GateConfig | None, report_root: str,
            logged: str | None = None, say: Callable[[str], None] = print
            ) -> tuple[str | None, str | None, promote.Decision | None]:
    """(model URI, registered version, gate decision) for the run's final checkpoint."""
    from mlflow import MlflowClient

    from pipelines.registry.pyfunc import log_model

    if not register:
        if logged:
            return logged, None, None
        with local_checkpoint(checkpoint) as directory:
            model_uri, _ = log_model(directory, run_id, tracking_uri)
        return model_uri, None, None

    client = MlflowClient(tracking_uri)
    version = promote.registered_version(tracking_uri, register, run_id, step)
    if version is not None:
        say(f"{register} v{version} was registered from this run at step {step}: not registered again")
    else:
        with local_checkpoint(checkpoint) as directory:
            _, version = log_model(directory, run_id, tracking_uri, register=register, alias=None,
                                   version_tags={promote.STEP_TAG: str(step)})
        say(f"registered {register} v{version}")
    gate = gate or promote.GateConfig()
    recorded = client.get_model_version(register, version).tags
    if promote.DECISION_TAG in recorded and not gate.force:
        holder = promote.holder_of(tracking_uri, register, alias)
        decision = promote.Decision(holder == version, f"decided before: {recorded.get(promote.REASON_TAG, '?')}",
                                    version, holder)
        say(f"@{alias} {'is on' if decision.moved else 'is not on'} v{version} ({decision.reason})")
    else:
        gate = dataclasses.replace(gate, report_root=gate.report_root or report_root)
        decision = promote.gate(tracking_uri, register, version, alias, pairs, gate, run_id=run_id, say=say)
    model_uri = f"models:/{register}@{alias}" if decision.moved else f"models:/{register}/{version}"
    return model_uri, version, decision
