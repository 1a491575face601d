"""Errors of the market-data context.

Hierarchy::

    ReplicationError                 root of everything raised by ``replication``
    ├── QuoteRejected                a quote failed validation: ``reason``, ``field``, ``rule``
    ├── ReplayError                  unreadable tick file: ``path``, ``line``, ``rule``
    └── ResumeError                  a feed cannot tell where its stream ends: ``subject``,
                                     ``stream_seq``, ``rule``
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


class ResumeError(ReplicationError):
    """A feed cannot establish the last seq of a symbol in its ``MD`` stream.

    Restarting that symbol at seq 1 instead would collide with the stored history (the stream
    dedups by ``Nats-Msg-Id`` within its window and views would hold two feeds under one
    subject), so the feed does not start until an operator repairs the subject.

    Attributes:
        subject: The symbol's subject in ``MD``.
        stream_seq: Stream sequence of the message that could not be read.
        rule: What is wrong with it, and what to do.
    """

    def __init__(self, subject: str, stream_seq: int, rule: str) -> None:
        super().__init__(f"{subject} (MD seq {stream_seq}): {rule}")
        self.subject = subject
        self.stream_seq = stream_seq
        self.rule = rule
