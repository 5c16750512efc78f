"""Schema migrations (Alembic). The scripts ship inside the package (rlhfkit/feedback/migrations), so
`rlhfkit feedback db upgrade` works from an installed wheel with no alembic.ini around."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import inspect

from rlhfkit.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str, connection: Any = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _current(conn: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current(store: Any) -> str | None:
    with store.engine.connect() as conn:
        return _current(conn)


def upgrade(store: Any, revision: str = "head") -> None:
    from alembic import command

    # One transaction (BEGIN IMMEDIATE on SQLite): two processes opening a fresh file at once queue
    # here instead of both creating the tables.
    with store._write_engine.begin() as conn:
        command.upgrade(alembic_config(store.url, conn), revision)


def downgrade(store: Any, revision: str) -> None:
    from alembic import command

    with store._write_engine.begin() as conn:
        command.downgrade(alembic_config(store.url, conn), revision)


def stamp(store: Any, revision: str = "head") -> None:
    from alembic import command

    with store._write_engine.begin() as conn:
        command.stamp(alembic_config(store.url, conn), revision)


def ensure_current(store: Any, auto: bool) -> None:
    """Make sure the database is at the newest schema: create it if `auto` and the database is empty,
    else explain which command to run."""
    want = head()
    with store._write_engine.begin() as conn:
        have = _current(conn)
        if have == want:
            return
        tables = set(inspect(conn).get_table_names()) - {"alembic_version"}
        if have is None and not tables and auto:
            from alembic import command

            command.upgrade(alembic_config(store.url, conn), "head")
            return
    safe = store.engine.url.render_as_string(hide_password=True)
    if have is None and tables:
        raise ConfigError(f"{safe}: has tables but no rlhfkit schema version; is this a feedback database?")
    raise ConfigError(f"{safe}: the feedback schema is at revision {have or 'none'}, this rlhfkit needs "
                      f"{want}; run `rlhfkit feedback db upgrade --db {safe}`")
