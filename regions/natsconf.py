"""Render each region's nats-server configuration from the topology.

Every region gets: JetStream with its own domain and store dir, a monitoring port, a system
account, the application account ``MERIDIAN`` with one user per role, and leaf-node links as
the topology says (decision 0001): the hub and the standby acceptors listen for leaf links,
spokes dial the hub first and then the next acceptor, through the link's latency proxy.

Roles and what they may do (least privilege, refined further by the zero-trust work):

    desk, bridge  order entry (the gateway's, or direct into ORDERS), read their reports,
                  replay report streams (ephemeral consumers, never acked), read md; no acks,
                  and no hand on the workers' durable consumers
    worker        the services: order path, ledger writer, md feed (application subjects, JS)
    compliance    read-only: reports, fills, stream reads; no order entry, no stream writes
    sre           everything in the application account
    leaf          the account binding of leaf-node links
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regions.topology import Topology
from router import subjects

ROLES = ("desk", "bridge", "worker", "compliance", "sre")
APP_ACCOUNT = "MERIDIAN"

# Client-side keepalive (MACHINE-NOTES): a SIGSTOPped server is noticed after
# (max_outstanding_pings + 1) * ping_interval, ~3 s instead of ~6 minutes at the defaults.
CLIENT_PING_INTERVAL_S = 1
CLIENT_MAX_OUTSTANDING_PINGS = 2

_JS_READ = [
    "$JS.API.INFO",
    "$JS.*.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.*.API.STREAM.INFO.*",
    # their own ephemeral consumers (nats-py names them by nuid) to read streams with; never
    # a durable, never a delete, never an ack: see _js_read_denies
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.*.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.MSG.NEXT.>",
    "$JS.*.API.CONSUMER.MSG.NEXT.>",
    "$JS.API.CONSUMER.INFO.>",
    "$JS.*.API.CONSUMER.INFO.>",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.*.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.*.API.DIRECT.GET.>",
    "$JS.FC.>",
]
"""What the read roles (desk, bridge, compliance) may ask of JetStream. They read with
ephemeral consumers they never ack (replays, history). Acks were allowed once (``$JS.ACK.>``):
with AckPolicy.ALL, any desk could have acked risk's undecided orders away; and any could
delete or pull from the workers' durable consumers (CONSUMER.DELETE, MSG.NEXT)."""


def _js_read_denies(topology: Topology) -> list[str]:
    """The workers' durable consumers, which no read role may create, update or pull from
    (subject wildcards match whole tokens only, so each name is listed)."""
    codes = topology.codes
    names = [
        *(subjects.durable_risk(r) for r in codes),
        *(subjects.durable_exec(r) for r in codes),
        *(subjects.durable_ledger(r) for r in codes),
        *(subjects.durable_feedback(h, x) for h in codes for x in codes),
    ]
    out = []
    for api in ("$JS.API", "$JS.*.API"):
        for n in names:
            out += [
                f"{api}.CONSUMER.CREATE.*.{n}",
                f"{api}.CONSUMER.CREATE.*.{n}.>",
                f"{api}.CONSUMER.MSG.NEXT.*.{n}",
            ]
    return out


def role_permissions(role: str, topology: Topology) -> dict[str, Any]:
    """``role``'s permissions in the application account of ``topology``'s servers."""
    perms: dict[str, Any] = json.loads(json.dumps(PERMISSIONS[role]))  # a copy
    if role in ("desk", "bridge", "compliance"):
        perms["publish"]["deny"] = _js_read_denies(topology)
    return perms


PERMISSIONS: dict[str, dict[str, Any]] = {
    "desk": {
        # mrd.*.ord.*.*: direct entry, a request stored in its home region's ORDERS by the
        # desk itself (contract.md); risk derives what a gateway would have stamped
        "publish": {"allow": ["mrd.v1.entry.>", "mrd.*.ord.*.*", "_INBOX.>", *_JS_READ]},
        "subscribe": {"allow": ["_INBOX.>", "mrd.*.er.>", "mrd.*.md.>"]},
    },
    "bridge": {
        "publish": {"allow": ["mrd.v1.entry.>", "mrd.*.ord.*.*", "_INBOX.>", *_JS_READ]},
        "subscribe": {"allow": ["_INBOX.>", "mrd.*.er.>", "mrd.*.md.>"]},
    },
    "worker": {
        # $O.>: the execution workers' book snapshots (JetStream object store)
        "publish": {"allow": ["mrd.>", "_INBOX.>", "$JS.>", "$KV.>", "$O.>"]},
        "subscribe": {"allow": ["mrd.>", "_INBOX.>", "$JS.>", "$KV.>", "$O.>"]},
    },
    "compliance": {
        "publish": {"allow": ["_INBOX.>", *_JS_READ]},
        "subscribe": {"allow": ["_INBOX.>", "mrd.*.er.>", "mrd.*.fill.>", "$JS.>"]},
    },
    "sre": {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """Passwords per role (+ leaf and system users). Redacted in repr."""

    passwords: Mapping[str, str] = field(repr=False)

    @classmethod
    def generate(cls) -> Credentials:
        names = (*ROLES, "leaf", "sys")
        return cls(passwords={n: secrets.token_urlsafe(18) for n in names})

    @classmethod
    def load(cls, path: Path) -> Credentials:
        return cls(passwords=json.loads(path.read_text()))

    def to_json(self) -> str:
        """The document :meth:`load` reads. Secret: write it readable by its owner only
        from the start (``ops.procs.write_private``), never chmod'ed afterwards."""
        return json.dumps(dict(self.passwords), indent=1)

    def __repr__(self) -> str:
        return f"Credentials(roles={sorted(self.passwords)}, passwords=<redacted>)"


def client_url(host: str, port: int, role: str, creds: Credentials) -> str:
    return f"nats://{role}:{creds.passwords[role]}@{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLayout:
    """Where one region's server lives on this machine."""

    store_dir: Path
    host: str = "127.0.0.1"
    sync_always: bool = False
    """fsync every JetStream write (the local 'durable' mode); default flushes every 2 min."""
    leaf_urls: Mapping[str, str] = field(default_factory=dict)
    """acceptor region -> host:port this region dials for it (the link proxy's listen side)."""


def render_server_config(
    topology: Topology, code: str, layout: ServerLayout, creds: Credentials
) -> str:
    """nats-server configuration text for region ``code``."""
    r = topology.region(code)
    pw = creds.passwords
    lines: list[str] = [
        f"# Meridian region {r.code} ({r.name}) - generated from {topology.source}",
        f"server_name: {_q(r.code)}",
        f"listen: {_q(f'{layout.host}:{r.client_port}')}",
        f"http: {_q(f'{layout.host}:{r.monitor_port}')}",
        'ping_interval: "1s"',
        "ping_max: 2",
        'write_deadline: "5s"',
        "max_payload: 1048576",
        "jetstream {",
        f"  store_dir: {_q(str(layout.store_dir))}",
        f"  domain: {_q(r.domain)}",
        "  max_memory_store: 268435456",
        "  max_file_store: 8589934592",
    ]
    if layout.sync_always:
        lines.append("  sync_interval: always")
    lines += [
        "}",
        "accounts {",
        "  SYS {",
        f"    users: [{{user: sys, password: {_q(pw['sys'])}}}]",
        "  }",
        f"  {APP_ACCOUNT} {{",
        "    jetstream: enabled",
        "    users: [",
    ]
    for role in ROLES:
        perms = json.dumps(role_permissions(role, topology))
        lines.append(f"      {{user: {role}, password: {_q(pw[role])}, permissions: {perms}}}")
    lines += [
        "    ]",
        "  }",
        "}",
        "system_account: SYS",
        "leafnodes {",
    ]
    if r.accepts_leaf:
        lines += [
            f"  listen: {_q(f'{layout.host}:{r.leaf_port}')}",
            # A re-linking spoke must keep dialling the proxy, not learn the real port.
            "  no_advertise: true",
            "  authorization {",
            f"    users: [{{user: leaf, password: {_q(pw['leaf'])}, account: {APP_ACCOUNT}}}]",
            "  }",
        ]
    if r.leaf_dial:
        urls = [f"nats-leaf://leaf:{pw['leaf']}@{layout.leaf_urls[t]}" for t in r.leaf_dial]
        lines += [
            '  reconnect: "250ms"' if len(r.leaf_dial) == 1 else '  reconnect: "2s"',
            "  remotes: [",
            f"    {{urls: {json.dumps(urls)}, account: {APP_ACCOUNT}, no_randomize: true}}",
            "  ]",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    return json.dumps(s)
