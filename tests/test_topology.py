"""Topology files: the shipped default loads; malformed ones name the field and the rule."""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ops.procs import nats_server_binary
from regions.natsconf import Credentials, ServerLayout, render_server_config
from regions.topology import (
    DEFAULT_TOPOLOGY,
    Session,
    TopologyError,
    load_topology,
    parse_topology,
)
from router.session import last_roll_ns, next_roll_ns


def raw() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_TOPOLOGY.read_text())


def test_default_topology_is_three_regions_with_disjoint_symbols() -> None:
    t = load_topology()
    assert t.codes == ("lon", "nyc", "sgp")
    assert t.hub == "lon"
    assert t.exec_region("EURUSD") == "lon"
    assert t.exec_region("USDCAD") == "nyc"
    assert t.exec_region("USDJPY") == "sgp"
    assert t.link("sgp", "lon").one_way_ms == 85
    assert t.link("lon", "nyc").one_way_ms == 35
    assert t.link("nyc", "sgp").one_way_ms == 115
    assert t.instrument("USDJPY").price_decimals == 3
    assert t.instrument("EURUSD").price_decimals == 5
    assert t.account_home("SGP-HF-01") == "sgp"
    assert all(r.domain == r.code for r in t.regions)


def test_price_formatting_is_exact() -> None:
    t = load_topology()
    eur, jpy = t.instrument("EURUSD"), t.instrument("USDJPY")
    assert eur.format_price(108453) == "1.08453"
    assert eur.parse_price("1.08453") == 108453
    assert jpy.parse_price("151.2") == 151200
    assert jpy.format_price(151200) == "151.200"
    with pytest.raises(ValueError):
        eur.parse_price("1.084531")


def _mutate(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(raw())
    node: Any = doc
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    last = parts[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field", "rule"),
    [
        ("regions.1.leaf_port", "7420", "regions[1].leaf_port", "integer in 1..65535"),
        ("regions.1.leaf_port", 70000, "regions[1].leaf_port", "integer in 1..65535"),
        ("regions.0.code", "LONDON", "regions[0].code", "three-letter"),
        ("regions.2.executes", ["EURUSD"], "regions[2].executes[0]", "already executed"),
        ("regions.2.executes", ["XXXYYY"], "regions[2].executes[0]", "not a known instrument"),
        ("regions.1.failover", ["nyc", "lon"], "regions[1].failover", "every region"),
        ("regions.2.leaf_dial", ["nyc", "lon"], "regions[2].leaf_dial[0]", "must be the hub"),
        ("regions.0.name", _DELETE, "regions[0].name", "is required"),
        ("hub", "par", "hub", "not one of the regions"),
        ("links.0.one_way_ms", -5, "links[0].one_way_ms", "0..2000"),
        ("links.1.b", "par", "links[1].b", "not one of the regions"),
        ("instruments.0.price_decimals", 2.5, "instruments[0].price_decimals", "integer"),
        ("instruments.0.base", "XXX", "instruments[0].base", "not a listed currency"),
        ("desks.1.region", "par", "desks[1].region", "not one of the regions"),
        ("regions.1.client_port", 4310, "regions[1].client_port", "already used"),
    ],
)
def test_malformed_topology_names_the_field(path: str, value: Any, field: str, rule: str) -> None:
    with pytest.raises(TopologyError) as ei:
        parse_topology(_mutate(path, value))
    assert ei.value.field == field
    assert rule in ei.value.rule


@pytest.mark.parametrize(
    ("session", "field", "rule"),
    [
        ({"roll": "25:00"}, "session.roll", "HH:MM"),
        ({"roll": "5pm"}, "session.roll", "HH:MM"),
        ({"tz": "Mars/Olympus"}, "session.tz", "not a known time zone"),
        ({"close": "17:00"}, "session", "unknown keys"),
        ("17:00", "session", "must be a table"),
    ],
)
def test_a_malformed_session_names_the_field(session: Any, field: str, rule: str) -> None:
    doc = copy.deepcopy(raw())
    doc["session"] = session
    with pytest.raises(TopologyError) as ei:
        parse_topology(doc)
    assert ei.value.field == field and rule in ei.value.rule


def _utc_ns(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()) * 10**9


@pytest.mark.parametrize(
    ("now", "last", "nxt"),
    [
        # New York on daylight time: 17:00 is 21:00 UTC
        ("2026-07-01T12:00:00", "2026-06-30T21:00:00", "2026-07-01T21:00:00"),
        ("2026-07-01T21:00:00", "2026-07-01T21:00:00", "2026-07-02T21:00:00"),  # at the roll
        # on standard time: 22:00 UTC
        ("2026-12-01T21:30:00", "2026-11-30T22:00:00", "2026-12-01T22:00:00"),
        # over the change back (1 November 2026): the day before on daylight time
        ("2026-11-01T12:00:00", "2026-10-31T21:00:00", "2026-11-01T22:00:00"),
        # a Saturday: the roll is daily (a market that trades all week)
        ("2026-11-28T23:00:00", "2026-11-28T22:00:00", "2026-11-29T22:00:00"),
    ],
)
def test_the_trading_day_rolls_at_17_new_york(now: str, last: str, nxt: str) -> None:
    session = load_topology().session
    assert (session.roll, session.tz) == ("17:00", "America/New_York")
    assert last_roll_ns(session, _utc_ns(now)) == _utc_ns(last)
    assert next_roll_ns(session, _utc_ns(now)) == _utc_ns(nxt)
    assert next_roll_ns(Session(roll="00:00", tz="UTC"), _utc_ns(now)) == _utc_ns(
        (dt.datetime.fromisoformat(now).date() + dt.timedelta(days=1)).isoformat() + "T00:00:00"
    )


@pytest.mark.parametrize("roll", ["17:00", "01:30", "02:30", "00:00", "23:59"])
def test_the_last_roll_is_never_after_now_nor_the_next_at_or_before_it(roll: str) -> None:
    """Around both of New York's daylight saving changes, for roll times the change skips or
    repeats too: instants are compared, never wall-clock times (which once made the next
    roll one already past, and the worker's wait a busy loop)."""
    session = Session(roll=roll, tz="America/New_York")
    for start in ("2026-10-31T00:00:00", "2027-03-13T00:00:00"):
        t0 = _utc_ns(start)
        for step in range(0, 3 * 86_400, 599):  # three days, about every ten minutes
            now = t0 + step * 10**9
            last, nxt = last_roll_ns(session, now), next_roll_ns(session, now)
            assert last <= now < nxt and nxt - last <= 25 * 3600 * 10**9


def test_spokes_dialling_each_other_is_refused() -> None:
    doc = _mutate("regions.1.leaf_dial", ["lon", "sgp"])
    doc["regions"][2]["accepts_leaf"] = True
    with pytest.raises(TopologyError, match="dial each other"):
        parse_topology(doc)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    bad = tmp_path / "t.toml"
    bad.write_text("regions = [[[")
    with pytest.raises(TopologyError, match="not valid TOML"):
        load_topology(bad)
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.toml")


def test_rendered_configs_pass_nats_server_check(tmp_path: Path) -> None:
    t = load_topology()
    creds = Credentials.generate()
    assert "redacted" in repr(creds) and creds.passwords["sre"] not in repr(creds)
    for code in t.codes:
        layout = ServerLayout(
            store_dir=tmp_path / code, leaf_urls={"lon": "127.0.0.1:7510", "nyc": "127.0.0.1:7512"}
        )
        conf = tmp_path / f"{code}.conf"
        conf.write_text(render_server_config(t, code, layout, creds))
        text = conf.read_text()
        assert f'domain: "{code}"' in text
        r = subprocess.run(
            [str(nats_server_binary()), "-t", "-c", str(conf)], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr + r.stdout
    sgp = (tmp_path / "sgp.conf").read_text()
    assert "no_randomize: true" in sgp and "7510" in sgp and "7512" in sgp
    lon = (tmp_path / "lon.conf").read_text()
    assert "no_advertise: true" in lon and "remotes" not in lon
