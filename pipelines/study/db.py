"""The answers' database, through SQLAlchemy Core: SQLite by default, any SQLAlchemy URL for a team.

Tables (created when missing; one database can hold many studies, keyed by `study_id`):

- `study_studies`: one row per study served: study_id (pk), next_slot, created_at;
- `study_invites`: one-time invite codes: id, study_id, code_hash (unique), label, created_at, used_at;
- `study_raters`: one row per rater session: id, study_id, slot (unique per study), token_hash
  (unique), invite_id, completion_code, started_at, finished_at;
- `study_trials`: the trials of a session: id, token (unique), rater_id, position (unique per
  rater), image, model (null: a catch trial), real_side, issued_at, shown (times issued);
- `study_answers`: one row per answer, trial_id its primary key: choice, picked (real / model /
  degraded), rt_ms (client: prompt to answer), server_ms (server: issued to answered), answered_at.

Integrity: a session's trials are all written when it starts (its plan slot, taken with an atomic
`UPDATE … RETURNING`); only the lowest unanswered trial is ever issued; an answer must name an issued
trial of the answering session, and the primary key on `trial_id` stores each answer exactly once
(a replay or a concurrent duplicate is refused by the database itself). Session tokens and invite
codes are stored as SHA-256 digests only. Times are Unix seconds (floats).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from typing import Any

from sqlalchemy import (Column, Float, ForeignKey, Integer, MetaData, String, Table, UniqueConstraint, and_,
                        create_engine, event, exists, func, insert, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

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
               UniqueConstraint("study_id", "slot"))
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
               UniqueConstraint("rater_id", "position"))
answers = Table("study_answers", metadata,
                Column("trial_id", Integer, ForeignKey("study_trials.id"), primary_key=True),
                Column("choice", String(5), nullable=False),
                Column("picked", String(8), nullable=False),
                Column("rt_ms", Integer, nullable=False),
                Column("server_ms", Integer, nullable=False),
                Column("answered_at", Float, nullable=False))


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


class StudyDB:
    """One study's view of the database: sessions, trials, answers, invites, export."""

    def __init__(self, url: str, study: Study) -> None:
        self.engine = make_engine(url)
        self.study = study
        metadata.create_all(self.engine)
        try:
            with self.engine.begin() as conn:
                if conn.execute(select(studies.c.study_id).where(studies.c.study_id == study.id)).first() is None:
                    conn.execute(insert(studies).values(study_id=study.id, next_slot=0, created_at=time.time()))
        except IntegrityError:
            pass  # another server process registered it first

    def close(self) -> None:
        self.engine.dispose()

    # -- raters -------------------------------------------------------------------------------
    def start_session(self, invite: str | None = None, invite_only: bool = False) -> str | None:
        """A new rater session (its trials written); returns its secret token, None if refused."""
        token, now = secrets.token_urlsafe(32), time.time()
        with self.engine.begin() as conn:
            invite_id = None
            if invite_only or invite:
                if not invite:
                    return None
                invite_id = conn.execute(
                    update(invites).where(and_(invites.c.study_id == self.study.id, invites.c.code_hash == digest(invite),
                                               invites.c.used_at.is_(None)))
                    .values(used_at=now).returning(invites.c.id)).scalar()
                if invite_id is None:
                    return None
            slot = conn.execute(update(studies).where(studies.c.study_id == self.study.id)
                                .values(next_slot=studies.c.next_slot + 1).returning(studies.c.next_slot)).scalar_one() - 1
            rater_id = conn.execute(insert(raters).values(
                study_id=self.study.id, slot=slot, token_hash=digest(token), invite_id=invite_id,
                completion_code=secrets.token_hex(5).upper(), started_at=now).returning(raters.c.id)).scalar_one()
            conn.execute(insert(trials), [
                {"token": secrets.token_urlsafe(24), "rater_id": rater_id, "position": k, "image": t["image"],
                 "model": t["model"], "real_side": t["real"], "shown": 0}
                for k, t in enumerate(self.study.slot_plan(slot))])
        return token

    def rater(self, token: str | None) -> dict[str, Any] | None:
        if not token:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(raters).where(and_(raters.c.token_hash == digest(token),
                                                         raters.c.study_id == self.study.id))).mappings().first()
        return dict(row) if row else None

    def progress(self, rater_id: int) -> tuple[int, int]:
        """(answered, total) trials of a session."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(trials.c.id, answers.c.trial_id).select_from(
                trials.outerjoin(answers, answers.c.trial_id == trials.c.id)).where(trials.c.rater_id == rater_id)).all()
        return sum(1 for _, answered in rows if answered is not None), len(rows)

    # -- trials -------------------------------------------------------------------------------
    def next_trial(self, rater_id: int) -> dict[str, Any] | None:
        """The session's lowest unanswered trial, marked issued; None when every trial is answered."""
        unanswered = ~exists().where(answers.c.trial_id == trials.c.id)
        with self.engine.begin() as conn:
            row = conn.execute(select(trials).where(and_(trials.c.rater_id == rater_id, unanswered))
                               .order_by(trials.c.position).limit(1)).mappings().first()
            if row is None:
                return None
            issued = conn.execute(update(trials).where(trials.c.id == row["id"])
                                  .values(issued_at=func.coalesce(trials.c.issued_at, time.time()),
                                          shown=trials.c.shown + 1)
                                  .returning(trials.c.issued_at)).scalar_one()
        return {**row, "issued_at": issued}

    def current_trial(self, rater_id: int, token: str) -> dict[str, Any] | None:
        """The trial named `token` if it is issued to this session and not answered, else None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(trials).where(and_(
                trials.c.token == token, trials.c.rater_id == rater_id, trials.c.issued_at.is_not(None),
                ~exists().where(answers.c.trial_id == trials.c.id)))).mappings().first()
        return dict(row) if row else None

    def answer(self, rater_id: int, token: str, choice: str, rt_ms: int) -> str:
        """Store one answer: "stored", "unknown" (not an issued trial of this session) or "replayed"."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                row = conn.execute(select(trials).where(and_(
                    trials.c.token == token, trials.c.rater_id == rater_id,
                    trials.c.issued_at.is_not(None)))).mappings().first()
                if row is None:
                    return "unknown"
                if row["real_side"] == choice:
                    picked = "real"
                else:
                    picked = "degraded" if row["model"] is None else "model"
                conn.execute(insert(answers).values(
                    trial_id=row["id"], choice=choice, picked=picked, rt_ms=rt_ms,
                    server_ms=int(round((now - row["issued_at"]) * 1000)), answered_at=now))
                left = conn.execute(select(trials.c.id).where(and_(
                    trials.c.rater_id == rater_id, ~exists().where(answers.c.trial_id == trials.c.id)))).first()
                if left is None:
                    conn.execute(update(raters).where(raters.c.id == rater_id).values(finished_at=now))
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
        """Every answer of this study with its trial and rater (what `results` and /admin/export read)."""
        query = (select(raters.c.id.label("rater"), raters.c.slot, raters.c.finished_at, trials.c.token, trials.c.position,
                        trials.c.image, trials.c.model, trials.c.real_side, trials.c.shown, answers.c.choice,
                        answers.c.picked, answers.c.rt_ms, answers.c.server_ms, answers.c.answered_at)
                 .select_from(answers.join(trials, answers.c.trial_id == trials.c.id)
                              .join(raters, trials.c.rater_id == raters.c.id))
                 .where(raters.c.study_id == self.study.id)
                 .order_by(raters.c.id, trials.c.position))
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            started = conn.execute(select(raters.c.id).where(raters.c.study_id == self.study.id)).all()
            finished = conn.execute(select(raters.c.id).where(and_(raters.c.study_id == self.study.id,
                                                                   raters.c.finished_at.is_not(None)))).all()
        return {"sessions": len(started), "finished": len(finished), "answers": len(self.export())}
