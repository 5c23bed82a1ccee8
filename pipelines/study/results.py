"""`jobs/study.py results`: the study's answers → fool rates, an HTML page (the paper's Fig. 11), MLflow.

    REPORT/results.json   pipelines.study.stats.fool_rates + the study's protocol + the void trials
                          (an image asked for twice, pipelines.study.db: never counted), per reason
    REPORT/index.html     fool rate per model with both 95% intervals, excluded raters, and per
                          model the `top` source images with the highest and the lowest fool
                          rates (LR | real photo | model output, fool rate k/n)
    REPORT/images/*.png   the images the page shows (named by role: the page is for the team)

REPORT defaults to STUDY/results. With `mlflow=True` the fool rates go to each model version's
evaluation run (experiment `sr3-eval`): the newest run that `jobs/evaluate.py` logged for that
version (tag `sr3.model_uri`), else a new run tagged as evaluate tags its runs (`sr3.model_name`,
`sr3.model_version`, `sr3.model_uri`; `sr3.job = study`). Metrics `human/task<T>/fool_rate`,
`…/wilson_low`, `…/wilson_high`, `…/bootstrap_low`, `…/bootstrap_high`, `…/trials`, `…/raters`,
logged at step = the number of included answers (a later, larger count supersedes it).
The bicubic baseline has no model version and is reported, not logged.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.study.db import StudyDB
from pipelines.study.plan import Study
from pipelines.study.stats import fool_rates

EXPERIMENT = "sr3-eval"
Say = Callable[[str], None]


def results(study_uri: str, db_url: str, *, report_uri: str | None = None, log_mlflow: bool = False,
            tracking_uri: str | None = None, max_catch_misses: int = 0, top: int = 5,
            say: Say = print) -> dict[str, Any]:
    """Compute and write the results (module docstring); returns the results.json document."""
    from pipelines.eval import report

    study = Study.load(study_uri)
    db = StudyDB(db_url, study)
    try:
        rows, voided = db.export(), db.voided()
    finally:
        db.close()
    if not rows:
        raise ValueError(f"no answers for study {study.id} in {db_url}")
    found = fool_rates(rows, study.models, max_catch_misses=max_catch_misses)
    doc = {"study": study_uri, "study_id": study.id, "task": study.task, "question": study.question,
           "protocol": study.doc["protocol"], **found, "void": _void_summary(voided)}
    report_uri = report_uri or storage.join(study_uri, "results")
    for model, entry in found["models"].items():
        rate = "—" if entry["fool_rate"] is None else f"{100 * entry['fool_rate']:.1f}%"
        low, high = entry["bootstrap95"]
        say(f"task {study.task} {entry['label']}: fool rate {rate} ({entry['fooled']}/{entry['trials']} trials, "
            f"{entry['raters']} raters; 95% CI over raters {100 * low:.1f}–{100 * high:.1f}%)")
    if voided:
        say(f"{doc['void']['trials']} void trials (never counted) of {doc['void']['raters']} raters: "
            + ", ".join(f"{n} {reason}" for reason, n in doc["void"]["by_reason"].items()))
    for entry in found["excluded"]:
        say(f"excluded rater #{entry['rater']} (slot {entry['slot']}): missed {entry['catch_missed']} of "
            f"{entry['catch_answered']} catch trials")
    with report.staged(report_uri) as folder:
        (folder / "results.json").write_text(json.dumps(doc, indent=2))
        (folder / "index.html").write_text(_page(study, doc, _copy_images(study, found, folder, top), top),
                                           encoding="utf-8")
    doc["report"] = report_uri
    if log_mlflow:
        doc["mlflow"] = _log(study, found, tracking_uri, say)
    return doc


def _void_summary(voided: list[dict[str, Any]]) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for row in voided:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    return {"trials": len(voided), "raters": len({row["rater"] for row in voided}), "by_reason": reasons}


def _copy_images(study: Study, found: dict[str, Any], folder: Path, top: int) -> dict[str, dict[int, dict]]:
    """{model: {image: {"lr", "real", "output"} relative paths}} for the images the page shows."""
    shown: dict[str, dict[int, dict]] = {}
    for model, entry in found["models"].items():
        ranked = entry["images"]
        for item in ranked[:top] + ranked[-top:]:
            i = item["image"]
            if i in shown.setdefault(model, {}):
                continue
            source = study.images[i]
            paths = {}
            for role, name in (("lr", source["lr"]), ("real", source["real"]), ("output", source["outputs"][model])):
                paths[role] = f"images/{model}-{i:04d}-{role}.png"
                target = folder / paths[role]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(storage.join(study.uri, name)))
            shown[model][i] = paths
    return shown


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _rows(study: Study, items: list[dict], paths: dict[int, dict], label: str) -> str:
    esc = html.escape
    return "".join(
        f"<tr><td><code>{esc(study.images[it['image']]['key'])}</code></td>"
        + "".join(f'<td><img src="{paths[it["image"]][role]}" width="160" alt="{role}"></td>'
                  for role in ("lr", "real", "output"))
        + f"<td>{_percent(it['fool_rate'])} ({it['fooled']}/{it['trials']})</td></tr>" for it in items
    ) or f"<tr><td colspan=5>no answers for {esc(label)}</td></tr>"


def _page(study: Study, doc: dict[str, Any], shown: dict[str, dict[int, dict]], top: int) -> str:
    esc = html.escape
    table = "".join(
        f"<tr><th>{esc(m['label'])}</th><td><b>{_percent(m['fool_rate'])}</b></td>"
        f"<td>{_percent(m['bootstrap95'][0])} – {_percent(m['bootstrap95'][1])}</td>"
        f"<td>{_percent(m['wilson95'][0])} – {_percent(m['wilson95'][1])}</td>"
        f"<td>{m['fooled']}/{m['trials']}</td><td>{m['raters']}</td><td>{m['median_rt_ms'] or '—'}</td></tr>"
        for m in doc["models"].values())
    excluded = "".join(f"<li>rater #{e['rater']} (slot {e['slot']}): missed {e['catch_missed']} of "
                       f"{e['catch_answered']} catch trials</li>" for e in doc["excluded"]) or "<li>none</li>"
    head = "<tr><th>source</th><th>LR</th><th>real photo</th><th>model output</th><th>fool rate</th></tr>"
    figures = "".join(
        f"<h3>{esc(m['label'])}: highest fool rates</h3><table>{head}"
        f"{_rows(study, m['images'][:top], shown.get(model, {}), m['label'])}</table>"
        f"<h3>{esc(m['label'])}: lowest fool rates</h3><table>{head}"
        f"{_rows(study, list(reversed(m['images'][-top:])), shown.get(model, {}), m['label'])}</table>"
        for model, m in doc["models"].items())
    raters = doc["raters"]
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>2AFC study results</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:4px;text-align:center}img{image-rendering:pixelated}</style>"
        f"</head><body><h1>2AFC study {esc(study.id)}: Task {study.task}</h1>"
        f"<p>Question: “{esc(study.question)}” Images shown for {study.display_seconds:g} s.</p>"
        f"<p>{doc['answers']} answers from {raters['answered']} raters ({raters['finished']} finished, "
        f"{raters['included']} included; {doc['void']['trials']} void trials — an image asked for twice — "
        "not counted). Fool rate = fraction of trials in which the rater picked the "
        "model's output over the real photo (50% = indistinguishable).</p>"
        "<table><tr><th>model</th><th>fool rate</th><th>95% CI, bootstrap over raters</th>"
        "<th>95% CI, Wilson</th><th>fooled/trials</th><th>raters</th><th>median response ms</th></tr>"
        f"{table}</table><h2>Raters excluded by catch trials (more than {doc['max_catch_misses']} missed)</h2>"
        f"<ul>{excluded}</ul><h2>Images with the highest and lowest fool rates (SR3 Fig. 11)</h2>{figures}"
        "</body></html>")


def _log(study: Study, found: dict[str, Any], tracking_uri: str | None, say: Say) -> dict[str, str]:
    """Fool rates → each model version's evaluation run; returns {model id: run id}."""
    from mlflow import MlflowClient

    from pipelines import tracking

    uri = tracking.tracking_uri(tracking_uri)
    client, logged = MlflowClient(uri), {}
    step = sum(m["trials"] for m in found["models"].values())
    for model, entry in found["models"].items():
        described = study.models[model]
        if described["uri"] == "bicubic" or entry["fool_rate"] is None:
            continue
        run_id = _evaluation_run(client, uri, described, study)
        prefix = f"human/task{study.task}"
        values = {"fool_rate": entry["fool_rate"], "wilson_low": entry["wilson95"][0],
                  "wilson_high": entry["wilson95"][1], "bootstrap_low": entry["bootstrap95"][0],
                  "bootstrap_high": entry["bootstrap95"][1], "trials": entry["trials"], "raters": entry["raters"]}
        tracking.RunLogger(uri, run_id).log_metrics({f"{prefix}/{k}": v for k, v in values.items()}, step=step)
        tracking.set_tags(uri, run_id, {f"sr3.study_task{study.task}": study.uri})
        logged[model] = run_id
        say(f"mlflow: {entry['label']} fool rate → run {run_id} ({uri}, experiment {EXPERIMENT})")
    return logged


def _evaluation_run(client, uri: str, described: dict[str, Any], study: Study) -> str:
    from pipelines import tracking

    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        runs = client.search_runs([found.experiment_id], f"tags.`sr3.model_uri` = '{described['uri']}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0].info.run_id
    tags = {"sr3.model_name": described.get("model_name", ""), "sr3.model_version": described.get("model_version", ""),
            "sr3.model_uri": described["uri"], "sr3.job": "study"}
    run_id, _ = tracking.start_or_resume(uri, EXPERIMENT, f"study-{study.id}-{described['label']}", tags)
    tracking.end_run(uri, run_id)
    return run_id
