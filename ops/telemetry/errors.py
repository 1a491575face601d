"""Exceptions of :mod:`ops.telemetry`.

Hierarchy::

    TelemetryError            (ValueError)  root; ``field`` + ``rule`` of the problem
    └── LabelError                          a label value outside its bounded set
"""

from __future__ import annotations


class TelemetryError(ValueError):
    """Root exception of the telemetry package. ``field`` names the input, ``rule`` the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class LabelError(TelemetryError):
    """A label value is not in the bounded set the label allows (cardinality guard).

    ``field`` is the label name, ``value`` the refused value.
    """

    def __init__(self, label: str, value: str, allowed: tuple[str, ...]) -> None:
        shown = ", ".join(allowed[:12]) + (", ..." if len(allowed) > 12 else "")
        super().__init__(label, f"{value!r} is not one of [{shown}]")
        self.value = value
        self.allowed = allowed
