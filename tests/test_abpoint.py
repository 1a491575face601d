"""The A/B tool's mode syntax (ops/abpoint.py); the points themselves are benchmarks."""

import pytest

from ops.abpoint import Step, parse_mode


def test_modes_are_plus_joined_steps() -> None:
    assert parse_mode("base") == [Step("base")]
    assert parse_mode("env:MERIDIAN_RISK_ENTRY=1+stop:gateway-lon") == [
        Step("env", "MERIDIAN_RISK_ENTRY=1"),
        Step("stop", "gateway-lon"),
    ]
    assert parse_mode("noledger+linger250") == [Step("noledger"), Step("linger", "250")]


@pytest.mark.parametrize("bad", ["", "fast", "linger", "lingerx", "stop:", "env:X", "env:=1"])
def test_an_unknown_step_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_mode(bad)
