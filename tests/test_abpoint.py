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


async def test_a_closed_loop_slot_is_freed_once_by_the_ack_or_the_report() -> None:
    """``--window report`` frees a slot at the first report; an order answered UNAVAILABLE
    (outcome unknown) frees it at once, and its report, if it was stored after all, frees
    nothing more: the loop never runs above its in-flight count."""
    import types

    import msgpack

    from ops.loadgen import Loader, LoadResult
    from regions.topology import load_topology

    ld = Loader(None, load_topology(), "lon", run_id="t")  # type: ignore[arg-type]
    ld.window = "report"
    ld._res = LoadResult(region="lon", seconds=1, offered_per_s=None)
    for cl in ("c1", "c2"):
        ld.sent_ns[cl] = 1
        ld._open.add(cl)
    ld.inflight = 2

    def reply(cl: str, status: str) -> object:
        return types.SimpleNamespace(
            subject=f"_INBOX.x.{cl}", data=msgpack.packb({"status": status, "reason": "X"})
        )

    def report(cl: str) -> object:
        return types.SimpleNamespace(data=msgpack.packb({"cl_ord_id": cl, "exec_type": "NEW"}))

    await ld._on_reply(reply("c1", "ACCEPTED"))  # type: ignore[arg-type]
    assert ld.inflight == 2  # an ack frees nothing in this window
    await ld._on_report(report("c1"))  # type: ignore[arg-type]
    assert ld.inflight == 1
    await ld._on_reply(reply("c2", "REJECTED"))  # type: ignore[arg-type]
    assert ld.inflight == 0
    await ld._on_report(report("c2"))  # type: ignore[arg-type]
    assert ld.inflight == 0 and ld._open == set()
