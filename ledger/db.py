"""DSN handling and the retry predicate shared by the writer, verify and export."""

from __future__ import annotations

import psycopg

from ledger.errors import LedgerConfigError, LedgerError

RETRY_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure (incl. CockroachDB's retry protocol) and deadlock: rerun the txn."""


def dialect_of(dsn: str) -> str:
    """``postgresql`` or ``cockroachdb`` from a DSN's scheme."""
    scheme = dsn.split("://", 1)[0].split("+", 1)[0].lower() if "://" in dsn else ""
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    if scheme == "cockroachdb":
        return "cockroachdb"
    raise LedgerConfigError("dsn", "scheme must be postgresql://, postgres:// or cockroachdb://")


def libpq_dsn(dsn: str) -> str:
    """The DSN psycopg accepts (CockroachDB speaks the PostgreSQL protocol)."""
    dialect_of(dsn)
    _, rest = dsn.split("://", 1)
    return "postgresql://" + rest


def sqlalchemy_url(dsn: str) -> str:
    """The SQLAlchemy URL for ``dsn`` using the psycopg 3 driver."""
    dialect = dialect_of(dsn)
    _, rest = dsn.split("://", 1)
    return f"{dialect}+psycopg://{rest}"


def is_retryable(exc: BaseException) -> bool:
    """True for errors after which rerunning the WHOLE transaction can succeed."""
    if isinstance(exc, LedgerError):
        return exc.retryable
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate in RETRY_SQLSTATES:
            return True
        # Lost connection, server shutting down, cannot connect: wait and reconnect.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return isinstance(exc, ConnectionError | TimeoutError)
