"""Fill factories for tests, benchmarks and demos (no I/O)."""

from __future__ import annotations

import random

from regions.topology import Topology
from router.contract import Fill, Side


def make_fill(
    topology: Topology,
    *,
    trade_id: str,
    symbol: str,
    qty: int,
    price_ticks: int,
    buy_account: str,
    sell_account: str,
    transact_ns: int = 1,
) -> Fill:
    """A contract-valid fill of ``symbol`` executed in the symbol's region."""
    inst = topology.instrument(symbol)
    return Fill(
        trade_id=trade_id,
        exec_region=topology.exec_region(symbol),
        symbol=symbol,
        base=inst.base,
        quote=inst.quote,
        price_decimals=inst.price_decimals,
        price_ticks=price_ticks,
        qty=qty,
        buy_account=buy_account,
        sell_account=sell_account,
        buy_order_id=f"{trade_id}-b",
        sell_order_id=f"{trade_id}-s",
        buy_exec_id=f"{trade_id}-bx",
        sell_exec_id=f"{trade_id}-sx",
        aggressor=Side.BUY,
        transact_ns=transact_ns,
    )


def random_fills(
    topology: Topology,
    n: int,
    *,
    prefix: str,
    region: str | None = None,
    seed: int = 0,
    start_ns: int = 1_700_000_000_000_000_000,
) -> list[Fill]:
    """``n`` deterministic pseudo-random fills (of one region's symbols when given)."""
    rnd = random.Random(seed)
    symbols = [s for r in topology.regions if region in (None, r.code) for s in r.executes]
    accounts = list(topology.accounts())
    out = []
    for i in range(n):
        sym = rnd.choice(symbols)
        buy, sell = rnd.sample(accounts, 2)
        inst = topology.instrument(sym)
        out.append(
            make_fill(
                topology,
                trade_id=f"{topology.exec_region(sym)}-{sym}-{prefix}-{i}",
                symbol=sym,
                qty=rnd.randint(inst.min_qty, 5_000_000),
                price_ticks=rnd.randint(10**inst.price_decimals // 2, 2 * 10**inst.price_decimals),
                buy_account=buy,
                sell_account=sell,
                transact_ns=start_ns + i * 1000,
            )
        )
    return out
