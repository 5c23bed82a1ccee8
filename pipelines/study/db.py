"""The answers' database, through SQLAlchemy Core: SQLite by default, any SQLAlchemy URL for a team.

Tables (created when missing; one database can hold many studies, keyed by `study_id`):

- `study_studies`: one row per study served: study_id (pk), next_slot, created_at;
- `study_invites`: one-time invite codes: id, study_id, code_hash (unique), label, created_at, used_at;
- `study_raters`: one row per rater session: id, study_id, slot (unique per study), token_hash
  (unique), invite_id, address (SHA-256 of study id + client address, pipelines.study.access),
  completion_code, started_at, finished_at;
- `study_trials`: the trials of a session: id, token (unique), rater_id, position (unique per
  rater), image, model (null: a catch trial), real_side, issued_at, shown (times issued),
  voided_at, void_reason ("reissued" | "refetched");
- `study_served`: one row per image sent, (trial_id, slot) its primary key: served_at;
- `study_answers`: one row per answer, trial_id its primary key: choice, picked (real / model /
  degraded), rt_ms (client: prompt to answer), server_ms (server: issued to answered), answered_at.

Integrity: a session's trials are all written when it starts (its plan slot, taken with an atomic
`UPDATE … RETURNING`); only the lowest open (unanswered, not void) trial is ever issued; an answer
must name an issued trial of the answering session whose images were all sent, and the primary key
on `trial_id` stores each answer exactly once (a replay or a concurrent duplicate is refused by the
database itself).

Each image of a trial is sent once: the primary key on (trial_id, slot) lets one request insert
its row, and only that request gets the bytes. A second request for the slot is refused and makes
the trial void; so does asking for the trial again (`next_trial`) after any of its images was sent
(a reloaded page). A void trial takes no answer and is never counted; the next trial is issued.
Refusing rather than recording: the paper shows the images for 3 s, and a second copy of the
bytes is a second look for as long as the requester likes — the answer would have to go anyway, and
refusing keeps the look from happening at all. Voiding rather than blocking: an honest rater whose
page reloads (or whose browser drops a response) goes on to the next trial, losing one.

Session tokens and invite codes are stored as SHA-256 digests only. Times are Unix seconds (floats).

Schema: `create_schema` creates missing tables and adds missing (nullable) columns and indexes of
tables an older version made, inside one transaction that, on PostgreSQL, first takes a
transaction-level advisory lock: servers starting at once on one database create the schema one
after the other (the second finds it made) instead of racing on the catalog's unique names. Where
there is no such lock (SQLite, other databases) a transaction that loses the race fails, and is
retried (up to 5 times), when it finds the winner's tables; on PostgreSQL either guard alone holds.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from typing import Any

from sqlalchemy import (Column, Float, ForeignKey, Index, Integer, MetaData, PrimaryKeyConstraint, String, Table,
                        UniqueConstraint, and_, create_engine, event, exists, func, inspect, insert, select, text,
                        update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from pipelines.study.plan import Study

metadata = MetaData()
studies = Table("study_studies", metadata,
                Column("study_id", String(64), primary_key=True),
                Column("next_slot", Integer, nullable=False, default=0),
                Column("created_at", Float, nullable=False))
invites = Table("study_invites", metadata,
                Column("id", Integer, primary_key=True, autoincrement=True),
                Column("study_id", String(64), ForeignKey("study_studies.study_id"), nullable=False),
                Column("code_hash", String(64), nullable=False, unique=True),
                Column("label", String(200)),
                Column("created_at", Float, nullable=False),
                Column("used_at", Float))
raters = Table("study_raters", metadata,
               Column("id", Integer, primary_key=True, autoincrement=True),
               Column("study_id", String(64), ForeignKey("study_studies.study_id"), nullable=False, index=True),
               Column("slot", Integer, nullable=False),
               Column("token_hash", String(64), nullable=False, unique=True),
               Column("invite_id", Integer, ForeignKey("study_invites.id"), unique=True),
               Column("completion_code", String(16), nullable=False),
               Column("started_at", Float, nullable=False),
               Column("finished_at", Float),
               Column("address", String(64)),
               UniqueConstraint("study_id", "slot"),
               Index("ix_study_raters_address", "study_id", "address", "started_at"))
trials = Table("study_trials", metadata,
               Column("id", Integer, primary_key=True, autoincrement=True),
               Column("token", String(64), nullable=False, unique=True),
               Column("rater_id", Integer, ForeignKey("study_raters.id"), nullable=False, index=True),
               Column("position", Integer, nullable=False),
               Column("image", Integer, nullable=False),
               Column("model", String(16)),  # null: a catch trial
               Column("real_side", String(5), nullable=False),
               Column("issued_at", Float),
               Column("shown", Integer, nullable=False, default=0),
               Column("voided_at", Float),
               Column("void_reason", String(16)),
               UniqueConstraint("rater_id", "position"))
served = Table("study_served", metadata,
               Column("trial_id", Integer, ForeignKey("study_trials.id"), nullable=False),
               Column("slot", String(5), nullable=False),
               Column("served_at", Float, nullable=False),
               PrimaryKeyConstraint("trial_id", "slot"))
answers = Table("study_answers", metadata,
                Column("trial_id", Integer, ForeignKey("study_trials.id"), primary_key=True),
                Column("choice", String(5), nullable=False),
                Column("picked", String(8), nullable=False),
                Column("rt_ms", Integer, nullable=False),
                Column("server_ms", Integer, nullable=False),
                Column("answered_at", Float, nullable=False))


SCHEMA_LOCK = 0x5352335F53545544  # "SR3_STUD": the advisory lock key schema creation takes on PostgreSQL


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 (the pinned driver); a relative SQLite path becomes absolute."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + os.path.abspath(url[len(prefix):])
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                               pool_size=8, max_overflow=32)

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record) -> None:  # WAL: readers never wait for the writer
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
        return engine
    return create_engine(url, pool_size=10, max_overflow=30, pool_pre_ping=True)


def create_schema(engine: Engine, study_id: str) -> None:
    """Tables, missing columns and the study's row, safe when several servers start at once."""
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
                metadata.create_all(conn)
                _add_missing_columns(conn)
                if conn.execute(select(studies.c.study_id).where(studies.c.study_id == study_id)).first() is None:
                    conn.execute(insert(studies).values(study_id=study_id, next_slot=0, created_at=time.time()))
            return
        except DBAPIError:
            # Without a lock (SQLite, other databases) a concurrent creator can win a CREATE TABLE
            # or the study's row: look again, and find what it made.
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def _add_missing_columns(conn: Connection) -> None:
    """Columns (all nullable) and indexes this version added to tables an older version created."""
    inspector = inspect(conn)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                if not column.nullable:
                    raise ValueError(f"{table.name}.{column.name}: a new column must be nullable to be added")
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)


class _Refused(Exception):
    def __init__(self, retry_s: float) -> None:
        super().__init__(retry_s)
        self.retry_s = retry_s


def _open():
    """A trial neither answered nor void."""
    return and_(trials.c.voided_at.is_(None), ~exists().where(answers.c.trial_id == trials.c.id))


def _void(conn: Connection, trial_id: int, reason: str, now: float) -> None:
    conn.execute(update(trials).where(and_(trials.c.id == trial_id, trials.c.voided_at.is_(None)))
                 .values(voided_at=now, void_reason=reason))


def _finish_if_done(conn: Connection, rater_id: int, now: float) -> None:
    """Mark the session finished once no trial is open."""
    if conn.execute(select(trials.c.id).where(and_(trials.c.rater_id == rater_id, _open())).limit(1)).first() is None:
        conn.execute(update(raters).where(and_(raters.c.id == rater_id, raters.c.finished_at.is_(None)))
                     .values(finished_at=now))


class StudyDB:
    """One study's view of the database: sessions, trials, answers, invites, export."""

    def __init__(self, url: str, study: Study) -> None:
        self.engine = make_engine(url)
        self.study = study
        self.slots = ("left", "lr", "right") if study.task == 1 else ("left", "right")
        create_schema(self.engine, study.id)

    def close(self) -> None:
        self.engine.dispose()

    # -- raters -------------------------------------------------------------------------------
    def start_session(self, invite: str | None = None, *, open_sessions: bool = False, address: str | None = None,
                      per_address: int = 3, window_s: float = 86400.0) -> tuple[str, str | float | None]:
        """A new rater session (its trials written). Returns ("started", token); ("invite", None)
        when an invite is needed or is not valid; ("limit", seconds until the address may start
        again) when an open session would exceed `per_address` starts in `window_s` seconds.
        An invite is always honoured and never counted; `address` is the digest to count."""
        token, now = secrets.token_urlsafe(32), time.time()
        try:
            with self.engine.begin() as conn:
                invite_id = None
                if invite:
                    invite_id = conn.execute(
                        update(invites).where(and_(invites.c.study_id == self.study.id,
                                                   invites.c.code_hash == digest(invite), invites.c.used_at.is_(None)))
                        .values(used_at=now).returning(invites.c.id)).scalar()
                    if invite_id is None:
                        return "invite", None
                elif not open_sessions:
                    return "invite", None
                # Taking the slot locks the study's row until commit: concurrent starts queue here,
                # so the count below sees every session started before this one.
                slot = conn.execute(update(studies).where(studies.c.study_id == self.study.id)
                                    .values(next_slot=studies.c.next_slot + 1)
                                    .returning(studies.c.next_slot)).scalar_one() - 1
                if invite_id is None:
                    recent = conn.execute(select(raters.c.started_at).where(and_(
                        raters.c.study_id == self.study.id, raters.c.address == address, raters.c.invite_id.is_(None),
                        raters.c.started_at > now - window_s)).order_by(raters.c.started_at)).scalars().all()
                    if len(recent) >= per_address:
                        raise _Refused(recent[-per_address] + window_s - now)
                rater_id = conn.execute(insert(raters).values(
                    study_id=self.study.id, slot=slot, token_hash=digest(token), invite_id=invite_id, address=address,
                    completion_code=secrets.token_hex(5).upper(), started_at=now).returning(raters.c.id)).scalar_one()
                conn.execute(insert(trials), [
                    {"token": secrets.token_urlsafe(24), "rater_id": rater_id, "position": k, "image": t["image"],
                     "model": t["model"], "real_side": t["real"], "shown": 0}
                    for k, t in enumerate(self.study.slot_plan(slot))])
        except _Refused as refused:  # rolled back: the slot is not used
            return "limit", max(1.0, refused.retry_s)
        return "started", token

    def rater(self, token: str | None) -> dict[str, Any] | None:
        if not token:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(raters).where(and_(raters.c.token_hash == digest(token),
                                                         raters.c.study_id == self.study.id))).mappings().first()
        return dict(row) if row else None

    def progress(self, rater_id: int) -> tuple[int, int]:
        """(done, total) trials of a session: done = answered or void."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(trials.c.voided_at, answers.c.trial_id).select_from(
                trials.outerjoin(answers, answers.c.trial_id == trials.c.id)).where(trials.c.rater_id == rater_id)).all()
        return sum(1 for voided, answered in rows if answered is not None or voided is not None), len(rows)

    # -- trials -------------------------------------------------------------------------------
    def next_trial(self, rater_id: int) -> dict[str, Any] | None:
        """The session's lowest open trial, marked issued; None when every trial is done. An open
        trial any of whose images was sent already is made void first ("reissued": the page asked
        again, e.g. a reload), and the next one is issued."""
        now = time.time()
        with self.engine.begin() as conn:
            while True:
                row = conn.execute(select(trials).where(and_(trials.c.rater_id == rater_id, _open()))
                                   .order_by(trials.c.position).limit(1)).mappings().first()
                if row is None:
                    _finish_if_done(conn, rater_id, now)
                    return None
                if conn.execute(select(served.c.slot).where(served.c.trial_id == row["id"])).first() is None:
                    break
                _void(conn, row["id"], "reissued", now)
            issued = conn.execute(update(trials).where(trials.c.id == row["id"])
                                  .values(issued_at=func.coalesce(trials.c.issued_at, now), shown=trials.c.shown + 1)
                                  .returning(trials.c.issued_at)).scalar_one()
        return {**row, "issued_at": issued}

    def serve_image(self, rater_id: int, token: str, slot: str) -> tuple[str, dict[str, Any] | None]:
        """Claim (trial, slot) for one response: ("serve", trial) the first time; ("refetched", None)
        after, which voids the trial; ("unknown", None) if `token` is not this session's issued,
        open trial."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                row = conn.execute(select(trials).where(and_(
                    trials.c.token == token, trials.c.rater_id == rater_id, trials.c.issued_at.is_not(None),
                    _open()))).mappings().first()
                if row is None:
                    return "unknown", None
                conn.execute(insert(served).values(trial_id=row["id"], slot=slot, served_at=now))
            return "serve", dict(row)
        except IntegrityError:  # the slot was sent already: the primary key refused this copy
            with self.engine.begin() as conn:
                _void(conn, row["id"], "refetched", now)
                _finish_if_done(conn, rater_id, now)
            return "refetched", None

    def answer(self, rater_id: int, token: str, choice: str, rt_ms: int) -> str:
        """Store one answer: "stored"; "unknown" (not an issued trial of this session); "replayed"
        (answered already); "void" (the trial was made void); "unseen" (not all its images sent)."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                row = conn.execute(select(trials).where(and_(
                    trials.c.token == token, trials.c.rater_id == rater_id,
                    trials.c.issued_at.is_not(None)))).mappings().first()
                if row is None:
                    return "unknown"
                if row["voided_at"] is not None:
                    return "void"
                sent = conn.execute(select(func.count()).select_from(served).where(served.c.trial_id == row["id"])).scalar()
                if sent < len(self.slots):
                    if conn.execute(select(answers.c.trial_id).where(answers.c.trial_id == row["id"])).first():
                        return "replayed"
                    return "unseen"
                if row["real_side"] == choice:
                    picked = "real"
                else:
                    picked = "degraded" if row["model"] is None else "model"
                conn.execute(insert(answers).values(
                    trial_id=row["id"], choice=choice, picked=picked, rt_ms=rt_ms,
                    server_ms=int(round((now - row["issued_at"]) * 1000)), answered_at=now))
                _finish_if_done(conn, rater_id, now)
        except IntegrityError:
            return "replayed"
        return "stored"

    # -- admin --------------------------------------------------------------------------------
    def create_invites(self, count: int, label: str | None = None) -> list[str]:
        codes = [secrets.token_urlsafe(18) for _ in range(count)]  # 24 characters
        with self.engine.begin() as conn:
            conn.execute(insert(invites), [{"study_id": self.study.id, "code_hash": digest(c), "label": label,
                                            "created_at": time.time()} for c in codes])
        return codes

    def export(self) -> list[dict[str, Any]]:
        """Every counted answer of this study with its trial and rater (what `results` and
        /admin/export read): answers of void trials are left out (see `voided`)."""
        query = (select(raters.c.id.label("rater"), raters.c.slot, raters.c.finished_at, trials.c.token, trials.c.position,
                        trials.c.image, trials.c.model, trials.c.real_side, trials.c.shown, answers.c.choice,
                        answers.c.picked, answers.c.rt_ms, answers.c.server_ms, answers.c.answered_at)
                 .select_from(answers.join(trials, answers.c.trial_id == trials.c.id)
                              .join(raters, trials.c.rater_id == raters.c.id))
                 .where(and_(raters.c.study_id == self.study.id, trials.c.voided_at.is_(None)))
                 .order_by(raters.c.id, trials.c.position))
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def voided(self) -> list[dict[str, Any]]:
        """Every void trial of this study: rater, slot, token, position, image, model, reason, when."""
        query = (select(raters.c.id.label("rater"), raters.c.slot, trials.c.token, trials.c.position, trials.c.image,
                        trials.c.model, trials.c.void_reason.label("reason"), trials.c.voided_at)
                 .select_from(trials.join(raters, trials.c.rater_id == raters.c.id))
                 .where(and_(raters.c.study_id == self.study.id, trials.c.voided_at.is_not(None)))
                 .order_by(raters.c.id, trials.c.position))
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            started = conn.execute(select(raters.c.id).where(raters.c.study_id == self.study.id)).all()
            finished = conn.execute(select(raters.c.id).where(and_(raters.c.study_id == self.study.id,
                                                                   raters.c.finished_at.is_not(None)))).all()
        return {"sessions": len(started), "finished": len(finished), "answers": len(self.export()),
                "void": len(self.voided())}
