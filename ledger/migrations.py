"""A small, explicit, versioned migration runner for the ledger.

Versions are applied in order, each recorded in ``schema_migrations``; PostgreSQL runs each
version (DDL included) in one transaction under an advisory lock, so two migrators never race.
Topology-driven steps run on every call and are idempotent: on CockroachDB, before the versions,
the database's regions (a primary region only if it has none, every region added IF NOT EXISTS,
never a survival goal: terraform owns it) and, after them, each transactional table's
``crdb_region`` recomputed if the topology gained a region; one partition per region
(PostgreSQL); reference data: currencies and instruments the ledger lacks are inserted, but one
it has with other units is refused (:class:`LedgerConfigError`), since amounts already posted
are in those units; accounts upserted; a genesis chain head per region; the read-only
compliance role's grants.

CockroachDB region names: :func:`ledger.schema.crdb_region_names` (CockroachDB Cloud's, as
terraform creates them), overridden by ``crdb_regions=`` or ``MERIDIAN_LEDGER_CRDB_REGIONS``
for a self-hosted or demo cluster.

``migrate`` is idempotent: calling it again applies nothing and changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, create_engine, text

from ledger import schema
from ledger.db import sqlalchemy_url
from ledger.errors import LedgerConfigError
from ledger.model import GENESIS_HASH
from ledger.roles import grant_ddl
from regions.topology import Topology

log = logging.getLogger(__name__)

_LOCK_KEY = 0x4D52444C  # "MRDL": advisory lock id of the ledger migrator


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """What the statements are emitted for."""

    dialect: str
    topology: Topology
    database: str
    crdb_regions: Mapping[str, str] | None = None
    """CockroachDB region name overrides (:func:`ledger.schema.crdb_region_names`); None:
    CockroachDB Cloud's names."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CockroachState:
    """What the topology steps read from a CockroachDB database before emitting DDL."""

    primary_region: str | None
    """The database's primary region; None while it is not multi-region."""
    region_columns: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    """Per existing transactional table: (crdb_region's expression, its crdb_region* columns)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    version: int
    name: str
    statements: Callable[[Target], list[str]]
    """Target -> SQL statements."""


def _v1_core(t: Target) -> list[str]:
    if t.dialect == "postgresql":
        return schema.postgres_table_ddl(schema.V1_TABLES)
    # The database's regions are a topology step (cockroach_locality_ddl), run before this.
    return schema.cockroach_table_ddl(t.topology, schema.V1_TABLES, crdb_regions=t.crdb_regions)


def _v2_held_fills(t: Target) -> list[str]:
    if t.dialect == "postgresql":
        return schema.postgres_table_ddl([schema.held_fills])
    return schema.cockroach_table_ddl(t.topology, [schema.held_fills], crdb_regions=t.crdb_regions)


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


def cockroach_locality_ddl(target: Target, state: CockroachState) -> list[str]:
    """The database's regions, run by every migrate before the versions (CockroachDB).

    Idempotent: a primary region only when the database has none (terraform sets it in
    production), the others ``ADD REGION IF NOT EXISTS``; no survival goal (terraform's).
    """
    return schema.cockroach_database_ddl(
        target.database,
        target.topology,
        crdb_regions=target.crdb_regions,
        primary_region=state.primary_region,
    )


def cockroach_region_columns_ddl(target: Target, state: CockroachState) -> list[str]:
    """Each existing transactional table's ``crdb_region`` recomputed if the topology's
    regions outgrew its CASE (CockroachDB; run by every migrate after the versions)."""
    out: list[str] = []
    for t in schema.TRANSACTIONAL_TABLES:
        if t.name not in state.region_columns:
            continue
        expression, columns = state.region_columns[t.name]
        out.extend(
            schema.cockroach_region_column_ddl(
                t.name,
                target.topology,
                expression=expression,
                columns=columns,
                crdb_regions=target.crdb_regions,
            )
        )
    return out


def _cockroach_state(conn: Connection, database: str) -> CockroachState:
    primary = conn.execute(
        text("SELECT primary_region FROM [SHOW DATABASES] WHERE database_name = :db"),
        {"db": database},
    ).scalar_one_or_none()
    tables = {t.name for t in schema.TRANSACTIONAL_TABLES}
    expressions: dict[str, str] = {}
    columns: dict[str, list[str]] = {}
    for table, column, expression in conn.execute(
        text(
            "SELECT table_name, column_name, coalesce(generation_expression, '') "
            "FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND column_name IN ('crdb_region', 'crdb_region_new', 'crdb_region_old')"
        )
    ).tuples():
        if table in tables:
            columns.setdefault(table, []).append(column)
            if column == "crdb_region":
                expressions[table] = expression
    for table, expression in expressions.items():
        if not schema.crdb_region_case_pairs(expression):
            log.warning(
                "ledger migrate: %s.crdb_region is no CASE it can read: %s", table, expression
            )
    return CockroachState(
        primary_region=str(primary) if primary else None,
        region_columns={t: (expressions.get(t, ""), tuple(c)) for t, c in columns.items()},
    )


def _check_units(conn: Connection, topology: Topology) -> None:
    """Refuse a topology whose currency or instrument units differ from the ledger's."""
    have_ccy = dict(conn.execute(text("SELECT code, minor_units FROM currencies")).tuples().all())
    for c in topology.currencies:
        if c.code in have_ccy and int(have_ccy[c.code]) != c.minor_units:
            raise LedgerConfigError(
                f"currencies.{c.code}.minor_units",
                f"the ledger has {have_ccy[c.code]}, the topology {c.minor_units}: a "
                "currency's minor units never change once set (amounts are posted in them; "
                "ISO 4217 does not change them either)",
            )
    have_ins = {
        str(s): (str(b), str(q), int(pd))
        for s, b, q, pd in conn.execute(
            text("SELECT symbol, base, quote, price_decimals FROM instruments")
        ).tuples()
    }
    for i in topology.instruments:
        if i.symbol not in have_ins:
            continue
        for name, had, want in zip(
            ("base", "quote", "price_decimals"),
            have_ins[i.symbol],
            (i.base, i.quote, i.price_decimals),
            strict=True,
        ):
            if had != want:
                raise LedgerConfigError(
                    f"instruments.{i.symbol}.{name}",
                    f"the ledger has {had!r}, the topology {want!r}: an instrument's terms "
                    "never change once set (posted trades were priced in them)",
                )


def _reference_data(conn: Connection, topology: Topology, now_ns: int) -> None:
    conn.execute(
        text(
            "INSERT INTO currencies (code, minor_units) VALUES (:code, :mu) "
            "ON CONFLICT (code) DO NOTHING"
        ),
        [{"code": c.code, "mu": c.minor_units} for c in topology.currencies],
    )
    conn.execute(
        text(
            "INSERT INTO instruments (symbol, base, quote, price_decimals) "
            "VALUES (:s, :b, :q, :pd) ON CONFLICT (symbol) DO NOTHING"
        ),
        [
            {"s": i.symbol, "b": i.base, "q": i.quote, "pd": i.price_decimals}
            for i in topology.instruments
        ],
    )
    # After the inserts, in their transaction: a row a concurrent migrator inserted counts too,
    # and a refusal rolls back everything this call wrote.
    _check_units(conn, topology)
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
    engine_or_dsn: Engine | str,
    topology: Topology,
    *,
    compliance_role: bool = True,
    crdb_regions: Mapping[str, str] | None = None,
) -> list[int]:
    """Bring the ledger schema up to date for ``topology``; returns the versions applied now.

    Args:
        engine_or_dsn: a SQLAlchemy engine or a ``postgresql://``/``cockroachdb://`` DSN.
        topology: regions (partitions / database regions), currencies, instruments, accounts.
        compliance_role: create ``meridian_compliance`` (SELECT only) and grant it the tables.
        crdb_regions: CockroachDB only: region code -> the cluster's region name, ``"*"`` for
            every code not named (a self-hosted or demo cluster); default
            ``MERIDIAN_LEDGER_CRDB_REGIONS`` if set, else CockroachDB Cloud's ``gcp-<region>``.

    Raises:
        LedgerConfigError: a currency or instrument of the topology has other units or terms
            than the ledger's (nothing is changed), or a bad ``crdb_regions``.
    """
    engine, owned = _engine(engine_or_dsn)
    dialect = engine.dialect.name
    applied: list[int] = []
    try:
        pg = dialect == "postgresql"
        if not pg:
            crdb_regions = (
                crdb_regions if crdb_regions is not None else schema.crdb_regions_from_env()
            )
            schema.crdb_region_names(topology, crdb_regions)  # a bad mapping fails before any DDL
        with engine.connect() as conn:
            database = str(conn.exec_driver_sql("SELECT current_database()").scalar_one())
        target = Target(
            dialect=dialect, topology=topology, database=database, crdb_regions=crdb_regions
        )
        ac = engine.execution_options(isolation_level="AUTOCOMMIT")
        if pg:
            with engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
                conn.exec_driver_sql(_VERSION_TABLE)
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql(_VERSION_TABLE)
            # Multi-region DDL cannot run in a transaction; REGIONAL BY ROW tables need the
            # database's regions first. Every statement is idempotent (see cockroach_locality_ddl).
            with ac.connect() as conn:
                _run(conn, cockroach_locality_ddl(target, _cockroach_state(conn, database)))
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
                    _run(conn, m.statements(target))
            if not pg:
                with ac.connect() as conn:
                    _run(conn, m.statements(target))
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO schema_migrations (version, name, applied_ns) "
                        "VALUES (:v, :n, :t) ON CONFLICT (version) DO NOTHING"
                    ),
                    {"v": m.version, "n": m.name, "t": time.time_ns()},
                )
            applied.append(m.version)
        if not pg:
            # A region the topology gained needs a crdb_region CASE that maps it, or its chain
            # head row below violates crdb_region NOT NULL.
            with ac.connect() as conn:
                _run(conn, cockroach_region_columns_ddl(target, _cockroach_state(conn, database)))
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
