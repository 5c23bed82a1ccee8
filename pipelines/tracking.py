"""The one MLflow adapter of the stages: find-or-create a run by name, params, metrics, images.

Everything here goes through an explicit `MlflowClient(tracking_uri)` and a run id, never the
global "active run": Ray workers do not inherit the driver's MLflow settings, so the driver resolves
the tracking URI once (`tracking_uri()`), finds or creates the run (`start_or_resume`) and hands
both to the rank-0 worker (`RunLogger`) through the train loop config.

- Tracking URI: `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the current directory. A
  relative sqlite path is made absolute, because Ray workers run in other directories.
- Experiments created here on a sqlite store keep their artifacts in `mlartifacts/` next to the
  database file (MLflow's default would be `./mlruns` of the current directory).
- A run is found again by its tag `sr3.run_name` (= `--run-name`) in the experiment, so a rerun
  with the same name continues the same MLflow run and its metric steps.
- Params: MLflow refuses to change a logged param, so a resumed run logs only params it does not
  have yet and returns the ones whose value differs (the caller prints them).
- A tracking server that is briefly gone (a restart, a deploy) must not stall or fail training:
  the rank-0 worker's `RunLogger(…, background=True)` **buffers** — every metric, image, text and
  tag goes out from one background thread in the order it was logged (each call through MLflow's
  client, which itself retries a request for ~4 minutes; a call that still fails is tried again,
  3 times in all, then dropped with a warning), so the loop never waits for the server; metrics
  keep the time they were logged at. `flush` / `close` wait until everything logged so far is in
  MLflow: the loop closes it (bounded) at its last step, before the driver registers the model.
  Not covered: a worker that dies while the server is away loses the calls it still held (those
  after the last checkpoint are logged again when the steps are; earlier ones are not). Drivers
  log in the foreground (their calls retry the same way and block meanwhile).
- Datasets: every run that reads a pairs dataset records its identity (`pipelines.pairs.store`):
  params `data.id`, `data.fingerprint`, `data.pairs`, `data.train`, `data.val`, `data.recipe`,
  `data.hr_size`, `data.scale` and tags `sr3.data.id`, `sr3.data.fingerprint`, `sr3.data.uri`
  (`log_dataset`). Training calls it, and evaluation and the schedule search
  (`pipelines.eval.report.log_params_and_dataset`), so a model version says what it was trained
  and evaluated on.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

TRACKING_ENV = "MLFLOW_TRACKING_URI"
RUN_NAME_TAG = "sr3.run_name"
DEFAULT_EXPERIMENT = "sr3"
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_PARAM_LENGTH = 6000


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use everywhere: argument, else MLFLOW_TRACKING_URI, else ./mlflow.db."""
    uri = uri or os.environ.get(TRACKING_ENV) or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + os.path.abspath(uri[len(prefix):])  # sqlite:////abs/path/mlflow.db
    return uri


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go next to the database file (`mlartifacts/`), not into
    `./mlruns` of whatever directory the run happened to start in; servers choose their own."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and ":memory:" not in uri:
        return "file://" + os.path.join(os.path.dirname(uri[len(prefix):]), "mlartifacts")
    return None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The newest run tagged `sr3.run_name = run_name` in `experiment`, or None."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def start_or_resume(uri: str, experiment: str, run_name: str,
                    tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(run id, resumed): the run named `run_name` in `experiment`, created if absent."""
    client = _client(uri)
    run_id = find_run(uri, experiment, run_name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=default_artifact_location(uri))
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={RUN_NAME_TAG: run_name, **(tags or {})})
    return run.info.run_id, False


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Log params the run lacks; return {key: (logged, new)} for those whose value differs."""
    from mlflow.entities import Param

    client = _client(uri)
    existing = client.get_run(run_id).data.params
    values = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}
    new = [Param(k, v) for k, v in sorted(values.items()) if k not in existing]
    for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[i:i + MAX_PARAMS_PER_BATCH])
    return {k: (existing[k], v) for k, v in values.items() if k in existing and existing[k] != v}


def log_dataset(uri: str, run_id: str, identity: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """The dataset's identity (`pipelines.pairs.store.identity`) as `data.*` params and `sr3.data.*`
    tags; returns the params whose logged value differs (a resumed run on a rebuilt dataset)."""
    set_tags(uri, run_id, {"sr3.data.id": identity.get("id"), "sr3.data.fingerprint": identity.get("fingerprint"),
                           "sr3.data.uri": identity.get("uri")})
    return log_params(uri, run_id, {f"data.{key}": identity.get(key) for key in
                                    ("id", "fingerprint", "pairs", "train", "val", "recipe", "hr_size", "scale")})


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(uri).get_run(run_id).data.tags)


def run_latest_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of the run."""
    return dict(_client(uri).get_run(run_id).data.metrics)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED (or FAILED / KILLED)."""
    _client(uri).set_terminated(run_id, status=status)


def run_metrics(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of one metric, by step: for tests and reports."""
    history = _client(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


class RunLogger:
    """Metrics and images of one run (the rank-0 training worker, evaluation, the study). With
    `background`, calls are buffered and sent in order by one thread (module docstring)."""

    ATTEMPTS = 3  # tries of one call in the background (each with MLflow's own ~4 minutes of retries)
    PAUSE_S = 5.0  # before the second try; twice that before the third

    def __init__(self, uri: str, run_id: str, *, background: bool = False, say: Callable[[str], None] = print):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)
        self.say = say
        self._pending: deque[Callable[[], Any]] | None = deque() if background else None
        self._changed = threading.Condition()
        self._busy = False
        self._closed = False
        self.dropped = 0  # calls given up on (see ATTEMPTS)
        if background:
            threading.Thread(target=self._send, name="mlflow-run-logger", daemon=True).start()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the time of the step, however late it reaches the server
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None and np.isfinite(v)]
        if batch:
            self._call(self.client.log_batch, self.run_id, metrics=batch)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """An (H, W, 3) uint8 image as a PNG artifact at `artifact_file` (e.g. val/step_100.png)."""
        self._call(self.client.log_image, self.run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(self.client.log_text, self.run_id, text, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        self._call(self.client.set_tag, self.run_id, key, value)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (at most `timeout_s`) until every call made so far has been sent; whether it was."""
        if self._pending is None:
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._pending or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left if left is None else min(left, 1.0))
        return True

    def close(self, timeout_s: float | None = None) -> bool:
        """`flush`, then stop the background thread."""
        sent = self.flush(timeout_s)
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        return sent

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._pending is None:
            function(*args, **kwargs)
            return
        with self._changed:
            self._pending.append(lambda: function(*args, **kwargs))
            self._changed.notify_all()

    def _send(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return
                call = self._pending[0]
                self._busy = True
            for attempt in range(1, self.ATTEMPTS + 1):
                try:
                    call()
                    break
                except Exception as error:  # noqa: BLE001 — the server is away: later, or give up on this call
                    if attempt == self.ATTEMPTS:
                        self.dropped += 1
                        self.say(f"warning: MLflow call dropped after {attempt} tries: {type(error).__name__}: "
                                 f"{' '.join(str(error).split())[:300]}")
                    else:
                        time.sleep(self.PAUSE_S * attempt)
            with self._changed:
                self._pending.popleft()
                self._busy = False
                self._changed.notify_all()
