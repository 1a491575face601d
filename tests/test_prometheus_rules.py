"""Prometheus rules, rendered config and the Grafana dashboard, checked with promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ops.natsmon import NATS_METRIC_NAMES
from ops.prometheus import (
    RULES_FILE,
    PrometheusConfigError,
    ScrapeTarget,
    prometheus_command,
    render_prometheus_config,
)
from ops.telemetry import metric_names
from regions.topology import load_topology

PROM_DIR = RULES_FILE.parent
DASHBOARD = Path(__file__).resolve().parents[1] / "ops" / "grafana" / "meridian.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found on PATH: install Debian's 'prometheus' package to check rules",
)

_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_HIST_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def known_series() -> set[str]:
    from prometheus_client import CollectorRegistry

    from ledger.writer import WriterMetrics
    from replication.metrics import MdMetrics

    ledger = CollectorRegistry()
    WriterMetrics(ledger, "lon")  # the ledger writer's own series (it has no MeridianMetrics)
    md = CollectorRegistry()
    MdMetrics(md, view="lon", sources=("lon", "nyc"))  # the md service's own, likewise
    names = set(metric_names()) | set(NATS_METRIC_NAMES) | set(metric_names(ledger))
    return names | set(metric_names(md)) | {"up"}


def recording_rules() -> set[str]:
    return set(re.findall(r"^\s*- record:\s*(\S+)", RULES_FILE.read_text(), re.M))


def unknown_metrics(expr: str) -> set[str]:
    """Names in a PromQL expression that look like our series but are not defined anywhere."""
    known = known_series()
    recorded = recording_rules()
    bad = set()
    for tok in _IDENT.findall(re.sub(r'"[^"]*"', '""', expr)):  # ignore label values
        if ":" in tok:
            if tok not in recorded:
                bad.add(tok)
        elif tok.startswith("meridian_"):
            base = _HIST_SUFFIX.sub("", tok)
            if tok not in known and base not in known:
                bad.add(tok)
    return bad


def rule_exprs(text: str) -> list[str]:
    """Every ``expr:`` of a rules file, inline or as a folded block (no YAML library here)."""
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        if rest not in {">-", ">", "|", "|-"}:
            out.append(rest)
            continue
        block = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            block.append(nxt.strip())
        out.append(" ".join(block).strip())
    return out


# ---- rules -----------------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    r = promtool("check", "rules", str(RULES_FILE))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_promtool_rule_unit_tests_fire_the_replication_lag_alert() -> None:
    r = promtool("test", "rules", "rules_test.yml", cwd=PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_rule_unit_test_fails_when_the_alert_does_not_fire(tmp_path: Path) -> None:
    # The unit test must be able to fail: raise the lag threshold so the alert never fires.
    text = RULES_FILE.read_text()
    raised = text.replace(
        "(rate(meridian_replication_lag_seconds_bucket[5m]))) > 5\n",
        "(rate(meridian_replication_lag_seconds_bucket[5m]))) > 500\n",
    )
    assert raised != text
    (tmp_path / "rules.yml").write_text(raised)
    shutil.copy(PROM_DIR / "rules_test.yml", tmp_path / "rules_test.yml")
    r = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert r.returncode != 0
    assert "MeridianReplicationLagHigh" in r.stdout + r.stderr


def test_rules_cover_the_service_levels_and_use_known_metrics() -> None:
    text = RULES_FILE.read_text()
    alerts = set(re.findall(r"^\s*- alert:\s*(\S+)", text, re.M))
    assert alerts >= {
        "MeridianAckLatencyP99High",
        "MeridianOrderToExecutionP99High",
        "MeridianReplicationLagHigh",
        "MeridianLedgerBacklogHigh",
        "MeridianLinkDown",
        "MeridianConsumerStalled",
        "MeridianKillSwitchEngaged",
    }
    exprs = rule_exprs(text)
    assert len(exprs) == len(alerts) + len(recording_rules())
    for e in exprs:
        assert not unknown_metrics(e), (e, unknown_metrics(e))


# ---- rendered configuration -----------------------------------------------------------------


def test_render_writes_config_and_file_sd_targets(tmp_path: Path) -> None:
    cfg = render_prometheus_config(
        tmp_path,
        {
            "meridian-gateway": [
                "127.0.0.1:9310",
                ScrapeTarget(address="127.0.0.1:9320", labels={"node": "nyc-1"}),
            ],
            "meridian-natsmon": ["127.0.0.1:9400"],
        },
    )
    assert cfg == tmp_path.resolve() / "prometheus" / "prometheus.yml"
    groups = json.loads((cfg.parent / "targets" / "meridian-gateway.json").read_text())
    assert groups == [
        {"targets": ["127.0.0.1:9310"], "labels": {}},
        {"targets": ["127.0.0.1:9320"], "labels": {"node": "nyc-1"}},
    ]
    text = cfg.read_text()
    assert "file_sd_configs" in text and "honor_labels: true" in text
    assert (cfg.parent / "rules.yml").read_text() == RULES_FILE.read_text()
    # A job that disappears loses its target file on the next render.
    render_prometheus_config(tmp_path, {"meridian-natsmon": ["127.0.0.1:9400"]})
    assert not (cfg.parent / "targets" / "meridian-gateway.json").exists()
    cmd = prometheus_command(tmp_path, 9090)
    assert f"--config.file={cfg}" in cmd and "--web.listen-address=127.0.0.1:9090" in cmd


def test_render_refuses_bad_jobs_and_targets(tmp_path: Path) -> None:
    with pytest.raises(PrometheusConfigError) as e:
        render_prometheus_config(tmp_path, {"bad job": ["127.0.0.1:1"]})
    assert "bad job" in e.value.field
    with pytest.raises(PrometheusConfigError):
        render_prometheus_config(tmp_path, {"meridian-x": ["http://127.0.0.1:1/metrics"]})
    with pytest.raises(PrometheusConfigError):
        render_prometheus_config(
            tmp_path, {"meridian-x": [ScrapeTarget(address="h:1", labels={"__x": "y"})]}
        )


@needs_promtool
def test_promtool_accepts_the_rendered_config(tmp_path: Path) -> None:
    cfg = render_prometheus_config(
        tmp_path,
        {"meridian-gateway": ["127.0.0.1:9310", "127.0.0.1:9320"], "meridian-natsmon": []},
    )
    r = promtool("check", "config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout


# ---- Grafana dashboard -----------------------------------------------------------------------


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_dashboard_has_a_row_per_region_and_link_and_known_exprs() -> None:
    dash = json.loads(DASHBOARD.read_text())
    topo = load_topology()
    panels = _panels(dash)
    rows = [str(p["title"]) for p in panels if p["type"] == "row"]
    for r in topo.regions:
        assert any(t.startswith(f"Region {r.code} ") for t in rows), r.code
    for ln in topo.links:
        assert any(t.startswith(f"Link {ln.name} ") for t in rows), ln.name
    variables = dash["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    n = 0
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            assert "meridian_" in expr, (p["title"], expr)
            assert not unknown_metrics(expr), (p["title"], expr, unknown_metrics(expr))
            n += 1
    assert n >= 40


SINCE_START = "meridian_replication_lag_p99_seconds"
"""The md service's HdrHistogram p99 since it started: never reset, so it neither pages on a
lag that starts after a long uptime nor clears once the lag is over."""


def test_no_alert_or_panel_reads_the_since_start_replication_p99() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = rule_exprs(RULES_FILE.read_text())
    exprs += [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]
    assert not [e for e in exprs if SINCE_START in e]
    rules = RULES_FILE.read_text()
    assert re.search(
        r"expr: histogram_quantile\(0\.99, sum by \(link, le\) "
        r"\(rate\(meridian_replication_lag_seconds_bucket\[5m\]\)\)\) > 5$",
        rules,
        re.M,
    )
    lag = [e for e in exprs if "replication_lag" in e]
    assert len(lag) >= 1 + len(load_topology().links)  # the rule, then a panel per link
    for e in lag:
        assert "meridian_replication_lag_seconds" in e, e


# ---- legends name only labels their query keeps -------------------------------------------

_AGG = re.compile(
    r"\b(sum|max|min|avg|count|group|stddev|stdvar|topk|bottomk|quantile|count_values)\s*"
    r"(?:(by|without)\s*\(([^)]*)\))?\s*\("
)
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_TARGET_LABELS = frozenset({"job", "instance"})
"""Labels Prometheus adds to every scraped series."""


def series_labels() -> dict[str, frozenset[str]]:
    """Label names of every series we define, by the names PromQL uses (counters with
    ``_total``, histograms by their base name)."""
    from prometheus_client import CollectorRegistry

    from ledger.writer import WriterMetrics
    from ops.natsmon import _FAMILIES
    from ops.telemetry import MeridianMetrics
    from replication.metrics import MdMetrics

    out: dict[str, frozenset[str]] = {}
    for name, (kind, _doc, labels) in _FAMILIES.items():
        out[f"{name}_total" if kind == "counter" else name] = frozenset(labels)
    regs = [CollectorRegistry() for _ in range(3)]
    MeridianMetrics(regs[0], region="lon", service="probe")
    WriterMetrics(regs[1], "lon")
    MdMetrics(regs[2], view="lon", sources=("lon", "nyc"))
    for reg in regs:
        # the label names each metric was declared with (prometheus_client keeps them there),
        # under every name it registered (counters with and without _total, histograms' too)
        for c, names in reg._collector_to_names.items():
            declared = frozenset(getattr(c, "_labelnames", ()))
            for name in names:
                out[name] = out.get(name, frozenset()) | declared
    return {k: v | _TARGET_LABELS for k, v in out.items()}


def result_labels(expr: str, known: dict[str, frozenset[str]]) -> frozenset[str]:
    """Label names of a PromQL expression's result, as far as a legend can use them: the
    outermost (first) aggregation's ``by (...)`` (without ``le`` under histogram_quantile),
    or, with no aggregation, the labels every series it reads carries. Only the shapes the
    dashboard and the rules use; anything else fails the test, on purpose."""
    bare = re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', '""', expr))
    m = _AGG.search(bare)
    if m is not None:
        how, names = m.group(2), m.group(3)
        assert how != "without", f"{expr}: a legend check for `without` is not written"
        kept = frozenset(n.strip() for n in (names or "").split(",") if n.strip())
        if "histogram_quantile" in bare[: m.start()]:
            kept -= {"le"}
        return kept
    found = [t for t in _IDENT.findall(bare) if t.startswith("meridian_") or ":" in t]
    assert found, expr
    sets = []
    for tok in found:
        base = tok if tok in known else _HIST_SUFFIX.sub("", tok)
        assert base in known, (expr, tok)
        sets.append(known[base])
    return frozenset.intersection(*sets)


def _known_with_recorded() -> dict[str, frozenset[str]]:
    known = series_labels()
    text = RULES_FILE.read_text()
    for rec, expr in re.findall(r"^\s*- record:\s*(\S+)\s*\n\s*expr:\s*(.+)$", text, re.M):
        known[rec] = result_labels(expr, known)
    return known


def legend_problems(dash: dict[str, Any]) -> list[str]:
    """Every ``{{label}}`` of a legend that its query's result does not carry."""
    known = _known_with_recorded()
    bad = []
    for p in _panels(dash):
        for t in p.get("targets", []):
            used = set(_LEGEND_LABEL.findall(str(t.get("legendFormat", ""))))
            missing = used - result_labels(t["expr"], known)
            if missing:
                bad.append(f"{p['title']!r}: {t['legendFormat']!r} names {sorted(missing)}")
    return bad


def test_every_legend_label_is_kept_by_its_query() -> None:
    assert legend_problems(json.loads(DASHBOARD.read_text())) == []


def test_the_legend_check_finds_a_label_the_query_drops() -> None:
    dash = {
        "panels": [
            {
                "title": "gaps",
                "targets": [
                    {
                        "expr": 'sum by (link) (increase(meridian_md_gaps_total{link=~".*"}[5m]))',
                        "legendFormat": "{{symbol}}",
                    },
                    {
                        "expr": "histogram_quantile(0.99, sum by (le) (rate("
                        "meridian_submit_to_ack_seconds_bucket[1m])))",
                        "legendFormat": "{{region}}",
                    },
                    {"expr": 'meridian_nats_up{region="lon"}', "legendFormat": "{{stream}}"},
                    {"expr": 'meridian_nats_up{region="lon"}', "legendFormat": "{{region}}"},
                ],
            }
        ]
    }
    assert len(legend_problems(dash)) == 3


def test_order_rate_by_region_counts_every_entry_path() -> None:
    """The gateway counts only its own entries; risk counts every request it reads from
    ORDERS, direct entries included (meridian_risk_requests_total{entry})."""
    dash = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in _panels(dash) if p["title"].startswith("Order requests/s by home")]
    assert [t["expr"] for t in panel["targets"]] == [
        "sum by (region) (rate(meridian_risk_requests_total[1m]))"
    ]


def test_unknown_metric_detection_can_fail() -> None:
    assert unknown_metrics("rate(meridian_orders_recieved_total[1m])") == {
        "meridian_orders_recieved_total"
    }
    assert not unknown_metrics('rate(meridian_submit_to_ack_seconds_bucket{region="lon"}[1m])')
    assert not unknown_metrics('meridian_nats_leafnode_up{link="meridian_nope"}')


# ---- a real Prometheus server ----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus not found on PATH: install Debian's 'prometheus' package",
)
def test_real_prometheus_scrapes_file_sd_targets_and_loads_rules(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from ops.procs import ManagedProcess, free_ports, http_ok
    from ops.telemetry import MeridianMetrics, serve

    reg = CollectorRegistry()
    m = MeridianMetrics(reg, region="lon", service="gateway", topology=load_topology())
    m.orders_received.inc(7)
    metrics = serve(reg, 0)
    (port,) = free_ports(1)
    render_prometheus_config(
        tmp_path,
        {"meridian-gateway": [ScrapeTarget(address=f"127.0.0.1:{metrics.port}",
                                           labels={"region": "lon"})]},
        scrape_interval_s=1,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    prom = ManagedProcess(
        "prometheus-test",
        prometheus_command(tmp_path, port),
        tmp_path / "prometheus.log",
        ready=lambda: http_ok(f"{base}/-/ready"),
    )
    try:
        prom.start(timeout_s=30)
        result = _poll_query(base, "meridian_orders_received_total", timeout_s=20)
        labels = result[0]["metric"]
        # honor_labels keeps our own region label instead of renaming it exported_region.
        assert labels["region"] == "lon" and "exported_region" not in labels
        assert labels["job"] == "meridian-gateway"
        assert float(result[0]["value"][1]) == 7
        rules = _get_json(f"{base}/api/v1/rules")["data"]["groups"]
        assert {g["name"] for g in rules} >= {"meridian-slo", "meridian-recording"}
    finally:
        prom.stop()
        metrics.close()


def _get_json(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        data: dict[str, Any] = json.load(r)
    return data


def _poll_query(base: str, query: str, timeout_s: float) -> list[dict[str, Any]]:
    import time
    import urllib.parse

    deadline = time.monotonic() + timeout_s
    while True:
        res = _get_json(f"{base}/api/v1/query?query={urllib.parse.quote(query)}")
        if res["data"]["result"]:
            return list(res["data"]["result"])
        if time.monotonic() > deadline:
            raise AssertionError(f"{query} never appeared in Prometheus")
        time.sleep(0.25)
