"""A study raters cannot game, against the app under real uvicorn processes (SQLite, and a real
PostgreSQL server for the schema race):

- each (trial, slot) image is sent once: a second request gets 410 and voids the trial, so does
  asking for the trial again after its images came (a reload); a void trial takes no answer and is
  never counted; an answer needs all of the trial's images sent; racing duplicates get one copy;
- no served file is ever the same twice, within a rater's trials and across raters, nor after an
  exact transformation (low bits masked, quantised), while no value changes by more than one
  level — although the real photos do recur across these sessions (shown);
- invite-only by default; `--open` sessions limited per address, also under concurrent starts;
  forwarded headers count only from trusted proxies, and then only the rightmost untrusted entry;
- `Cache-Control: no-store, no-transform` on every response;
- the session cookie is Secure with `--secure`, or when a trusted proxy says https;
- two servers starting at once on a fresh PostgreSQL database make one schema (lined up on a table
  name another transaction holds, as a server halfway through creating the schema would);
- a database made by the previous version gains the new columns.
(In the browser: test_study_browser.py.)
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, text

from pipelines.study import db as D
from pipelines.study.images import pixels
from study_support import Client, fetch_images, invited, invites, serve, servers

pytestmark = pytest.mark.slow
NO_STORE = "no-store, no-transform"


@pytest.fixture(scope="module")
def plain(created_study, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    with serve(created_study.uri, f"sqlite:///{folder}/answers.db", folder) as running:
        yield running


def _store(server, created_study) -> D.StudyDB:
    return D.StudyDB(server.db, created_study.study())


def _post_answer(client: Client, token: str, choice: str = "left"):
    return client.post("/api/answer", {"trial": token, "choice": choice, "rt_ms": 500})


def test_each_image_is_sent_once_and_a_second_request_voids_the_trial(plain, created_study):
    client = invited(plain)
    t1 = client.get("/api/trial").json()
    assert client.get("/api/trial").json()["trial"] == t1["trial"], "no image sent yet: the same trial again"
    assert client.get(t1["images"]["left"]).status == 200
    again = client.get(t1["images"]["left"])
    assert again.status == 410 and not again.body.startswith(b"\x89PNG") and len(again.body) < 200
    assert client.get(t1["images"]["right"]).status == 404, "the trial is void: nothing more of it is sent"
    assert _post_answer(client, t1["trial"]).status == 409

    t2 = client.get("/api/trial").json()
    assert t2["trial"] != t1["trial"] and t2["position"] == 2
    fetch_images(client, t2)
    t3 = client.get("/api/trial").json()  # asked again after its images came: a reload voids t2
    assert t3["trial"] != t2["trial"] and t3["position"] == 3
    assert _post_answer(client, t2["trial"]).status == 409
    assert _post_answer(client, t3["trial"]).status == 409, "no answer before the images are sent"
    fetch_images(client, t3)
    assert _post_answer(client, t3["trial"]).status == 200

    t4 = client.get("/api/trial").json()
    racers = [Client(plain.url) for _ in range(6)]
    for racer in racers:
        racer.cookies = dict(client.cookies)
    barrier, replies = threading.Barrier(len(racers)), []

    def race(racer: Client) -> None:
        barrier.wait()
        replies.append(racer.get(t4["images"]["lr"]))

    threads = [threading.Thread(target=race, args=(racer,)) for racer in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(r.status for r in replies)  # 410: refused (and the trial voided); 404: void already
    assert statuses[0] == 200 and 410 in statuses and set(statuses[1:]) <= {404, 410}, statuses
    assert sum(r.body.startswith(b"\x89PNG") for r in replies) == 1, "exactly one copy of the image left"

    store = _store(plain, created_study)
    try:
        rater = store.rater(next(iter(client.cookies.values())))
        void = [v for v in store.voided() if v["rater"] == rater["id"]]
        counted = [row for row in store.export() if row["rater"] == rater["id"]]
    finally:
        store.close()
    assert [(v["token"], v["reason"]) for v in void] == [
        (t1["trial"], "refetched"), (t2["trial"], "reissued"), (t4["trial"], "refetched")]
    assert [row["token"] for row in counted] == [t3["trial"]], "answers of void trials are never counted"
    export = client.get("/admin/export", headers=plain.admin).json()
    assert {v["token"] for v in export["void"]} >= {t1["trial"], t2["trial"], t4["trial"]}
    assert not {t1["trial"], t2["trial"], t4["trial"]} & {row["token"] for row in export["answers"]}


def test_served_files_never_repeat_and_change_no_value_by_more_than_one_level(plain, created_study):
    """What a script collecting every served file of 10 sessions can find: nothing that recurs."""
    oracle, served = created_study.oracle, []
    for _ in range(10):
        client = invited(plain)
        while not (trial := client.get("/api/trial").json())["done"]:
            for slot, reply in fetch_images(client, trial).items():
                served.append((slot, reply.body, oracle.identify(reply.body)))
            assert _post_answer(client, trial["trial"]).status == 200
    assert len(served) == 10 * 6 * 3

    # The real photos do recur across these sessions: identical stored bytes would give them away.
    recurring = Counter(who.name for slot, _, who in served if who.role == "real")
    assert max(recurring.values()) >= 3, recurring
    # The served files: no hash, no size, no exact transformation of the pixels recurs.
    assert len({hashlib.sha256(body).digest() for _, body, _ in served}) == len(served)
    assert len({len(body) for slot, body, _ in served if slot != "lr"}) == 1
    for bits in (1, 2, 3):
        keys = {hashlib.sha256((pixels(body) >> bits).tobytes()).digest() for _, body, _ in served}
        assert len(keys) == len(served), f"pixels >> {bits} recur"
    changes = np.concatenate([(pixels(body).astype(np.int16) - oracle.pixels[who.name]).ravel()
                              for _, body, who in served])
    stored = np.concatenate([oracle.pixels[who.name].ravel() for _, _, who in served])
    assert set(np.unique(changes)) <= {-1, 0, 1}, "a change of at most one level"
    inside = changes[(stored > 0) & (stored < 255)]  # values that can move both ways: 2/3 of them move
    assert inside.size > 10**5 and 0.64 < np.abs(inside).mean() < 0.69 and abs(inside.mean()) < 0.01


def test_sessions_are_invite_only_unless_open(plain, created_study, tmp_path):
    page = Client(plain.url).get("/")
    assert 'data-open="0"' in page.body.decode()
    refused = Client(plain.url).post("/api/session", {})
    assert refused.status == 403 and b"by invitation" in refused.body

    with serve(created_study.uri, f"sqlite:///{tmp_path}/open.db", tmp_path, "--open", "--per-address", "2") as open_:
        assert 'data-open="1"' in Client(open_.url).get("/").body.decode()
        first = Client(open_.url)
        assert first.post("/api/session", {}).status == 200
        again = first.post("/api/session", {})  # the same browser presses Start again: its own session
        assert again.status == 200 and again.json().get("resumed") is True
        assert Client(open_.url).post("/api/session", {}).status == 200
        spoof = {"X-Forwarded-For": "198.51.100.1", "X-Forwarded-Proto": "https"}  # no trusted proxy: ignored
        over = Client(open_.url).post("/api/session", {}, headers=spoof)
        assert over.status == 429 and b"too many sessions" in over.body
        assert 0 < int(over.headers["retry-after"]) <= 24 * 3600 + 1
        assert Client(open_.url).post("/api/session", {"invite": invites(open_, 1)[0]}).status == 200, "invites are not limited"
        store = D.StudyDB(open_.db, created_study.study())
        try:
            assert store.counts()["sessions"] == 3
            with store.engine.connect() as conn:
                addresses = conn.execute(select(D.raters.c.address)).scalars().all()
        finally:
            store.close()
        assert len(set(addresses)) == 1 and re.fullmatch(r"[0-9a-f]{64}", addresses[0]), "a digest, not the address"


def test_forwarded_addresses_count_only_from_trusted_proxies(created_study, tmp_path):
    with serve(created_study.uri, f"sqlite:///{tmp_path}/proxied.db", tmp_path, "--open", "--per-address", "2",
               "--trusted-proxy", "127.0.0.0/8") as proxied:
        def start(forwarded: str) -> int:
            return Client(proxied.url).post("/api/session", {}, headers={"X-Forwarded-For": forwarded}).status

        assert [start("203.0.113.5"), start("203.0.113.5:51234"), start("203.0.113.5")] == [200, 200, 429]
        assert start("198.51.100.9, 203.0.113.5") == 429, "what the client wrote left of the proxy's entry is ignored"
        assert start("203.0.113.6") == 200
        assert start("203.0.113.7, 127.0.0.2") == 200, "trusted hops are skipped"
        assert start("203.0.113.7, 127.0.0.2") == 200 and start("203.0.113.7, 127.0.0.3") == 429
        assert [start("2001:db8:1:2::1"), start("[2001:db8:1:2::99]:443"), start("2001:db8:1:2:ffff::1")] == \
               [200, 200, 429], "IPv6 is counted per /64"
        assert start("2001:db8:1:3::1") == 200

        barrier, statuses = threading.Barrier(8), []

        def racer() -> None:
            barrier.wait()
            statuses.append(start("192.0.2.77"))

        threads = [threading.Thread(target=racer) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(statuses) == [200, 200] + [429] * 6, "concurrent starts cannot slip under the limit"


def test_every_response_says_no_store_no_transform(plain):
    client, stranger = invited(plain), Client(plain.url)
    trial = client.get("/api/trial").json()
    replies = [client.get(p) for p in ("/", "/trial", "/thanks", "/static/study.js", "/static/study.css", "/healthz",
                                       "/api/trial", "/nope", "/img/" + "a" * 32 + "/left")]
    images = fetch_images(client, trial)
    replies += list(images.values()) + [client.get(trial["images"]["left"])]  # 200 ×3, then 410
    replies += [_post_answer(client, trial["trial"]), client.post("/api/answer", {"x": 1}),
                client.post("/api/answer", raw=b"{}", headers={"Content-Type": "text/plain"}),
                client.request("PUT", "/api/answer", {}), stranger.get("/api/trial"), stranger.get("/trial"),
                stranger.post("/api/session", {}), stranger.get("/admin/export"),
                stranger.get("/admin/results", headers=plain.admin), stranger.get("/admin/export?format=csv", headers=plain.admin)]
    statuses = {r.status for r in replies}
    assert {200, 303, 401, 403, 404, 405, 409, 410, 415, 422} <= statuses, statuses
    assert all(r.headers.get("cache-control") == NO_STORE for r in replies), \
        [(r.status, r.headers.get("cache-control")) for r in replies if r.headers.get("cache-control") != NO_STORE]


def _cookie(server, headers: dict[str, str]) -> str:
    reply = Client(server.url).post("/api/session", {"invite": invites(server, 1)[0]}, headers=headers)
    assert reply.status == 200
    return reply.headers["set-cookie"]


def test_the_cookie_is_secure_with_the_flag_or_a_trusted_proxys_https(plain, created_study, tmp_path):
    https = {"X-Forwarded-Proto": "https"}
    assert "secure" not in _cookie(plain, https).lower(), "no trusted proxy: the header is ignored"
    assert "httponly" in _cookie(plain, {}).lower() and "samesite=strict" in _cookie(plain, {}).lower()
    with serve(created_study.uri, f"sqlite:///{tmp_path}/secure.db", tmp_path, "--secure") as secure:
        assert "; secure" in _cookie(secure, {}).lower()
    with serve(created_study.uri, f"sqlite:///{tmp_path}/proxied.db", tmp_path, "--trusted-proxy", "127.0.0.1") as proxied:
        assert "; secure" in _cookie(proxied, https).lower()
        assert "; secure" in _cookie(proxied, {"X-Forwarded-Proto": "http, https"}).lower(), "the proxy's value is the last"
        assert "secure" not in _cookie(proxied, {"X-Forwarded-Proto": "http"}).lower()
        assert "secure" not in _cookie(proxied, {}).lower()


def test_two_servers_starting_at_once_on_a_fresh_postgresql_database_make_one_schema(postgres, created_study, tmp_path):
    """The test holds the name `study_studies` in an open transaction, so both servers reach schema
    creation and wait there together; when it rolls back, they would race on the catalog's unique
    names: with neither the advisory lock nor the retry (the previous code) one server exits on a
    duplicate key. Both must come up, and then share one per-address limit."""
    import psycopg

    url = postgres.new_database()
    name = url.rsplit("/", 1)[1]
    blocker = psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname={name}")
    blocker.execute("CREATE TABLE study_studies (held integer)")  # uncommitted

    def line_up(started) -> None:
        deadline = time.monotonic() + 90
        with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname={name}", autocommit=True) as watch:
            while True:
                waiting = watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                        "wait_event_type = 'Lock' AND pid <> %s", (name, blocker.info.backend_pid)
                                        ).fetchone()[0]
                if waiting == 2:
                    break
                assert all(s.process.poll() is None for s in started), [s.log.read_text()[-2000:] for s in started]
                assert time.monotonic() < deadline, "the two servers never waited together"
                time.sleep(0.1)
        blocker.rollback()
        blocker.close()

    with servers(created_study.uri, url, tmp_path, 2, "--open", "--per-address", "3", "--trusted-proxy", "127.0.0.1",
                 started=line_up) as both:
        store = D.StudyDB(url, created_study.study())
        try:
            with store.engine.connect() as conn:
                tables = conn.execute(text("SELECT table_name FROM information_schema.tables WHERE "
                                           "table_schema = 'public' ORDER BY table_name")).scalars().all()
                rows = conn.execute(select(D.studies)).all()
        finally:
            store.close()
        assert tables == sorted(t.name for t in D.metadata.sorted_tables) and len(rows) == 1

        barrier, statuses = threading.Barrier(10), []

        def racer(k: int) -> None:  # one address, through both servers: one limit, held by the database
            barrier.wait()
            statuses.append(Client(both[k % 2].url).post("/api/session", {}, headers={"X-Forwarded-For": "192.0.2.8"}).status)

        threads = [threading.Thread(target=racer, args=(k,)) for k in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(statuses) == [200] * 3 + [429] * 7


def test_a_database_of_the_previous_version_gains_the_new_columns(created_study, tmp_path: Path):
    url = f"sqlite:///{tmp_path}/old.db"
    D.StudyDB(url, created_study.study()).close()
    engine = D.make_engine(url)
    with engine.begin() as conn:  # back to the previous version's schema
        conn.execute(text("DROP INDEX ix_study_raters_address"))
        for table, column in (("study_raters", "address"), ("study_trials", "voided_at"), ("study_trials", "void_reason")):
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(text("DROP TABLE study_served"))
    engine.dispose()
    store = D.StudyDB(url, created_study.study())
    try:
        outcome, token = store.start_session(open_sessions=True, address="a" * 64)
        rater = store.rater(token)
        trial = store.next_trial(rater["id"])
        for slot in store.slots:
            assert store.serve_image(rater["id"], trial["token"], slot)[0] == "serve"
        assert outcome == "started" and store.answer(rater["id"], trial["token"], "left", 100) == "stored"
        assert store.serve_image(rater["id"], store.next_trial(rater["id"])["token"], "lr")[0] == "serve"
        assert store.next_trial(rater["id"])["position"] == 2 and len(store.voided()) == 1
    finally:
        store.close()
