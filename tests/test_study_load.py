"""A bounded load test on loopback, on SQLite and on a real PostgreSQL server (there with two server
processes sharing the database): 50 simulated raters answer a whole session each, concurrently,
replaying every answer once; every answer must be stored exactly once. The raters have a known
preference (the fool rate they are fooled at, per model); `jobs/study.py results` must recover it
within its 95% intervals, exclude exactly the inattentive raters the catch trials flag, write the
HTML page, and (`--mlflow`) log the fool rates to each model version's evaluation run. Both
databases must give the same answers.

Simulated raters see images, not labels: they recognise each served image by its pixels (the
test's oracle, built from the study's files: served bytes are jittered afresh each time). Each
rater starts with a one-time invite (invite-only is the default). A rater is fooled when its next random draw falls
below its preference for that model; the draws come from a generator seeded by the rater's plan
slot (looked up in the database by the harness), so the outcome does not depend on which thread
got which slot, and the test is deterministic.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import pytest

from job_support import load_job
from pipelines.study.db import StudyDB
from study_support import Client, Oracle, invites, serve

pytestmark = pytest.mark.slow
PREFERENCE = {"m0": 0.35, "m1": 0.10, "m2": 0.22}  # the simulated raters' fool rate per model
RATERS, INATTENTIVE = 50, 4
FOUND: dict[str, dict] = {}  # backend → (fooled, trials) per model, to compare the two databases


def simulated_rater(base: str, invite: str, oracle: Oracle, latencies: list[float], store: StudyDB,
                    attentive: bool = True) -> list[dict]:
    """One whole session; returns one entry per answered trial."""
    client = Client(base)
    started = client.post("/api/session", {"invite": invite})
    assert started.status == 200
    draws, log = random.Random(store.rater(next(iter(client.cookies.values())))["slot"]), []
    latencies.append(started.seconds)
    while True:
        reply = client.get("/api/trial")
        assert reply.status == 200, reply.body
        latencies.append(reply.seconds)
        trial = reply.json()
        if trial["done"]:
            break
        images = {slot: client.get(url) for slot, url in trial["images"].items()}
        assert all(r.status == 200 for r in images.values())
        latencies.extend(r.seconds for r in images.values())
        seen = {slot: oracle.identify(r.body) for slot, r in images.items()}
        real = "left" if seen["left"].role == "real" else "right"
        other = "right" if real == "left" else "left"
        kind, model = seen[other].role, seen[other].model
        if not attentive:
            choice = "left"
        elif kind == "degraded":
            choice = real
        else:
            choice = other if draws.random() < PREFERENCE[model] else real
        body = {"trial": trial["trial"], "choice": choice, "rt_ms": 250 + len(log)}
        answered = client.post("/api/answer", body)
        assert answered.status == 200, answered.body
        latencies.append(answered.seconds)
        assert client.post("/api/answer", {**body, "choice": real}).status == 409, "a replay must be refused"
        log.append({"token": trial["trial"], "choice": choice, "model": model if kind == "model" else None,
                    "fooled": kind == "model" and choice == other, "missed": kind == "degraded" and choice != real})
    client.close()
    return log


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_fifty_concurrent_raters_every_answer_once_and_the_preference_recovered(
        backend, created_study, tmp_path: Path, request, monkeypatch):
    study = created_study.study()
    db = (f"sqlite:///{tmp_path}/answers.db" if backend == "sqlite"
          else request.getfixturevalue("postgres").new_database())
    latencies: list[float] = []
    with serve(created_study.uri, db, tmp_path) as server, \
            (serve(created_study.uri, db, tmp_path) if backend == "postgresql" else nullcontext(server)) as second:
        store = StudyDB(db, study)  # the harness's own connection (tables made by the server)
        codes = invites(server, RATERS + INATTENTIVE)
        started = time.perf_counter()
        with ThreadPoolExecutor(RATERS) as pool:  # on PostgreSQL, two server processes share the database
            futures = [pool.submit(simulated_rater, (server, second)[i % 2].url, codes[i], created_study.oracle,
                                   latencies, store) for i in range(RATERS)]
            logs = [future.result(timeout=300) for future in futures]
        elapsed = time.perf_counter() - started
        careless = [simulated_rater(server.url, codes[RATERS + k], created_study.oracle, [], store, attentive=False)
                    for k in range(INATTENTIVE)]

    per_session = study.trials_per_rater
    answers = RATERS * per_session
    latencies.sort()
    where = f"{backend}, 2 servers" if second is not server else backend
    print(f"\nload test ({where}): {RATERS} raters × {per_session} trials concurrently, {len(latencies)} requests "
          f"+ {answers} replays in {elapsed:.1f} s ({answers / elapsed:.0f} answers/s); latency p50 "
          f"{1000 * statistics.median(latencies):.0f} ms, p95 {1000 * latencies[int(0.95 * len(latencies))]:.0f} ms, "
          f"max {1000 * latencies[-1]:.0f} ms")
    assert latencies[-1] < 30, "no request may take longer than 30 s"

    try:
        rows, counts = store.export(), store.counts()
    finally:
        store.close()
    everyone = [entry for log in logs + careless for entry in log]
    assert len(rows) == len(everyone) == (RATERS + INATTENTIVE) * per_session, "each answer stored exactly once"
    assert len({(r["rater"], r["position"]) for r in rows}) == len(rows)
    assert {r["token"]: r["choice"] for r in rows} == {e["token"]: e["choice"] for e in everyone}
    assert {r["token"] for r in rows if r["picked"] == "model"} == {e["token"] for e in everyone if e["fooled"]}
    assert counts == {"sessions": RATERS + INATTENTIVE, "finished": RATERS + INATTENTIVE, "answers": len(rows),
                      "void": 0}
    assert all(r["shown"] == 1 for r in rows), "each trial issued once"

    report = tmp_path / "results"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", created_study.tracking_uri)
    argv = ["results", "--study", created_study.uri, "--db", db, "--report", str(report), "--top", "2"]
    assert load_job("study").main(argv + (["--mlflow"] if backend == "sqlite" else [])) == 0
    doc = json.loads((report / "results.json").read_text())

    assert sorted(e["slot"] for e in doc["excluded"]) == list(range(RATERS, RATERS + INATTENTIVE))
    assert all(e["catch_missed"] == 1 and e["catch_answered"] == 2 for e in doc["excluded"])
    attentive = [e for log in logs for e in log if e["model"]]
    found = {}
    for model, truth in PREFERENCE.items():
        mine = [e for e in attentive if e["model"] == model]
        entry = doc["models"][model]
        assert (entry["fooled"], entry["trials"]) == (sum(e["fooled"] for e in mine), len(mine))
        assert entry["trials"] >= 60 and entry["raters"] >= 40
        for interval in ("bootstrap95", "wilson95"):
            low, high = entry[interval]
            assert low <= truth <= high, f"{model}: the raters' preference {truth} is outside {interval} {low, high}"
        found[model] = (entry["fooled"], entry["trials"])
    FOUND[backend] = found
    if len(FOUND) == 2:
        assert FOUND["sqlite"] == FOUND["postgresql"], "SQLite and PostgreSQL must give the same study"

    page = (report / "index.html").read_text()
    assert all(label in page for label in ("tiny-study v1", "bicubic", "regression"))
    assert "highest fool rates" in page and "lowest fool rates" in page and "slot 50" in page
    shown = re.findall(r'src="([^"]+)"', page)
    assert shown and all((report / src).is_file() for src in shown)
    if backend == "sqlite":
        _check_mlflow(created_study, doc)


def _check_mlflow(created_study, doc: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(created_study.tracking_uri)
    experiment = client.get_experiment_by_name("sr3-eval")
    for model, uri in (("m0", "models:/tiny-study/1"), ("m2", created_study.regression)):
        runs = client.search_runs([experiment.experiment_id], f"tags.`sr3.model_uri` = '{uri}'")
        assert len(runs) == 1, f"one evaluation run for {uri}"
        metrics, tags = runs[0].data.metrics, runs[0].data.tags
        assert metrics["human/task1/fool_rate"] == pytest.approx(doc["models"][model]["fool_rate"])
        assert metrics["human/task1/bootstrap_low"] == pytest.approx(doc["models"][model]["bootstrap95"][0])
        assert metrics["human/task1/trials"] == doc["models"][model]["trials"]
        assert tags["sr3.study_task1"] == created_study.uri
    m0 = client.search_runs([experiment.experiment_id], "tags.`sr3.model_uri` = 'models:/tiny-study/1'")[0]
    assert (m0.data.tags["sr3.model_name"], m0.data.tags["sr3.model_version"]) == ("tiny-study", "1")
    assert not client.search_runs([experiment.experiment_id], "tags.`sr3.model_uri` = 'bicubic'")
