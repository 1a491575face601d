"""A small, explicit, versioned migration runner for the ledger.

Versions are applied in order, each recorded in ``schema_migrations``; PostgreSQL runs each
version (DDL included) in one transaction under an advisory lock, so two migrators never race.
After the versions, topology-driven steps run on every call and are idempotent: one partition
per region (PostgreSQL), reference data upserted from the topology, a genesis chain head per
region, and the read-only compliance role's grants.

``migrate`` is idempotent: calling it again applies nothing and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, create_engine, text

from ledger import schema
from ledger.db import sqlalchemy_url
from ledger.model import GENESIS_HASH
from ledger.roles import grant_ddl
from regions.topology import Topology

_LOCK_KEY = 0x4D52444C  # "MRDL": advisory lock id of the ledger migrator


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    version: int
    name: str
    statements: Callable[[str, Topology, str], list[str]]
    """(dialect, topology, database name) -> SQL statements."""


def _v1_core(dialect: str, topology: Topology, database: str) -> list[str]:
    if dialect == "postgresql":
        return schema.postgres_table_ddl(schema.V1_TABLES)
    return schema.cockroach_database_ddl(database, topology) + schema.cockroach_table_ddl(
        topology, schema.V1_TABLES
    )


def _v2_held_fills(dialect: str, topology: Topology, database: str) -> list[str]:
    if dialect == "postgresql":
        return schema.postgres_table_ddl([schema.held_fills])
    return schema.cockroach_table_ddl(topology, [schema.held_fills])


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1, name="core tables: reference + region-partitioned ledger", statements=_v1_core
    ),
    Migration(version=2, name="held_fills: fills not posted yet", statements=_v2_held_fills),
)

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL, applied_ns BIGINT NOT NULL)"
)


def _engine(engine_or_dsn: Engine | str) -> tuple[Engine, bool]:
    if isinstance(engine_or_dsn, Engine):
        return engine_or_dsn, False
    return create_engine(sqlalchemy_url(engine_or_dsn), pool_pre_ping=True), True


def _run(conn: Connection, statements: list[str]) -> None:
    for sql in statements:
        conn.exec_driver_sql(sql)


def _topology_steps(dialect: str, topology: Topology) -> list[str]:
    out: list[str] = []
    if dialect == "postgresql":
        out.extend(schema.postgres_partition_ddl(topology))
    return out


def _reference_data(conn: Connection, topology: Topology, now_ns: int) -> None:
    conn.execute(
        text(
            "INSERT INTO currencies (code, minor_units) VALUES (:code, :mu) "
            "ON CONFLICT (code) DO UPDATE SET minor_units = EXCLUDED.minor_units"
        ),
        [{"code": c.code, "mu": c.minor_units} for c in topology.currencies],
    )
    conn.execute(
        text(
            "INSERT INTO instruments (symbol, base, quote, price_decimals) "
            "VALUES (:s, :b, :q, :pd) ON CONFLICT (symbol) DO UPDATE SET base = EXCLUDED.base, "
            "quote = EXCLUDED.quote, price_decimals = EXCLUDED.price_decimals"
        ),
        [
            {"s": i.symbol, "b": i.base, "q": i.quote, "pd": i.price_decimals}
            for i in topology.instruments
        ],
    )
    conn.execute(
        text(
            "INSERT INTO accounts (account, desk, home_region) VALUES (:a, :d, :r) "
            "ON CONFLICT (account) DO UPDATE SET desk = EXCLUDED.desk, "
            "home_region = EXCLUDED.home_region"
        ),
        [{"a": a, "d": d.code, "r": d.region} for d in topology.desks for a in d.accounts],
    )
    conn.execute(
        text(
            "INSERT INTO chain_heads (region, last_posting_id, last_hash, updated_ns) "
            "VALUES (:r, 0, :h, :now) ON CONFLICT (region) DO NOTHING"
        ),
        [{"r": code, "h": GENESIS_HASH, "now": now_ns} for code in topology.codes],
    )


def applied_versions(engine_or_dsn: Engine | str) -> list[int]:
    """Versions recorded in ``schema_migrations`` (empty for a fresh database)."""
    engine, owned = _engine(engine_or_dsn)
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                text(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_name = 'schema_migrations' AND table_schema = current_schema()"
                )
            ).scalar_one()
            if not exists:
                return []
            return [
                int(v)
                for v in conn.execute(
                    text("SELECT version FROM schema_migrations ORDER BY version")
                ).scalars()
            ]
    finally:
        if owned:
            engine.dispose()


def migrate(
    engine_or_dsn: Engine | str, topology: Topology, *, compliance_role: bool = True
) -> list[int]:
    """Bring the ledger schema up to date for ``topology``; returns the versions applied now.

    Args:
        engine_or_dsn: a SQLAlchemy engine or a ``postgresql://``/``cockroachdb://`` DSN.
        topology: regions (partitions / database regions), currencies, instruments, accounts.
        compliance_role: create ``meridian_compliance`` (SELECT only) and grant it the tables.
    """
    engine, owned = _engine(engine_or_dsn)
    dialect = engine.dialect.name
    applied: list[int] = []
    try:
        with engine.connect() as conn:
            database = str(conn.exec_driver_sql("SELECT current_database()").scalar_one())
        pg = dialect == "postgresql"
        if pg:
            with engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
                conn.exec_driver_sql(_VERSION_TABLE)
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql(_VERSION_TABLE)
        for m in MIGRATIONS:
            # One transaction per version on PostgreSQL (transactional DDL, advisory lock).
            # CockroachDB cannot run multi-region DDL inside a transaction: autocommit each
            # statement; every statement is IF NOT EXISTS, so a rerun after a crash is safe.
            with engine.begin() as conn:
                if pg:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
                done = conn.execute(
                    text("SELECT 1 FROM schema_migrations WHERE version = :v"), {"v": m.version}
                ).first()
                if done:
                    continue
                if pg:
                    _run(conn, m.statements(dialect, topology, database))
            if not pg:
                ac = engine.execution_options(isolation_level="AUTOCOMMIT")
                with ac.connect() as conn:
                    _run(conn, m.statements(dialect, topology, database))
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO schema_migrations (version, name, applied_ns) "
                        "VALUES (:v, :n, :t) ON CONFLICT (version) DO NOTHING"
                    ),
                    {"v": m.version, "n": m.name, "t": time.time_ns()},
                )
            applied.append(m.version)
        with engine.begin() as conn:
            if pg:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            _run(conn, _topology_steps(dialect, topology))
            _reference_data(conn, topology, time.time_ns())
            if compliance_role:
                _run(conn, grant_ddl(dialect))
    finally:
        if owned:
            engine.dispose()
    return applied
