"""The promotion gate: a newly registered version takes the alias only if it is shown to be no worse.

    new version v of NAME, the alias holder h (models:/NAME@ALIAS)
      ──pipelines.eval.run.evaluate: the same val pairs (the first `limit` by key), the same seeds,
        `samples` outputs per pair, each version sampled as it is served (its stored sampling, else
        its config; `steps`/`sampler` force both)──>  per-pair metrics of v and h
      ──pipelines.train.compare: paired bootstrap over the pairs; the guards (or one metric)──> verdict
      ──moved: alias → v by compare-and-set on h (`move_alias`); a concurrent move is reported, not
        overwritten──>  otherwise v stays registered without the alias
    the decision, its reason, every metric with its interval: tags on the version and the training
    run, `promotion.json` in the report folder (with the evaluation's report beside it), and the
    evaluation as an MLflow run in experiment `sr3-promotion`.

No holder: the alias moves without an evaluation. `force=True` moves it without one, too (still
by compare-and-set). A version is found again by (run id, step) (`registered_version`), so a
rerun of a finished run reuses its version instead of registering another.

Compare-and-set: MLflow has no conditional alias update, so the read-check-set runs under a lock
that is itself an MLflow record: the registered model `LOCK_PREFIX + NAME + "." + ALIAS`, whose
creation fails when it exists (the registry's unique name), deleted when done; a lock older than
`LOCK_TTL_S` (a crashed gate) is broken.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pipelines import storage
from pipelines.train import compare as C

DEFAULT_LIMIT = 64
EXPERIMENT = "sr3-promotion"
STEP_TAG, DECISION_TAG, REASON_TAG = "sr3.step", "sr3.promotion", "sr3.promotion_reason"
METRICS_TAG = "sr3.promotion_metrics"  # JSON: every compared metric, both values, Δ and its interval
LOCK_PREFIX, LOCK_TTL_S = "sr3-lock.", 600.0
Say = Callable[[str], None]


@dataclass(frozen=True)
class GateConfig:
    """How the new version and the holder are compared."""

    metric: str | None = None  # one metric decides (--promote-metric); None: the guards (compare.GUARDS)
    limit: int | None = DEFAULT_LIMIT  # val pairs (the first N by key)
    steps: int | None = None  # refinement steps for both; None: each version's own sampling
    sampler: str | None = None  # sampler for both; None: each version's own
    seed: int = 0
    samples: int = 2  # outputs per pair, each with its own seed
    resamples: int = 2000  # bootstrap resamples of the pairs
    force: bool = False  # move the alias without comparing
    on_cluster: bool | None = None  # sample on the connected Ray cluster's actors (None: when connected)
    report_root: str | None = None  # where the evaluation report goes (default: reports/)


@dataclass(frozen=True)
class Decision:
    moved: bool
    reason: str
    version: str
    holder: str | None = None
    new_score: float | None = None  # the deciding metric's (`--promote-metric`) values, when one decides
    holder_score: float | None = None
    comparisons: dict[str, dict] = field(default_factory=dict)  # metric → `compare.Comparison` fields
    report: str | None = None


def metric_names() -> tuple[str, ...]:
    from pipelines.eval.measures import METRICS

    return tuple(METRICS)


def registered_version(tracking_uri: str, name: str, run_id: str, step: int) -> str | None:
    """The version of `name` registered from this run at this step, if any (tagged at creation)."""
    from mlflow import MlflowClient

    found = MlflowClient(tracking_uri).search_model_versions(f"name='{name}' and run_id='{run_id}'")
    versions = [str(v.version) for v in found if (v.tags or {}).get(STEP_TAG) == str(step)]
    return max(versions, key=int) if versions else None


def holder_of(tracking_uri: str, name: str, alias: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def move_alias(tracking_uri: str, name: str, alias: str, expected: str | None, version: str) -> tuple[bool, str | None]:
    """Point `alias` at `version` only if it still points at `expected` (None: at nothing); under the
    registry lock (module docstring). Returns (moved, the holder found)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    with _registry_lock(client, f"{LOCK_PREFIX}{name}.{alias}"):
        found = holder_of(tracking_uri, name, alias)
        if found != expected and found != version:
            return False, found
        if found != version:
            client.set_registered_model_alias(name, alias, version)
        return True, found


class _registry_lock:
    """Mutual exclusion through the registry's unique model names (module docstring)."""

    def __init__(self, client, lock: str, wait_s: float = 120.0):
        self.client, self.lock, self.wait_s = client, lock, wait_s

    def __enter__(self):
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self.client.create_registered_model(self.lock, tags={"sr3.lock_at": str(time.time()),
                                                                     "sr3.lock_id": uuid.uuid4().hex})
                return self
            except MlflowException:
                try:
                    held_at = float(self.client.get_registered_model(self.lock).tags.get("sr3.lock_at", "0"))
                    if time.time() - held_at > LOCK_TTL_S:  # a crashed gate's lock
                        self.client.delete_registered_model(self.lock)
                        continue
                except MlflowException:
                    continue  # released in between
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the registry lock {self.lock} is held by another gate") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(self.lock)
        except MlflowException:
            pass


def gate(tracking_uri: str, name: str, version: str, alias: str, pairs: str, config: GateConfig = GateConfig(),
         *, run_id: str | None = None, say: Say = print) -> Decision:
    """Decide whether `version` takes `alias`, move it if so, record why (see the module docstring)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    holder = holder_of(tracking_uri, name, alias)
    if holder == version:
        decision = Decision(True, f"v{version} already holds @{alias}", version, holder)
    elif holder is None:
        decision = Decision(True, f"no version held @{alias}", version)
    elif config.force:
        decision = Decision(True, f"--force-alias (v{holder} held @{alias}; not compared)", version, holder)
    else:
        decision = compare_versions(tracking_uri, name, version, holder, alias, pairs, config, say)
    if decision.moved and holder != version:
        moved, found = move_alias(tracking_uri, name, alias, holder, version)
        if not moved:
            decision = Decision(False, f"lost a race: v{found} took @{alias} while v{version} was compared with "
                                       f"v{holder}; not moved (rerun the gate to compare with v{found})",
                                version, found, decision.new_score, decision.holder_score, decision.comparisons,
                                decision.report)
    tags = {DECISION_TAG: "moved" if decision.moved else "kept", REASON_TAG: decision.reason[:5000]}
    if decision.comparisons:
        tags[METRICS_TAG] = json.dumps(decision.comparisons, sort_keys=True)[:5000]
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        if run_id:
            client.set_tag(run_id, key, value)
    if run_id:
        for metric, c in decision.comparisons.items():
            client.log_metric(run_id, f"promotion_{metric}", c["new"])
            client.log_metric(run_id, f"promotion_{metric}_delta_high", c["high"])
    say(f"@{alias} {'moved to' if decision.moved else 'stays on v' + str(decision.holder) + ', not moved to'} "
        f"v{version}: {decision.reason}")
    return decision


def compare_versions(tracking_uri: str, name: str, version: str, holder: str, alias: str, pairs: str,
                     config: GateConfig, say: Say) -> Decision:
    """Evaluate both versions on the same pairs and seeds; decide by the guards or `config.metric`."""
    if config.metric is not None and config.metric not in metric_names():
        raise ValueError(f"--promote-metric {config.metric!r}: choose from {', '.join(metric_names())}")
    new_uri, old_uri = f"models:/{name}/{version}", f"models:/{name}/{holder}"
    deciding = config.metric or "guards " + ", ".join(C.GUARDS)
    say(f"promotion gate: v{version} against v{holder} (@{alias}) on {deciding}, up to {config.limit} val pairs "
        f"of {pairs}, {config.samples} samples per pair, paired bootstrap ({config.resamples} resamples)")
    try:
        result, labels = evaluate_versions(tracking_uri, [new_uri, old_uri], pairs, config)
    except Exception as error:  # no val pairs, an unconditional model, a failed evaluation: keep the holder
        error = getattr(error, "cause", None) or error  # a Ray actor's error: the exception it raised
        why = " ".join(str(error).split())[:300]
        return Decision(False, f"could not compare ({type(error).__name__}: {why}); --force-alias moves it anyway",
                        version, holder)
    new, old = (result.per_pair[label] for label in labels)
    wanted = [config.metric] if config.metric else list(C.GUARDS)
    comparisons = C.compare(new, old, wanted, resamples=config.resamples, seed=config.seed)
    for metric in ([config.metric] if config.metric in C.POINT_GUARDS else [] if config.metric else C.POINT_GUARDS):
        found = C.point(metric, result.metrics[labels[0]].get(metric), result.metrics[labels[1]].get(metric))
        if found is not None:
            comparisons[metric] = found
    verdict = C.decide(comparisons, single=config.metric)
    record = {m: asdict(c) for m, c in verdict.comparisons.items()}
    chosen = verdict.comparisons.get(config.metric) if config.metric else None
    decision = Decision(verdict.moved, verdict.reason + ("" if verdict.moved else "; --force-alias moves it anyway"),
                        version, holder, chosen.new if chosen else None, chosen.holder if chosen else None,
                        record, result.report)
    storage.write_bytes(storage.join(result.report, "promotion.json"), json.dumps({
        "name": name, "alias": alias, "version": version, "holder": holder, "moved": decision.moved,
        "reason": decision.reason, "decided_by": config.metric or "guards", "comparisons": record,
        "config": asdict(config), "evaluation": result.meta}, indent=2, default=str).encode())
    return decision


def evaluate_versions(tracking_uri: str, models: list[str], pairs: str, config: GateConfig):
    """One evaluation of `models` (the first, the others as its baselines): the same pairs and seeds,
    `config.samples` per pair, each sampled as served unless `config.steps`/`sampler` force it; one
    report (under `config.report_root`), one MLflow run. Returns (EvalResult, their labels)."""
    from pipelines.eval.run import evaluate

    label = "-vs-".join(m.split("models:/", 1)[-1].replace("/", "-v") for m in models)
    root = config.report_root or "reports"
    result = evaluate(models[0], pairs, baselines=tuple(models[1:]), steps=config.steps, sampler=config.sampler,
                      samples=max(1, config.samples), limit=config.limit, seed=config.seed,
                      report_uri=storage.join(root, f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"),
                      tracking_uri=tracking_uri, experiment=EXPERIMENT, run_name=f"promote-{label}",
                      on_cluster=config.on_cluster, say=lambda _: None)
    labels = [result.meta["model"]] + [m for m in result.metrics if m not in ("bicubic", result.meta["model"])]
    return result, labels
