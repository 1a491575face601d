"""Subject scheme and JetStream stream layout, v1 (docs/contract.md, decision 0002).

Request subjects (core NATS request/reply, never captured by a stream):

    mrd.v1.entry.<entry region>.<account>.<op>     op: new | cancel | replace

Stream subjects carry the region that stores them first, so each region's streams are disjoint
and ``js.publish`` is routed by interest to exactly one domain:

    stream    region  subjects                                 writer
    ORDERS    home    mrd.<r>.ord.<account>.<key>              gateways, and desks (direct entry)
    RISKLOG   home    mrd.<r>.risk.rec , mrd.<r>.er.r.>        the home region's risk worker
    EXEC      exec    mrd.<r>.exe.<symbol>                     risk workers of every region
    EXECOUT   exec    mrd.<r>.er.n.<home>.<account> ,           the exec region's execution worker
                      mrd.<r>.er.x.<home>.<account> ,
                      mrd.<r>.fill.<symbol>
    MD        any     mrd.<r>.md.<symbol>                      the region's market-data feed
    MDVIEW    any     (sources the other regions' MD)          JetStream itself

Execution reports reach a desk on ``mrd.*.er.*.*.<account>`` wherever it is connected (leaf
links propagate interest), and stay replayable from RISKLOG/EXECOUT in every region.
``<key>`` in ORDERS is a hash of the client order id: one subject per order request, so
``Nats-Expected-Last-Subject-Sequence: 0`` and the stream's one message per subject make the
stream itself the idempotency record (no msg ids: decision 0007).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PREFIX = "mrd"
ENTRY_OPS = ("new", "cancel", "replace")


def entry(region: str, account: str, op: str) -> str:
    return f"{PREFIX}.v1.entry.{region}.{account}.{op}"


def entry_wildcard(region: str) -> str:
    return f"{PREFIX}.v1.entry.{region}.*.*"


def request_key(account: str, cl_ord_id: str) -> str:
    """Subject-safe, deterministic key of one client request (any op)."""
    h = hashlib.blake2b(f"{account}\x00{cl_ord_id}".encode(), digest_size=12)
    return h.hexdigest()


def orders(home: str, account: str, key: str) -> str:
    return f"{PREFIX}.{home}.ord.{account}.{key}"


def orders_filter(home: str) -> str:
    return f"{PREFIX}.{home}.ord.>"


def risklog(home: str) -> str:
    """The risk worker's decision records (batches of input + externals + outputs)."""
    return f"{PREFIX}.{home}.risk.rec"


def exec_in(exec_region: str, symbol: str) -> str:
    return f"{PREFIX}.{exec_region}.exe.{symbol}"


def report_exec(exec_region: str, home: str, account: str) -> str:
    """Execution reports that change the order's exposure (TRADE, CANCELED, REPLACED, ...)
    and cancel rejects."""
    return f"{PREFIX}.{exec_region}.er.x.{home}.{account}"


def report_exec_new(exec_region: str, home: str, account: str) -> str:
    """ExecType NEW reports (the order is live on the book): acknowledgements only, so the
    home region's risk worker does not consume them (:func:`reports_for_home`)."""
    return f"{PREFIX}.{exec_region}.er.n.{home}.{account}"


def exec_reports_of(exec_region: str, home: str, account: str) -> str:
    """Every report of ``account`` in ``exec_region``'s EXECOUT (NEW and the rest)."""
    return f"{PREFIX}.{exec_region}.er.*.{home}.{account}"


def report_risk(home: str, account: str) -> str:
    return f"{PREFIX}.{home}.er.r.{home}.{account}"


def reports_for_account(account: str) -> str:
    """Every report of ``account`` from every region (risk and execution)."""
    return f"{PREFIX}.*.er.*.*.{account}"


def reports_for_home(exec_region: str, home: str) -> str:
    """Execution reports produced in ``exec_region`` for accounts homed in ``home`` that change
    exposure (NEW reports are on ``er.n`` and left out)."""
    return f"{PREFIX}.{exec_region}.er.x.{home}.>"


def fill(exec_region: str, symbol: str) -> str:
    return f"{PREFIX}.{exec_region}.fill.{symbol}"


def fills_filter(exec_region: str) -> str:
    return f"{PREFIX}.{exec_region}.fill.>"


def md(region: str, symbol: str) -> str:
    return f"{PREFIX}.{region}.md.{symbol}"


def md_filter(region: str) -> str:
    return f"{PREFIX}.{region}.md.>"


def js_api(domain: str) -> str:
    return f"$JS.{domain}.API"


# Durable consumer names. JetStream ack subjects carry no domain
# ($JS.ACK.<stream>.<consumer>...), and leaf links propagate each server's interest in the
# acks of its own consumers: two domains with a consumer of the same name on a stream of the
# same name would receive (and apply!) each other's acks. Every name below embeds the domain
# that holds the stream, so no two domains ever share one (tests/test_subjects.py).


def durable_risk(home: str) -> str:
    """Risk worker of ``home`` on ``home``'s ORDERS."""
    return f"risk_{home}"


def durable_feedback(home: str, exec_region: str) -> str:
    """Risk worker of ``home`` reading execution reports from ``exec_region``'s EXECOUT."""
    return f"fb_{home}_at_{exec_region}"


def durable_exec(exec_region: str) -> str:
    """Execution worker of ``exec_region`` on its EXEC."""
    return f"exec_{exec_region}"


def durable_ledger(exec_region: str) -> str:
    """Ledger writer of ``exec_region`` on its EXECOUT fills."""
    return f"LEDGER_{exec_region}"


def kill_bucket(region: str) -> str:
    """KV bucket of kill switches in ``region``'s domain.

    One name per domain for the same reason as the durable names: a KV put is a publish on
    ``$KV.<bucket>.<key>``, routed by interest, so same-named buckets in every domain would all
    receive the write of whichever region the writer is connected to.
    """
    return f"KILL_{region}"


def refused_bucket(region: str) -> str:
    """KV bucket of the commands ``region``'s execution refused (key: EXEC sequence; value:
    the answer it sent), so that a rebuild never applies one it answered as refused (a
    later build or topology could): ``router.execution``."""
    return f"EXECREFUSED_{region}"


def riskcfg_bucket(region: str) -> str:
    """KV bucket of runtime risk limits (key ``limits``) in ``region``'s domain."""
    return f"RISKCFG_{region}"


ORDERS_MAX_MSG_BYTES = 8192
"""An ORDERS message, headers included: the contract's 4 KiB payload limit plus 4 KiB."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    duplicate_window_s: float = 120.0
    max_msgs_per_subject: int = -1
    discard_new_per_subject: bool = False
    """With ``max_msgs_per_subject``: a message past the limit is refused, not the oldest
    dropped (the stream then discards new messages; its other limits are unlimited)."""
    max_bytes: int = -1
    max_msg_size: int = -1


def region_streams(region: str) -> tuple[StreamSpec, ...]:
    """The JetStream streams every region's domain holds (MDVIEW is created by replication)."""
    day = 86400.0
    return (
        StreamSpec(
            name="ORDERS",
            subjects=(f"{PREFIX}.{region}.ord.>",),
            max_age_s=7 * day,
            duplicate_window_s=600.0,
            # one request per (account, cl_ord_id) subject, whoever stores it (the gateway,
            # or a desk: direct entry), header or not; and none larger than a request can be
            # (the contract's payload limit, plus room for headers)
            max_msgs_per_subject=1,
            discard_new_per_subject=True,
            max_msg_size=ORDERS_MAX_MSG_BYTES,
        ),
        StreamSpec(
            name="RISKLOG",
            subjects=(f"{PREFIX}.{region}.risk.>", f"{PREFIX}.{region}.er.r.>"),
            max_age_s=7 * day,
            duplicate_window_s=3600.0,
        ),
        StreamSpec(
            name="EXEC",
            subjects=(f"{PREFIX}.{region}.exe.>",),
            max_age_s=7 * day,
            duplicate_window_s=3600.0,
        ),
        StreamSpec(
            name="EXECOUT",
            subjects=(
                f"{PREFIX}.{region}.er.x.>",
                f"{PREFIX}.{region}.er.n.>",
                f"{PREFIX}.{region}.fill.>",
            ),
            max_age_s=7 * day,
            duplicate_window_s=3600.0,
        ),
        StreamSpec(
            name="MD",
            subjects=(f"{PREFIX}.{region}.md.>",),
            max_age_s=3600.0,
            max_msgs_per_subject=100_000,
        ),
    )
