"""Ledger exceptions: one root, structured fields, read by retry predicates.

Hierarchy::

    LedgerError                     root of every ledger failure
    ├── FillRejected                a fill message cannot be posted (field + rule); never retried
    │   └── TransferConflict        its trade id is posted already with other content (permanent)
    ├── LedgerConfigError           bad DSN, unknown dialect, unknown region (field + rule)
    └── TamperDetected              verify found problems (carries the report)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class LedgerError(Exception):
    """Root of every ledger error. ``retryable`` tells retry predicates what to do."""

    retryable: bool = False


class FillRejected(LedgerError):
    """A fill broke the contract or the ledger's rules; ``field`` and ``rule`` say how."""

    def __init__(
        self, field: str, rule: str, *, trade_id: str = "", permanent: bool = False
    ) -> None:
        super().__init__(f"fill {trade_id or '?'}: {field}: {rule}")
        self.field = field
        self.rule = rule
        self.trade_id = trade_id
        self.permanent = permanent
        """No topology this writer could be given would post it (another region's fill, an
        amount beyond int64 minor units); otherwise it names something the topology may
        learn (an account, pair or currency)."""


class TransferConflict(FillRejected):
    """Transfers whose ids are taken by transfers of other content: another fill under a trade
    id already posted (or twice in one batch). Nothing of the batch was posted; never retried.

    ``conflicts`` holds each offending transfer, as given, with what differs, so a caller
    posting many fills can drop exactly those and post the rest.
    """

    def __init__(self, region: str, conflicts: Sequence[tuple[Any, str]]) -> None:
        first = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        super().__init__(
            "trade_id",
            f"{first[0].id} is posted in {region} with other content: {first[1]}{more}",
            trade_id=str(first[0].trade_id),
            permanent=True,
        )
        self.region = region
        self.conflicts = tuple(conflicts)
        """(the Transfer given, what differs from the one posted), per offending transfer."""

    @property
    def trade_ids(self) -> tuple[str, ...]:
        """The trade ids of the offending transfers, in order, without repeats."""
        return tuple(dict.fromkeys(str(t.trade_id) for t, _ in self.conflicts))


class LedgerConfigError(LedgerError):
    """Configuration that cannot work (unknown dialect, region not in the topology)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class TamperDetected(LedgerError):
    """Raised by callers that want an exception rather than a report from verify."""

    def __init__(self, report: Any) -> None:
        super().__init__(f"ledger verify failed: {len(report.problems)} problem(s)")
        self.report = report
