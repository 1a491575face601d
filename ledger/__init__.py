"""The geo-partitioned double-entry ledger (issue 4; docs/decisions/0004-ledger.md).

Fills from each region's EXECOUT stream become two balanced transfers (base and quote leg)
written in the executing region's partition, hash-chained per region, verifiable and
exportable as one consistent snapshot.
"""

from typing import Any

from ledger.errors import FillRejected, LedgerConfigError, LedgerError, TamperDetected
from ledger.export import ExportRequest, export_ledger
from ledger.migrations import applied_versions, migrate
from ledger.model import Posting, Transfer, TransferId, transfer_id, transfers_for_fill
from ledger.roles import COMPLIANCE_ROLE
from ledger.schema import schema_ddl
from ledger.store import BatchResult, post_transfers
from ledger.verify import Problem, ProblemKind, VerifyReport, verify


def __getattr__(name: str) -> Any:
    # Lazy: `python -m ledger.writer` must not find ledger.writer already imported.
    if name in ("LedgerWriter", "WriterConfig"):
        from ledger import writer

        return getattr(writer, name)
    raise AttributeError(name)


__all__ = [
    "COMPLIANCE_ROLE",
    "BatchResult",
    "ExportRequest",
    "FillRejected",
    "LedgerConfigError",
    "LedgerError",
    "LedgerWriter",
    "Posting",
    "Problem",
    "ProblemKind",
    "TamperDetected",
    "Transfer",
    "TransferId",
    "VerifyReport",
    "WriterConfig",
    "applied_versions",
    "export_ledger",
    "migrate",
    "post_transfers",
    "schema_ddl",
    "transfer_id",
    "transfers_for_fill",
    "verify",
]
