"""The raters' web app (FastAPI, served by uvicorn): pages, a small JSON API, the image route, admin.

| route                        | who     | what                                                                |
| ---------------------------- | ------- | ------------------------------------------------------------------- |
| `GET /`                      | anyone  | instructions (task, question, display time, keys); Start            |
| `POST /api/session`          | anyone  | {"invite": code} (or {} with --open) → a session cookie (HttpOnly, SameSite=Strict, Secure: access.py) |
| `GET /trial`                 | rater   | the trial page (templates/trial.html + static/study.js)             |
| `GET /api/trial`             | rater   | the current trial: opaque token, its 2 (Task 1: 3) image URLs, progress, display time |
| `GET /img/{token}/{slot}`    | rater   | slot left / right / lr of the session's current trial, sent once     |
| `POST /api/answer`           | rater   | {"trial", "choice": left/right, "rt_ms"} → stored once              |
| `GET /thanks`                | rater   | thank-you page with the session's completion code                   |
| `GET /healthz`               | anyone  | {"ok": true}                                                        |
| `POST /admin/invites`        | admin   | {"count", "label"?} → one-time invite codes (needed unless --open)  |
| `GET /admin/export`          | admin   | every counted answer with its trial, and the void trials (`?format=csv`: answers) |
| `GET /admin/results`         | admin   | fool rates, intervals, exclusions (pipelines.study.stats)            |

What the browser gets never tells the real image apart: the trial JSON names only the trial token
and `/img/<token>/left|right|lr`; image pixels come from memory (decoded at start) through one code
path that jitters and encodes them afresh for every response (pipelines.study.images: no two
served files are alike, every image of a size has the same byte length), with the same headers
(no ETag, Last-Modified or file name). Every response says `Cache-Control: no-store,
no-transform`: nothing keeps a copy, and no proxy may recompress an image (which would make sizes
differ). The image route maps (token, slot) to a name from study.json — a request can name no
file — and sends each (trial, slot) once (pipelines.study.db: a second request gets 410 and voids
the trial). Who may start a session and how a request's address and scheme are read behind a
proxy: pipelines.study.access. Admin endpoints need `Authorization: Bearer <admin token>`.
Malformed requests get 4xx before anything is written: 401 no session, 403 refused (no or a used
invite), 404 not this session's current trial, 409 answer refused (replayed, void trial, images
not sent yet), 410 image sent already, 415 not JSON, 422 invalid fields, 429 too many sessions
from one address.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import html
import io
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from pipelines import storage
from pipelines.study import images as I
from pipelines.study.access import Access, address_digest
from pipelines.study.db import StudyDB
from pipelines.study.plan import Study
from pipelines.study.stats import fool_rates

HERE = Path(__file__).resolve().parent
TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
CACHE_CONTROL = "no-store, no-transform"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'",
}
KEYS = "← or F for the left image, → or J for the right image"


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trial: str = Field(min_length=20, max_length=64, pattern=TOKEN.pattern)
    choice: Literal["left", "right"]
    rt_ms: int = Field(ge=0, le=3_600_000, strict=True)


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invite: str | None = Field(default=None, max_length=64, pattern=TOKEN.pattern)


class InvitesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=1, le=10_000, strict=True)
    label: str | None = Field(default=None, max_length=200)


def load_images(study: Study) -> dict[str, np.ndarray]:
    """Every image of the study, by name, read and decoded once (threads: object stores answer in
    parallel)."""
    names = sorted(study.all_names())
    with ThreadPoolExecutor(16) as pool:
        data = list(pool.map(lambda n: I.pixels(storage.read_bytes(storage.join(study.uri, n))), names))
    return dict(zip(names, data))


def _page(name: str, **values: Any) -> HTMLResponse:
    text = Template((HERE / "templates" / name).read_text(encoding="utf-8"))
    return HTMLResponse(text.substitute({k: html.escape(str(v)) for k, v in values.items()}))


def _json_body(request: Request) -> None:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send application/json")


def create_app(study_uri: str, db_url: str, admin_token: str, access: Access = Access()) -> FastAPI:
    """The app for one study (images loaded, tables created)."""
    if len(admin_token) < 16:
        raise ValueError("the admin token must have at least 16 characters")
    study = Study.load(study_uri)
    db = StudyDB(db_url, study)
    images = load_images(study)
    cookie = f"sr3study_{study.id}"
    admin_digest = hashlib.sha256(admin_token.encode()).digest()
    slots = db.slots
    hr_side = int(study.doc["hr_shape"][1])
    shown_px = min(512, max(256, hr_side))

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db, app.state.study = db, study
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        response.headers["Cache-Control"] = CACHE_CONTROL  # every page, image, API answer and error
        return response

    def rater(request: Request) -> dict[str, Any]:
        token = request.cookies.get(cookie)
        found = db.rater(token) if token and TOKEN.match(token) else None
        if found is None:
            raise HTTPException(401, "no study session: start from the instructions page")
        return found

    def admin(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                hashlib.sha256(given.strip().encode()).digest(), admin_digest):
            raise HTTPException(401, "admin token required", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    def instructions() -> HTMLResponse:
        lr_text = "the low-resolution input in the middle and " if study.task == 1 else ""
        return _page("instructions.html", question=study.question, trials=study.trials_per_rater,
                     seconds=f"{study.display_seconds:g} second{'' if study.display_seconds == 1 else 's'}",
                     lr_text=lr_text, keys=KEYS, open=int(access.open))

    @app.post("/api/session", dependencies=[Depends(_json_body)])
    def start(body: SessionIn, request: Request) -> JSONResponse:
        try:
            who = rater(request)
        except HTTPException:
            who = None
        if who is not None and who["finished_at"] is None:  # Start pressed again: the same session
            return JSONResponse({"ok": True, "resumed": True})
        peer = request.client.host if request.client else None
        address = access.client_address(peer, request.headers.getlist("x-forwarded-for"))
        outcome, value = db.start_session(body.invite, open_sessions=access.open,
                                          address=address_digest(study.id, address),
                                          per_address=access.per_address, window_s=access.window_s)
        if outcome == "invite":
            raise HTTPException(403, "this invitation is not valid or was used already" if body.invite
                                else "this study is by invitation: open the link you were sent")
        if outcome == "limit":
            raise HTTPException(429, "too many sessions were started from your network; please try again later",
                                headers={"Retry-After": str(int(value + 1))})
        response = JSONResponse({"ok": True})
        secure = access.cookie_secure(request.url.scheme, peer, request.headers.getlist("x-forwarded-proto"))
        response.set_cookie(cookie, value, httponly=True, samesite="strict", path="/", secure=secure,
                            max_age=7 * 24 * 3600)
        return response

    @app.get("/trial", response_class=HTMLResponse)
    def trial_page(request: Request) -> Response:
        try:
            rater(request)
        except HTTPException:
            return RedirectResponse("/", status_code=303)
        return _page("trial.html", question=study.question, display_ms=int(study.display_seconds * 1000),
                     size=shown_px, task=study.task, keys=KEYS)

    @app.get("/api/trial")
    def next_trial(who: dict = Depends(rater)) -> dict[str, Any]:
        row = db.next_trial(who["id"])
        done, total = db.progress(who["id"])
        if row is None:
            return {"done": True, "answered": done, "total": total}
        token = row["token"]
        return {"done": False, "trial": token, "position": done + 1, "total": total,
                "display_ms": int(study.display_seconds * 1000),
                "images": {slot: f"/img/{token}/{slot}" for slot in slots}}

    @app.get("/img/{token}/{slot}")
    def image(token: str, slot: str, who: dict = Depends(rater)) -> Response:
        outcome, row = db.serve_image(who["id"], token, slot) if TOKEN.match(token) and slot in slots else ("unknown", None)
        if outcome == "refetched":
            raise HTTPException(410, "each image of a trial is sent once; this trial is void, go on to the next")
        if row is None:
            raise HTTPException(404, "not an image of your current trial")
        name = study.files({"image": row["image"], "model": row["model"], "real": row["real_side"]})[slot]
        return Response(I.served_png(images[name]), media_type="image/png")

    @app.post("/api/answer", dependencies=[Depends(_json_body)])
    def answer(body: AnswerIn, who: dict = Depends(rater)) -> dict[str, Any]:
        status = db.answer(who["id"], body.trial, body.choice, body.rt_ms)
        if status == "unknown":
            raise HTTPException(404, "not a trial issued to this session")
        if status != "stored":
            raise HTTPException(409, {"replayed": "this trial was answered already",
                                      "void": "this trial is void (its images were asked for twice)",
                                      "unseen": "the images of this trial were not sent yet"}[status])
        done, total = db.progress(who["id"])
        return {"stored": True, "done": done == total}

    @app.get("/thanks", response_class=HTMLResponse)
    def thanks(request: Request) -> Response:
        try:
            who = rater(request)
        except HTTPException:
            return RedirectResponse("/", status_code=303)
        if who["finished_at"] is None:
            return RedirectResponse("/trial", status_code=303)
        return _page("thanks.html", code=who["completion_code"])

    @app.get("/healthz")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/admin/invites", dependencies=[Depends(admin), Depends(_json_body)])
    def make_invites(body: InvitesIn) -> dict[str, Any]:
        codes = db.create_invites(body.count, body.label)
        return {"invites": codes, "links": [f"/?invite={code}" for code in codes]}

    @app.get("/admin/export", dependencies=[Depends(admin)])
    def export(format: Literal["json", "csv"] = "json") -> Response:
        rows = [{**row, "key": study.images[row["image"]]["key"],
                 "model_label": study.models[row["model"]]["label"] if row["model"] else "catch"}
                for row in db.export()]
        if format == "json":
            return JSONResponse({"study_id": study.id, "task": study.task, "answers": rows, "void": db.voided()})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["rater"])
        writer.writeheader()
        writer.writerows(rows)
        return Response(buffer.getvalue(), media_type="text/csv")

    @app.get("/admin/results", dependencies=[Depends(admin)])
    def results(max_catch_misses: int = Query(0, ge=0, le=1000)) -> dict[str, Any]:
        return {"study_id": study.id, "task": study.task, **db.counts(),
                **fool_rates(db.export(), study.models, max_catch_misses=max_catch_misses)}

    return app


def serve(study_uri: str, db_url: str, host: str = "127.0.0.1", port: int = 8000, *, admin_token: str,
          access: Access = Access(), log_level: str = "warning") -> None:
    """Run the app under uvicorn (one process; the database is the shared state). uvicorn's
    proxy-header rewriting is off: forwarded headers count only as `access` says."""
    import uvicorn

    app = create_app(study_uri, db_url, admin_token, access)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, server_header=False,
                proxy_headers=False)


ADMIN_ENV = "SR3_STUDY_ADMIN_TOKEN"


@dataclass(frozen=True)
class ServeOptions:
    """What `jobs/study.py serve` lets a user choose (field names are its flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None  # default: $SR3_STUDY_ADMIN_TOKEN, else a new one, printed
    open: bool = False  # anyone may start a session (else invite-only)
    per_address: int = 3  # open sessions per client address per window
    per_address_hours: float = 24.0
    trusted_proxy: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For/-Proto are believed
    secure: bool = False  # always mark the session cookie Secure

    @property
    def access(self) -> Access:
        return Access(open=self.open, per_address=self.per_address, window_s=self.per_address_hours * 3600,
                      trusted_proxies=tuple(self.trusted_proxy), secure=self.secure)


def serve_study(study_uri: str, db_url: str, options: ServeOptions | None = None, *,
                say: Callable[[str], None] = print) -> None:
    """`serve` with the admin token chosen (flag, else $SR3_STUDY_ADMIN_TOKEN, else a new one, said)
    and what is served said first (the database URL without its password)."""
    import secrets

    from sqlalchemy.engine import make_url

    o = options or ServeOptions()
    access = o.access  # a bad proxy or limit fails here, before anything is served
    token = o.admin_token or os.environ.get(ADMIN_ENV)
    if not token:
        token = secrets.token_urlsafe(24)
        say(f"admin token (set {ADMIN_ENV} to choose one): {token}")
    shown = make_url(db_url).render_as_string(hide_password=True)
    say(f"serving {study_uri} on http://{o.host}:{o.port}/ (answers: {shown}; "
        + (f"open sessions, at most {access.per_address} per address in {o.per_address_hours:g} h"
           if access.open else "invite-only: POST /admin/invites") + ")")
    serve(study_uri, db_url, o.host, o.port, admin_token=token, access=access)
