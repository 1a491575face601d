"""The ledger's one model (SQLAlchemy Core) and its DDL per dialect.

Reference tables (``currencies``, ``instruments``, ``accounts``) are small, read everywhere and
written by migrations only. Transactional tables (``transfers``, ``postings``, ``balances``,
``chain_heads``) carry the executing region in ``region`` and every primary key starts with it,
so the order path writes only rows of its own region.

The physical layout is dialect-specific and emitted explicitly here (the CockroachDB dialect
derives from the PostgreSQL one and would otherwise inherit PostgreSQL table options):

* PostgreSQL: every transactional table is ``PARTITION BY LIST (region)`` with one partition per
  region of the topology, named ``<table>_<region>``.
* CockroachDB: a multi-region database (primary region = the hub's cloud region, the others
  added, ``SURVIVE ZONE FAILURE`` unless told otherwise); transactional tables are
  ``LOCALITY REGIONAL BY ROW AS crdb_region`` where ``crdb_region`` is a hidden stored column
  computed from ``region`` through ``Region.cloud_region``; reference tables are
  ``LOCALITY GLOBAL``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex, CreateTable

from ledger.errors import LedgerConfigError
from regions.topology import Topology

Survival = Literal["zone", "region"]
DialectName = Literal["postgresql", "cockroachdb"]

metadata = MetaData()

# ---- reference data ------------------------------------------------------------------------

currencies = Table(
    "currencies",
    metadata,
    Column("code", String(3), primary_key=True),
    Column("minor_units", SmallInteger, nullable=False),
    CheckConstraint("minor_units BETWEEN 0 AND 4", name="ck_currencies_minor_units"),
)

instruments = Table(
    "instruments",
    metadata,
    Column("symbol", String(6), primary_key=True),
    Column("base", String(3), nullable=False),
    Column("quote", String(3), nullable=False),
    Column("price_decimals", SmallInteger, nullable=False),
)

accounts = Table(
    "accounts",
    metadata,
    Column("account", String(48), primary_key=True),
    Column("desk", String(48), nullable=False),
    Column("home_region", String(3), nullable=False),
)

# ---- transactional -------------------------------------------------------------------------

transfers = Table(
    "transfers",
    metadata,
    Column("region", String(3), nullable=False),
    Column("id", String(80), nullable=False, comment="<trade_id>:base | <trade_id>:quote"),
    Column("trade_id", String(64), nullable=False),
    Column("leg", String(5), nullable=False),
    Column("symbol", String(6), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("amount", BigInteger, nullable=False, comment="minor units moved, >= 0"),
    Column("debit_account", String(48), nullable=False),
    Column("credit_account", String(48), nullable=False),
    Column("price_ticks", BigInteger, nullable=False),
    Column("price_decimals", SmallInteger, nullable=False),
    Column("qty", BigInteger, nullable=False),
    Column("transact_ns", BigInteger, nullable=False),
    Column("recorded_ns", BigInteger, nullable=False),
    Column("stream_seq", BigInteger, nullable=False),
    PrimaryKeyConstraint("region", "id", name="pk_transfers"),
    CheckConstraint("amount >= 0", name="ck_transfers_amount"),
    CheckConstraint("leg IN ('base', 'quote')", name="ck_transfers_leg"),
)

postings = Table(
    "postings",
    metadata,
    Column("region", String(3), nullable=False),
    Column("id", BigInteger, nullable=False, comment="position in the region's hash chain"),
    Column("transfer_id", String(80), nullable=False),
    Column("account", String(48), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("amount", BigInteger, nullable=False, comment="> 0 credit, < 0 debit"),
    Column("transact_ns", BigInteger, nullable=False),
    Column("recorded_ns", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    PrimaryKeyConstraint("region", "id", name="pk_postings"),
    Index("ix_postings_transfer", "region", "transfer_id"),
    Index("ix_postings_time", "region", "transact_ns"),
)

balances = Table(
    "balances",
    metadata,
    Column("region", String(3), nullable=False),
    Column("account", String(48), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("last_posting_id", BigInteger, nullable=False),
    Column("updated_ns", BigInteger, nullable=False),
    PrimaryKeyConstraint("region", "account", "currency", name="pk_balances"),
)

chain_heads = Table(
    "chain_heads",
    metadata,
    Column("region", String(3), nullable=False),
    Column("last_posting_id", BigInteger, nullable=False),
    Column("last_hash", String(64), nullable=False),
    Column("updated_ns", BigInteger, nullable=False),
    PrimaryKeyConstraint("region", name="pk_chain_heads"),
)

held_fills = Table(
    "held_fills",
    metadata,
    Column("region", String(3), nullable=False),
    Column("stream_seq", BigInteger, nullable=False, comment="the fill's EXECOUT sequence"),
    Column("trade_id", String(64), nullable=True, comment="NULL: not readable by this build"),
    Column("subject", String(200), nullable=False),
    Column("field", String(64), nullable=False, comment="what could not be posted"),
    Column("reason", String(500), nullable=False),
    Column("payload", LargeBinary, nullable=False, comment="the fill message as stored"),
    Column("payload_sha256", String(64), nullable=False),
    Column("first_held_ns", BigInteger, nullable=False),
    Column("last_held_ns", BigInteger, nullable=False),
    Column("holds", Integer, nullable=False),
    PrimaryKeyConstraint("region", "stream_seq", "payload_sha256", name="pk_held_fills"),
)
"""Fills the writer could not post (a topology or build older than execution's), kept with
their bytes: EXECOUT deletes a message after its max_age, and until the fill is posted the
books of record lack a trade. A row is outstanding while its region has no transfer of the
trade; rows stay as the record of the hold. The bytes' digest is part of the key: a stream
recreated with its sequences reused gives another fill another row."""

REFERENCE_TABLES: tuple[Table, ...] = (currencies, instruments, accounts)
TRANSACTIONAL_TABLES: tuple[Table, ...] = (transfers, postings, balances, chain_heads, held_fills)
V1_TABLES: tuple[Table, ...] = (*REFERENCE_TABLES, transfers, postings, balances, chain_heads)
"""What migration 1 created; later migrations create their own tables."""


def partition_name(table: str, region: str) -> str:
    """Name of a table's PostgreSQL partition for ``region``."""
    return f"{table}_{region}"


# ---- DDL -----------------------------------------------------------------------------------


def get_dialect(name: str) -> Dialect:
    """A dialect instance to compile against, without a server."""
    if name == "postgresql":
        return postgresql.psycopg.dialect()  # type: ignore[no-any-return,no-untyped-call]
    if name == "cockroachdb":
        from sqlalchemy_cockroachdb.psycopg import CockroachDBDialect_psycopg

        return CockroachDBDialect_psycopg()  # type: ignore[no-any-return]
    raise LedgerConfigError("dialect", f"{name!r} is not postgresql or cockroachdb")


def _create_table(table: Table, dialect: Dialect) -> str:
    return str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)).strip()


def _create_indexes(table: Table, dialect: Dialect) -> list[str]:
    return [
        str(CreateIndex(ix, if_not_exists=True).compile(dialect=dialect)).strip()
        for ix in sorted(table.indexes, key=lambda i: str(i.name))
    ]


def _check_regions(topology: Topology) -> None:
    for r in topology.regions:
        if "'" in r.cloud_region or '"' in r.cloud_region:
            raise LedgerConfigError(f"regions.{r.code}.cloud_region", "must not contain quotes")


def postgres_table_ddl(tables: Sequence[Table] | None = None) -> list[str]:
    """CREATE TABLE/INDEX for PostgreSQL; transactional tables partitioned by LIST (region).

    ``tables``: only these (a migration's own), in the schema's order; default every table.
    """
    d = get_dialect("postgresql")
    out: list[str] = []
    for t in REFERENCE_TABLES:
        if tables is None or t in tables:
            out.append(_create_table(t, d))
    for t in TRANSACTIONAL_TABLES:
        if tables is None or t in tables:
            out.append(_create_table(t, d) + " PARTITION BY LIST (region)")
            out.extend(_create_indexes(t, d))
    return out


def postgres_partition_ddl(topology: Topology) -> list[str]:
    """One partition per region of the topology for every transactional table (idempotent)."""
    out: list[str] = []
    for t in TRANSACTIONAL_TABLES:
        for code in topology.codes:
            out.append(
                f"CREATE TABLE IF NOT EXISTS {partition_name(t.name, code)} "
                f"PARTITION OF {t.name} FOR VALUES IN ('{code}')"
            )
    return out


def crdb_region_case(topology: Topology) -> str:
    """SQL expression mapping a region code to its cloud region (the crdb_region value)."""
    _check_regions(topology)
    whens = " ".join(f"WHEN '{r.code}' THEN '{r.cloud_region}'" for r in topology.regions)
    return f"CASE region {whens} END"


def cockroach_database_ddl(
    database: str, topology: Topology, *, survival: Survival = "zone"
) -> list[str]:
    """Turn ``database`` into a multi-region database covering every topology region."""
    _check_regions(topology)
    if survival not in ("zone", "region"):
        raise LedgerConfigError("survival", "must be 'zone' or 'region'")
    db = '"' + database.replace('"', '""') + '"'
    primary = topology.region(topology.hub).cloud_region
    out = [f'ALTER DATABASE {db} SET PRIMARY REGION "{primary}"']
    for r in topology.regions:
        if r.code != topology.hub:
            out.append(f'ALTER DATABASE {db} ADD REGION IF NOT EXISTS "{r.cloud_region}"')
    out.append(f"ALTER DATABASE {db} SURVIVE {survival.upper()} FAILURE")
    return out


def cockroach_table_ddl(topology: Topology, tables: Sequence[Table] | None = None) -> list[str]:
    """CREATE TABLE/INDEX for CockroachDB: GLOBAL reference, REGIONAL BY ROW transactional.

    ``tables``: only these (a migration's own); default every table.
    """
    d = get_dialect("cockroachdb")
    case = crdb_region_case(topology)
    out: list[str] = []
    for t in REFERENCE_TABLES:
        if tables is None or t in tables:
            out.append(_create_table(t, d) + " LOCALITY GLOBAL")
    for t in TRANSACTIONAL_TABLES:
        if tables is not None and t not in tables:
            continue
        body = _create_table(t, d)
        close = body.rindex(")")
        col = f",\n\tcrdb_region crdb_internal_region NOT VISIBLE NOT NULL AS ({case}) STORED\n"
        out.append(
            body[:close].rstrip() + col + body[close:] + " LOCALITY REGIONAL BY ROW AS crdb_region"
        )
        out.extend(_create_indexes(t, d))
    return out


def schema_ddl(
    dialect: str, topology: Topology, *, database: str = "meridian", survival: Survival = "zone"
) -> list[str]:
    """Every statement that builds the schema on ``dialect`` (for docs, tests and migrations)."""
    if dialect == "postgresql":
        return postgres_table_ddl() + postgres_partition_ddl(topology)
    if dialect == "cockroachdb":
        return cockroach_database_ddl(database, topology, survival=survival) + (
            cockroach_table_ddl(topology)
        )
    raise LedgerConfigError("dialect", f"{dialect!r} is not postgresql or cockroachdb")


def table_names() -> Sequence[str]:
    """Every ledger table name, reference first."""
    return [t.name for t in (*REFERENCE_TABLES, *TRANSACTIONAL_TABLES)]
