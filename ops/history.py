"""``meridian order history``: one order's whole life, across regions, for compliance.

Pieced together from the records the platform already keeps (nothing extra is written on the
order path):

* entry: the request in the home region's ``ORDERS`` stream (subject derived from account
  and cl_ord_id; headers carry the entry region, accept time and order id);
* routing and risk decision: the home region's ``RISKLOG`` (decision records with the
  recorded reference price and rate verdict, requests risk could not read, and risk
  rejects);
* execution: every report of the order in every region's ``EXECOUT``;
* ledger: the transfers and postings of each of the order's trades.

Reads only; compliance credentials suffice.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import psycopg
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from ledger.db import libpq_dsn
from regions.topology import Topology
from router import contract, ids, subjects
from router.contract import CancelReject, ExecutionReport
from router.entry import entry_time, header_ns, request_op, stored_accept_ns
from router.natsutil import H_ACCEPTED_NS, H_ENTRY_REGION, H_KIND
from router.risk_worker import UNREAD

MAX_REPLACES = 256
"""How many cancel/replace requests back a lookup follows ``orig_cl_ord_id`` to the new order."""


@dataclass
class Event:
    ts_ns: int
    where: str
    what: str
    detail: str


@dataclass
class History:
    account: str
    order_id: str
    cl_ord_ids: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    trade_ids: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    """Reads that ended before every stored message was read: the history may miss events."""

    def render(self) -> str:
        lines = [
            f"order {self.order_id}  account {self.account}  "
            f"cl_ord_ids {', '.join(self.cl_ord_ids) or '-'}"
        ]
        t0 = min((e.ts_ns for e in self.events if e.ts_ns), default=0)
        for e in sorted(self.events, key=lambda e: e.ts_ns or 0):
            dt = (e.ts_ns - t0) / 1e6 if e.ts_ns and t0 else 0.0
            lines.append(f"  +{dt:10.3f} ms  {e.where:<14} {e.what:<22} {e.detail}")
        if not self.events:
            lines.append("  (nothing found)")
        for g in self.gaps:
            lines.append(f"  INCOMPLETE: {g}")
        return "\n".join(lines)


async def _read_subject(
    nc: NATS,
    domain: str,
    stream: str,
    subject: str,
    timeout_s: float = 2.0,
    gaps: list[str] | None = None,
) -> list[Any]:
    """Every stored message on ``subject`` in ``stream`` of ``domain`` (ordered replay). A
    read that fails or times out before the stream's count is reached (a region unreachable,
    a slow link) says so in ``gaps``: a partial history must never look whole."""

    def note(what: str) -> None:
        if gaps is not None:
            gaps.append(f"{domain} {stream} {subject}: {what}")

    js = nc.jetstream(domain=domain)
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except NotFoundError:
        return []  # no such stream in that region: nothing stored
    except Exception as e:
        note(f"not read ({type(e).__name__})")
        return []
    total = sum((info.state.subjects or {}).values())
    if not total:
        return []
    # never acked (compliance may not ack): with explicit acks the server stopped delivering
    # at max_ack_pending, 1,000, and a busy account's history came back INCOMPLETE
    cfg = ConsumerConfig(
        filter_subject=subject, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE
    )
    out: list[Any] = []
    sub = None
    try:
        sub = await js.pull_subscribe(subject, stream=stream, config=cfg)
        while len(out) < total:
            out.extend(await sub.fetch(min(256, total - len(out)), timeout=timeout_s))
    except Exception as e:  # a timeout under load (nats-py's or asyncio's), no responders
        note(f"read {len(out)} of {total} ({type(e).__name__})")
    finally:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    return out


async def find_account(
    nc: NATS, topology: Topology, ref: str, gaps: list[str] | None = None
) -> tuple[str, str] | None:
    """(account, order_id) for a cl_ord_id or order id, trying every account."""
    for acct in topology.accounts():
        found = await _order_of(nc, topology, acct, ref, gaps)
        if found is not None:
            return acct, found
    for acct in topology.accounts():
        for m in await _reports(nc, topology, acct):
            if m[1].order_id == ref:
                return acct, ref
    return None


async def _order_of(
    nc: NATS, topology: Topology, account: str, cl_ord_id: str, gaps: list[str] | None = None
) -> str | None:
    """The id of the order ``cl_ord_id`` names, if ORDERS holds a request by it: a new
    order's own (derived from its cl_ord_id), a cancel's or replace's the order it targets,
    followed back along ``orig_cl_ord_id`` (a replace of a replace names the latest id, and the
    order keeps the first one's order id). A request on the way that ORDERS no longer holds
    (7 days) is taken for the new order."""
    cl, seen = cl_ord_id, set()
    for _ in range(MAX_REPLACES):
        m = await _orders_msg(nc, topology, account, cl)
        if m is None:
            if cl == cl_ord_id:
                return None
            if gaps is not None:  # a guess, and said so: the chain may go on before it
                gaps.append(
                    f"the request {cl!r} that {cl_ord_id!r} goes back to is not in ORDERS "
                    "(kept 7 days, or its region unreachable): taken for the new order"
                )
            return ids.order_id(account, cl)
        seen.add(cl)
        if request_op(m.headers) == "new":
            return ids.order_id(account, cl)
        body: Any = None
        with contextlib.suppress(Exception):
            body = msgpack.unpackb(m.data, raw=False)
        orig = body.get("orig_cl_ord_id") if isinstance(body, dict) else None
        if not isinstance(orig, str) or orig in seen:
            break  # no target to follow: its own id, as a reader of the request would take it
        cl = orig
    return ids.order_id(account, cl)


async def _orders_msg(nc: NATS, topology: Topology, account: str, cl_ord_id: str) -> Any:
    home = topology.account_home(account)
    key = subjects.request_key(account, cl_ord_id)
    js = nc.jetstream(domain=home)
    try:
        return await js.get_last_msg("ORDERS", subjects.orders(home, account, key), direct=True)
    except Exception:
        return None


async def _reports(
    nc: NATS, topology: Topology, account: str, gaps: list[str] | None = None
) -> list[tuple[str, ExecutionReport | CancelReject]]:
    home = topology.account_home(account)
    found: list[tuple[str, ExecutionReport | CancelReject]] = []
    wanted = [(x, "EXECOUT", subjects.exec_reports_of(x, home, account)) for x in topology.codes]
    wanted.append((home, "RISKLOG", subjects.report_risk(home, account)))
    for region, stream, subj in wanted:
        for m in await _read_subject(nc, region, stream, subj, gaps=gaps):
            with contextlib.suppress(Exception):
                kind = (m.headers or {}).get(H_KIND, "ExecutionReport")
                rep: ExecutionReport | CancelReject = (
                    contract.decode(CancelReject, m.data)
                    if kind == "CancelReject"
                    else contract.decode(ExecutionReport, m.data)
                )
                found.append((f"{region}/{stream}", rep))
    return found


async def order_history(
    nc: NATS, topology: Topology, ref: str, *, account: str | None = None, dsn: str | None = None
) -> History | None:
    gaps: list[str] = []
    if account is None:
        hit = await find_account(nc, topology, ref, gaps)
        if hit is None:
            return None
        account, order_id = hit
    else:
        # a cl_ord_id (of the order, or of a cancel or replace of it), else an order id
        order_id = await _order_of(nc, topology, account, ref, gaps) or ref
    h = History(account=account, order_id=order_id, gaps=gaps)
    home = topology.account_home(account)

    every = await _reports(nc, topology, account, h.gaps)
    reports = [(w, r) for w, r in every if r.order_id == order_id]
    cl_ids = {r.cl_ord_id for _, r in reports} | {
        r.orig_cl_ord_id for _, r in reports if r.orig_cl_ord_id
    }
    if not reports:
        cl_ids.add(ref)
    h.cl_ord_ids = sorted(cl_ids)
    # entry: every request (new, cancel, replace) known by one of the order's cl_ord_ids
    for cl in sorted(cl_ids):
        m = await _orders_msg(nc, topology, account, cl)
        if m is None:
            continue
        hdr = m.headers or {}
        op = request_op(hdr)
        body = msgpack.unpackb(m.data, raw=False)
        # a desk that stored its request itself (direct entry) sent no gateway headers: its
        # accept time is the stored time, as risk takes it
        entered = (
            f"entered in {hdr[H_ENTRY_REGION][:16]} (as its publisher stamped it)"
            if H_ENTRY_REGION in hdr
            else "stored by the desk (direct entry)"
        )
        detail = f"cl={cl} {entered}, stored in {home} ORDERS seq {m.seq}: " + ", ".join(
            f"{k}={v}" for k, v in body.items() if k not in ("v", "account")
        )
        # when ORDERS stored it (what risk takes as its accept time): a publisher's stamp is
        # not evidence
        at = stored_accept_ns(hdr)
        h.events.append(Event(at, f"{home}/ORDERS", f"accepted ({op})", detail))
        if op == "new" and isinstance(body.get("cl_ord_id"), str):
            h.order_id = ids.order_id(account, body["cl_ord_id"])
    # risk decisions, and requests risk could not read (recorded with their answer only)
    keys = {f"o:{subjects.request_key(account, cl)}": cl for cl in cl_ids}
    for m in await _read_subject(nc, home, "RISKLOG", subjects.risklog(home), gaps=h.gaps):
        records: Any = []
        with contextlib.suppress(Exception):  # not a record batch this build can read
            body = msgpack.unpackb(m.data, raw=False)
            records = body.get("b", [body])
        for rec in records if isinstance(records, list) else []:
            with contextlib.suppress(Exception):  # one record: the others still count
                ev = _risk_event(rec, keys, account, cl_ids, f"{home}/RISKLOG")
                if ev is not None:
                    h.events.append(ev)
    for where, r in reports:
        if isinstance(r, CancelReject):
            h.events.append(
                Event(
                    r.transact_ns, where, f"cancel reject ({r.response_to})", f"{r.reason} {r.text}"
                )
            )
            continue
        h.events.append(
            Event(
                r.transact_ns,
                where,
                f"{r.exec_type} {r.ord_status}",
                f"exec_id={r.exec_id} cum {r.cum_qty} leaves {r.leaves_qty} "
                f"last {r.last_qty}@{r.last_px} avg {r.avg_px}"
                + (f" trade {r.trade_id}" if r.trade_id else "")
                + (f" reason {r.reject_reason}" if r.reject_reason else ""),
            )
        )
        if r.trade_id:
            h.trade_ids.append(r.trade_id)
    if dsn and h.trade_ids:
        await asyncio.to_thread(_ledger_events, h, dsn, reports)
    return h


def _risk_event(
    rec: dict[str, Any], keys: dict[str, str], account: str, cl_ids: set[str], where: str
) -> Event | None:
    """One RISKLOG record as an event of this order's history, or None if not one of its."""
    # a record's stored time (its input's, as risk took it); older records: the gateway's stamp
    h = rec["h"]
    stored, claimed = header_ns(str(h.get("ts", ""))), header_ns(str(h.get(H_ACCEPTED_NS, "")))
    at = entry_time(claimed or 0, stored or 0) + 1
    if rec.get("k") == UNREAD and rec.get("in") in keys:
        answers = ", ".join(o[2] for o in rec.get("o") or []) or "nothing"
        return Event(
            at,
            where,
            "risk: not readable",
            f"cl={keys[rec['in']]} this build could not read the request: "
            f"decided nothing, answered {answers}",
        )
    if rec.get("k") != "order":
        return None
    p = msgpack.unpackb(rec["p"], raw=False)
    if p.get("account") != account or p.get("cl_ord_id") not in cl_ids:
        return None
    ok, ref_px = rec.get("x") or [True, None]
    outs = rec.get("o") or []
    verdict = (
        "approved -> " + ", ".join(o[0] for o in outs)
        if outs and ".exe." in outs[0][0]
        else "rejected"
    )
    return Event(
        at,
        where,
        "risk decision",
        f"cl={p.get('cl_ord_id')} {verdict}; reference {ref_px}, rate ok {ok}",
    )


def _ledger_events(h: History, dsn: str, reports: list[Any]) -> None:
    exec_region = {
        r.trade_id: r.exec_region
        for _, r in reports
        if isinstance(r, ExecutionReport) and r.trade_id
    }
    with psycopg.connect(libpq_dsn(dsn)) as conn:  # cockroachdb:// too
        for trade_id in sorted(set(h.trade_ids)):
            region = exec_region.get(trade_id, "")
            tids = [f"{trade_id}:base", f"{trade_id}:quote"]
            rows = conn.execute(
                "SELECT p.transfer_id, p.id, p.account, p.currency, p.amount, p.recorded_ns "
                "FROM postings p WHERE p.region = %s AND p.transfer_id = ANY(%s) "
                "AND p.account = %s ORDER BY p.id",
                (region, tids, h.account),
            ).fetchall()
            if not rows:
                h.events.append(
                    Event(
                        0, f"{region}/ledger", "NOT POSTED", f"trade {trade_id} has no postings yet"
                    )
                )
            for transfer_id, pid, acct, ccy, amount, rec_ns in rows:
                h.events.append(
                    Event(
                        int(rec_ns),
                        f"{region}/ledger",
                        "posting",
                        f"{transfer_id} #{pid} {acct} {ccy} {amount:+d}",
                    )
                )
