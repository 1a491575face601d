"""The ledger's one model (SQLAlchemy Core) and its DDL per dialect.

Reference tables (``currencies``, ``instruments``, ``accounts``) are small, read everywhere and
written by migrations only. Transactional tables (``transfers``, ``postings``, ``balances``,
``chain_heads``) carry the executing region in ``region`` and every primary key starts with it,
so the order path writes only rows of its own region.

The physical layout is dialect-specific and emitted explicitly here (the CockroachDB dialect
derives from the PostgreSQL one and would otherwise inherit PostgreSQL table options):

* PostgreSQL: every transactional table is ``PARTITION BY LIST (region)`` with one partition per
  region of the topology, named ``<table>_<region>``.
* CockroachDB: a multi-region database (primary region = the hub's, the others added; the
  survival goal is terraform's and is set here only when asked); transactional tables are
  ``LOCALITY REGIONAL BY ROW AS crdb_region`` where ``crdb_region`` is a hidden stored column
  computed from ``region`` (a CASE over the topology's regions, mapped to CockroachDB region
  names by :func:`crdb_region_names`); reference tables are ``LOCALITY GLOBAL``.

CockroachDB accepts only the region names ``SHOW REGIONS FROM CLUSTER`` lists. CockroachDB Cloud
names a GCP region ``gcp-<cloud_region>`` (:func:`crdb_region_name`, the one definition); a
self-hosted or demo cluster names its regions after its nodes' ``--locality``, so the mapping can
be overridden (``crdb_regions`` argument, or ``MERIDIAN_LEDGER_CRDB_REGIONS``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
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
from regions.topology import Region, Topology

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


# ---- CockroachDB region names ---------------------------------------------------------------

CRDB_CLOUD_REGION_PREFIX = "gcp-"
"""CockroachDB Cloud's SQL name of a GCP region is this prefix + the GCP region.

terraform/modules/ledger/main.tf (``locals.crdb_region``, used for the database's regions)
must build the same names: tests/test_ledger_crdb_regions.py reads it and compares."""

CRDB_REGIONS_ENV = "MERIDIAN_LEDGER_CRDB_REGIONS"
"""Override of the region names for a self-hosted or demo cluster: ``lon=us-east1,nyc=...``;
``*=NAME`` maps every region not named otherwise (a one-region demo cluster)."""


def crdb_region_name(region: Region) -> str:
    """The CockroachDB (Cloud) region name of ``region``: ``gcp-<cloud_region>``."""
    return CRDB_CLOUD_REGION_PREFIX + region.cloud_region


def parse_crdb_regions(spec: str) -> dict[str, str]:
    """``"lon=a,nyc=b"`` or ``"*=a"`` (the :data:`CRDB_REGIONS_ENV` format) -> a mapping."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        code, sep, name = item.partition("=")
        if not sep or not code.strip() or not name.strip():
            raise LedgerConfigError(CRDB_REGIONS_ENV, f"{item.strip()!r} is not CODE=REGION")
        out[code.strip()] = name.strip()
    return out


def crdb_regions_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The mapping set in :data:`CRDB_REGIONS_ENV`, or None when it is unset or empty."""
    spec = (os.environ if environ is None else environ).get(CRDB_REGIONS_ENV, "").strip()
    return parse_crdb_regions(spec) if spec else None


def crdb_region_names(
    topology: Topology, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Region code -> the CockroachDB region its rows live in, for every topology region.

    Default :func:`crdb_region_name` (CockroachDB Cloud, as terraform creates it).
    ``overrides`` (a self-hosted or demo cluster) maps codes to other names; ``"*"`` maps
    every code not named. A code outside the topology is an error, not ignored.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {"*", *topology.codes})
    if unknown:
        raise LedgerConfigError("crdb_regions", f"{', '.join(unknown)}: not a topology region")
    out: dict[str, str] = {}
    for r in topology.regions:
        name = overrides.get(r.code, overrides.get("*", crdb_region_name(r)))
        if not name or "'" in name or '"' in name:
            raise LedgerConfigError(
                f"crdb_regions.{r.code}", f"{name!r}: must be non-empty, without quotes"
            )
        out[r.code] = name
    return out


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


def crdb_region_case(topology: Topology, crdb_regions: Mapping[str, str] | None = None) -> str:
    """SQL expression mapping a region code to its CockroachDB region (the crdb_region value).

    ``crdb_regions``: overrides passed to :func:`crdb_region_names` (default: CockroachDB
    Cloud's names).
    """
    names = crdb_region_names(topology, crdb_regions)
    whens = " ".join(f"WHEN '{code}' THEN '{name}'" for code, name in names.items())
    return f"CASE region {whens} END"


def cockroach_database_ddl(
    database: str,
    topology: Topology,
    *,
    crdb_regions: Mapping[str, str] | None = None,
    primary_region: str | None = None,
    survival: Survival | None = None,
) -> list[str]:
    """Make ``database`` a multi-region database covering every topology region; idempotent.

    Args:
        database: the database name.
        topology: its regions; the hub's is the primary region of a database that has none.
        crdb_regions: overrides passed to :func:`crdb_region_names`.
        primary_region: the database's primary region now (``SHOW DATABASES``), None if it is
            not multi-region yet. A database that has one keeps it (terraform sets it in
            production): ``SET PRIMARY REGION`` is emitted only when there is none, and every
            other region is added with ``ADD REGION IF NOT EXISTS``, so a rerun changes nothing.
        survival: the survival goal to set; None (default) leaves the database's as it is
            (terraform owns it in production; CockroachDB's own default is zone).
    """
    if survival not in (None, "zone", "region"):
        raise LedgerConfigError("survival", "must be 'zone' or 'region'")
    names = crdb_region_names(topology, crdb_regions)
    db = '"' + database.replace('"', '""') + '"'
    out: list[str] = []
    primary = primary_region
    if primary is None:
        primary = names[topology.hub]
        out.append(f'ALTER DATABASE {db} SET PRIMARY REGION "{primary}"')
    for name in dict.fromkeys(names.values()):
        if name != primary:
            out.append(f'ALTER DATABASE {db} ADD REGION IF NOT EXISTS "{name}"')
    if survival is not None:
        out.append(f"ALTER DATABASE {db} SURVIVE {survival.upper()} FAILURE")
    return out


def cockroach_table_ddl(
    topology: Topology,
    tables: Sequence[Table] | None = None,
    *,
    crdb_regions: Mapping[str, str] | None = None,
) -> list[str]:
    """CREATE TABLE/INDEX for CockroachDB: GLOBAL reference, REGIONAL BY ROW transactional.

    ``tables``: only these (a migration's own); default every table. ``crdb_regions``: overrides
    passed to :func:`crdb_region_names`.
    """
    d = get_dialect("cockroachdb")
    case = crdb_region_case(topology, crdb_regions)
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


def crdb_region_case_pairs(expression: str) -> dict[str, str]:
    """(region code, CockroachDB region) pairs of a crdb_region CASE as CockroachDB stores it."""
    # CockroachDB stores the expression normalised ('lon':::STRING, 'x':::public.crdb_internal_
    # region or an OID reference): read the WHEN/THEN literals, whatever the casts.
    cast = r"(?:\s*:::?\s*[\w.@\"]+)?"
    pairs = re.findall(rf"WHEN\s+'([^']*)'{cast}\s+THEN\s+'([^']*)'", expression, re.IGNORECASE)
    return dict(pairs)


def cockroach_region_column_ddl(
    table: str,
    topology: Topology,
    *,
    expression: str,
    columns: Sequence[str] = (),
    crdb_regions: Mapping[str, str] | None = None,
) -> list[str]:
    """Recompute ``table``'s crdb_region when the topology's regions changed; idempotent.

    CockroachDB cannot alter a computed column's expression, so the documented way is taken:
    add ``crdb_region_new`` with the new CASE, swap the names, point ``REGIONAL BY ROW AS`` at
    it and drop the old column. Each statement is its own schema change; ``columns`` (the
    table's column names now) lets a rerun after a crash finish from wherever it stopped.

    Args:
        table: a transactional table.
        topology: the regions its crdb_region must cover.
        expression: the current crdb_region expression (information_schema.columns).
        columns: the table's columns now; ``crdb_region_new``/``crdb_region_old`` are leftovers
            of an interrupted run.
        crdb_regions: overrides passed to :func:`crdb_region_names`.
    """
    names = crdb_region_names(topology, crdb_regions)
    out: list[str] = []
    if "crdb_region_old" in columns:  # stopped after the swap: crdb_region is the new column
        out += [
            f"ALTER TABLE {table} SET LOCALITY REGIONAL BY ROW AS crdb_region",
            f"ALTER TABLE {table} DROP COLUMN crdb_region_old",
        ]
    if "crdb_region_new" in columns:  # stopped after adding it (maybe for another topology)
        out.append(f"ALTER TABLE {table} DROP COLUMN crdb_region_new")
    now = crdb_region_case_pairs(expression)
    # Unreadable (not our CASE): leave it; a region it lacks fails loudly at its chain head.
    # A code the topology dropped stays out of the new CASE: if that region has rows, adding
    # the NOT NULL column fails, and a migrate must not silently re-home a region's books.
    if not now or names.items() <= now.items():
        return out
    case = crdb_region_case(topology, crdb_regions)
    out += [
        f"ALTER TABLE {table} ADD COLUMN crdb_region_new crdb_internal_region "
        f"NOT VISIBLE NOT NULL AS ({case}) STORED",
        f"ALTER TABLE {table} RENAME COLUMN crdb_region TO crdb_region_old, "
        "RENAME COLUMN crdb_region_new TO crdb_region",
        f"ALTER TABLE {table} SET LOCALITY REGIONAL BY ROW AS crdb_region",
        f"ALTER TABLE {table} DROP COLUMN crdb_region_old",
    ]
    return out


def schema_ddl(
    dialect: str,
    topology: Topology,
    *,
    database: str = "meridian",
    survival: Survival | None = None,
    crdb_regions: Mapping[str, str] | None = None,
) -> list[str]:
    """Every statement that builds the schema on ``dialect`` (for docs and tests).

    CockroachDB: a database that is not multi-region yet; ``survival`` and ``crdb_regions``
    as in :func:`cockroach_database_ddl`.
    """
    if dialect == "postgresql":
        return postgres_table_ddl() + postgres_partition_ddl(topology)
    if dialect == "cockroachdb":
        return cockroach_database_ddl(
            database, topology, crdb_regions=crdb_regions, survival=survival
        ) + cockroach_table_ddl(topology, crdb_regions=crdb_regions)
    raise LedgerConfigError("dialect", f"{dialect!r} is not postgresql or cockroachdb")


def table_names() -> Sequence[str]:
    """Every ledger table name, reference first."""
    return [t.name for t in (*REFERENCE_TABLES, *TRANSACTIONAL_TABLES)]
