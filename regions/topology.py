"""The Meridian topology as data: regions, links, instruments, currencies, desks.

Loaded from TOML (default: ``regions/topology.toml``) into frozen dataclasses and validated at
load time. A bad file raises :class:`TopologyError` naming the offending field, e.g.
``regions[1].leaf_port: must be an integer in 1..65535``.

Exceptions::

    TopologyError            (ValueError)  field + rule of the first problem found
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_TOPOLOGY = Path(__file__).with_name("topology.toml")

_CODE = re.compile(r"^[a-z]{3}$")
_SYMBOL = re.compile(r"^[A-Z]{6}$")
_CCY = re.compile(r"^[A-Z]{3}$")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")


class TopologyError(ValueError):
    """A topology file broke a rule. ``field`` is a dotted path into the file."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    code: str
    """Three-letter region code; also the JetStream domain and the subject token."""
    name: str
    cloud_region: str
    """Production cloud region (terraform)."""
    client_port: int
    leaf_port: int
    monitor_port: int
    metrics_port_base: int
    """First port of this region's worker metrics endpoints (one per worker)."""
    executes: tuple[str, ...]
    """Symbols whose order book lives here (single writer per symbol)."""
    failover: tuple[str, ...]
    """Regions a client of this region tries, in order, starting with itself."""
    accepts_leaf: bool
    leaf_dial: tuple[str, ...]
    """Leaf-node remotes this region dials, in order (no_randomize)."""

    @property
    def domain(self) -> str:
        """JetStream domain of this region's server."""
        return self.code


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    a: str
    b: str
    one_way_ms: float

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    def joins(self, x: str, y: str) -> bool:
        return {self.a, self.b} == {x, y}


@dataclass(frozen=True, slots=True, kw_only=True)
class Instrument:
    symbol: str
    base: str
    quote: str
    price_decimals: int
    """Ticks per unit of price = 10**price_decimals."""
    min_qty: int
    max_qty: int

    @property
    def display(self) -> str:
        return f"{self.base}/{self.quote}"

    def format_price(self, ticks: int) -> str:
        s = f"{ticks:0{self.price_decimals + 1}d}"
        if self.price_decimals == 0:
            return s
        return f"{s[: -self.price_decimals]}.{s[-self.price_decimals :]}"

    def parse_price(self, text: str) -> int:
        """Exact decimal string -> ticks; raises ValueError on excess precision."""
        whole, _, frac = text.strip().partition(".")
        if len(frac) > self.price_decimals:
            extra = frac[self.price_decimals :]
            if extra.strip("0"):
                raise ValueError(f"{text!r} has more than {self.price_decimals} decimals")
            frac = frac[: self.price_decimals]
        scale: int = 10**self.price_decimals
        return int(whole or "0") * scale + int(frac.ljust(self.price_decimals, "0") or "0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Currency:
    code: str
    minor_units: int
    usd_rate_micros: int
    """Reference rate for risk notional only: micro-USD per one major unit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Desk:
    code: str
    region: str
    accounts: tuple[str, ...]


DEFAULT_ROLL, DEFAULT_TZ = "17:00", "America/New_York"


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """The trading day (``[session]``): it rolls daily at ``roll`` (HH:MM) in ``tz``, and
    DAY orders expire then (:mod:`router.session`). FX's day ends at 17:00 New York."""

    roll: str = DEFAULT_ROLL
    tz: str = DEFAULT_TZ

    @property
    def hh_mm(self) -> tuple[int, int]:
        hh, mm = self.roll.split(":")
        return int(hh), int(mm)


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    version: int
    hub: str
    regions: tuple[Region, ...]
    links: tuple[Link, ...]
    instruments: tuple[Instrument, ...]
    currencies: tuple[Currency, ...]
    desks: tuple[Desk, ...]
    session: Session = field(default_factory=Session)
    source: str = field(default="<memory>", compare=False)

    # ---- lookups -------------------------------------------------------------------------
    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(r.code for r in self.regions)

    def region(self, code: str) -> Region:
        for r in self.regions:
            if r.code == code:
                return r
        raise KeyError(f"unknown region {code!r}")

    def link(self, x: str, y: str) -> Link:
        for ln in self.links:
            if ln.joins(x, y):
                return ln
        raise KeyError(f"no link between {x!r} and {y!r}")

    def instrument(self, symbol: str) -> Instrument:
        for i in self.instruments:
            if i.symbol == symbol:
                return i
        raise KeyError(f"unknown symbol {symbol!r}")

    def currency(self, code: str) -> Currency:
        for c in self.currencies:
            if c.code == code:
                return c
        raise KeyError(f"unknown currency {code!r}")

    def exec_region(self, symbol: str) -> str:
        """Region whose book executes ``symbol``."""
        for r in self.regions:
            if symbol in r.executes:
                return r.code
        raise KeyError(f"no region executes {symbol!r}")

    def account_home(self, account: str) -> str:
        """Region that owns ``account`` (runs its pre-trade risk)."""
        for d in self.desks:
            if account in d.accounts:
                return d.region
        raise KeyError(f"unknown account {account!r}")

    def account_desk(self, account: str) -> str:
        for d in self.desks:
            if account in d.accounts:
                return d.code
        raise KeyError(f"unknown account {account!r}")

    def accounts(self, region: str | None = None) -> tuple[str, ...]:
        return tuple(
            a for d in self.desks if region is None or d.region == region for a in d.accounts
        )

    def dial_links(self) -> list[tuple[str, str]]:
        """(dialer, acceptor) for every leaf remote, in dial order."""
        return [(r.code, t) for r in self.regions for t in r.leaf_dial]

    # ---- derivation ----------------------------------------------------------------------
    def with_ports(self, ports: Mapping[str, Mapping[str, int]]) -> Topology:
        """Copy with per-region ports replaced, e.g. free ports for a test mesh."""
        regions = tuple(
            dataclasses.replace(r, **dict(ports.get(r.code, {})))  # type: ignore[arg-type]
            for r in self.regions
        )
        return dataclasses.replace(self, regions=regions)

    def with_latency(self, one_way_ms: Mapping[str, float]) -> Topology:
        links = tuple(
            dataclasses.replace(ln, one_way_ms=one_way_ms.get(ln.name, ln.one_way_ms))
            for ln in self.links
        )
        return dataclasses.replace(self, links=links)


# ---- loading -------------------------------------------------------------------------------


def load_topology(path: str | Path | None = None) -> Topology:
    """Load and validate a topology file (default: the shipped lon/nyc/sgp topology)."""
    p = Path(path) if path is not None else DEFAULT_TOPOLOGY
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TopologyError("<file>", f"not valid TOML: {e}") from e
    except OSError as e:
        raise TopologyError("<file>", f"cannot read {p}: {e.strerror}") from e
    return parse_topology(raw, source=str(p))


def parse_topology(raw: Mapping[str, Any], *, source: str = "<memory>") -> Topology:
    """Validate a decoded TOML document into a :class:`Topology`."""
    version = _int(raw, "version", "version", lo=1, hi=1)
    hub = _str(raw, "hub", "hub", _CODE, "a three-letter lower-case region code")

    regions = tuple(_region(r, f"regions[{i}]") for i, r in enumerate(_list(raw, "regions")))
    if not regions:
        raise TopologyError("regions", "at least one region is required")
    codes = [r.code for r in regions]
    _unique(codes, "regions", "code")
    if hub not in codes:
        raise TopologyError("hub", f"{hub!r} is not one of the regions {codes}")
    ports: dict[int, str] = {}
    for i, r in enumerate(regions):
        for fname in ("client_port", "leaf_port", "monitor_port", "metrics_port_base"):
            port = getattr(r, fname)
            where = f"regions[{i}].{fname}"
            if port in ports:
                raise TopologyError(where, f"port {port} already used by {ports[port]}")
            ports[port] = where

    links = tuple(_link(ln, f"links[{i}]", codes) for i, ln in enumerate(_list(raw, "links")))
    pairs = [frozenset((ln.a, ln.b)) for ln in links]
    for i, p in enumerate(pairs):
        if pairs.index(p) != i:
            raise TopologyError(f"links[{i}]", "duplicate link between the same two regions")

    currencies = tuple(
        _currency(c, f"currencies[{i}]") for i, c in enumerate(_list(raw, "currencies"))
    )
    _unique([c.code for c in currencies], "currencies", "code")
    ccys = {c.code for c in currencies}
    instruments = tuple(
        _instrument(x, f"instruments[{i}]", ccys) for i, x in enumerate(_list(raw, "instruments"))
    )
    _unique([x.symbol for x in instruments], "instruments", "symbol")
    symbols = {x.symbol for x in instruments}

    executed: dict[str, str] = {}
    for i, r in enumerate(regions):
        for j, s in enumerate(r.executes):
            where = f"regions[{i}].executes[{j}]"
            if s not in symbols:
                raise TopologyError(where, f"{s!r} is not a known instrument")
            if s in executed:
                raise TopologyError(where, f"{s!r} is already executed in {executed[s]}")
            executed[s] = r.code
        if tuple(sorted(r.failover)) != tuple(sorted(codes)) or r.failover[0] != r.code:
            raise TopologyError(
                f"regions[{i}].failover",
                "must list every region exactly once, starting with the region itself",
            )
        for j, t in enumerate(r.leaf_dial):
            where = f"regions[{i}].leaf_dial[{j}]"
            if t not in codes or t == r.code:
                raise TopologyError(where, f"{t!r} is not another region")
            if not regions[codes.index(t)].accepts_leaf:
                raise TopologyError(where, f"{t!r} does not accept leaf links (accepts_leaf)")
            if frozenset((r.code, t)) not in pairs:
                raise TopologyError(where, f"no [[links]] entry joins {r.code} and {t}")
        if r.code != hub and not r.leaf_dial:
            raise TopologyError(f"regions[{i}].leaf_dial", "a spoke must dial the hub")
        if r.code != hub and r.leaf_dial[0] != hub:
            raise TopologyError(f"regions[{i}].leaf_dial[0]", f"must be the hub {hub!r}")
        if r.code == hub and r.leaf_dial:
            raise TopologyError(f"regions[{i}].leaf_dial", "the hub dials nobody")
    if not regions[codes.index(hub)].accepts_leaf:
        raise TopologyError("hub", "the hub region must have accepts_leaf = true")
    # Two spokes that dial each other would loop-detect and ban both links (MACHINE-NOTES).
    dials = {(r.code, t) for r in regions for t in r.leaf_dial}
    for a, b in dials:
        if (b, a) in dials:
            raise TopologyError("regions.leaf_dial", f"{a} and {b} dial each other")

    desks = tuple(_desk(d, f"desks[{i}]", codes) for i, d in enumerate(_list(raw, "desks")))
    _unique([d.code for d in desks], "desks", "code")
    _unique([a for d in desks for a in d.accounts], "desks", "accounts")
    return Topology(
        version=version,
        hub=hub,
        regions=regions,
        links=links,
        instruments=instruments,
        currencies=currencies,
        desks=desks,
        session=_session(raw.get("session", {})),
        source=source,
    )


def _region(raw: Any, where: str) -> Region:
    _table(raw, where)
    return Region(
        code=_str(raw, "code", f"{where}.code", _CODE, "a three-letter lower-case region code"),
        name=_str(raw, "name", f"{where}.name"),
        cloud_region=_str(raw, "cloud_region", f"{where}.cloud_region"),
        client_port=_port(raw, "client_port", where),
        leaf_port=_port(raw, "leaf_port", where),
        monitor_port=_port(raw, "monitor_port", where),
        metrics_port_base=_port(raw, "metrics_port_base", where),
        executes=_strs(raw, "executes", f"{where}.executes", _SYMBOL, "a six-letter symbol"),
        failover=_strs(raw, "failover", f"{where}.failover", _CODE, "a region code"),
        accepts_leaf=_bool(raw, "accepts_leaf", f"{where}.accepts_leaf"),
        leaf_dial=_strs(raw, "leaf_dial", f"{where}.leaf_dial", _CODE, "a region code"),
    )


_ROLL = re.compile(r"([01]\d|2[0-3]):[0-5]\d")


def _session(raw: Any) -> Session:
    _table(raw, "session")
    unknown = set(raw) - {"roll", "tz"}
    if unknown:
        raise TopologyError("session", f"unknown keys {sorted(unknown)}")
    s = Session(
        roll=_str(raw, "roll", "session.roll", _ROLL, "HH:MM") if "roll" in raw else DEFAULT_ROLL,
        tz=_str(raw, "tz", "session.tz") if "tz" in raw else DEFAULT_TZ,
    )
    try:
        ZoneInfo(s.tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as e:  # a directory: "America"
        raise TopologyError("session.tz", f"{s.tz!r} is not a known time zone ({e})") from e
    return s


def _link(raw: Any, where: str, codes: list[str]) -> Link:
    _table(raw, where)
    a = _str(raw, "a", f"{where}.a", _CODE, "a region code")
    b = _str(raw, "b", f"{where}.b", _CODE, "a region code")
    for k, v in (("a", a), ("b", b)):
        if v not in codes:
            raise TopologyError(f"{where}.{k}", f"{v!r} is not one of the regions {codes}")
    if a == b:
        raise TopologyError(f"{where}.b", "a link joins two different regions")
    ms = raw.get("one_way_ms")
    if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms <= 2000:
        raise TopologyError(f"{where}.one_way_ms", "must be a number of milliseconds in 0..2000")
    return Link(a=a, b=b, one_way_ms=float(ms))


def _instrument(raw: Any, where: str, ccys: set[str]) -> Instrument:
    _table(raw, where)
    sym = _str(raw, "symbol", f"{where}.symbol", _SYMBOL, "six upper-case letters")
    base = _str(raw, "base", f"{where}.base", _CCY, "a currency code")
    quote = _str(raw, "quote", f"{where}.quote", _CCY, "a currency code")
    for k, v in (("base", base), ("quote", quote)):
        if v not in ccys:
            raise TopologyError(f"{where}.{k}", f"{v!r} is not a listed currency")
    if sym != base + quote:
        raise TopologyError(f"{where}.symbol", f"must be base+quote ({base + quote})")
    min_qty = _int(raw, "min_qty", f"{where}.min_qty", lo=1)
    max_qty = _int(raw, "max_qty", f"{where}.max_qty", lo=min_qty)
    return Instrument(
        symbol=sym,
        base=base,
        quote=quote,
        price_decimals=_int(raw, "price_decimals", f"{where}.price_decimals", lo=0, hi=8),
        min_qty=min_qty,
        max_qty=max_qty,
    )


def _currency(raw: Any, where: str) -> Currency:
    _table(raw, where)
    return Currency(
        code=_str(raw, "code", f"{where}.code", _CCY, "three upper-case letters"),
        minor_units=_int(raw, "minor_units", f"{where}.minor_units", lo=0, hi=4),
        usd_rate_micros=_int(raw, "usd_rate_micros", f"{where}.usd_rate_micros", lo=1),
    )


def _desk(raw: Any, where: str, codes: list[str]) -> Desk:
    _table(raw, where)
    region = _str(raw, "region", f"{where}.region", _CODE, "a region code")
    if region not in codes:
        raise TopologyError(f"{where}.region", f"{region!r} is not one of the regions {codes}")
    accounts = _strs(raw, "accounts", f"{where}.accounts", _TOKEN, "an account id [A-Za-z0-9_-]")
    if not accounts:
        raise TopologyError(f"{where}.accounts", "a desk needs at least one account")
    return Desk(
        code=_str(raw, "code", f"{where}.code", _TOKEN, "a desk id [A-Za-z0-9_-]"),
        region=region,
        accounts=accounts,
    )


# ---- field helpers -------------------------------------------------------------------------


def _table(raw: Any, where: str) -> None:
    if not isinstance(raw, Mapping):
        raise TopologyError(where, "must be a table")


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    v = raw.get(key, [])
    if not isinstance(v, list):
        raise TopologyError(key, "must be an array of tables ([[...]])")
    return v


def _str(
    raw: Mapping[str, Any],
    key: str,
    where: str,
    pattern: re.Pattern[str] | None = None,
    what: str = "",
) -> str:
    if key not in raw:
        raise TopologyError(where, "is required")
    v = raw[key]
    if not isinstance(v, str) or not v:
        raise TopologyError(where, "must be a non-empty string")
    if pattern is not None and not pattern.fullmatch(v):
        raise TopologyError(where, f"{v!r} must be {what}")
    return v


def _strs(
    raw: Mapping[str, Any], key: str, where: str, pattern: re.Pattern[str], what: str
) -> tuple[str, ...]:
    if key not in raw:
        raise TopologyError(where, "is required")
    v = raw[key]
    if not isinstance(v, list):
        raise TopologyError(where, "must be an array of strings")
    out = []
    for i, s in enumerate(v):
        if not isinstance(s, str) or not pattern.fullmatch(s):
            raise TopologyError(f"{where}[{i}]", f"{s!r} must be {what}")
        out.append(s)
    _unique(out, where, None)
    return tuple(out)


def _int(
    raw: Mapping[str, Any], key: str, where: str, *, lo: int | None = None, hi: int | None = None
) -> int:
    if key not in raw:
        raise TopologyError(where, "is required")
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise TopologyError(where, f"must be an integer, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise TopologyError(where, f"must be in {lo if lo is not None else ''}..{hi or ''}")
    return v


def _port(raw: Mapping[str, Any], key: str, where: str) -> int:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise TopologyError(f"{where}.{key}", "must be an integer in 1..65535")
    return v


def _bool(raw: Mapping[str, Any], key: str, where: str) -> bool:
    v = raw.get(key)
    if not isinstance(v, bool):
        raise TopologyError(where, "must be true or false")
    return v


def _unique(values: Iterable[str], where: str, key: str | None) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise TopologyError(f"{where}.{key}" if key else where, f"duplicate {v!r}")
        seen.add(v)
