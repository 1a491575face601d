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
