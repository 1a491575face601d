"""Compliance history's pieces that need no mesh."""

from __future__ import annotations

import psycopg
import pytest

from ops.history import History, _ledger_events


def test_the_ledger_lookup_takes_a_cockroachdb_dsn() -> None:
    """A CockroachDB DSN reaches the connection attempt (refused here: nothing listens on
    port 1), rather than failing to parse in psycopg."""
    h = History(account="A", order_id="O", trade_ids=["T1"])
    with pytest.raises(psycopg.OperationalError):
        _ledger_events(h, "cockroachdb://root@127.0.0.1:1/x?connect_timeout=2", [])


def test_an_incomplete_read_is_shown() -> None:
    h = History(account="A", order_id="O", gaps=["lon EXECOUT mrd.lon.er.A.>: read 3 of 9"])
    assert "INCOMPLETE: lon EXECOUT mrd.lon.er.A.>: read 3 of 9" in h.render()


async def test_a_region_that_cannot_be_read_is_a_gap_not_an_empty_answer() -> None:
    """A stream of an unreachable region (no responders over a cut link) once read as
    empty: the history lacked that region's reports and looked whole."""
    import types
    from typing import Any

    from nats.errors import NoRespondersError
    from nats.js.errors import NotFoundError

    from ops.history import _read_subject

    def nc(fail: Exception) -> Any:
        async def stream_info(stream: str, subjects_filter: str = "") -> Any:
            raise fail

        return types.SimpleNamespace(
            jetstream=lambda domain: types.SimpleNamespace(stream_info=stream_info)
        )

    gaps: list[str] = []
    assert await _read_subject(nc(NoRespondersError()), "sgp", "EXECOUT", "s", gaps=gaps) == []
    assert gaps == ["sgp EXECOUT s: not read (NoRespondersError)"]
    gaps.clear()
    assert await _read_subject(nc(NotFoundError()), "sgp", "EXECOUT", "s", gaps=gaps) == []
    assert gaps == []  # no such stream: nothing was stored there


async def test_history_reads_with_a_consumer_it_never_has_to_ack() -> None:
    """With explicit acks (nats-py's default) and no acks sent, the server stopped at
    max_ack_pending (1,000): a busy account's history was always INCOMPLETE."""
    import types
    from typing import Any

    from nats.js.api import AckPolicy

    from ops.history import _read_subject

    made: list[Any] = []

    class _Sub:
        async def fetch(self, n: int, timeout: float) -> list[int]:
            return [0] * n

        async def unsubscribe(self) -> None:
            pass

    async def stream_info(stream: str, subjects_filter: str = "") -> Any:
        return types.SimpleNamespace(state=types.SimpleNamespace(subjects={"s": 3}))

    async def pull_subscribe(subject: str, stream: str, config: Any) -> _Sub:
        made.append(config)
        return _Sub()

    js = types.SimpleNamespace(stream_info=stream_info, pull_subscribe=pull_subscribe)
    nc = types.SimpleNamespace(jetstream=lambda domain: js)
    assert len(await _read_subject(nc, "lon", "EXECOUT", "s")) == 3  # type: ignore[arg-type]
    assert made[0].ack_policy is AckPolicy.NONE


async def test_a_replace_chain_reaching_an_expired_request_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replace of a replace of an order older than ORDERS' 7 days: the missing link was
    silently taken for the new order (a wrong order id, "nothing found"). It is still the
    best guess, and the history now says it is one."""
    import types
    from typing import Any

    import msgpack

    from ops import history
    from regions.topology import load_topology
    from router import ids

    stored = {"R3": {"op": "replace", "orig": "R2"}}

    async def orders_msg(nc: Any, topology: Any, account: str, cl: str) -> Any:
        m = stored.get(cl)
        if m is None:
            return None
        body = msgpack.packb({"orig_cl_ord_id": m["orig"], "cl_ord_id": cl})
        return types.SimpleNamespace(headers={"Mrd-Op": m["op"]}, data=body)

    monkeypatch.setattr(history, "_orders_msg", orders_msg)
    gaps: list[str] = []
    oid = await history._order_of(None, load_topology(), "A", "R3", gaps)  # type: ignore[arg-type]
    assert oid == ids.order_id("A", "R2")
    (gap,) = gaps
    assert "'R2'" in gap and "not in ORDERS" in gap
