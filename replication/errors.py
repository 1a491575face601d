"""Errors of the market-data context.

Hierarchy::

    ReplicationError                 root of everything raised by ``replication``
    ├── QuoteRejected                a quote failed validation: ``reason``, ``field``, ``rule``
    └── ReplayError                  unreadable tick file: ``path``, ``line``, ``rule``
"""

from __future__ import annotations

from pathlib import Path


class ReplicationError(Exception):
    """Root of the market-data context's errors."""


class QuoteRejected(ReplicationError):
    """A quote broke a rule; it is counted and dropped, the feed keeps going.

    Attributes:
        reason: A label from :data:`replication.validate.REJECT_REASONS`.
        field: The offending field (``""`` for the payload as a whole).
        rule: The rule broken, in words.
    """

    def __init__(self, reason: str, field: str, rule: str) -> None:
        super().__init__(f"{reason}: {field}: {rule}")
        self.reason = reason
        self.field = field
        self.rule = rule


class ReplayError(ReplicationError):
    """A tick file could not be replayed."""

    def __init__(self, path: Path, line: int, rule: str) -> None:
        super().__init__(f"{path}:{line}: {rule}")
        self.path = path
        self.line = line
        self.rule = rule
