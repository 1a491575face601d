"""ops.telemetry: metrics registry, tracing over NATS headers, waterfall, JSON logs, CLI."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ops import cli_obs
from ops.telemetry import (
    LATENCY_BUCKETS_S,
    LabelError,
    MeridianMetrics,
    SpanRecord,
    TelemetryError,
    configure_logging,
    metric_names,
    process_span,
    read_spans,
    send_span,
    serve,
    setup_tracing,
    spans_path,
    waterfall,
)
from ops.telemetry.metrics import KILL_SCOPES
from ops.telemetry.tracing import ORDER_ID, destination_template, extract, inject
from regions.topology import Topology, load_topology
from router.contract import RejectReason

ISSUE_SERIES = {
    "meridian_orders_received_total",
    "meridian_orders_acked_total",
    "meridian_order_rejects_total",
    "meridian_submit_to_ack_seconds",
    "meridian_order_to_execution_seconds",
    "meridian_fills_total",
    "meridian_risk_decisions_total",
    "meridian_book_depth",
    "meridian_consumer_pending",
    "meridian_ledger_batch_size",
    "meridian_ledger_commit_seconds",
    "meridian_ledger_backlog",
    "meridian_replication_lag_seconds",
    "meridian_md_gaps_total",
    "meridian_reconnects_total",
    "meridian_kill_switch_engaged",
}


@pytest.fixture(scope="module")
def topo() -> Topology:
    return load_topology()


def _samples(reg: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(reg).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    for (n, lbl), v in _samples(reg).items():
        if n == name and want <= set(lbl):
            return v
    return None


# ---- metrics ---------------------------------------------------------------------------------


def test_every_series_of_the_issue_is_registered() -> None:
    from replication.metrics import MdMetrics

    md = CollectorRegistry()
    MdMetrics(md, view="lon", sources=("lon", "sgp"))  # replication lag is the md service's
    assert metric_names() | metric_names(md) >= ISSUE_SERIES
    # one definition: the since-start p99 gauge is the md service's alone (never set here)
    assert "meridian_replication_lag_p99_seconds" not in metric_names()


def test_ledger_writer_exports_the_same_ledger_families_as_every_process() -> None:
    from ledger.writer import WriterMetrics

    shared = {
        "meridian_ledger_batch_size",
        "meridian_ledger_commit_seconds",
        "meridian_ledger_backlog",
    }
    app, led = CollectorRegistry(), CollectorRegistry()
    m = MeridianMetrics(app, region="lon", service="ledger")
    _ = (m.ledger_batch_size, m.ledger_commit_seconds, m.ledger_backlog)  # series exist once used
    w = WriterMetrics(led, "lon")
    w.rejected("payload").inc()
    w.retries("connection").inc()

    def shape(reg: CollectorRegistry) -> set[tuple[str, tuple[str, ...], str | None]]:
        """(sample, label names, bucket) of the shared families: one definition, one shape."""
        return {
            (s.name, tuple(sorted(k for k in s.labels if k != "le")), s.labels.get("le"))
            for fam in reg.collect()
            if fam.name in shared
            for s in fam.samples
        }

    assert shape(led) == shape(app)
    assert ("meridian_ledger_backlog", ("region", "service"), None) in shape(led)
    names = set()
    for fam in led.collect():
        for s in fam.samples:
            if s.name.startswith("meridian_"):
                assert (s.labels["region"], s.labels["service"]) == ("lon", "ledger"), s.name
                names.add(fam.name)
    assert names >= shared | {"meridian_ledger_fills_rejected", "meridian_ledger_db_retries"}


def test_only_the_ledger_exports_ledger_series(topo: Topology) -> None:
    """Every process registers the ledger families (one definition), but a gateway, risk or
    execution worker, which never observes them, exports no empty series of them."""
    reg = CollectorRegistry()
    MeridianMetrics(reg, region="lon", service="gateway", topology=topo)
    families = {fam.name: fam for fam in reg.collect()}
    assert "meridian_ledger_batch_size" in families
    for name, fam in families.items():
        if name.startswith("meridian_ledger_"):
            assert fam.samples == [], name


def test_gc_pauses_are_observed_per_generation(topo: Topology) -> None:
    import gc

    reg = CollectorRegistry()
    m = MeridianMetrics(reg, region="lon", service="risk", topology=topo)
    cb = m.watch_gc()
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(cb)
    labels = {"region": "lon", "service": "risk", "generation": "2"}
    assert reg.get_sample_value("meridian_gc_pause_seconds_count", labels) == 1.0
    assert reg.get_sample_value("meridian_gc_pause_seconds_sum", labels) > 0.0
    gc.collect()  # no longer watched
    assert reg.get_sample_value("meridian_gc_pause_seconds_count", labels) == 1.0


def test_registry_exposes_series_with_names_and_labels(topo: Topology) -> None:
    reg = CollectorRegistry()
    m = MeridianMetrics(reg, region="sgp", service="execution", topology=topo)
    m.orders_received.inc(3)
    m.orders_acked.inc(2)
    m.order_rejects(RejectReason.MAX_QTY).inc()
    m.submit_to_ack.observe(120e-6)
    m.order_to_execution("USDJPY").observe(0.180)
    m.fills("USDJPY").inc(4)
    m.risk_decisions("accept").inc()
    m.book_depth("USDJPY", "BUY").set(7)
    m.consumer_pending("EXEC", "exec-worker").set(11)
    m.ledger_batch_size.observe(250)
    m.ledger_commit_seconds.observe(0.004)
    m.ledger_backlog.set(42)
    m.md_gaps("sgp->lon").inc()
    m.reconnects.inc()
    m.kill_switch_engaged("desk").set(1)

    base = {"region": "sgp", "service": "execution"}
    assert _value(reg, "meridian_orders_received_total", **base) == 3
    assert _value(reg, "meridian_orders_acked_total", **base) == 2
    assert _value(reg, "meridian_order_rejects_total", reason="MAX_QTY", **base) == 1
    assert _value(reg, "meridian_fills_total", symbol="USDJPY", **base) == 4
    assert _value(reg, "meridian_book_depth", symbol="USDJPY", side="buy", **base) == 7
    assert _value(reg, "meridian_consumer_pending", stream="EXEC", consumer="exec-worker") == 11
    assert _value(reg, "meridian_md_gaps_total", link="sgp->lon", **base) == 1
    assert _value(reg, "meridian_kill_switch_engaged", scope="desk", **base) == 1
    # Closed label sets start at 0 so rate()/alerts work before the first event.
    assert _value(reg, "meridian_risk_decisions_total", decision="reject", **base) == 0
    assert _value(reg, "meridian_risk_requests_total", entry="direct", **base) == 0
    assert _value(reg, "meridian_kill_switch_engaged", scope="global", **base) == 0
    # Sub-millisecond buckets: 120 us lands in the 200 us bucket, not in the first 50 us one.
    assert _value(reg, "meridian_submit_to_ack_seconds_bucket", le="5e-05") == 0
    assert _value(reg, "meridian_submit_to_ack_seconds_bucket", le="0.0002") == 1
    assert _value(reg, "meridian_order_to_execution_seconds_bucket", le="0.175") == 0
    assert _value(reg, "meridian_order_to_execution_seconds_bucket", le="0.2") == 1
    assert _value(reg, "meridian_ledger_batch_size_count", **base) == 1
    # Every sample carries the constant labels.
    for (name, labels), _ in _samples(reg).items():
        if name.startswith("meridian_"):
            assert {"region", "service"} <= {k for k, _ in labels}, name


def test_label_values_are_bounded(topo: Topology) -> None:
    m = MeridianMetrics(CollectorRegistry(), region="lon", service="gateway", topology=topo)
    with pytest.raises(LabelError) as e:
        m.fills("XXXYYY")
    assert e.value.field == "symbol" and e.value.value == "XXXYYY"
    with pytest.raises(LabelError):
        m.md_gaps("lon->tyo")
    m.md_gaps("sgp->lon")  # both directions of a topology link are allowed
    with pytest.raises(LabelError):
        m.order_rejects("SOMETHING_ELSE")
    with pytest.raises(LabelError):
        m.risk_decisions("maybe")
    with pytest.raises(LabelError):
        m.risk_requests("fax")
    with pytest.raises(LabelError):
        m.book_depth("EURUSD", "middle")
    with pytest.raises(LabelError):
        m.consumer_pending("NOSUCH", "c1")
    with pytest.raises(TelemetryError):
        MeridianMetrics(CollectorRegistry(), region="tyo", service="gateway", topology=topo)
    # Registries are per instance: two processes' metrics never collide.
    MeridianMetrics(CollectorRegistry(), region="lon", service="gateway", topology=topo)


def test_kill_switch_gauges_count_the_engaged_keys_per_scope(topo: Topology) -> None:
    reg = CollectorRegistry()
    m = MeridianMetrics(reg, region="lon", service="risk", topology=topo)
    base = {"region": "lon", "service": "risk"}
    m.kills_engaged({"global", "account.LON-HF-01", "account.LON-HF-02", "desk.LONFX1", "x.y"})
    got = {s: _value(reg, "meridian_kill_switch_engaged", scope=s, **base) for s in KILL_SCOPES}
    assert got == {"global": 1, "account": 2, "desk": 1}
    m.kills_engaged({"desk.LONFX1"})  # released ones read 0 again
    got = {s: _value(reg, "meridian_kill_switch_engaged", scope=s, **base) for s in KILL_SCOPES}
    assert got == {"global": 0, "account": 0, "desk": 1}


def test_help_texts_say_what_is_measured() -> None:
    docs = {fam.name: fam.documentation for fam in _registry_families()}
    depth = docs["meridian_book_depth"]
    assert "price levels" in depth.lower() and "50" in depth and "Resting orders in" not in depth
    o2e = docs["meridian_order_to_execution_seconds"]
    assert "wall clock" in o2e.lower() and "publishing its NEW report" in o2e
    assert "rebuild" in o2e and "first execution report" not in o2e


def _registry_families() -> list[Any]:
    reg = CollectorRegistry()
    MeridianMetrics(reg, region="lon", service="probe")
    return list(reg.collect())


def test_latency_buckets_are_fine_below_a_millisecond() -> None:
    b = LATENCY_BUCKETS_S
    assert list(b) == sorted(set(b))
    assert b[0] <= 50e-6 and b[-1] >= 5.0
    assert sum(1 for x in b if x < 1e-3) >= 5


def test_serve_exposes_the_registry_over_http(topo: Topology) -> None:
    reg = CollectorRegistry()
    MeridianMetrics(reg, region="nyc", service="risk", topology=topo).orders_received.inc()
    server = serve(reg, 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as r:
            body = r.read().decode()
        assert 'meridian_orders_received_total{region="nyc",service="risk"} 1.0' in body
    finally:
        server.close()


# ---- tracing ---------------------------------------------------------------------------------


def test_destination_template_keeps_low_cardinality_prefix() -> None:
    assert destination_template("mrd.lon.ord.LON-HF-01.ab12") == "mrd.lon.ord"
    assert destination_template("mrd.v1.entry.lon.LON-HF-01.new") == "mrd.v1.entry.lon"
    assert destination_template("mrd.sgp.exe.USDJPY") == "mrd.sgp.exe"


def test_parent_child_links_survive_headers_across_processes(tmp_path: Path) -> None:
    desk = setup_tracing(service="desk", region="lon", run_dir=tmp_path, enabled=True)
    gateway = setup_tracing(service="gateway", region="lon", run_dir=tmp_path, enabled=True)
    execution = setup_tracing(service="execution", region="sgp", run_dir=tmp_path, enabled=True)
    assert desk.exporter == "file" and desk.path == spans_path(tmp_path, "desk", "lon")

    # desk -> gateway (request) ; gateway -> EXEC stream ; execution processes it.
    h1: dict[str, str] = {}
    with send_span(
        desk.tracer, "mrd.v1.entry.lon.LON-HF-01.new", h1, order_id="O-1", operation="request"
    ):
        assert "traceparent" in h1
        wire1 = dict(h1)  # what travels in the NATS message headers
    h2: dict[str, str] = {}
    with (
        process_span(gateway.tracer, "mrd.v1.entry.lon", wire1, order_id="O-1"),
        send_span(gateway.tracer, "mrd.sgp.exe.USDJPY", h2, order_id="O-1"),
    ):
        pass
    with process_span(
        execution.tracer,
        "EXEC",
        dict(h2),
        subject="mrd.sgp.exe.USDJPY",
        order_id="O-1",
        consumer="exec",
    ):
        pass
    for t in (desk, gateway, execution):
        t.shutdown()

    spans = {s.name: s for s in read_spans(sorted((tmp_path / "traces").glob("*.jsonl")))}
    assert set(spans) == {
        "request mrd.v1.entry.lon",
        "process mrd.v1.entry.lon",
        "publish mrd.sgp.exe",
        "process EXEC",
    }
    req, proc, pub, exe = (
        spans["request mrd.v1.entry.lon"],
        spans["process mrd.v1.entry.lon"],
        spans["publish mrd.sgp.exe"],
        spans["process EXEC"],
    )
    assert len({s.trace_id for s in spans.values()}) == 1
    assert req.parent_id is None
    assert proc.parent_id == req.span_id
    assert pub.parent_id == proc.span_id
    assert exe.parent_id == pub.span_id
    assert (req.kind, proc.kind, pub.kind, exe.kind) == (
        "CLIENT",
        "CONSUMER",
        "PRODUCER",
        "CONSUMER",
    )
    assert (exe.service, exe.region, req.service, req.region) == ("execution", "sgp", "desk", "lon")
    assert exe.attributes["messaging.system"] == "nats"
    assert exe.attributes["messaging.operation.type"] == "process"
    assert exe.attributes["messaging.destination.name"] == "mrd.sgp.exe.USDJPY"
    assert exe.attributes["messaging.consumer.group.name"] == "exec"
    assert pub.attributes["messaging.operation.type"] == "send"
    assert pub.attributes["messaging.operation.name"] == "publish"
    assert all(s.attributes[ORDER_ID] == "O-1" for s in spans.values())
    # The line format is the documented one.
    line = json.loads((tmp_path / "traces" / "execution-sgp.jsonl").read_text().splitlines()[0])
    assert set(line) >= {
        "trace_id",
        "span_id",
        "parent_id",
        "name",
        "kind",
        "start_ns",
        "end_ns",
        "attributes",
        "service",
        "region",
    }


def test_inject_extract_roundtrip_without_helpers(tmp_path: Path) -> None:
    t = setup_tracing(service="probe", region="nyc", path=tmp_path / "s.jsonl", enabled=True)
    with t.tracer.start_as_current_span("outer") as outer:
        headers = inject({})
    ctx = extract(headers)
    remote = trace.get_current_span(ctx).get_span_context()
    assert remote.is_remote
    assert remote.trace_id == outer.get_span_context().trace_id
    assert remote.span_id == outer.get_span_context().span_id
    assert not trace.get_current_span(extract(None)).get_span_context().is_valid
    t.shutdown()


def test_tracing_off_is_a_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERIDIAN_TRACING", "off")
    t = setup_tracing(service="gateway", region="lon", run_dir=tmp_path)
    assert not t.enabled and t.exporter == "off"
    headers: dict[str, str] = {}
    with send_span(t.tracer, "mrd.lon.ord.A.k", headers, order_id="O") as span:
        assert not span.is_recording()
    with process_span(t.tracer, "ORDERS", headers) as span:
        assert not span.is_recording()
    assert headers == {}
    t.shutdown()
    assert not (tmp_path / "traces").exists()


def test_otlp_endpoint_falls_back_to_file_when_exporter_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    t = setup_tracing(service="risk", region="lon", run_dir=tmp_path, enabled=True)
    try:
        if not _otlp_installed():
            assert t.exporter == "file" and t.path is not None
        else:
            assert t.exporter.startswith("otlp-")
    finally:
        t.shutdown()


def _otlp_installed() -> bool:
    for proto in ("http", "grpc"):
        try:
            if importlib.util.find_spec(f"opentelemetry.exporter.otlp.proto.{proto}") is not None:
                return True
        except ModuleNotFoundError:
            continue
    return False


def _rec(sid: str, parent: str | None, name: str, start_us: int, end_us: int) -> SpanRecord:
    return SpanRecord(
        trace_id="ab" * 16, span_id=sid, parent_id=parent, name=name, kind="INTERNAL",
        start_ns=1_000_000_000 + start_us * 1000, end_ns=1_000_000_000 + end_us * 1000,
        service="svc", region="lon", attributes={ORDER_ID: "O-9"},
    )  # fmt: skip


def test_waterfall_renders_a_three_span_tree() -> None:
    spans = [
        _rec("c" * 16, "b" * 16, "process EXEC", 150, 300),
        _rec("a" * 16, None, "request mrd.v1.entry.lon", 0, 1000),
        _rec("b" * 16, "a" * 16, "publish mrd.sgp.exe", 100, 400),
    ]
    out = waterfall(spans, width=20)
    lines = out.splitlines()
    assert lines[0].startswith(f"trace {'ab' * 16}") and "3 spans" in lines[0]
    assert "1,000 us" in lines[0]
    body = lines[2:]
    assert len(body) == 3
    # Parent before child, indented by depth; offset and duration in microseconds.
    assert body[0].split()[:3] == ["0", "1,000", "request"]
    assert "  publish mrd.sgp.exe" in body[1] and body[1].split()[:2] == ["100", "300"]
    assert "    process EXEC" in body[2] and body[2].split()[:2] == ["150", "150"]
    bars = [ln[ln.index("|") + 1 : ln.rindex("|")] for ln in body]
    assert bars[0] == "█" * 20
    assert bars[1] == "  " + "█" * 6 + " " * 12
    assert bars[2] == "   " + "█" * 3 + " " * 14
    assert "svc@lon" in body[2]


@st.composite
def _trees(draw: st.DrawFn) -> list[SpanRecord]:
    n = draw(st.integers(1, 25))
    out = []
    for i in range(n):
        parent = draw(st.none() | st.integers(0, i - 1)) if i else None
        start = draw(st.integers(0, 10_000))
        dur = draw(st.integers(0, 10_000))
        out.append(
            _rec(
                f"{i:016x}",
                None if parent is None else f"{parent:016x}",
                f"span{i}",
                start,
                start + dur,
            )
        )
    return draw(st.permutations(out))


@settings(max_examples=60, deadline=None)
@given(_trees())
def test_waterfall_shows_every_span_once_below_its_parent(spans: list[SpanRecord]) -> None:
    body = waterfall(spans).splitlines()[2:]
    names = [ln.split()[2] for ln in body]
    assert sorted(names) == sorted(s.name for s in spans)
    pos = {n: i for i, n in enumerate(names)}
    label_col = 10 + 1 + 10 + 2  # start_us, dur_us, then the indented span name
    indent = {
        n: len(ln[label_col:]) - len(ln[label_col:].lstrip())
        for n, ln in zip(names, body, strict=True)
    }
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        if s.parent_id is None:
            assert indent[s.name] == 0
        else:
            parent = by_id[s.parent_id]
            assert pos[parent.name] < pos[s.name]
            assert indent[s.name] == indent[parent.name] + 2


def test_cli_trace_prints_the_orders_waterfall(tmp_path: Path) -> None:
    path = spans_path(tmp_path, "gateway", "lon")
    path.parent.mkdir(parents=True)
    spans = [
        _rec("a" * 16, None, "request mrd.v1.entry.lon", 0, 1000),
        _rec("b" * 16, "a" * 16, "publish mrd.sgp.exe", 100, 400),
    ]
    path.write_text("".join(s.to_json() + "\n" for s in spans) + '{"torn": ')
    parser = argparse.ArgumentParser()
    cli_obs.register(parser.add_subparsers(dest="command"))

    out = io.StringIO()
    args = parser.parse_args(["trace", "O-9", "--run-dir", str(tmp_path)])
    assert cli_obs.cmd_trace(args, out) == 0
    assert "request mrd.v1.entry.lon" in out.getvalue()
    assert "publish mrd.sgp.exe" in out.getvalue()
    args = parser.parse_args(["trace", "O-unknown", "--run-dir", str(tmp_path)])
    assert args.func(args) == 1
    args = parser.parse_args(["trace", "O-9", "--run-dir", str(tmp_path / "empty")])
    assert args.func(args) == 2


# ---- logs ------------------------------------------------------------------------------------


def test_json_logs_carry_region_service_order_and_trace(tmp_path: Path) -> None:
    logger = logging.getLogger("test.telemetry.json")
    logger.propagate = False
    path = configure_logging(service="risk", region="nyc", run_dir=tmp_path, logger=logger)
    assert path == tmp_path / "logs" / "risk-nyc.jsonl"
    t = setup_tracing(service="risk", region="nyc", run_dir=tmp_path, enabled=True)
    with t.tracer.start_as_current_span("work") as span:
        logger.info("accepted %s", "O-7", extra={"order_id": "O-7", "account": "NYC-HF-01"})
        tid = f"{span.get_span_context().trace_id:032x}"
    logger.warning("plain")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed", extra={"order_id": "O-8", "trace_id": "f" * 32})
    # Reconfiguring replaces our handler instead of doubling every line.
    configure_logging(service="risk", region="nyc", run_dir=tmp_path, logger=logger)
    logger.info("again")
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)
    t.shutdown()

    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["msg"] for r in recs] == ["accepted O-7", "plain", "failed", "again"]
    first = recs[0]
    assert (first["region"], first["service"], first["level"]) == ("nyc", "risk", "INFO")
    assert first["order_id"] == "O-7" and first["account"] == "NYC-HF-01"
    assert first["trace_id"] == tid
    assert first["ts"].endswith("+00:00")
    assert "order_id" not in recs[1] and "trace_id" not in recs[1]
    assert recs[2]["trace_id"] == "f" * 32 and "RuntimeError: boom" in recs[2]["exc"]


def test_cli_logs_filters_and_merges_in_time_order(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "gateway-lon.jsonl").write_text(
        '{"ts":"2025-01-01T00:00:01.000000+00:00","level":"INFO","region":"lon",'
        '"service":"gateway","msg":"in","order_id":"O-1"}\n'
        '{"ts":"2025-01-01T00:00:03.000000+00:00","level":"INFO","region":"lon",'
        '"service":"gateway","msg":"acked","order_id":"O-1"}\n'
    )
    (logs / "execution-sgp.jsonl").write_text(
        '{"ts":"2025-01-01T00:00:02.000000+00:00","level":"INFO","region":"sgp",'
        '"service":"execution","msg":"filled","order_id":"O-1"}\n'
        '{"ts":"2025-01-01T00:00:02.500000+00:00","level":"INFO","region":"sgp",'
        '"service":"execution","msg":"other","order_id":"O-2"}\n{"torn'
    )
    parser = argparse.ArgumentParser()
    cli_obs.register(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> tuple[int, list[str]]:
        out = io.StringIO()
        args = parser.parse_args(["logs", "--run-dir", str(tmp_path), *argv])
        code = cli_obs.cmd_logs(args, out)
        return code, out.getvalue().splitlines()

    code, lines = run("--order", "O-1")
    assert code == 0
    assert [ln.split()[3] for ln in lines] == ["in", "filled", "acked"]
    code, lines = run("--region", "sgp", "--json")
    assert [json.loads(ln)["msg"] for ln in lines] == ["filled", "other"]
    code, lines = run("--service", "gateway", "--order", "O-2")
    assert code == 1 and lines == []


def test_commands_are_wired_into_the_main_cli(tmp_path: Path) -> None:
    from ops.cli import build_parser

    path = spans_path(tmp_path, "gateway", "lon")
    path.parent.mkdir(parents=True)
    path.write_text(_rec("a" * 16, None, "request mrd.v1.entry.lon", 0, 10).to_json() + "\n")
    ap = build_parser()
    # The global --run-dir (before the command) must reach the command, as must a local one.
    for argv in (
        ["--run-dir", str(tmp_path), "trace", "O-9"],
        ["trace", "O-9", "--run-dir", str(tmp_path)],
    ):
        args = ap.parse_args(argv)
        out = io.StringIO()
        assert cli_obs.cmd_trace(args, out) == 0, argv
        assert "request mrd.v1.entry.lon" in out.getvalue()
    args = ap.parse_args(["--run-dir", str(tmp_path), "logs", "--region", "lon"])
    assert args.func is cli_obs.cmd_logs


def test_head_sampling_keeps_whole_traces(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MERIDIAN_TRACE_SAMPLE=0 drops new traces, but a child of a sampled parent is kept."""
    from opentelemetry import trace as otel

    monkeypatch.setenv("MERIDIAN_TRACE_SAMPLE", "0")
    t = setup_tracing(service="gateway", region="lon", run_dir=tmp_path, enabled=True)
    root = t.tracer.start_span("root")
    assert not root.get_span_context().trace_flags.sampled
    root.end()
    parent = otel.SpanContext(
        trace_id=1, span_id=2, is_remote=True, trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED)
    )
    child = t.tracer.start_span(
        "child", context=otel.set_span_in_context(otel.NonRecordingSpan(parent))
    )
    assert child.get_span_context().trace_flags.sampled
    child.end()
    t.shutdown()


def test_a_stalled_event_loop_is_measured_and_named(caplog: pytest.LogCaptureFixture) -> None:
    """The heartbeat observes how late it woke; while the loop is held, the watchdog thread
    logs the stack that holds it (here a blocking call inside a named function)."""
    import asyncio
    import time

    from ops.telemetry.stalls import StallWatch

    lags: list[float] = []

    class Lag:
        def observe(self, v: float) -> None:
            lags.append(v)

    def hold_the_loop_for_a_while() -> None:
        time.sleep(0.9)

    async def go() -> StallWatch:
        w = StallWatch(Lag(), beat_s=0.05, stall_s=0.3).start()
        await asyncio.sleep(0.2)
        hold_the_loop_for_a_while()
        await asyncio.sleep(0.2)
        await w.stop()
        return w

    with caplog.at_level("WARNING", logger="meridian.stalls"):
        w = asyncio.run(go())
    # no bound on how late the other beats were: this machine may be busy
    assert w.stalls >= 1 and max(lags) >= 0.8
    assert any("hold_the_loop_for_a_while" in st for st in w.stacks)
    assert any("held for" in r.message and "hold_the_loop" in r.message for r in caplog.records)
    assert any("event loop stalled for" in r.message for r in caplog.records)
