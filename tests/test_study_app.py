"""The raters' web app under a real uvicorn process (SQLite): what the browser receives reveals
nothing about which image is real (names, URLs, sizes, headers, page source, timing); a session
answers only its own issued trials, once; malformed and replayed requests get a 4xx and change
nothing; image serving reaches nothing outside the study; admin endpoints need the token; invites
are one-time; Task 2 has no LR; a study on object storage (the GCS emulator) is served as is.
(Serving each image once, unique served bytes, open sessions and proxies: test_study_integrity.py.)"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from pipelines.study import db as D
from study_support import ADMIN_TOKEN, Client, fetch_images, invited, serve

pytestmark = pytest.mark.slow
IMAGE = re.compile(r"^/img/([A-Za-z0-9_-]{32})/(left|lr|right)$")


@pytest.fixture(scope="module")
def server(created_study, tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    with serve(created_study.uri, f"sqlite:///{folder}/answers.db", folder) as running:
        yield running


@pytest.fixture(scope="module")
def store(server, created_study):
    database = D.StudyDB(server.db, created_study.study())
    yield database
    database.close()


def _snapshot(store: D.StudyDB) -> tuple:
    with store.engine.connect() as conn:
        trials = conn.execute(select(D.trials).order_by(D.trials.c.id)).all()
        served = conn.execute(select(D.served).order_by(D.served.c.trial_id, D.served.c.slot)).all()
    return store.export(), store.counts(), trials, served


def test_nothing_the_browser_receives_tells_the_real_image(server, created_study):
    study = created_study.study()
    client = invited(server)
    received = [client.get(p) for p in ("/", "/trial", "/static/study.js", "/static/study.css")]
    real_sides, tokens = [], set()
    while True:
        reply = client.get("/api/trial")
        received.append(reply)
        trial = reply.json()
        if trial["done"]:
            break
        assert set(trial) == {"done", "trial", "position", "total", "display_ms", "images"}
        assert set(trial["images"]) == {"left", "lr", "right"} and trial["display_ms"] == 1000
        assert all(IMAGE.match(url)[1] == trial["trial"] for url in trial["images"].values())
        tokens.add(trial["trial"])
        images = {slot: client.get(url) for slot, url in trial["images"].items()}
        left, right = images["left"], images["right"]
        assert left.status == right.status == 200 and len(left.body) == len(right.body)
        assert {k: v for k, v in left.headers.items() if k != "date"} == \
               {k: v for k, v in right.headers.items() if k != "date"}
        assert left.headers["content-type"] == "image/png" and left.headers["cache-control"] == "no-store, no-transform"
        assert not {"etag", "last-modified", "content-disposition"} & set(left.headers)
        roles = {slot: created_study.oracle.identify(r.body).role for slot, r in images.items()}
        assert roles["lr"] == "lr" and sorted(roles[s] for s in ("left", "right"))[1] == "real"
        real_sides.append("left" if roles["left"] == "real" else "right")
        received += list(images.values())
        received.append(client.post("/api/answer", {"trial": trial["trial"], "choice": "left", "rt_ms": 400}))
    assert len(tokens) == study.trials_per_rater and set(real_sides) == {"left", "right"}
    received.append(client.get("/thanks"))
    assert received[-1].status == 200 and b"completion code" in received[-1].body

    secrets = {study.id.encode() * 0}  # the study id only names the cookie; everything else is secret
    for model in study.models.values():
        secrets |= {model["label"].encode(), model["uri"].encode(), model.get("given", "").encode()}
    for image in study.images:
        secrets |= {image["key"].encode(), image["source"].encode()}
        secrets |= {name.split("/")[1].split(".")[0].encode() for name in study.all_names()}
    secrets |= {created_study.uri.encode(), b"study.json", b"degraded"}
    secrets.discard(b"")
    for reply in received:
        blob = reply.body + json.dumps(reply.headers).encode()
        if reply.headers.get("content-type") == "image/png":
            blob = json.dumps(reply.headers).encode()
        leaked = [s for s in secrets if s in blob]
        assert not leaked, f"{leaked} reached the browser"


def test_real_and_generated_images_take_the_same_time_to_serve(server, created_study):
    """Paired: each trial's two images are fetched back to back (alternating which first; each is
    sent once), so machine load shifts both; the median difference over the trials of 8 sessions
    must be a small fraction of a fetch."""
    differences, fetches = [], []
    for session in range(8):
        client = invited(server)
        while not (trial := client.get("/api/trial").json())["done"]:
            seconds = {}
            for slot in (("left", "right") if (session + trial["position"]) % 2 else ("right", "left")):
                reply = client.get(trial["images"][slot])
                role = created_study.oracle.identify(reply.body).role
                seconds["real" if role == "real" else "other"] = reply.seconds
            differences.append(seconds["real"] - seconds["other"])
            fetches += list(seconds.values())
            client.get(trial["images"]["lr"])
            assert client.post("/api/answer", {"trial": trial["trial"], "choice": "right", "rt_ms": 300}).status == 200
    typical, difference = statistics.median(fetches), statistics.median(differences)
    assert len(differences) == 8 * 6 and abs(difference) < max(0.003, 0.5 * typical), (difference, typical)


def test_a_session_answers_only_its_own_issued_trials_once(server, store):
    a, b = invited(server), invited(server)
    trial = a.get("/api/trial").json()
    assert b.post("/api/answer", {"trial": trial["trial"], "choice": "left", "rt_ms": 10}).status == 404
    assert b.get(trial["images"]["left"]).status == 404
    rater_a = store.rater(a.cookies[next(iter(a.cookies))])
    with store.engine.connect() as conn:
        future = conn.execute(select(D.trials.c.token).where(
            D.trials.c.rater_id == rater_a["id"], D.trials.c.position == 3)).scalar_one()
    assert a.post("/api/answer", {"trial": future, "choice": "left", "rt_ms": 10}).status == 404, "not issued yet"
    assert a.get(f"/img/{future}/left").status == 404
    assert a.post("/api/answer", {"trial": trial["trial"], "choice": "left", "rt_ms": 10}).status == 409, "unseen"
    fetch_images(a, trial)

    racers = [Client(server.url) for _ in range(8)]
    statuses: list[tuple[int, str]] = []
    for racer, choice in zip(racers, ["left", "right"] * 4):
        racer.cookies = dict(a.cookies)
    barrier = threading.Barrier(len(racers))

    def race(racer: Client, choice: str) -> None:
        barrier.wait()
        statuses.append((racer.post("/api/answer", {"trial": trial["trial"], "choice": choice, "rt_ms": 20}).status,
                         choice))

    threads = [threading.Thread(target=race, args=(r, c)) for r, c in zip(racers, ["left", "right"] * 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [choice for status, choice in statuses if status == 200]
    assert len(winners) == 1 and sorted(s for s, _ in statuses) == [200] + [409] * 7
    stored = [row for row in store.export() if row["rater"] == rater_a["id"]]
    assert len(stored) == 1 and stored[0]["choice"] == winners[0] and stored[0]["position"] == 0
    assert a.post("/api/answer", {"trial": trial["trial"], "choice": "left", "rt_ms": 10}).status == 409
    assert a.get(trial["images"]["left"]).status == 404, "an answered trial's images are gone"
    assert [row["choice"] for row in store.export() if row["rater"] == rater_a["id"]] == winners


def test_malformed_requests_get_a_4xx_and_change_nothing(server, store, created_study):
    client = invited(server)
    trial = client.get("/api/trial").json()
    fetch_images(client, trial)
    token, before = trial["trial"], _snapshot(store)
    stranger = Client(server.url)
    forged = Client(server.url)
    forged.cookies = {name: "x" * 43 for name in client.cookies}
    good = {"trial": token, "choice": "left", "rt_ms": 100}
    cases = [
        (stranger.post("/api/answer", good), 401), (forged.post("/api/answer", good), 401),
        (client.post("/api/answer", raw=json.dumps(good).encode(), headers={"Content-Type": "text/plain"}), 415),
        (client.post("/api/answer", raw=b"{not json", headers={"Content-Type": "application/json"}), 422),
        (client.post("/api/answer", {"trial": token, "choice": "left"}), 422),
        (client.post("/api/answer", {**good, "real": "left"}), 422),
        (client.post("/api/answer", {**good, "choice": "middle"}), 422),
        (client.post("/api/answer", {**good, "rt_ms": -1}), 422),
        (client.post("/api/answer", {**good, "rt_ms": "100"}), 422),
        (client.post("/api/answer", {**good, "rt_ms": 10**9}), 422),
        (client.post("/api/answer", {**good, "trial": "../../study.json"}), 422),
        (client.post("/api/answer", [good]), 422),
        (client.post("/api/session", raw=b"{}", headers={"Content-Type": "text/plain"}), 415),
        (client.post("/api/session", {"invite": "x" * 30, "extra": 1}), 422),
        (client.request("PUT", "/api/answer", good), 405), (client.get("/api/answer"), 405),
        (stranger.get("/api/trial"), 401), (stranger.get(trial["images"]["left"]), 401),
        (stranger.get("/trial"), 303), (stranger.get("/thanks"), 303),
    ]
    study_json = (Path(created_study.uri) / "study.json").read_bytes()
    image_name = created_study.study().images[0]["real"]
    for path in (f"/img/{token}/study.json", f"/img/{token}/..%2f..%2fstudy.json", "/img/../study.json",
                 "/img/%2e%2e/%2e%2e/study.json", f"/img/{token}/%2e%2e", "/static/../study.json",
                 "/static/%2e%2e/%2e%2e/%2e%2e/study/study.json", "/static/..%2f..%2fstudy.json",
                 f"/{image_name}", f"/static/{image_name}", "/study.json", "/answers.db", "/docs", "/openapi.json",
                 f"/img/{token}/LEFT", f"/img/{token.upper()}/left", "/img/" + "a" * 32 + "/left"):
        cases.append((client.get(path), 404))
    for reply, status in cases:
        assert reply.status == status, (reply.status, status, reply.body[:200])
        assert study_json[:200] not in reply.body and b'"plan"' not in reply.body
    assert _snapshot(store) == before, "a rejected request changed the database"
    assert client.post("/api/answer", good).status == 200  # the session still works


def test_admin_endpoints_need_the_admin_token(server):
    client = invited(server)
    for wrong in ({}, {"Authorization": "Bearer nope-nope-nope-nope"}, {"Authorization": f"Basic {ADMIN_TOKEN}"},
                  {"Authorization": ADMIN_TOKEN}, {"Cookie": f"admin={ADMIN_TOKEN}"}):
        assert client.get("/admin/export", headers=wrong).status == 401
        assert client.get("/admin/results", headers=wrong).status == 401
        assert client.post("/admin/invites", {"count": 1}, headers=wrong).status == 401
    assert client.get(f"/admin/export?token={ADMIN_TOKEN}").status == 401
    export = client.get("/admin/export", headers=server.admin)
    assert export.status == 200 and export.json()["answers"], "answers of the earlier tests"
    row = export.json()["answers"][0]
    assert {"key", "model_label", "choice", "picked", "rt_ms", "server_ms", "real_side"} <= set(row)
    csv = client.get("/admin/export?format=csv", headers=server.admin)
    assert csv.status == 200 and csv.headers["content-type"].startswith("text/csv")
    assert len(csv.body.decode().strip().splitlines()) == len(export.json()["answers"]) + 1
    results = client.get("/admin/results", headers=server.admin).json()
    assert set(results["models"]) == {"m0", "m1", "m2"} and results["answers"] == len(export.json()["answers"])
    assert client.get("/admin/export?format=xml", headers=server.admin).status == 422


def test_invite_only_sessions_and_task_2_without_lr(created_study, tmp_path):
    copy = tmp_path / "task2"
    shutil.copytree(created_study.uri, copy, ignore=shutil.ignore_patterns("answers.db*", "results"))
    doc = json.loads((copy / "study.json").read_text())
    doc["protocol"]["task"] = 2
    (copy / "study.json").write_text(json.dumps(doc))
    with serve(str(copy), f"sqlite:///{tmp_path}/answers.db", tmp_path, "--invite-only") as running:
        page = Client(running.url).get("/").body.decode()
        assert "Which image would you guess is from a camera?" in page and "low-resolution" not in page
        assert Client(running.url).post("/api/session", {}).status == 403
        assert Client(running.url).post("/api/session", {"invite": "z" * 24}).status == 403
        made = Client(running.url).post("/admin/invites", {"count": 2, "label": "pilot"}, headers=running.admin)
        codes = made.json()["invites"]
        assert made.status == 200 and len(set(codes)) == 2 and made.json()["links"][0] == f"/?invite={codes[0]}"
        rater = Client(running.url)
        assert rater.post("/api/session", {"invite": codes[0]}).status == 200
        assert Client(running.url).post("/api/session", {"invite": codes[0]}).status == 403, "one-time"
        assert Client(running.url).post("/api/session", {"invite": codes[1]}).status == 200
        trial = rater.get("/api/trial").json()
        assert set(trial["images"]) == {"left", "right"}
        assert rater.get(f"/img/{trial['trial']}/lr").status == 404
        assert rater.get(trial["images"]["right"]).status == 200


def test_a_study_on_object_storage_is_served_as_is(created_study, gcs_bucket, tmp_path):
    from pipelines import storage

    remote = f"{gcs_bucket}/studies/task1"
    for item in storage.list_files(created_study.uri):
        if item.relpath == "study.json" or item.relpath.startswith("images/"):
            storage.write_bytes(storage.join(remote, item.relpath), Path(item.uri).read_bytes())
    with serve(remote, f"sqlite:///{tmp_path}/answers.db", tmp_path) as running:
        rater = invited(running)
        trial = rater.get("/api/trial").json()
        for slot, reply in fetch_images(rater, trial).items():
            assert created_study.oracle.identify(reply.body).role in ({"real", "model", "degraded"}, {"lr"})[slot == "lr"]
