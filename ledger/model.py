"""Pure ledger rules: fill -> transfers -> postings, amounts, and the per-region hash chain.

No I/O here: the writer, the verifier, the exporter and the property tests share these
functions, so what is written and what is checked cannot drift apart.

Sign convention (docs/decisions/0004-ledger.md): a posting's ``amount`` is signed integer
minor units seen from the account holder. ``amount > 0`` is a CREDIT (the account receives the
currency), ``amount < 0`` is a DEBIT (the account gives it). Every transfer moves one currency
from its debit account to its credit account, so its postings sum to zero, and an account's
balance in a currency is the plain sum of its postings.

A trade is two transfers:

* ``<trade_id>:base``  seller -> buyer, ``qty`` base units in base minor units;
* ``<trade_id>:quote`` buyer -> seller, ``qty * price`` in quote minor units, rounded half-even.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NewType

from ledger.errors import FillRejected
from regions.topology import Topology
from router.contract import MAX_INT64, Fill

TransferId = NewType("TransferId", str)
"""``<trade_id>:base`` or ``<trade_id>:quote``; injective, so a replay maps to the same id."""

LEGS = ("base", "quote")
GENESIS_HASH = "00" * 32
"""prev_hash of the first posting of every region's chain."""
HASH_VERSION = "v1"


def transfer_id(trade_id: str, leg: str) -> TransferId:
    """Deterministic transfer id of one leg of a trade."""
    if leg not in LEGS:
        raise ValueError(f"leg must be one of {LEGS}")
    return TransferId(f"{trade_id}:{leg}")


def round_half_even_div(num: int, den: int) -> int:
    """``num / den`` rounded half to even, exactly, for ``num >= 0`` and ``den > 0``."""
    q, r = divmod(num, den)
    twice = 2 * r
    if twice > den or (twice == den and q % 2 == 1):
        q += 1
    return q


def quote_amount_minor(
    *, qty: int, price_ticks: int, price_decimals: int, quote_minor_units: int
) -> int:
    """Quote amount of a trade in quote minor units: qty * price, rounded half-even."""
    return round_half_even_div(
        int(qty * price_ticks * 10**quote_minor_units), int(10**price_decimals)
    )


def base_amount_minor(*, qty: int, base_minor_units: int) -> int:
    """Base amount of a trade in base minor units (qty is in whole base units)."""
    return int(qty * 10**base_minor_units)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """One currency moving from ``debit_account`` to ``credit_account`` (one leg of a trade)."""

    region: str
    """Executing region: the partition the transfer and its postings live in."""
    id: TransferId
    trade_id: str
    leg: str
    symbol: str
    currency: str
    amount: int
    """Minor units moved, >= 0."""
    debit_account: str
    """Gives ``amount`` (its posting is negative)."""
    credit_account: str
    """Receives ``amount`` (its posting is positive)."""
    price_ticks: int
    price_decimals: int
    qty: int
    transact_ns: int
    """When the trade happened (matching time), UTC ns."""
    stream_seq: int = 0
    """Sequence of the fill in the region's EXECOUT stream (0 when not from JetStream)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Posting:
    """One signed entry of a transfer, chained into its region's hash chain."""

    region: str
    id: int
    """Position in the region's chain, 1, 2, 3, ... without gaps."""
    transfer_id: str
    account: str
    currency: str
    amount: int
    """Signed minor units: > 0 credit (account receives), < 0 debit (account gives)."""
    transact_ns: int
    recorded_ns: int
    """When the writer recorded it, UTC ns."""
    prev_hash: str
    hash: str


def validate_fill(fill: Fill, topology: Topology, region: str) -> None:
    """Check a decoded fill against the topology; raises :class:`FillRejected`."""
    tid = fill.trade_id
    if fill.exec_region != region:
        raise FillRejected(
            "exec_region", f"must be {region!r} on this region's stream", trade_id=tid,
            permanent=True,
        )  # fmt: skip
    try:
        inst = topology.instrument(fill.symbol)
    except KeyError:
        raise FillRejected("symbol", "not a known instrument", trade_id=tid) from None
    if (fill.base, fill.quote) != (inst.base, inst.quote):
        raise FillRejected(
            "base", f"must be {inst.base}/{inst.quote} for {fill.symbol}", trade_id=tid
        )
    if fill.price_decimals != inst.price_decimals:
        raise FillRejected("price_decimals", f"must be {inst.price_decimals}", trade_id=tid)
    known = set(topology.accounts())
    for name in ("buy_account", "sell_account"):
        if getattr(fill, name) not in known:
            raise FillRejected(name, "not a known account", trade_id=tid)
    for code in (fill.base, fill.quote):
        try:
            topology.currency(code)
        except KeyError:
            raise FillRejected(
                "quote" if code == fill.quote else "base", "not a known currency", trade_id=tid
            ) from None


def transfers_for_fill(
    fill: Fill, topology: Topology, region: str, *, stream_seq: int = 0
) -> tuple[Transfer, Transfer]:
    """The two transfers of a trade (base leg, quote leg); validates the fill first."""
    validate_fill(fill, topology, region)
    base, quote = trade_transfers(
        region=region,
        trade_id=fill.trade_id,
        symbol=fill.symbol,
        base=fill.base,
        quote=fill.quote,
        base_minor_units=topology.currency(fill.base).minor_units,
        quote_minor_units=topology.currency(fill.quote).minor_units,
        price_ticks=fill.price_ticks,
        price_decimals=fill.price_decimals,
        qty=fill.qty,
        buy_account=fill.buy_account,
        sell_account=fill.sell_account,
        transact_ns=fill.transact_ns,
        stream_seq=stream_seq,
    )
    for name, t in (("qty", base), ("price_ticks", quote)):
        if t.amount > MAX_INT64:
            raise FillRejected(
                name, "amount exceeds int64 minor units", trade_id=fill.trade_id, permanent=True
            )
    return base, quote


def trade_transfers(
    *,
    region: str,
    trade_id: str,
    symbol: str,
    base: str,
    quote: str,
    base_minor_units: int,
    quote_minor_units: int,
    price_ticks: int,
    price_decimals: int,
    qty: int,
    buy_account: str,
    sell_account: str,
    transact_ns: int,
    stream_seq: int = 0,
) -> tuple[Transfer, Transfer]:
    """The two transfers of a trade from its terms, no validation: what the writer posts
    (:func:`transfers_for_fill`) and what verify re-derives a posted trade's transfers with."""
    base_amount = base_amount_minor(qty=qty, base_minor_units=base_minor_units)
    quote_amount = quote_amount_minor(
        qty=qty,
        price_ticks=price_ticks,
        price_decimals=price_decimals,
        quote_minor_units=quote_minor_units,
    )

    def leg(name: str, currency: str, amount: int, debit: str, credit: str) -> Transfer:
        return Transfer(
            region=region,
            id=transfer_id(trade_id, name),
            trade_id=trade_id,
            leg=name,
            symbol=symbol,
            currency=currency,
            amount=amount,
            debit_account=debit,
            credit_account=credit,
            price_ticks=price_ticks,
            price_decimals=price_decimals,
            qty=qty,
            transact_ns=transact_ns,
            stream_seq=stream_seq,
        )

    return (
        leg("base", base, base_amount, sell_account, buy_account),
        leg("quote", quote, quote_amount, buy_account, sell_account),
    )


def canonical_bytes(
    *,
    region: str,
    id: int,
    transfer_id: str,
    account: str,
    currency: str,
    amount: int,
    transact_ns: int,
    recorded_ns: int,
) -> bytes:
    """Canonical encoding of a posting's content (every column except the two hashes)."""
    return json.dumps(
        [
            HASH_VERSION,
            region,
            id,
            transfer_id,
            account,
            currency,
            amount,
            transact_ns,
            recorded_ns,
        ],
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()


def chain_hash(prev_hash: str, content: bytes) -> str:
    """``sha256(prev_hash_bytes || content)`` as lower-case hex."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + content).hexdigest()


def posting_hash(p: Posting) -> str:
    """Recompute the hash a posting should carry given its stored ``prev_hash``."""
    return chain_hash(
        p.prev_hash,
        canonical_bytes(
            region=p.region,
            id=p.id,
            transfer_id=p.transfer_id,
            account=p.account,
            currency=p.currency,
            amount=p.amount,
            transact_ns=p.transact_ns,
            recorded_ns=p.recorded_ns,
        ),
    )


def chain_postings(
    transfers: Iterable[Transfer],
    *,
    region: str,
    last_id: int,
    last_hash: str,
    recorded_ns: int,
) -> list[Posting]:
    """Postings for ``transfers`` in order (debit first), extending a chain at its head."""
    out: list[Posting] = []
    pid, prev = last_id, last_hash
    for t in transfers:
        for account, amount in ((t.debit_account, -t.amount), (t.credit_account, t.amount)):
            pid += 1
            unsealed = Posting(
                region=region,
                id=pid,
                transfer_id=t.id,
                account=account,
                currency=t.currency,
                amount=amount,
                transact_ns=t.transact_ns,
                recorded_ns=recorded_ns,
                prev_hash=prev,
                hash="",
            )
            # the same content definition verify recomputes (posting_hash)
            out.append(replace(unsealed, hash=posting_hash(unsealed)))
            prev = out[-1].hash
    return out


def balance_deltas(postings: Sequence[Posting]) -> dict[tuple[str, str], int]:
    """Sum of posting amounts per (account, currency), in sorted key order."""
    acc: dict[tuple[str, str], int] = {}
    for p in postings:
        key = (p.account, p.currency)
        acc[key] = acc.get(key, 0) + p.amount
    return dict(sorted(acc.items()))
