"""Subject and consumer naming rules that keep regions from interfering with each other."""

from __future__ import annotations

import itertools

from regions.topology import load_topology
from router import subjects


def test_durable_names_never_repeat_across_domains() -> None:
    """JetStream ack subjects carry no domain ($JS.ACK.<stream>.<consumer>...): a consumer name
    used in two domains on a same-named stream would receive and apply the other's acks over
    the leaf links. Every durable name must be unique across the whole mesh."""
    topo = load_topology()
    names = []
    for r in topo.codes:
        names += [
            ("ORDERS", subjects.durable_risk(r)),
            ("EXEC", subjects.durable_exec(r)),
            ("EXECOUT", subjects.durable_ledger(r)),
        ]
        names += [("EXECOUT", subjects.durable_feedback(r, x)) for x in topo.codes]
    assert len(names) == len(set(names))


def test_region_stream_subjects_are_disjoint() -> None:
    topo = load_topology()
    specs = {r: subjects.region_streams(r) for r in topo.codes}
    for a, b in itertools.combinations(topo.codes, 2):
        sa = {s for spec in specs[a] for s in spec.subjects}
        sb = {s for spec in specs[b] for s in spec.subjects}
        assert not sa & sb
        assert all(s.startswith(f"mrd.{a}.") for s in sa)


def test_request_keys_are_deterministic_and_subject_safe() -> None:
    k = subjects.request_key("LON-HF-01", "weird id.with*wild>cards")
    assert k == subjects.request_key("LON-HF-01", "weird id.with*wild>cards")
    assert k.isalnum() and k != subjects.request_key("LON-HF-02", "weird id.with*wild>cards")
