"""The feedback store: SQLAlchemy schema, session helpers, and every write the app and labelers make.

One database holds projects -> rounds -> prompts -> samples (a completion of a prompt by a model in a
round). Samples are grouped into *items* (tasks) of four kinds:

    rate  one sample, a Likert rating on the project's scale
    rank  K samples of one prompt, ordered best first
    pair  two samples of one prompt, A or B or a tie
    edit  one sample, rewritten by the annotator

An annotator gets an item through an *assignment* (pre-assigned with `assign`, or claimed on demand by
`next_task` while fewer than `round.overlap` annotators hold it) and answers it with one *submission*
whose id the client chooses, so a retried request is stored once. `undo` retracts a submission (kept
for the record, left out of exports). Humans in the web app, the JSON API, the simulated labelers and
the chat page all write through this module, so validation lives here once.

SQLite (default) runs in WAL mode; write transactions start with BEGIN IMMEDIATE so concurrent writers
queue instead of failing. PostgreSQL works by URL (claims lock rows with SELECT ... FOR UPDATE).
The schema is versioned with Alembic (migrations ship in rlhfkit/feedback/migrations).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
import secrets
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from rlhfkit.errors import RLHFKitError
from rlhfkit.utils.http import INT64_MAX, bad_unicode

KINDS = ("rate", "rank", "pair", "edit")
MAX_TEXT_CHARS = 20_000      # default cap on any text an annotator writes (edits, comments)
TEXT_CEILING = 1_000_000     # no configuration goes above this (pydantic refuses longer fields outright)
MAX_K = 8                    # most samples shown in one ranking task


# --------------------------------------------------------------------------------------------------
# Errors: each carries the HTTP status the web app answers with
# --------------------------------------------------------------------------------------------------
class FeedbackError(RLHFKitError):
    status = 400


class NotFound(FeedbackError):
    status = 404


class Forbidden(FeedbackError):
    status = 403


class Conflict(FeedbackError):
    status = 409


class Invalid(FeedbackError):
    status = 422


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def password_epoch(password_hash: str | None) -> str:
    """A short fingerprint of the stored password hash (salted, so it changes with every new password): web
    sessions carry it, so setting a new password ends every session opened with the old one."""
    return hashlib.sha256((password_hash or "").encode()).hexdigest()[:16]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
class Base(DeclarativeBase):
    # Named constraints, so Alembic migrations can refer to them on every backend.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"})


def _created() -> Any:
    return mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    scale_min: Mapped[int] = mapped_column(Integer, default=1)   # Likert scale of rate items
    scale_max: Mapped[int] = mapped_column(Integer, default=5)
    created_at: Mapped[datetime] = _created()


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("project_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    number: Mapped[int] = mapped_column(Integer)
    overlap: Mapped[int] = mapped_column(Integer, default=1)      # annotators per item
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = _created()
    project: Mapped[Project] = relationship()


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("project_id", "text_sha"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    text: Mapped[str] = mapped_column(Text)
    text_sha: Mapped[str] = mapped_column(String(64))             # unique key (TEXT is not indexable on PG)
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = _created()


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("round_id", "prompt_id", "text_sha"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    model: Mapped[str] = mapped_column(String(200), default="")
    text: Mapped[str] = mapped_column(Text)
    text_sha: Mapped[str] = mapped_column(String(64))
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = _created()
    prompt: Mapped[Prompt] = relationship()


class Item(Base):
    """One task: a kind and its samples (1 for rate/edit, 2 for pair, K for rank)."""

    __tablename__ = "items"
    __table_args__ = (Index(None, "round_id", "open_slots", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    kind: Mapped[str] = mapped_column(String(8))
    # overlap minus the annotators holding it (pending or done): claims look for open_slots > 0 without
    # counting assignments of every item.
    open_slots: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created()
    round: Mapped[Round] = relationship()
    prompt: Mapped[Prompt] = relationship()
    members: Mapped[list[ItemSample]] = relationship(order_by="ItemSample.position")


class ItemSample(Base):
    __tablename__ = "item_samples"
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)   # display order (A = 0, B = 1)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    sample: Mapped[Sample] = relationship()


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="human")   # human, labeler, user (chat)
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id"),
                      Index(None, "annotator_id", "status"))
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    status: Mapped[str] = mapped_column(String(8), default="pending")   # pending, done, skipped
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class Submission(Base):
    """One answer to an item. `uid` is chosen by the client: sending it twice stores it once."""

    __tablename__ = "submissions"
    __table_args__ = (
        # At most one live (not undone) answer per annotator and item, enforced by the database.
        Index("uq_submissions_live", "item_id", "annotator_id", unique=True,
              sqlite_where=sql_text("retracted_at IS NULL"),
              postgresql_where=sql_text("retracted_at IS NULL")),)
    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = _created()
    retracted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Rating(Base):
    __tablename__ = "ratings"
    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), unique=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"))
    value: Mapped[float] = mapped_column(Float)


class RankEntry(Base):
    __tablename__ = "rank_entries"
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)       # 0 = best
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"))


class Choice(Base):
    __tablename__ = "choices"
    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), unique=True)
    chosen_sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"))     # for a tie: sample A
    rejected_sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"))   # for a tie: sample B
    tie: Mapped[bool] = mapped_column(Boolean, default=False)


class Edit(Base):
    __tablename__ = "edits"
    id: Mapped[int] = mapped_column(primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"), unique=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"))
    original: Mapped[str] = mapped_column(Text)
    edited: Mapped[str] = mapped_column(Text)


class Comment(Base):
    __tablename__ = "comments"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    submission_id: Mapped[int | None] = mapped_column(ForeignKey("submissions.id"), nullable=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class WebSession(Base):
    """A login to the web app. The cookie holds a random token; only its hash is stored, so logging out
    (or out everywhere, or a new password) ends the session on the server, whatever the browser keeps."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))                  # this session's form token
    expires_at: Mapped[float] = mapped_column(Float)               # Unix time
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = _created()


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# --------------------------------------------------------------------------------------------------
# What a client sends (validated with pydantic; the web forms and the JSON API share these)
# --------------------------------------------------------------------------------------------------
_UID = r"^[A-Za-z0-9_-]{8,64}$"


def check_text(text: str, what: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    if "\x00" in text:
        raise Invalid(f"{what} contains a NUL character")
    if bad_unicode(text):
        raise Invalid(f"{what} is not valid Unicode (a lone UTF-16 surrogate)")
    if len(text) > max_chars:
        raise Invalid(f"{what} is {len(text)} characters long; the limit is {max_chars}")
    # Text that looks like HTML is still just text (an annotator may well write about a <script> tag):
    # every page escapes it and the pages' Content-Security-Policy runs no inline script.
    return text


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)
    submission_id: str = Field(pattern=_UID, description="client-chosen id (8-64 of A-Z a-z 0-9 _ -); "
                                                         "resending the same id stores the answer once")
    comment: str = Field("", max_length=TEXT_CEILING, description="optional free-text comment")


class RatingIn(_In):
    kind: Literal["rate"]
    rating: int = Field(description="Likert value on the project's scale (see the task's `scale`)")


class RankingIn(_In):
    kind: Literal["rank"]
    order: list[int] = Field(min_length=2, max_length=MAX_K, description="the task's sample ids, best first")


class ChoiceIn(_In):
    kind: Literal["pair"]
    chosen: int | None = Field(None, description="sample id of the better one; null with tie=true")
    tie: bool = Field(False, description="both are equally good (or bad)")


class EditIn(_In):
    kind: Literal["edit"]
    edited: str = Field(min_length=1, max_length=TEXT_CEILING, description="the improved response")


Answer = Annotated[RatingIn | RankingIn | ChoiceIn | EditIn, Field(discriminator="kind")]


def parse_answer(data: dict) -> Any:
    """Validate a raw dict (form fields or JSON) into one of the answer models, or raise Invalid."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(Answer).validate_python(data)
    except ValidationError as e:
        first = e.errors(include_input=False)[0]
        loc = ".".join(str(x) for x in first["loc"] if not str(x).endswith("In")) or "body"
        raise Invalid(f"{loc}: {validation_message(first)}") from None


def validation_message(err: dict) -> str:
    """pydantic's message for one error, in our words where pydantic's are obscure."""
    if err.get("type") == "string_unicode":
        return "text is not valid Unicode (a lone UTF-16 surrogate)"
    return str(err.get("msg", "invalid"))


def new_uid() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------------------
# What a client gets
# --------------------------------------------------------------------------------------------------
@dataclass
class Task:
    item_id: int
    kind: str
    project: str
    round: int
    prompt: str
    samples: list[dict]           # [{"id": sample id, "text": completion}] in display order
    scale: tuple[int, int]
    submission_id: str = field(default_factory=new_uid)   # a fresh id the client may use

    def to_dict(self) -> dict:
        return {"item_id": self.item_id, "kind": self.kind, "project": self.project, "round": self.round,
                "prompt": self.prompt, "samples": self.samples, "scale": list(self.scale),
                "submission_id": self.submission_id}


@dataclass
class Stored:
    submission_id: str
    item_id: int
    duplicate: bool               # True: this id was stored before; nothing new was written


# --------------------------------------------------------------------------------------------------
# Passwords and tokens
# --------------------------------------------------------------------------------------------------
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}   # ~16 MB and tens of ms per check: slow for guessing


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, maxmem=64 << 20, **_SCRYPT)
    b64 = lambda b: base64.b64encode(b).decode()
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt)}${b64(dk)}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        algo, n, r, p, salt, dk = stored.split("$")
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(base64.b64decode(dk)), maxmem=64 << 20)
    except (ValueError, TypeError):
        return False
    return algo == "scrypt" and hmac.compare_digest(got, base64.b64decode(dk))


def hash_token(token: str) -> str:
    # API tokens are 256 random bits: a plain hash is enough (and lets us look them up by index).
    return sha(token)


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------
def db_url(spec: str) -> str:
    """A SQLAlchemy URL from a URL or a plain file path (a path means SQLite)."""
    if "://" in spec:
        return spec
    return f"sqlite:///{Path(spec).expanduser().resolve()}"


class Store:
    """A feedback database. `Store("runs/feedback/feedback.db")` or `Store("postgresql+psycopg://...")`.

    upgrade="auto" creates the schema of a fresh SQLite file; any other database must be at the newest
    migration already (`rlhfkit feedback db upgrade`), else a clear error says so. "never" only checks;
    "skip" does not look (for the migration commands themselves).
    """

    def __init__(self, url: str, *, upgrade: Literal["auto", "never", "skip"] = "auto",
                 max_text_chars: int = MAX_TEXT_CHARS, pool_size: int = 20) -> None:
        self.url = db_url(url)
        if not 0 < max_text_chars <= TEXT_CEILING:
            raise Invalid(f"max_text_chars={max_text_chars} must be in 1..{TEXT_CEILING}")
        self.max_text_chars = max_text_chars
        self.is_sqlite = self.url.startswith("sqlite")
        kw: dict[str, Any] = {}
        if self.is_sqlite:
            if self.url not in ("sqlite://", "sqlite:///:memory:"):
                Path(self.url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            kw = {"connect_args": {"timeout": 60, "check_same_thread": False}, "pool_size": pool_size,
                  "max_overflow": pool_size}
        self.engine = create_engine(self.url, **kw)
        if self.is_sqlite:
            _sqlite_setup(self.engine)
        # Writes go through an engine flagged so that SQLite takes the write lock at BEGIN: two writers
        # then queue on the busy timeout instead of one failing when it upgrades a read lock.
        self._write_engine = self.engine.execution_options(rlhfkit_write=True)
        self._write_lock = threading.RLock() if self.is_sqlite else contextlib.nullcontext()
        if upgrade != "skip":
            from rlhfkit.feedback import migrate

            migrate.ensure_current(self, auto=(upgrade == "auto" and self.is_sqlite))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction: everything in the block is committed together, or nothing is."""
        # SQLite has one writer at a time. Threads of this process queue on a lock (woken at once when
        # it frees) rather than on SQLite's busy handler, which polls with sleeps of up to 100 ms.
        with self._write_lock, Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            yield s

    # ---- settings ---------------------------------------------------------------------------------
    def secret(self, key: str = "session_secret") -> bytes:
        """A random secret kept in the database (signs session cookies; stable across restarts)."""
        with self.write() as s:
            row = s.get(Setting, key)
            if row is None:
                row = Setting(key=key, value=secrets.token_hex(32))
                s.add(row)
            return bytes.fromhex(row.value)

    # ---- projects and rounds ----------------------------------------------------------------------
    def _project(self, s: Session, name: str, create: bool = False,
                 scale: tuple[int, int] | None = None) -> Project:
        p = s.scalar(select(Project).where(Project.name == name))
        if p is None:
            if not create:
                raise NotFound(f"no project named {name!r}")
            lo, hi = scale or (1, 5)
            if lo >= hi:
                raise Invalid(f"rating scale {lo}..{hi} is empty")
            p = Project(name=name, scale_min=lo, scale_max=hi)
            s.add(p)
            s.flush()
        elif scale is not None and (p.scale_min, p.scale_max) != tuple(scale):
            raise Conflict(f"project {name!r} already uses the scale {p.scale_min}..{p.scale_max}")
        return p

    def _round(self, s: Session, project: Project, number: int | None, create: bool = False,
               overlap: int = 1) -> Round:
        if number is None:
            if not create:
                number = s.scalar(select(func.max(Round.number)).where(Round.project_id == project.id))
                if number is None:
                    raise NotFound(f"project {project.name!r} has no rounds yet")
            else:
                number = (s.scalar(select(func.max(Round.number)).where(Round.project_id == project.id))
                          or 0) + 1
        r = s.scalar(select(Round).where(Round.project_id == project.id, Round.number == number))
        if r is None:
            if not create:
                raise NotFound(f"project {project.name!r} has no round {number}")
            r = Round(project_id=project.id, number=number, overlap=overlap)
            s.add(r)
            s.flush()
        return r

    def rounds(self, project: str) -> list[dict]:
        with self.read() as s:
            p = self._project(s, project)
            rows = s.scalars(select(Round).where(Round.project_id == p.id).order_by(Round.number)).all()
            return [{"round": r.number, "overlap": r.overlap, "closed": r.closed_at is not None}
                    for r in rows]

    def close_round(self, project: str, round: int) -> None:
        """Stop handing out new claims of this round (pending assignments can still be answered)."""
        with self.write() as s:
            r = self._round(s, self._project(s, project), round)
            r.closed_at = r.closed_at or utcnow()

    def release_stale(self, project: str, round: int | None, older_than_s: float) -> int:
        """Give back the slots of pending assignments nobody has touched for `older_than_s` seconds (an
        annotator who claimed a task and left), so that others can claim them. Answered, skipped and
        recently undone ones stay. Returns how many were released."""
        if older_than_s <= 0:
            raise Invalid(f"older_than={older_than_s} s must be > 0")
        # Stored without the zone on SQLite: compare in naive UTC there, aware UTC elsewhere.
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        if self.is_sqlite:
            cutoff = cutoff.replace(tzinfo=None)
        with self.write() as s:
            r = self._round(s, self._project(s, project), round)
            stale = s.execute(select(Assignment.id, Assignment.item_id)
                              .join(Item, Item.id == Assignment.item_id)
                              .where(Item.round_id == r.id, Assignment.status == "pending",
                                     Assignment.updated_at < cutoff)).all()
            for asg_id, item_id in stale:
                s.execute(Assignment.__table__.delete().where(Assignment.id == asg_id))
                s.execute(update(Item).where(Item.id == item_id).values(open_slots=Item.open_slots + 1))
            return len(stale)

    # ---- import -----------------------------------------------------------------------------------
    def import_samples(self, samples: list[dict], *, project: str = "default", round: int | None = None,
                       kinds: tuple[str, ...] | list[str] = ("rate",), overlap: int = 1,
                       group_size: int = 4, scale: tuple[int, int] | None = None,
                       model: str = "") -> dict:
        """Add samples ({prompt, completion, optional model, id}) to a round and make items of each kind.

        rate/edit make one item per sample; rank groups the samples of a prompt into items of up to
        `group_size`; pair cuts them into consecutive disjoint pairs. A (prompt, completion) already in
        the round is skipped, as are empty completions. round=None starts a new round. Returns counts.
        """
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise Invalid(f"unknown task kind(s) {bad or kinds}; choose from {', '.join(KINDS)}")
        if overlap < 1:
            raise Invalid(f"overlap={overlap} must be >= 1")
        if not 2 <= group_size <= MAX_K:
            raise Invalid(f"group_size={group_size} must be in 2..{MAX_K}")
        counts = {"samples": 0, "duplicates": 0, "empty": 0, **{f"items_{k}": 0 for k in kinds}}
        with self.write() as s:
            p = self._project(s, project, create=True, scale=scale)
            r = self._round(s, p, round, create=True, overlap=overlap)
            if r.overlap != overlap:
                raise Conflict(f"round {r.number} of {project!r} has overlap {r.overlap}, not {overlap}; "
                               "change it with `rlhfkit feedback assign --overlap`")
            by_prompt: dict[int, list[Sample]] = {}
            prompt_cache: dict[str, Prompt] = {}
            for i, rec in enumerate(samples):
                if not isinstance(rec, dict) or not isinstance(rec.get("completion"), str) \
                        or not isinstance(rec.get("prompt", ""), str):
                    raise Invalid(f"sample {i}: expected an object with string fields 'prompt' and "
                                  f"'completion', got {str(rec)[:80]!r}")
                ptext = _tidy(rec.get("prompt", ""))
                ctext = _tidy(rec["completion"])
                if not ctext:
                    counts["empty"] += 1
                    continue
                prm = prompt_cache.get(ptext)
                if prm is None:
                    prm = s.scalar(select(Prompt).where(Prompt.project_id == p.id,
                                                        Prompt.text_sha == sha(ptext)))
                    if prm is None:
                        prm = Prompt(project_id=p.id, text=ptext, text_sha=sha(ptext),
                                     external_id=_str_or_none(rec.get("prompt_id")))
                        s.add(prm)
                        s.flush()
                    prompt_cache[ptext] = prm
                dup = s.scalar(select(Sample.id).where(Sample.round_id == r.id, Sample.prompt_id == prm.id,
                                                       Sample.text_sha == sha(ctext)))
                if dup is not None:
                    counts["duplicates"] += 1
                    continue
                smp = Sample(round_id=r.id, prompt_id=prm.id, model=str(rec.get("model") or model),
                             text=ctext, text_sha=sha(ctext), external_id=_str_or_none(rec.get("id")))
                s.add(smp)
                by_prompt.setdefault(prm.id, []).append(smp)
                counts["samples"] += 1
            s.flush()
            for kind in kinds:
                for prompt_id, group in by_prompt.items():
                    if kind in ("rate", "edit"):
                        chunks = [[x] for x in group]
                    elif kind == "pair":
                        chunks = [group[j:j + 2] for j in range(0, len(group) - 1, 2)]
                    else:
                        chunks = [group[j:j + group_size] for j in range(0, len(group), group_size)]
                        chunks = [c for c in chunks if len(c) >= 2]
                    for chunk in chunks:
                        item = Item(round_id=r.id, prompt_id=prompt_id, kind=kind, open_slots=r.overlap)
                        s.add(item)
                        s.flush()
                        s.add_all(ItemSample(item_id=item.id, position=j, sample_id=x.id)
                                  for j, x in enumerate(chunk))
                        counts[f"items_{kind}"] += 1
            counts["round"] = r.number
        return counts

    # ---- annotators -------------------------------------------------------------------------------
    def add_annotator(self, name: str, password: str | None = None, *, admin: bool = False,
                      kind: str = "human", exist_ok: bool = False) -> int:
        if not re.fullmatch(r"[A-Za-z0-9_.@:-]{1,100}", name):
            raise Invalid(f"annotator name {name!r}: use 1-100 of A-Z a-z 0-9 _ . @ : -")
        if password is not None and len(password) < 8:
            raise Invalid("password must be at least 8 characters")
        with self.write() as s:
            a = s.scalar(select(Annotator).where(Annotator.name == name))
            if a is not None:
                if not exist_ok:
                    raise Conflict(f"annotator {name!r} exists already")
                return a.id
            a = Annotator(name=name, kind=kind, is_admin=admin,
                          password_hash=hash_password(password) if password else None)
            s.add(a)
            s.flush()
            return a.id

    def set_password(self, name: str, password: str) -> None:
        """A new password; every web session opened with the old one ends."""
        if len(password) < 8:
            raise Invalid("password must be at least 8 characters")
        with self.write() as s:
            a = self._annotator(s, name)
            a.password_hash = hash_password(password)
            self._revoke(s, WebSession.annotator_id == a.id)

    # ---- web sessions -----------------------------------------------------------------------------
    def open_session(self, annotator_id: int, seconds: float) -> tuple[str, str]:
        """A new web session: (token for the cookie, CSRF token for its forms)."""
        import time

        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        with self.write() as s:
            # Expired sessions of this annotator are dropped here, so the table does not grow forever.
            s.execute(WebSession.__table__.delete().where(WebSession.annotator_id == annotator_id,
                                                          WebSession.expires_at < time.time()))
            s.add(WebSession(token_hash=sha(token), annotator_id=annotator_id, csrf=csrf,
                             expires_at=time.time() + seconds))
        return token, csrf

    def session(self, token: str | None) -> dict | None:
        """The annotator of a live session ({id, name, admin, csrf}), or None (unknown, expired, ended,
        or the account disabled)."""
        import time

        if not token or len(token) > 100:
            return None
        with self.read() as s:
            row = s.execute(select(Annotator.id, Annotator.name, Annotator.is_admin, WebSession.csrf)
                            .join(WebSession, WebSession.annotator_id == Annotator.id)
                            .where(WebSession.token_hash == sha(token), WebSession.revoked_at.is_(None),
                                   WebSession.expires_at > time.time(), Annotator.is_active)).first()
        return None if row is None else {"id": row[0], "name": row[1], "admin": row[2], "csrf": row[3]}

    def end_session(self, token: str) -> None:
        with self.write() as s:
            self._revoke(s, WebSession.token_hash == sha(token))

    def end_sessions(self, annotator_id: int) -> int:
        """Log an annotator out everywhere. Returns how many sessions ended."""
        with self.write() as s:
            return self._revoke(s, WebSession.annotator_id == annotator_id)

    def _revoke(self, s: Session, where: Any) -> int:
        return s.execute(update(WebSession).where(where, WebSession.revoked_at.is_(None))
                         .values(revoked_at=utcnow())).rowcount

    def new_token(self, name: str) -> str:
        """A new API token for an annotator (replaces the old one). Only its hash is stored."""
        token = "rk_" + secrets.token_urlsafe(32)
        with self.write() as s:
            self._annotator(s, name).token_hash = hash_token(token)
        return token

    def _annotator(self, s: Session, name: str) -> Annotator:
        a = s.scalar(select(Annotator).where(Annotator.name == name))
        if a is None:
            raise NotFound(f"no annotator named {name!r}")
        return a

    def annotators(self) -> list[dict]:
        with self.read() as s:
            return [{"id": a.id, "name": a.name, "kind": a.kind, "admin": a.is_admin, "active": a.is_active,
                     "has_password": bool(a.password_hash), "has_token": bool(a.token_hash)}
                    for a in s.scalars(select(Annotator).order_by(Annotator.id))]

    def set_active(self, name: str, active: bool) -> None:
        with self.write() as s:
            self._annotator(s, name).is_active = active

    def login(self, name: str, password: str) -> dict | None:
        """The annotator ({id, name, admin}) if the password is right and the account active."""
        with self.read() as s:
            a = s.scalar(select(Annotator).where(Annotator.name == name))
            stored = a.password_hash if a is not None else None
            # Always run the KDF once, so a wrong name takes as long as a wrong password.
            ok = verify_password(password, stored or _DUMMY_HASH) and a is not None and a.is_active
            if not ok:
                return None
            return {"id": a.id, "name": a.name, "admin": a.is_admin, "pw": password_epoch(stored)}

    def by_token(self, token: str) -> dict | None:
        return self._who(Annotator.token_hash == hash_token(token))

    def by_id(self, annotator_id: int) -> dict | None:
        return self._who(Annotator.id == annotator_id)

    def _who(self, where: Any) -> dict | None:
        with self.read() as s:
            row = s.execute(select(Annotator.id, Annotator.name, Annotator.is_admin, Annotator.password_hash)
                            .where(where, Annotator.is_active)).first()
            if row is None:
                return None
            return {"id": row[0], "name": row[1], "admin": row[2], "pw": password_epoch(row[3])}

    # ---- tasks ------------------------------------------------------------------------------------
    # The hot path (every web request): column queries rather than ORM objects, a handful per answer.
    def next_task(self, annotator_id: int, *, project: str | None = None, round: int | None = None,
                  kinds: tuple[str, ...] = KINDS) -> Task | None:
        """The annotator's next task: an undone one first, then the oldest pending assignment, else a new
        claim of an item that still has open slots (in an open round). None when there is nothing left.
        `project` / `round` / `kinds` narrow the choice."""
        with self.write() as s:
            q = (select(Assignment.item_id).join(Item, Item.id == Assignment.item_id)
                 .join(Round, Round.id == Item.round_id)
                 .where(Assignment.annotator_id == annotator_id, Assignment.status == "pending",
                        Item.kind.in_(kinds))
                 .order_by(Assignment.undone_at.is_(None), Assignment.undone_at.desc(), Item.id).limit(1))
            item_id = s.scalar(_narrow(q, project, round))
            if item_id is None:
                item_id = self._claim(s, annotator_id, project, round, kinds)
            return None if item_id is None else self._task(s, item_id)

    def _claim(self, s: Session, annotator_id: int, project: str | None, round: int | None,
               kinds: tuple[str, ...]) -> int | None:
        mine = exists().where(Assignment.item_id == Item.id, Assignment.annotator_id == annotator_id)
        q = (select(Item.id).join(Round, Round.id == Item.round_id)
             .where(Round.closed_at.is_(None), Item.open_slots > 0, Item.kind.in_(kinds), ~mine)
             .order_by(Round.id, Item.id).limit(1))
        q = _narrow(q, project, round)
        if not self.is_sqlite:  # SQLite already serialises writers (BEGIN IMMEDIATE)
            q = q.with_for_update(of=Item, skip_locked=True)
        item_id = s.scalar(q)
        if item_id is None:
            return None
        s.execute(update(Item).where(Item.id == item_id).values(open_slots=Item.open_slots - 1))
        s.execute(insert(Assignment).values(item_id=item_id, annotator_id=annotator_id))
        return item_id

    def _item(self, s: Session, item_id: int) -> dict:
        """Everything about one item in one query: kind, round, project scale, prompt, samples."""
        _check_id(item_id)
        rows = s.execute(
            select(Item.kind, Round.number, Project.name, Project.scale_min, Project.scale_max, Prompt.text,
                   Sample.id, Sample.text)
            .join(Round, Round.id == Item.round_id).join(Project, Project.id == Round.project_id)
            .join(Prompt, Prompt.id == Item.prompt_id).join(ItemSample, ItemSample.item_id == Item.id)
            .join(Sample, Sample.id == ItemSample.sample_id)
            .where(Item.id == item_id).order_by(ItemSample.position)).all()
        if not rows:
            raise NotFound(f"no task {item_id}")
        kind, rnd, proj, lo, hi, prompt = rows[0][:6]
        return {"kind": kind, "round": rnd, "project": proj, "scale": (lo, hi), "prompt": prompt,
                "samples": [{"id": r[6], "text": r[7]} for r in rows]}

    def _task(self, s: Session, item_id: int) -> Task:
        it = self._item(s, item_id)
        return Task(item_id=item_id, kind=it["kind"], project=it["project"], round=it["round"],
                    prompt=it["prompt"], samples=it["samples"], scale=it["scale"])

    def task(self, annotator_id: int, item_id: int) -> Task:
        """A task the annotator holds (pending): for re-showing a page after a validation error."""
        with self.read() as s:
            task = self._task(s, item_id)
            self._assignment(s, annotator_id, item_id, lock=False)
            return task

    def _assignment(self, s: Session, annotator_id: int, item_id: int, lock: bool = True) -> Any:
        """(id, status) of the annotator's assignment to an item; 404 / 403 if there is none."""
        _check_id(item_id)
        q = select(Assignment.id, Assignment.status).where(Assignment.item_id == item_id,
                                                           Assignment.annotator_id == annotator_id)
        if lock and not self.is_sqlite:
            q = q.with_for_update()
        asg = s.execute(q).first()
        if asg is None:
            if s.get(Item, item_id) is None:
                raise NotFound(f"no task {item_id}")
            raise Forbidden(f"task {item_id} is not assigned to you")
        return asg

    def submit(self, annotator_id: int, item_id: int, answer: Any) -> Stored:
        """Store one answer (a RatingIn / RankingIn / ChoiceIn / EditIn, or a dict of one). Idempotent on
        answer.submission_id: a resend returns duplicate=True and writes nothing."""
        if isinstance(answer, dict):
            answer = parse_answer(answer)
        try:
            with self.write() as s:
                return self._submit(s, annotator_id, item_id, answer)
        except IntegrityError:
            # Two requests with the same id raced (possible on PostgreSQL): the other one stored it.
            with self.read() as s:
                return self._existing(s, annotator_id, item_id, answer)

    def _existing(self, s: Session, annotator_id: int, item_id: int, answer: Any) -> Stored:
        old = s.execute(select(Submission.annotator_id, Submission.item_id)
                        .where(Submission.uid == answer.submission_id)).first()
        if old is None:
            raise Conflict(f"task {item_id}: you have answered it already (undo first to change it)")
        if tuple(old) != (annotator_id, item_id):
            raise Conflict(f"submission id {answer.submission_id} was used for another task")
        return Stored(answer.submission_id, item_id, duplicate=True)

    def _submit(self, s: Session, annotator_id: int, item_id: int, answer: Any) -> Stored:
        if s.scalar(select(Submission.id).where(Submission.uid == answer.submission_id)) is not None:
            return self._existing(s, annotator_id, item_id, answer)
        it = self._item(s, item_id)
        asg = self._assignment(s, annotator_id, item_id)
        kind, sample_ids = it["kind"], [x["id"] for x in it["samples"]]
        if answer.kind != kind:
            raise Invalid(f"task {item_id} is a {kind} task, not {answer.kind}")
        if asg.status == "done":
            raise Conflict(f"task {item_id}: you have answered it already (undo first to change it)")
        comment = check_text(answer.comment, "comment", self.max_text_chars) if answer.comment else ""
        # Validate completely before writing anything.
        if kind == "rate":
            lo, hi = it["scale"]
            if not lo <= answer.rating <= hi:
                raise Invalid(f"rating {answer.rating} is outside the scale {lo}..{hi}")
            detail: Any = [(Rating, {"sample_id": sample_ids[0], "value": float(answer.rating)})]
        elif kind == "rank":
            if sorted(answer.order) != sorted(sample_ids):
                raise Invalid(f"order must list this task's samples {sorted(sample_ids)} once each, "
                              f"got {answer.order}")
            detail = [(RankEntry, {"rank": j, "sample_id": x}) for j, x in enumerate(answer.order)]
        elif kind == "pair":
            a, b = sample_ids
            if answer.tie:
                if answer.chosen is not None:
                    raise Invalid("a tie has no chosen sample (send chosen=null with tie=true)")
                detail = [(Choice, {"chosen_sample_id": a, "rejected_sample_id": b, "tie": True})]
            elif answer.chosen not in (a, b):
                raise Invalid(f"chosen must be {a} or {b} (or tie=true), got {answer.chosen}")
            else:
                detail = [(Choice, {"chosen_sample_id": answer.chosen,
                                    "rejected_sample_id": b if answer.chosen == a else a, "tie": False})]
        else:
            original = it["samples"][0]["text"]
            edited = _tidy(check_text(answer.edited, "edited text", self.max_text_chars))
            if not edited:
                raise Invalid("edited text is empty")
            if edited == original:
                raise Invalid("edited text is the same as the original (skip the task instead)")
            detail = [(Edit, {"sample_id": sample_ids[0], "original": original, "edited": edited})]
        sub_id = s.scalar(insert(Submission).values(uid=answer.submission_id, item_id=item_id,
                                                    annotator_id=annotator_id, kind=kind)
                          .returning(Submission.id))
        for table, values in detail:
            s.execute(insert(table).values(submission_id=sub_id, **values))
        if comment:
            s.execute(insert(Comment).values(item_id=item_id, annotator_id=annotator_id, submission_id=sub_id,
                                             text=comment))
        if asg.status == "skipped":   # answering a skipped task takes its slot back
            s.execute(update(Item).where(Item.id == item_id).values(open_slots=Item.open_slots - 1))
        s.execute(update(Assignment).where(Assignment.id == asg.id)
                  .values(status="done", updated_at=utcnow(), undone_at=None))
        return Stored(answer.submission_id, item_id, duplicate=False)

    def skip(self, annotator_id: int, item_id: int) -> None:
        """Skip a pending task: its slot goes back to the pool for another annotator."""
        with self.write() as s:
            asg = self._assignment(s, annotator_id, item_id)
            if asg.status != "pending":
                raise Conflict(f"task {item_id} is {asg.status}, not pending")
            s.execute(update(Assignment).where(Assignment.id == asg.id)
                      .values(status="skipped", updated_at=utcnow(), undone_at=None))
            s.execute(update(Item).where(Item.id == item_id).values(open_slots=Item.open_slots + 1))

    def undo(self, annotator_id: int) -> int | None:
        """Undo the annotator's last answer or skip; that task comes back next. Returns its item id."""
        with self.write() as s:
            asg = s.scalar(select(Assignment).where(Assignment.annotator_id == annotator_id,
                                                    Assignment.status.in_(("done", "skipped")))
                           .order_by(Assignment.updated_at.desc(), Assignment.id.desc()).limit(1))
            if asg is None:
                return None
            if asg.status == "done":
                s.execute(update(Submission).where(Submission.item_id == asg.item_id,
                                                   Submission.annotator_id == annotator_id,
                                                   Submission.retracted_at.is_(None))
                          .values(retracted_at=utcnow()))
            else:
                s.get(Item, asg.item_id).open_slots -= 1
            asg.status, asg.updated_at, asg.undone_at = "pending", utcnow(), utcnow()
            return asg.item_id

    def comment(self, annotator_id: int, item_id: int, text: str) -> None:
        with self.write() as s:
            self._assignment(s, annotator_id, item_id, lock=False)
            s.add(Comment(item_id=item_id, annotator_id=annotator_id,
                          text=check_text(text, "comment", self.max_text_chars)))

    def progress(self, annotator_id: int, project: str | None = None) -> dict:
        """Counts for one annotator: done, skipped, pending, and still claimable items."""
        with self.read() as s:
            q = (select(Assignment.status, func.count()).join(Item, Item.id == Assignment.item_id)
                 .join(Round, Round.id == Item.round_id).where(Assignment.annotator_id == annotator_id))
            mine = exists().where(Assignment.item_id == Item.id, Assignment.annotator_id == annotator_id)
            q2 = (select(func.count()).select_from(Item).join(Round, Round.id == Item.round_id)
                  .where(Round.closed_at.is_(None), Item.open_slots > 0, ~mine))
            if project:
                q = q.join(Project, Project.id == Round.project_id).where(Project.name == project)
                q2 = q2.join(Project, Project.id == Round.project_id).where(Project.name == project)
            out = {"done": 0, "skipped": 0, "pending": 0}
            out.update(dict(s.execute(q.group_by(Assignment.status)).all()))
            out["available"] = s.scalar(q2) or 0
            # Skipped tasks stay in the total: skipping is not a way to make the work smaller.
            out["total"] = out["done"] + out["skipped"] + out["pending"] + out["available"]
            return out

    def assign(self, project: str, round: int | None, annotators: list[str], overlap: int) -> int:
        """Set the round's overlap and pre-assign every item to `overlap` of the named annotators (the
        least loaded first, skipping ones who hold it already). Returns how many assignments it made."""
        if overlap < 1:
            raise Invalid(f"overlap={overlap} must be >= 1")
        if annotators and overlap > len(annotators):
            raise Invalid(f"overlap={overlap} needs at least that many annotators, got {len(annotators)}")
        made = 0
        with self.write() as s:
            r = self._round(s, self._project(s, project), round)
            delta = overlap - r.overlap
            r.overlap = overlap
            if delta:
                s.execute(update(Item).where(Item.round_id == r.id)
                          .values(open_slots=Item.open_slots + delta))
            if not annotators:
                return 0
            ids = [self._annotator(s, n).id for n in annotators]
            load = {a: 0 for a in ids}
            holders: dict[int, set[int]] = {}
            for item_id, a in s.execute(select(Assignment.item_id, Assignment.annotator_id)
                                        .join(Item, Item.id == Assignment.item_id)
                                        .where(Item.round_id == r.id, Assignment.status != "skipped")):
                holders.setdefault(item_id, set()).add(a)
                if a in load:
                    load[a] += 1
            for item in s.scalars(select(Item).where(Item.round_id == r.id).order_by(Item.id)):
                have = holders.get(item.id, set())
                for a in sorted((a for a in ids if a not in have), key=lambda a: (load[a], a)):
                    if item.open_slots <= 0:
                        break
                    s.add(Assignment(item_id=item.id, annotator_id=a))
                    item.open_slots -= 1
                    load[a] += 1
                    made += 1
        return made

    # ---- counts -----------------------------------------------------------------------------------
    def count_labelled(self, project: str, round: int | None = None, *, min_answers: int | None = None,
                       kinds: tuple[str, ...] = KINDS) -> int:
        """Items of a round with at least `min_answers` live answers (default: the round's overlap)."""
        with self.read() as s:
            r = self._round(s, self._project(s, project), round)
            need = r.overlap if min_answers is None else min_answers
            per_item = (select(Submission.item_id, func.count().label("n"))
                        .join(Item, Item.id == Submission.item_id)
                        .where(Item.round_id == r.id, Item.kind.in_(kinds), Submission.retracted_at.is_(None))
                        .group_by(Submission.item_id).subquery())
            return s.scalar(select(func.count()).select_from(per_item).where(per_item.c.n >= need)) or 0

    def stats(self, project: str | None = None) -> dict:
        """Counts for the admin view: per round and kind, and per annotator."""
        with self.read() as s:
            rounds = []
            q = select(Round, Project).join(Project, Project.id == Round.project_id)
            if project:
                q = q.where(Project.name == project)
            for r, p in s.execute(q.order_by(Project.name, Round.number)).all():
                by_kind = dict(s.execute(select(Item.kind, func.count()).where(Item.round_id == r.id)
                                         .group_by(Item.kind)).all())
                answers = dict(s.execute(select(Submission.kind, func.count())
                                         .join(Item, Item.id == Submission.item_id)
                                         .where(Item.round_id == r.id, Submission.retracted_at.is_(None))
                                         .group_by(Submission.kind)).all())
                rounds.append({"project": p.name, "round": r.number, "overlap": r.overlap,
                               "closed": r.closed_at is not None, "items": by_kind, "answers": answers,
                               "complete": self._complete(s, r)})
            people = []
            for a in s.scalars(select(Annotator).order_by(Annotator.name)):
                st = dict(s.execute(select(Assignment.status, func.count())
                                    .where(Assignment.annotator_id == a.id)
                                    .group_by(Assignment.status)).all())
                last = s.scalar(select(func.max(Submission.created_at))
                                .where(Submission.annotator_id == a.id))
                people.append({"name": a.name, "kind": a.kind, "admin": a.is_admin, "active": a.is_active,
                               "done": st.get("done", 0), "pending": st.get("pending", 0),
                               "skipped": st.get("skipped", 0),
                               "last": last.strftime("%Y-%m-%d %H:%M") if last else ""})
            return {"rounds": rounds, "annotators": people}

    def _complete(self, s: Session, r: Round) -> int:
        per_item = (select(Submission.item_id, func.count().label("n"))
                    .join(Item, Item.id == Submission.item_id)
                    .where(Item.round_id == r.id, Submission.retracted_at.is_(None))
                    .group_by(Submission.item_id).subquery())
        return s.scalar(select(func.count()).select_from(per_item).where(per_item.c.n >= r.overlap)) or 0

    def projects(self) -> list[str]:
        with self.read() as s:
            return list(s.scalars(select(Project.name).order_by(Project.name)))

    # ---- free-standing feedback from end users (the chat page) ------------------------------------
    def record_rating(self, prompt: str, completion: str, rating: int, *, user: str = "anonymous",
                      project: str = "chat", scale: tuple[int, int] = (0, 1), model: str = "") -> Stored:
        """Store an end user's rating of one (prompt, completion), e.g. thumbs down/up = 0/1."""
        return self._free(prompt, completion, user, project, scale, model, "rate",
                          parse_answer({"kind": "rate", "submission_id": new_uid(), "rating": rating}))

    def record_edit(self, prompt: str, completion: str, edited: str, *, user: str = "anonymous",
                    project: str = "chat", scale: tuple[int, int] = (0, 1), model: str = "") -> Stored:
        """Store an end user's rewrite of one completion (exported as edited > original)."""
        return self._free(prompt, completion, user, project, scale, model, "edit",
                          parse_answer({"kind": "edit", "submission_id": new_uid(), "edited": edited}))

    def _free(self, prompt: str, completion: str, user: str, project: str, scale: tuple[int, int],
              model: str, kind: str, answer: Any) -> Stored:
        for text, what in ((prompt, "prompt"), (completion, "completion")):
            check_text(text, what, self.max_text_chars)
        if not _tidy(completion):
            raise Invalid("completion is empty")
        aid = self.add_annotator(user, kind="user", exist_ok=True)
        with self.write() as s:
            # End users (the chat page) never write as an annotator or an admin of the web app.
            if s.scalar(select(Annotator.kind).where(Annotator.id == aid)) != "user":
                raise Forbidden(f"{user!r} is an annotator account, not a chat user")
            p = s.scalar(select(Project).where(Project.name == project)) or \
                self._project(s, project, create=True, scale=scale)
            if kind == "rate" and (p.scale_min, p.scale_max) != tuple(scale):
                raise Conflict(f"project {project!r} uses the scale {p.scale_min}..{p.scale_max}, "
                               f"not {scale}")
            # Chat feedback of a project collects in its round 1, which never hands out tasks.
            r = self._round(s, p, 1, create=True)
            r.closed_at = r.closed_at or utcnow()
            ptext, ctext = _tidy(prompt), _tidy(completion)
            prm = s.scalar(select(Prompt).where(Prompt.project_id == p.id, Prompt.text_sha == sha(ptext)))
            if prm is None:
                prm = Prompt(project_id=p.id, text=ptext, text_sha=sha(ptext))
                s.add(prm)
                s.flush()
            smp = s.scalar(select(Sample).where(Sample.round_id == r.id, Sample.prompt_id == prm.id,
                                                Sample.text_sha == sha(ctext)))
            if smp is None:
                smp = Sample(round_id=r.id, prompt_id=prm.id, model=model, text=ctext, text_sha=sha(ctext))
                s.add(smp)
                s.flush()
            item = Item(round_id=r.id, prompt_id=prm.id, kind=kind, open_slots=0)
            s.add(item)
            s.flush()
            s.add(ItemSample(item_id=item.id, position=0, sample_id=smp.id))
            s.add(Assignment(item_id=item.id, annotator_id=aid))
            s.flush()
            return self._submit(s, aid, item.id, answer)


def _check_id(item_id: int) -> None:
    """Ids are 64-bit database integers: a larger (or non-positive) one names nothing (and would overflow
    the database driver)."""
    if not 0 < item_id <= INT64_MAX:
        raise NotFound(f"no task {item_id}")


def _narrow(q: Any, project: str | None, round: int | None) -> Any:
    """Restrict a query that joins Round to one project (and round number)."""
    if project:
        q = q.join(Project, Project.id == Round.project_id).where(Project.name == project)
        if round is not None:
            q = q.where(Round.number == round)
    elif round is not None:
        raise Invalid("a round number needs a project")
    return q


_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _tidy(text: str) -> str:
    """Line endings to \\n, no trailing spaces on lines, no leading/trailing blank space."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(ln.rstrip() for ln in lines).strip()


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)[:200]


def _journal_wal(cur: Any, wait_s: float = 60.0) -> None:
    """PRAGMA journal_mode=WAL, retried while another connection holds the database: switching modes
    needs an exclusive lock, and SQLite answers "database is locked" at once, without its busy handler,
    when waiting could deadlock (e.g. another process creating the same new database)."""
    import sqlite3
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_setup(engine: Any) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None          # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")   # first: what follows may wait for other connections
        _journal_wal(cur)                          # readers never block the writer
        cur.execute("PRAGMA synchronous=NORMAL")   # durable at checkpoints; safe with WAL
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("rlhfkit_write")
                             else "BEGIN")
