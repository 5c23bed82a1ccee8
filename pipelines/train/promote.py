"""The promotion gate: a newly registered version takes the alias only if it is at least as good.

    new version v of NAME, the alias holder h (models:/NAME@ALIAS)
      ──pipelines.eval.evaluate: the same val pairs (the first `limit` by key), seed, sampler,
        steps; sampled on the cluster's sampling actors as jobs/evaluate.py does──>  metric(v), metric(h)
      ──v at least as good as h──> alias → v      otherwise v stays registered without the alias
    the decision, its reason and both scores: tags on the version and on the training run;
    the evaluation (the holder as the new version's baseline): an MLflow run in experiment
    `sr3-promotion` and a report under `report_root`.

Better means: lower for `pipelines.eval.LOWER_IS_BETTER`, |log ratio| closer to 0 for
`detail_ratio`, log ratio above 1 closer to 0 for `flat_noise_ratio`, higher for every other metric. The default metric `lr_psnr` compares the output,
downsampled, with the LR input: a model whose colours drift or that ignores its input loses it.
No holder: the alias moves without an evaluation. `force=True` moves it without one, too.
A version is found again by (run id, step) (`registered_version`), so a rerun of a finished run
reuses its version instead of registering another.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pipelines import storage

DEFAULT_METRIC = "lr_psnr"
DEFAULT_LIMIT = 64
EXPERIMENT = "sr3-promotion"
STEP_TAG, DECISION_TAG, REASON_TAG = "sr3.step", "sr3.promotion", "sr3.promotion_reason"
Say = Callable[[str], None]


@dataclass(frozen=True)
class GateConfig:
    """How the new version and the holder are compared."""

    metric: str = DEFAULT_METRIC
    limit: int | None = DEFAULT_LIMIT  # val pairs (the first N by key)
    steps: int | None = None  # refinement steps; None: the new version's config
    sampler: str | None = None  # None: the new version's config
    seed: int = 0
    force: bool = False  # move the alias without comparing
    on_cluster: bool | None = None  # sample on the connected Ray cluster's actors (None: when connected)
    report_root: str | None = None  # where the evaluation report goes (default: reports/)


@dataclass(frozen=True)
class Decision:
    moved: bool
    reason: str
    version: str
    holder: str | None = None
    new_score: float | None = None
    holder_score: float | None = None


def metric_names() -> tuple[str, ...]:
    from pipelines.eval.measures import BASE_METRICS, EXTRA_METRICS

    return (*BASE_METRICS, *EXTRA_METRICS)


def badness(metric: str, value: float) -> float:
    """The metric turned into "lower is better"."""
    from pipelines.eval.measures import LOWER_IS_BETTER

    if metric == "detail_ratio":
        return abs(math.log(value)) if value > 0 else math.inf
    if metric == "flat_noise_ratio":  # grain above the photo's own (1); smoother is no fault
        return max(0.0, math.log(value)) if value > 0 else 0.0
    return value if metric in LOWER_IS_BETTER else -value


def at_least_as_good(metric: str, new: float | None, old: float | None) -> bool:
    """Is `new` at least as good as `old` on `metric`? A missing or non-finite score loses."""
    if new is None or not math.isfinite(badness(metric, new)):
        return False
    if old is None or not math.isfinite(badness(metric, old)):
        return True
    return badness(metric, new) <= badness(metric, old)


def registered_version(tracking_uri: str, name: str, run_id: str, step: int) -> str | None:
    """The version of `name` registered from this run at this step, if any."""
    from mlflow import MlflowClient

    found = MlflowClient(tracking_uri).search_model_versions(f"name='{name}' and run_id='{run_id}'")
    versions = [str(v.version) for v in found if v.tags.get(STEP_TAG) == str(step)]
    return max(versions, key=int) if versions else None


def holder_of(tracking_uri: str, name: str, alias: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


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
        decision = compare(tracking_uri, name, version, holder, alias, pairs, config, say)
    if decision.moved and holder != version:
        client.set_registered_model_alias(name, alias, version)
    tags = {DECISION_TAG: "moved" if decision.moved else "kept", REASON_TAG: decision.reason}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        if run_id:
            client.set_tag(run_id, key, value)
    if run_id and decision.new_score is not None:
        client.log_metric(run_id, f"promotion_{config.metric}", decision.new_score)
    say(f"@{alias} {'moved to' if decision.moved else 'stays on v' + str(holder) + ', not moved to'} "
        f"v{version}: {decision.reason}")
    return decision


def compare(tracking_uri: str, name: str, version: str, holder: str, alias: str, pairs: str,
            config: GateConfig, say: Say) -> Decision:
    """Evaluate both versions on the same pairs; the decision by `config.metric`."""
    if config.metric not in metric_names():
        raise ValueError(f"--promote-metric {config.metric!r}: choose from {', '.join(metric_names())}")
    new_uri, old_uri = f"models:/{name}/{version}", f"models:/{name}/{holder}"
    say(f"promotion gate: v{version} against v{holder} (@{alias}) on {config.metric}, "
        f"up to {config.limit} val pairs of {pairs}")
    try:
        new, old = score_models(tracking_uri, [new_uri, old_uri], pairs, config)
    except Exception as error:  # no val pairs, an unconditional model, a failed evaluation: keep the holder
        error = getattr(error, "cause", None) or error  # a Ray actor's error: the exception it raised
        why = " ".join(str(error).split())[:300]
        return Decision(False, f"could not compare ({type(error).__name__}: {why}); --force-alias moves it anyway",
                        version, holder)
    direction = ("→ 1" if config.metric == "detail_ratio" else "down to 1" if config.metric == "flat_noise_ratio" else
                 "lower is better" if badness(config.metric, 1.0) > 0 else "higher is better")
    shown = f"{config.metric} {_fmt(new)} vs v{holder}'s {_fmt(old)} ({direction})"
    if at_least_as_good(config.metric, new, old):
        return Decision(True, f"at least as good: {shown}", version, holder, new, old)
    return Decision(False, f"worse: {shown}; --force-alias moves it anyway", version, holder, new, old)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def score_models(tracking_uri: str, models: list[str], pairs: str, config: GateConfig) -> list[float | None]:
    """`config.metric` of each model, from one evaluation (the first model, the others as its
    baselines): the same pairs, seed, sampler and steps (the first model's), one report, one run;
    sampled on the Ray cluster this process is connected to, else here."""
    import time

    from pipelines.eval.run import evaluate
    from pipelines.registry.models import resolve_model

    first = resolve_model(models[0], tracking_uri).config()
    label = "-vs-".join(m.split("models:/", 1)[-1].replace("/", "-v") for m in models)
    root = config.report_root or "reports"
    result = evaluate(models[0], pairs, baselines=models[1:], steps=config.steps or first.diffusion.sample_steps,
                      sampler=config.sampler or first.diffusion.sample_sampler, limit=config.limit, seed=config.seed,
                      report_uri=storage.join(root, f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"),
                      tracking_uri=tracking_uri, experiment=EXPERIMENT, run_name=f"promote-{label}",
                      on_cluster=config.on_cluster, say=lambda _: None)
    methods = [result.meta["model"]] + [m for m in result.metrics if m not in ("bicubic", result.meta["model"])]
    scores = [result.metrics[method].get(config.metric) for method in methods]
    return [None if v is None or not math.isfinite(v) else float(v) for v in scores]
