"""Real parts for the 2AFC study tests: a PostgreSQL server, headless Chromium, the study's web app
as a uvicorn subprocess, an HTTP rater client, and one study created for the whole session.

Fixtures (registered in conftest.py):
- `postgres` (session): Debian's PostgreSQL started by the test on a free 127.0.0.1 port under a
  fresh temp dir (as the `postgres` user when running as root), stopped and removed at the end;
  yields a `Postgres` whose `new_database()` gives a fresh `postgresql://…` URL.
- `chromium` (function): a Selenium 4 driver of Debian's headless Chromium (`/usr/bin/chromedriver`).
- `created_study` (session): `jobs/study.py create` on a local Ray with a registered tiny SR3
  model, the bicubic baseline and a tiny regression model directory (Task 1, 6 test + 2 catch
  images, 4 per rater, 60 planned slots, display 1 s).

`Oracle` tells the tests what a served image is: every response is the stored file's pixels with
a fresh ±1 jitter (pipelines.study.images), so bytes never match; the one stored file within one
level of the served pixels is it. `invited(server)` starts a rater session the default way, with
a one-time invite from the admin endpoint.

Missing system packages: these tests fail in CI (`CI` set) and wherever `make test` could have
installed them (root with apt-get: `make system-deps`); elsewhere they skip with a message naming
the packages — the only case where a skip is acceptable.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token-0123456789"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1400,900")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def require_system(ok: bool, what: str, packages: str) -> None:
    """Fail (CI, or root with apt-get) or skip (anyone else) when a system package is missing."""
    if ok:
        return
    can_install = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")
    if os.environ.get("CI") or can_install:
        pytest.fail(f"{what} is not installed; `make test` installs it (`make system-deps`: apt-get install -y "
                    f"{packages}) — this machine could have, so this is a failure, not a skip", pytrace=False)
    pytest.skip(f"{what} is not installed and this user cannot install it (not root with apt-get): "
                f"install Debian's {packages} to run this test")


# -- PostgreSQL -------------------------------------------------------------------------------
def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    port: int
    created: list[str] = field(default_factory=list)

    def new_database(self) -> str:
        import psycopg

        name = f"study_{len(self.created)}_{os.getpid()}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.created.append(name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    bindir = postgres_bin()
    require_system(bindir is not None, "PostgreSQL (initdb, pg_ctl)", "postgresql")
    root = Path(tempfile.mkdtemp(prefix="sr3-study-pg-"))  # under /tmp: reachable by the postgres user
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    data, log = root / "data", root / "pg.log"

    def run(*command: str) -> None:
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}{tail}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale",
            "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
        yield Postgres(port)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# -- Chromium ---------------------------------------------------------------------------------
@pytest.fixture()
def chromium() -> Iterator[Any]:
    binary = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    driver_path = shutil.which("chromedriver")
    require_system(bool(binary and driver_path), "Chromium and its driver (chromium, chromedriver)",
                   "chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# -- the app under a real server ---------------------------------------------------------------
@dataclass
class Server:
    url: str
    db: str
    process: subprocess.Popen
    log: Path

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def start_server(study: str, db: str, log_dir: Path, *extra: str) -> Server:
    """`jobs/study.py serve` in a subprocess on a free port, not yet waited for."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    env = {**os.environ, "SR3_STUDY_ADMIN_TOKEN": ADMIN_TOKEN}
    command = [sys.executable, str(REPO / "jobs" / "study.py"), "serve", "--study", study, "--db", db,
               "--host", "127.0.0.1", "--port", str(port), *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return Server(f"http://127.0.0.1:{port}", db, process, log)


def wait_healthy(server: Server, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"the study server exited: {server.log.read_text()[-3000:]}")
        try:
            if Client(server.url).get("/healthz").status == 200:
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the study server did not answer within {seconds:g} s: {server.log.read_text()[-3000:]}")
            time.sleep(0.1)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextmanager
def serve(study: str, db: str, log_dir: Path, *extra: str) -> Iterator[Server]:
    """`jobs/study.py serve` in a subprocess on a free port; stopped (SIGTERM) at the end."""
    with servers(study, db, log_dir, 1, *extra) as started:
        yield started[0]


@contextmanager
def servers(study: str, db: str, log_dir: Path, count: int, *extra: str,
            started: Callable[[list[Server]], None] | None = None) -> Iterator[list[Server]]:
    """`count` servers started at the same moment; `started(servers)` runs before they are waited
    for (a test can line them up at a lock there)."""
    running = [start_server(study, db, log_dir, *extra) for _ in range(count)]
    try:
        if started is not None:
            started(running)
        for server in running:
            wait_healthy(server)
        yield running
    finally:
        for server in running:
            stop_server(server)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One browser-like HTTP client: a kept-alive connection and its own cookies."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> Reply:
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        started = time.perf_counter()
        self.connection.request(method, path, body=data, headers=sent)
        response = self.connection.getresponse()
        content = response.read()
        seconds = time.perf_counter() - started
        for key, value in response.getheaders():
            if key.lower() == "set-cookie":
                name, _, rest = value.partition("=")
                self.cookies[name.strip()] = rest.split(";")[0]
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, content, seconds)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.request("POST", path, body, **kwargs)

    def close(self) -> None:
        self.connection.close()


def invites(server: Server, count: int) -> list[str]:
    made = Client(server.url).post("/admin/invites", {"count": count, "label": "test"}, headers=server.admin)
    assert made.status == 200, made.body
    return made.json()["invites"]


def invited(server: Server, code: str | None = None) -> Client:
    """A rater session started with a one-time invite (the default way in)."""
    client = Client(server.url)
    started = client.post("/api/session", {"invite": code or invites(server, 1)[0]})
    assert started.status == 200, started.body
    return client


def fetch_images(client: Client, trial: dict) -> dict[str, Reply]:
    """Every image of a trial, once each (as the page does)."""
    replies = {slot: client.get(url) for slot, url in trial["images"].items()}
    assert all(r.status == 200 for r in replies.values()), {s: r.status for s, r in replies.items()}
    return replies


# -- what a served image is ---------------------------------------------------------------------
class Identity(NamedTuple):
    name: str  # the stored file, images/<hex>.png
    role: str  # real | lr | model | degraded
    model: str | None
    image: int  # the source image's index in study.json


class Oracle:
    """The stored file whose pixels are within one level of a served image's (see the module doc)."""

    def __init__(self, uri: str) -> None:
        from pipelines import storage
        from pipelines.study.images import pixels
        from pipelines.study.plan import Study

        study, entries = Study.load(uri), []
        for i, image in enumerate(study.images):
            entries += [(image["real"], "real", None, i), (image["lr"], "lr", None, i)]
            entries += [(name, "model", m, i) for m, name in image["outputs"].items()]
            entries += [(image["degraded"], "degraded", None, i)] if image["degraded"] else []
        self.groups: dict[tuple, tuple[np.ndarray, list[Identity]]] = {}
        self.pixels: dict[str, np.ndarray] = {}  # stored file name → its (H, W, 3) uint8 pixels
        for entry in entries:
            self.pixels[entry[0]] = pixels(storage.read_bytes(storage.join(uri, entry[0])))
            rgb = self.pixels[entry[0]].astype(np.int16)
            stack, found = self.groups.setdefault(rgb.shape, (np.empty((0, *rgb.shape), np.int16), []))
            self.groups[rgb.shape] = (np.concatenate([stack, rgb[None]]), found + [Identity(*entry)])
        for stack, _ in self.groups.values():  # the oracle needs every pair of files to differ by > 2 levels
            flat = stack.reshape(len(stack), -1)
            for k in range(len(flat)):
                assert (np.abs(flat - flat[k]).max(axis=1) > 2).sum() == len(flat) - 1

    def identify(self, png: bytes) -> Identity:
        from pipelines.study.images import pixels

        rgb = pixels(png).astype(np.int16)
        stack, found = self.groups[rgb.shape]
        hits = np.flatnonzero(np.abs(stack - rgb).reshape(len(stack), -1).max(axis=1) <= 1)
        assert len(hits) == 1, f"{len(hits)} stored files within one level of a served image"
        return found[hits[0]]


# -- one created study for the session ----------------------------------------------------------
@dataclass
class CreatedStudy:
    uri: str
    pairs: str
    tracking_uri: str
    model_uri: str  # models:/tiny-study@champion
    regression: str  # the regression baseline's model directory
    oracle: Oracle

    def study(self):
        from pipelines.study.plan import Study

        return Study.load(self.uri)


@pytest.fixture(scope="session")
def created_study(ray_local, tmp_path_factory: pytest.TempPathFactory) -> CreatedStudy:
    from job_support import load_job
    from model_support import register_tiny, save_tiny
    from train_support import write_pairs

    root = tmp_path_factory.mktemp("study")
    tracking = f"sqlite:///{root}/mlflow.db"
    model_uri, _ = register_tiny(save_tiny(root / "sr3"), tracking, "tiny-study")
    regression = str(save_tiny(root / "regression", "regression", 1))
    pairs = write_pairs(root / "pairs", n_train=1, n_val=8)
    uri = str(root / "study")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    try:
        code = load_job("study").main([
            "create", "--model", model_uri, "--baseline", "bicubic", "--baseline", regression, "--pairs", pairs,
            "--study", uri, "--task", "1", "--images", "6", "--per-rater", "4", "--catch", "2", "--raters", "60",
            "--display-seconds", "1", "--steps", "2", "--batch-size", "8"])
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    assert code == 0
    return CreatedStudy(uri, pairs, tracking, model_uri, regression, Oracle(uri))
