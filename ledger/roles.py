"""The read-only compliance role: SELECT on the ledger, nothing else.

Roles are cluster-wide on PostgreSQL, so creating one that exists (another database of the same
cluster made it) is skipped rather than failing.
"""

from __future__ import annotations

from ledger import schema

COMPLIANCE_ROLE = "meridian_compliance"


def grant_ddl(dialect: str, role: str = COMPLIANCE_ROLE) -> list[str]:
    """Statements creating ``role`` (if missing) with SELECT only on every ledger table."""
    tables = ", ".join([*schema.table_names(), "schema_migrations"])
    if dialect == "postgresql":
        return [
            "DO $$ BEGIN "
            f"CREATE ROLE {role} NOLOGIN; "
            "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
            f"REVOKE ALL ON {tables} FROM {role}",
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"GRANT SELECT ON {tables} TO {role}",
        ]
    return [
        f"CREATE ROLE IF NOT EXISTS {role}",
        f"GRANT SELECT ON TABLE {tables} TO {role}",
    ]
