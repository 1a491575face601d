"""ops.natsmon against real nats-servers: our own single server, and the 3-region test mesh."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ops.natsmon import (
    NATS_METRIC_NAMES,
    NatsMonitorCollector,
    expected_leafs,
    monitors_from_topology,
    parse_go_duration,
)
from ops.procs import NatsServer, free_ports
from regions.topology import load_topology

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(collector: NatsMonitorCollector) -> Samples:
    reg = CollectorRegistry()
    reg.register(collector)
    out: Samples = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for (n, lbl), v in samples.items() if n == name and lbl == set(labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


# ---- pure parts ------------------------------------------------------------------------------


def test_parse_go_duration() -> None:
    assert parse_go_duration("730µs") == pytest.approx(730e-6)
    assert parse_go_duration("1.5ms") == pytest.approx(1.5e-3)
    assert parse_go_duration("42.5ms") == pytest.approx(0.0425)
    assert parse_go_duration("1m2.5s") == pytest.approx(62.5)
    assert parse_go_duration("12ns") == pytest.approx(12e-9)
    assert parse_go_duration("0s") == 0.0
    for bad in ("", "fast", "12", "1.5 ms", "ms"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


@given(
    st.lists(
        st.tuples(st.integers(0, 999), st.sampled_from(["h", "m", "s", "ms", "µs", "ns"])),
        min_size=1,
        max_size=4,
    )
)
def test_parse_go_duration_sums_its_parts(parts: list[tuple[int, str]]) -> None:
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "µs": 1e-6, "ns": 1e-9}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_go_duration(text) == pytest.approx(sum(n * scale[u] for n, u in parts))


def test_expected_leafs_follow_hub_and_spoke() -> None:
    exp = expected_leafs(load_topology())
    assert set(exp["lon"]) == {"nyc", "sgp"}
    assert exp["nyc"] == ("lon",) and exp["sgp"] == ("lon",)


def test_collector_declares_its_families_without_scraping() -> None:
    # Registration must not touch the network (the devstack registers before servers start).
    (port,) = free_ports(1)
    c = NatsMonitorCollector({"lon": f"http://127.0.0.1:{port}"})
    names = set()
    for fam in c.describe():
        assert not fam.samples
        names.add(f"{fam.name}_total" if fam.type == "counter" else fam.name)
    assert names == NATS_METRIC_NAMES


# ---- one real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    d = tmp_path_factory.mktemp("natsmon")
    client, monitor = free_ports(2)
    conf = d / "tst.conf"
    conf.write_text(
        f'server_name: "tst"\nlisten: "127.0.0.1:{client}"\nhttp: "127.0.0.1:{monitor}"\n'
        f'jetstream {{ store_dir: "{d / "js"}", domain: "tst" }}\n'
    )
    srv = NatsServer("nats-natsmon-test", conf, monitor, d / "nats.log")
    srv.start(timeout_s=20)
    try:
        yield f"nats://127.0.0.1:{client}", f"http://127.0.0.1:{monitor}"
    finally:
        srv.stop()


@pytest.mark.integration
async def test_stream_and_consumer_series_follow_the_server(
    server: tuple[str, str], tmp_path: Path
) -> None:
    url, monitor = server
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="NM1", subjects=["nm1.>"]))
        for i in range(5):
            await js.publish(f"nm1.{i}", b"x" * 100)
        await js.add_consumer(
            "NM1",
            ConsumerConfig(durable_name="W1", ack_policy=AckPolicy.EXPLICIT, ack_wait=0.5),
        )
        sub = await js.pull_subscribe_bind("W1", "NM1")
        first = await sub.fetch(2, timeout=2)
        await first[0].ack_sync()
        await asyncio.sleep(0.8)  # the second message's ack_wait runs out
        again = await sub.fetch(1, timeout=2)
        assert again[0].metadata.num_delivered == 2  # a redelivery, not acked either

        (dead,) = free_ports(1)
        c = NatsMonitorCollector({"tst": monitor, "off": f"http://127.0.0.1:{dead}"})
        t0 = time.monotonic()
        s = scrape(c)
        assert time.monotonic() - t0 < 2.0
    finally:
        await nc.close()

    assert value(s, "meridian_nats_up", region="tst") == 1
    assert value(s, "meridian_nats_up", region="off") == 0
    assert not [k for k in s if ("region", "off") in k[1] and k[0] not in _ALWAYS]
    assert value(s, "meridian_nats_stream_messages", region="tst", stream="NM1") == 5
    assert value(s, "meridian_nats_stream_last_seq", region="tst", stream="NM1") == 5
    assert value(s, "meridian_nats_stream_bytes", region="tst", stream="NM1") > 500  # type: ignore[operator]
    cons = {"region": "tst", "stream": "NM1", "consumer": "W1"}
    assert value(s, "meridian_nats_consumer_num_pending", **cons) == 3
    assert value(s, "meridian_nats_consumer_ack_pending", **cons) == 1
    assert value(s, "meridian_nats_consumer_redelivered", **cons) == 1
    assert value(s, "meridian_nats_consumer_ack_floor_stream_seq", **cons) == 1
    assert value(s, "meridian_nats_leafnodes", region="tst") == 0
    assert value(s, "meridian_nats_memory_bytes", region="tst") > 1e6  # type: ignore[operator]
    assert value(s, "meridian_nats_messages_total", region="tst", direction="in") >= 5  # type: ignore[operator]
    # The scrape reads live state: one more publish moves the series.
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish("nm1.x", b"y")
    finally:
        await nc.close()
    s2 = scrape(NatsMonitorCollector({"tst": monitor}))
    assert value(s2, "meridian_nats_stream_messages", region="tst", stream="NM1") == 6
    assert value(s2, "meridian_nats_consumer_num_pending", **cons) == 4


_ALWAYS = {
    "meridian_nats_up",
    "meridian_nats_scrape_duration_seconds",
    "meridian_nats_endpoint_errors_total",
}


# ---- one endpoint failing --------------------------------------------------------------------


@pytest.fixture
def monitor() -> Iterator[tuple[str, dict[str, Any]]]:
    """A stand-in monitoring endpoint on a free port: ``answers`` maps a path to the JSON it
    returns, an HTTP status to fail with, or bytes to send as they are."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            a = answers.get(self.path.split("?")[0], 404)
            if isinstance(a, int):
                self.send_error(a)
                return
            body = a if isinstance(a, bytes) else json.dumps(a).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return None

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", answers
    finally:
        srv.shutdown()
        srv.server_close()


_VARZ = {"connections": 4, "mem": 123456789, "in_msgs": 10, "out_msgs": 20}
_LEAFZ = {"leafs": [{"name": "lon", "rtt": "70ms", "in_msgs": 1, "out_msgs": 2}]}
_JSZ = {
    "api": {"errors": 0},
    "account_details": [
        {
            "stream_detail": [
                {
                    "name": "ORDERS",
                    "state": {"messages": 9, "bytes": 900, "last_seq": 9},
                    "consumer_detail": [{"name": "risk_nyc", "num_pending": 2}],
                }
            ]
        }
    ],
}


def test_one_failing_endpoint_leaves_out_only_its_own_series(
    monitor: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Before, any endpoint failing made the whole server ``up 0`` with no series: a page
    (MeridianNatsServerDown) for a server that answers, and every other panel blank."""
    import logging

    base, answers = monitor
    answers.update({"/varz": _VARZ, "/connz": 500, "/leafz": _LEAFZ, "/jsz": b"{not json"})
    topo = load_topology()
    c = NatsMonitorCollector({"nyc": base}, topology=topo)
    with caplog.at_level(logging.WARNING, logger="meridian.natsmon"):
        s = scrape(c)
        s = scrape(c)  # failing still: counted again, logged once
    assert value(s, "meridian_nats_up", region="nyc") == 1
    assert value(s, "meridian_nats_connections", region="nyc") == 4
    assert value(s, "meridian_nats_memory_bytes", region="nyc") == 123456789
    lbl = {"region": "nyc", "remote": "lon", "link": "lon-nyc"}
    assert value(s, "meridian_nats_leafnode_up", **lbl) == 1
    # /connz and /jsz failed: their series are absent (not 0), and counted
    assert value(s, "meridian_nats_pending_bytes", region="nyc") is None
    assert not [
        k for k in s if k[0].startswith(("meridian_nats_stream_", "meridian_nats_consumer_"))
    ]
    assert value(s, "meridian_nats_jetstream_api_errors_total", region="nyc") is None
    errors = "meridian_nats_endpoint_errors_total"
    assert value(s, errors, region="nyc", endpoint="connz") == 2
    assert value(s, errors, region="nyc", endpoint="jsz") == 2
    assert value(s, errors, region="nyc", endpoint="varz") == 0
    assert value(s, errors, region="nyc", endpoint="leafz") == 0
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and any("/connz" in m for m in logged), logged

    # /leafz failing: no leaf series at all, never a false "link down"
    answers.update({"/connz": {"connections": []}, "/leafz": 503, "/jsz": _JSZ})
    s = scrape(c)
    assert value(s, "meridian_nats_up", region="nyc") == 1
    assert not [k for k in s if k[0].startswith("meridian_nats_leafnode")]
    assert value(s, "meridian_nats_pending_bytes", region="nyc") == 0
    cons = {"region": "nyc", "stream": "ORDERS", "consumer": "risk_nyc"}
    assert value(s, "meridian_nats_consumer_num_pending", **cons) == 2
    assert value(s, errors, region="nyc", endpoint="leafz") == 1

    # up follows /varz
    answers["/varz"] = 500
    s = scrape(c)
    assert value(s, "meridian_nats_up", region="nyc") == 0
    assert not [k for k in s if ("region", "nyc") in k[1] and k[0] not in _ALWAYS]
    assert value(s, errors, region="nyc", endpoint="varz") == 1


# ---- the 3-region mesh -----------------------------------------------------------------------


async def test_leaf_links_of_the_mesh(mesh: Any) -> None:
    topo = mesh.topology
    collector = NatsMonitorCollector(monitors_from_topology(topo), topology=topo)
    s = scrape(collector)
    for code in topo.codes:
        assert value(s, "meridian_nats_up", region=code) == 1
    best_rtt: dict[str, float] = {}
    for region, remotes in expected_leafs(topo).items():
        for remote in remotes:
            link = topo.link(region, remote)
            lbl = {"region": region, "remote": remote, "link": link.name}
            assert value(s, "meridian_nats_leafnode_up", **lbl) == 1, lbl
            rtt = value(s, "meridian_nats_leafnode_rtt_seconds", **lbl)
            assert rtt is not None and rtt >= 0.8 * link.one_way_ms / 1000, (lbl, rtt)
            best_rtt[link.name] = max(rtt, best_rtt.get(link.name, 0.0))
    # The link proxy delays each direction, so the RTT shows the emulated WAN round trip. (The
    # dialing side's first sample, taken during the leaf handshake, shows about one way only
    # until its next ping; the accepting side's shows the full round trip from the start.)
    for name, rtt in best_rtt.items():
        assert rtt >= 1.5 * mesh.proxy(name).one_way_ms / 1000, (name, rtt)

    # Cut lon-nyc (nyc has no fallback, so the mesh returns to its shape on restore).
    mesh.proxy("lon-nyc").cut()
    try:
        down = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            s = await asyncio.to_thread(scrape, collector)
            down = value(s, "meridian_nats_leafnode_up", region="nyc", remote="lon", link="lon-nyc")
            if down == 0:
                break
            await asyncio.sleep(0.1)
        assert down == 0
    finally:
        mesh.proxy("lon-nyc").restore()
        await asyncio.to_thread(mesh.wait_linked, 30)
    s = scrape(collector)
    assert value(s, "meridian_nats_leafnode_up", region="nyc", remote="lon", link="lon-nyc") == 1
