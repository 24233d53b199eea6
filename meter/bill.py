"""Bills: usage per tenant, priced by a price sheet, in decimal money.

A price sheet (TOML) prices each *meter*; quantities come from the store's
exact 1 s rollups (or from Parquet files of many hosts, see
:func:`usage_from_parquet`), so a bill is an integer sum of millisecond
records, converted once::

    currency = "EUR"
    bill_estimated = true           # false: no line for a meter whose figure was estimated
    [prices]                        # list prices
    cpu_second = "0.00002"          # per CPU-second (cpu_ns + softirq_ns - softirq_given_ns)
    gigacycle = "0.000001"          # per 10^9 cycles
    million_cache_misses = "0.0001" # per 10^6 cache misses
    kwh = "0.30"                    # per kWh of attributed energy
    gb = "0.01"                     # per GB (10^9 bytes) through the compartment's ports
    million_packets = "0.001"       # per 10^6 packets through its ports
    vf_gb = "0.005"                 # per GB through its SR-IOV VFs
    [tenant.acme]                   # negotiated (contracted) prices of one tenant
    cpu_second = "0.000015"

Money rules (docs/architecture.md, "Money"): prices are decimal strings
of at most :data:`PRICE_DECIMALS` decimals (a TOML float is read through
its shortest decimal repr). A line's exact cost is ``consumed / divisor x
price``, a fraction computed without rounding. Lines carry
:data:`COST_DECIMALS` decimals: the exact cost rounded half-even, and when
one period's usage is split into several lines (charge periods, hosts,
compartments) each line is the rounded running total through it minus the
rounded running total before it (:func:`carry_round`), so the lines of any
split add up exactly to the whole period's line. An invoice's total is the
sum of its lines rounded half-even once, to the currency's minor unit.
List cost is the contracted cost plus the carried difference of list and
contracted price, so ListCost >= ContractedCost on every line where the
negotiated price is below the list price. meter's own rows (``host``,
``idle``, ``sched``, ``steal``, ``unattributed``, ``late``) are not billed.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

from .errors import ConfigError, MeterError
from .host import load_toml
from .records import ESTIMATE_COLUMNS
from .sinks.store import ROLLUPS
from .topology import RESERVED

_HOUR_NS = ROLLUPS["rollup_1h"]

__all__ = [
    "COST_DECIMALS",
    "METERS",
    "PRICE_DECIMALS",
    "QUANTITY_DECIMALS",
    "Charge",
    "Invoice",
    "Line",
    "PriceSheet",
    "SERVICES",
    "billing_period",
    "carry_round",
    "charges",
    "invoice_id",
    "invoices",
    "merge_periods",
    "minor_unit",
    "money",
    "price_text",
    "quantity_text",
    "usage_from_parquet",
    "usage_from_rollups",
    "usage_from_store",
]

#: Decimals of every cost a line carries (the stored precision).
COST_DECIMALS = 10
#: Decimals of a unit price: a price sheet may not say more.
PRICE_DECIMALS = 12
#: Decimals of a quantity in pricing units (exact for every meter but kWh).
QUANTITY_DECIMALS = 18

#: ISO 4217 currencies whose minor unit is not the cent (decimals of the amount due).
_MINOR_UNITS = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
                     "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    "CLF": 4, "UYW": 4,
}


def minor_unit(currency: str) -> int:
    """Decimals of the currency's minor unit (ISO 4217; 2 unless listed otherwise)."""
    return _MINOR_UNITS.get(currency, 2)


@dataclasses.dataclass(frozen=True)
class PricedMeter:
    """A billable meter: which record fields, how they convert to the priced unit.

    ``unit`` is in FOCUS unit format; ``service`` names the FOCUS service
    (one ServiceCategory and ServiceSubcategory per service name).
    """

    key: str
    fields: tuple[str, ...]
    divisor: int
    unit: str
    description: str
    service: str
    #: Fields subtracted from the sum (time a compartment ran for others).
    minus: tuple[str, ...] = ()
    #: The rollup column counting records whose figure for this meter was estimated.
    estimate: str = ""

    @property
    def all_fields(self) -> tuple[str, ...]:
        return self.fields + self.minus


@dataclasses.dataclass(frozen=True)
class Service:
    """A FOCUS service: its name, category and subcategory (FOCUS 1.2 values)."""

    name: str
    category: str
    subcategory: str


SERVICES = {
    "compute": Service("Compartment compute metering", "Compute", "Other (Compute)"),
    "network": Service("Compartment network metering", "Networking", "Network Infrastructure"),
    "energy": Service("Compartment energy metering", "Other", "Other (Other)"),
}

_CYCLES_EST, _ENERGY_EST = ESTIMATE_COLUMNS

#: The meters a price sheet can price, in invoice order.
METERS = (
    PricedMeter("cpu_second", ("cpu_ns", "softirq_ns"), 10**9, "CPU-Seconds",
                "CPU time of the compartment's tasks and of the kernel's packet processing for it", "compute",
                minus=("softirq_given_ns",)),
    PricedMeter("gigacycle", ("cycles",), 10**9, "1000000000 Cycles", "CPU cycles", "compute",
                estimate=_CYCLES_EST),
    PricedMeter("million_cache_misses", ("cache_misses",), 10**6, "1000000 Cache Misses", "Last-level cache misses",
                "compute"),
    PricedMeter("kwh", ("energy_uj",), 3_600_000_000_000, "kWh", "Energy attributed to the compartment", "energy",
                estimate=_ENERGY_EST),
    # Wire figures: what crossed the wire, whatever the offload settings (a GSO/GRO skb is many packets).
    PricedMeter("gb", ("rx_wire_bytes", "tx_wire_bytes"), 10**9, "GB",
                "Bytes on the wire through the compartment's ports", "network"),
    PricedMeter("million_packets", ("rx_wire_packets", "tx_wire_packets"), 10**6, "1000000 Packets",
                "Packets on the wire through the compartment's ports", "network"),
    PricedMeter("vf_gb", ("vf_rx_bytes", "vf_tx_bytes"), 10**9, "GB", "Bytes through the compartment's SR-IOV VFs",
                "network"),
)
_BY_KEY = {m.key: m for m in METERS}
#: meter's own rows (host, idle, sched, steal, unattributed, late): no tenant's bill.
NOT_BILLED = RESERVED


#: Prices per unit are below this.
MAX_PRICE = 10**9


def _decimal(value: Any, *, path: str, key: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError("must be a decimal number (a string like \"0.00002\")", path=path, key=key)
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{value!r} is not a decimal number", path=path, key=key) from None
    if not d.is_finite():
        raise ConfigError(f"{value!r} is not a finite price", path=path, key=key)
    if d < 0:
        raise ConfigError(f"a price cannot be negative ({value})", path=path, key=key)
    if d >= MAX_PRICE:
        raise ConfigError(f"a price must be below {MAX_PRICE:,} per unit, not {str(value)[:40]}", path=path, key=key)
    if d != d.quantize(Decimal(1).scaleb(-PRICE_DECIMALS), rounding=ROUND_HALF_EVEN):
        raise ConfigError(f"a price has at most {PRICE_DECIMALS} decimals, not {str(value)[:40]}", path=path, key=key)
    return abs(d)  # "-0" is 0


@dataclasses.dataclass(frozen=True)
class PriceSheet:
    """List prices per meter, a currency, and per-tenant negotiated prices."""

    currency: str
    prices: dict[str, Decimal]
    overrides: dict[str, dict[str, Decimal]]
    source: str = ""
    #: False: meters whose figure was estimated (cycles from cpu-clock, energy from a model) get no line.
    bill_estimated: bool = True

    @classmethod
    def from_file(cls, path: str | Path) -> PriceSheet:
        path = Path(path)
        data, _ = load_toml(path, "price sheet")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> PriceSheet:
        for key in data:
            if key not in ("currency", "bill_estimated", "prices", "tenant"):
                raise ConfigError("unknown key (expected currency, bill_estimated, prices, tenant)", path=source,
                                  key=key)
        currency = data.get("currency", "")
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
            raise ConfigError("must be an ISO 4217 code such as \"EUR\"", path=source, key="currency")
        bill_estimated = data.get("bill_estimated", True)
        if not isinstance(bill_estimated, bool):
            raise ConfigError("must be true or false", path=source, key="bill_estimated")

        def table(raw: Any, where: str) -> dict[str, Decimal]:
            if not isinstance(raw, dict):
                raise ConfigError("must be a table", path=source, key=where)
            out = {}
            for k, v in raw.items():
                if k not in _BY_KEY:
                    raise ConfigError(f"unknown meter (expected one of: {', '.join(_BY_KEY)})", path=source,
                                      key=f"{where}.{k}")
                out[k] = _decimal(v, path=source, key=f"{where}.{k}")
            return out

        prices = table(data.get("prices", {}), "prices")
        overrides = {}
        tenants = data.get("tenant", {})
        if not isinstance(tenants, dict):
            raise ConfigError("must be tables [tenant.NAME]", path=source, key="tenant")
        for name, raw in tenants.items():
            overrides[name] = table(raw, f"tenant.{name}")
        return cls(currency, prices, overrides, source, bill_estimated)

    def unused_overrides(self, tenants: list[str]) -> list[str]:
        """One sentence per ``[tenant.NAME]`` override naming none of ``tenants``
        (a typo bills that tenant at list price), with the closest name."""
        import difflib

        out = []
        for name in sorted(set(self.overrides) - set(tenants)):
            close = difflib.get_close_matches(name, tenants, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"{self.source or 'the price sheet'}: [tenant.{name}] names no tenant billed in this "
                       f"period{hint}; its prices were not used")
        return out

    def price(self, tenant: str, meter: str) -> Decimal | None:
        """The price ``tenant`` pays per unit of ``meter``: negotiated, else list."""
        return self.overrides.get(tenant, {}).get(meter, self.prices.get(meter))

    def list_price(self, meter: str) -> Decimal | None:
        """The list price, or the negotiated one where the sheet lists none."""
        return self.prices.get(meter)

    @property
    def digest(self) -> str:
        """A hash of everything that prices a bill (currency, list and negotiated prices)."""
        canon = json.dumps([self.currency, self.bill_estimated, sorted((k, str(v)) for k, v in self.prices.items()),
                            sorted((t, sorted((k, str(v)) for k, v in p.items())) for t, p in self.overrides.items())])
        return hashlib.sha256(canon.encode()).hexdigest()

    def sku_price_id(self, meter: str) -> str:
        """The list price point of ``meter``: changes only when its list price or the currency does."""
        price = self.prices.get(meter)
        tag = hashlib.sha256(f"{self.currency}:{meter}:{price}".encode()).hexdigest()[:12]
        return f"meter-{meter}-{tag}"


@dataclasses.dataclass(frozen=True)
class Line:
    """One line item: a meter's quantity, unit, prices and costs.

    ``cost`` (what the tenant pays: contracted) and ``list_cost`` carry
    :data:`COST_DECIMALS` decimals; ``estimated`` says which figure was
    estimated ("" when all were measured).
    """

    meter: str
    description: str
    service: str
    consumed: int  # in base units (ns, cycles, µJ, bytes, packets)
    quantity: Decimal
    unit: str
    unit_price: Decimal
    cost: Decimal
    list_unit_price: Decimal
    list_cost: Decimal
    estimated: str = ""


@dataclasses.dataclass(frozen=True)
class Invoice:
    """A tenant's invoice for [start_ns, end_ns)."""

    tenant: str
    start_ns: int
    end_ns: int
    currency: str
    lines: tuple[Line, ...]

    @property
    def subtotal(self) -> Decimal:
        """The lines' sum, in the lines' precision."""
        return sum((line.cost for line in self.lines), Decimal(0))

    @property
    def total(self) -> Decimal:
        """The amount due: the subtotal rounded half-even to the currency's minor unit (once, here)."""
        return self.subtotal.quantize(Decimal(1).scaleb(-minor_unit(self.currency)), rounding=ROUND_HALF_EVEN)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant, "start_ns": self.start_ns, "end_ns": self.end_ns, "currency": self.currency,
            "subtotal": money(self.subtotal), "total": str(self.total),
            "lines": [{**dataclasses.asdict(line), "quantity": quantity_text(line.quantity),
                       "unit_price": price_text(line.unit_price), "list_unit_price": price_text(line.list_unit_price),
                       "cost": money(line.cost), "list_cost": money(line.list_cost)} for line in self.lines],
        }


@dataclasses.dataclass(frozen=True)
class Charge:
    """One charge: a line of one resource (host, tenant, compartment) in one charge period."""

    tenant: str
    host: str
    compartment: str
    start_ns: int
    end_ns: int
    line: Line


def money(d: Decimal) -> str:
    """A cost as text: :data:`COST_DECIMALS` decimals, never E-notation."""
    return f"{d:.{COST_DECIMALS}f}"


def price_text(d: Decimal) -> str:
    return f"{d:.{PRICE_DECIMALS}f}"


def quantity_text(d: Decimal) -> str:
    return f"{d:.{QUANTITY_DECIMALS}f}"


def _round(x: Fraction) -> Decimal:
    """Half-even to the stored precision, from an exact fraction."""
    return Decimal(round(x * 10**COST_DECIMALS)).scaleb(-COST_DECIMALS)


def carry_round(exact: Iterable[Fraction]) -> list[Decimal]:
    """Each value rounded so that every running total is the running exact total rounded.

    Line i is R(S_i) - R(S_{i-1}), with S the running exact sum and R
    half-even to :data:`COST_DECIMALS`: any run of lines adds up to its
    exact sum within one unit of the last decimal, all of them to R(total)
    exactly, and none is more than one unit off its own exact value.
    """
    out, run, before = [], Fraction(0), Decimal(0)
    for x in exact:
        run += x
        now = _round(run)
        out.append(now - before)
        before = now
    return out


def _quantity(consumed: int, divisor: int) -> Decimal:
    return Decimal(round(Fraction(consumed, divisor) * 10**QUANTITY_DECIMALS)).scaleb(-QUANTITY_DECIMALS)


_ESTIMATED_WHAT = {_CYCLES_EST: "cycles estimated from cpu-clock", _ENERGY_EST: "energy from a power model"}


def _consumed(m: PricedMeter, u: dict[str, int | None]) -> int | None:
    values = [u.get(f) for f in m.fields]
    if all(v is None for v in values):
        return None  # not measured: no line, not a zero line
    return sum(v or 0 for v in values) - sum(u.get(f) or 0 for f in m.minus)


def _prices(sheet: PriceSheet, tenant: str, m: PricedMeter, consumed: int) -> tuple[Decimal, Decimal] | None:
    price = sheet.price(tenant, m.key)
    if price is None:
        if consumed == 0:
            return None
        raise MeterError(f"tenant {tenant!r} used meter {m.key!r} but {sheet.source or 'the price sheet'} "
                         f"has no price for it: add {m.key} = \"...\" under [prices]")
    listed = sheet.list_price(m.key)
    return price, (price if listed is None else listed)


def _lines(usage: dict[str, int | None], sheet: PriceSheet, tenant: str) -> list[tuple[PricedMeter, int, Decimal,
                                                                                        Decimal, str]]:
    """(meter, consumed, price, list price, estimated) of every meter that gets a line."""
    out = []
    for m in METERS:
        consumed = _consumed(m, usage)
        if consumed is None:
            continue
        estimated = _ESTIMATED_WHAT[m.estimate] if m.estimate and usage.get(m.estimate) else ""
        if estimated and not sheet.bill_estimated:
            continue
        prices = _prices(sheet, tenant, m, consumed)
        if prices is not None:
            out.append((m, consumed, *prices, estimated))
    return out


def _line(m: PricedMeter, consumed: int, price: Decimal, listed: Decimal, estimated: str,
          cost: Decimal, list_cost: Decimal) -> Line:
    return Line(m.key, m.description, m.service, consumed, _quantity(consumed, m.divisor), m.unit, price, cost,
                listed, list_cost, estimated)


def _exact(consumed: int, divisor: int, price: Decimal) -> Fraction:
    return Fraction(consumed, divisor) * Fraction(price)


def invoices(usage: dict[str, dict[str, int | None]], prices: PriceSheet, start_ns: int, end_ns: int,
             *, tenant: str | None = None) -> list[Invoice]:
    """One invoice per tenant (sorted by name), lines in METERS order.

    Raises MeterError for an unknown tenant and for a meter a tenant used
    that the price sheet does not price.
    """
    if end_ns <= start_ns:
        raise MeterError("the billing period is empty or reversed: --to must be after --from")
    names = sorted(t for t in usage if t not in NOT_BILLED)
    if tenant is not None:
        if tenant not in usage:
            raise MeterError(f"tenant {tenant!r} has no usage in this period (known: {', '.join(names) or 'none'})")
        names = [tenant]
    out = []
    for name in names:
        lines = []
        for m, consumed, price, listed, estimated in _lines(usage[name], prices, name):
            cost = _round(_exact(consumed, m.divisor, price))
            markup = _round(_exact(consumed, m.divisor, listed - price))
            lines.append(_line(m, consumed, price, listed, estimated, cost, cost + markup))
        out.append(Invoice(name, start_ns, end_ns, prices.currency, tuple(lines)))
    return out


Resource = tuple[str, str, str]  # (tenant, host, compartment)


def charges(by_period: dict[int, dict[Resource, dict[str, int | None]]], prices: PriceSheet, start_ns: int,
            end_ns: int, period_ns: int, *, tenant: str | None = None) -> list[Charge]:
    """Every resource's lines per charge period, costs carried so that they add up.

    ``by_period`` is usage per charge period (index k: [k x period_ns,
    (k+1) x period_ns) clipped to [start_ns, end_ns)) per resource, as
    :func:`usage_from_store` gives it with ``by_resource=True``. For each
    (tenant, meter), the costs of its charges in (period, host,
    compartment) order are :func:`carry_round`-ed: they add up exactly to
    that tenant's line in :func:`invoices` of the whole period.
    """
    if end_ns <= start_ns:
        raise MeterError("the billing period is empty or reversed: --to must be after --from")
    if tenant is not None and not any(r[0] == tenant for u in by_period.values() for r in u):
        known = sorted({r[0] for u in by_period.values() for r in u} - set(NOT_BILLED))
        raise MeterError(f"tenant {tenant!r} has no usage in this period (known: {', '.join(known) or 'none'})")
    # Each (tenant, meter)'s rows, in (period, host, compartment) order: the order costs carry in.
    groups: dict[tuple[str, str], list[tuple[int, Resource, PricedMeter, int, Decimal, Decimal, str]]] = {}
    for k in sorted(by_period):
        for res in sorted(by_period[k]):
            if res[0] in NOT_BILLED or (tenant is not None and res[0] != tenant):
                continue
            for m, consumed, price, listed, estimated in _lines(by_period[k][res], prices, res[0]):
                groups.setdefault((res[0], m.key), []).append((k, res, m, consumed, price, listed, estimated))
    out = []
    for rows in groups.values():
        costs = carry_round(_exact(r[3], r[2].divisor, r[4]) for r in rows)
        markups = carry_round(_exact(r[3], r[2].divisor, r[5] - r[4]) for r in rows)
        for (k, (ten, host, comp), m, consumed, price, listed, estimated), c, mk in zip(rows, costs, markups):
            out.append(Charge(ten, host, comp, max(k * period_ns, start_ns), min((k + 1) * period_ns, end_ns),
                              _line(m, consumed, price, listed, estimated, c, c + mk)))
    order = {m.key: i for i, m in enumerate(METERS)}
    return sorted(out, key=lambda ch: (ch.start_ns, ch.tenant, ch.host, ch.compartment, order[ch.line.meter]))


_SECOND = 1_000_000_000


def billing_period(ns: int, kind: str) -> tuple[int, int]:
    """The UTC calendar billing period (``month`` or ``day``) holding ``ns``: (start, end) in ns."""
    t = datetime.datetime.fromtimestamp(ns // _SECOND, datetime.UTC)
    if kind == "day":
        first = t.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = first + datetime.timedelta(days=1)
    elif kind == "month":
        first = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (first + datetime.timedelta(days=32)).replace(day=1)
    else:
        raise MeterError(f"unknown billing period {kind!r}: use month or day")
    return int(first.timestamp()) * _SECOND, int(nxt.timestamp()) * _SECOND


def invoice_id(tenant: str, start_ns: int, end_ns: int, digest: str) -> str:
    """A deterministic invoice id: tenant, period (UTC) and a hash of both and the price sheet."""
    def day(ns: int) -> str:
        return datetime.datetime.fromtimestamp(ns // _SECOND, datetime.UTC).strftime("%Y%m%dT%H%M%S")

    tag = hashlib.sha256(f"{tenant}\0{start_ns}\0{end_ns}\0{digest}".encode()).hexdigest()[:10]
    return f"INV-{day(start_ns)}-{day(end_ns)}-{tag}"


_SUM_FIELDS = tuple(sorted({f for m in METERS for f in m.all_fields} | set(ESTIMATE_COLUMNS)))
#: Rollups and Parquet files written before wire counting have none: their skb figures stand in.
_WIRE_FALLBACK = {f"{d}_wire_{u}": f"{d}_{u}" for d in ("rx", "tx") for u in ("packets", "bytes")}


def _key(row: dict[str, Any], by_resource: bool) -> Any:
    return (row["tenant"], row["host"], row["compartment"]) if by_resource else row["tenant"]


def usage_from_rollups(rows: list[dict[str, Any]], *, by_resource: bool = False) -> dict[Any, dict[str, int | None]]:
    """Integer sums of every billed field (and the estimate counts) per tenant,
    or per (tenant, host, compartment) with ``by_resource``, from rollup rows."""
    usage: dict[Any, dict[str, int | None]] = {}
    for row in rows:
        u = usage.setdefault(_key(row, by_resource), dict.fromkeys(_SUM_FIELDS))
        for f in _SUM_FIELDS:
            v = row.get(f)
            if v is None and f in _WIRE_FALLBACK:
                v = row.get(_WIRE_FALLBACK[f])
            if v is not None:
                u[f] = (u[f] or 0) + int(v)
    return usage


def usage_from_store(store: Any, start_ns: int, end_ns: int, period_ns: int, *,
                     by_resource: bool = False) -> dict[int, dict[Any, dict[str, int | None]]]:
    """Usage per charge period from the store's exact rollups.

    Charge period k is [k x period_ns, (k+1) x period_ns) (UTC-aligned:
    a period dividing an hour starts on the hour), clipped to
    [start_ns, end_ns); keys as in :func:`usage_from_rollups`. When charge
    periods are whole hours (the default), the whole hours of the range are
    read from the 1 h rollups (each the exact sum of its 1 s rows: a month
    of a host is ~720 rows a compartment, not 2.6 M) and only its partial
    hours at either end from the 1 s rollups.
    """
    _whole_seconds(start_ns, end_ns, period_ns)
    spans = [("rollup_1s", start_ns, end_ns)]
    if period_ns % _HOUR_NS == 0:
        first, last = -(-start_ns // _HOUR_NS) * _HOUR_NS, end_ns // _HOUR_NS * _HOUR_NS
        if first < last:
            spans = [("rollup_1s", start_ns, first), ("rollup_1h", first, last), ("rollup_1s", last, end_ns)]
    out: dict[int, list[dict[str, Any]]] = {}
    for table, a, b in spans:
        if a < b:
            for row in store.rollup(table, a, b):
                out.setdefault(row["period_start_ns"] // period_ns, []).append(row)
    return {k: usage_from_rollups(v, by_resource=by_resource) for k, v in sorted(out.items())}



def usage_from_parquet(root: str | Path, start_ns: int, end_ns: int, period_ns: int, *,
                       by_resource: bool = False) -> dict[int, dict[Any, dict[str, int | None]]]:
    """The same from a directory of Parquet files of many hosts, with plain SQL (DuckDB).

    The query is standard SQL over ``read_parquet``: Trino or Spark run the
    same GROUP BY over the same files.
    """
    from .records import estimate_sql

    _whole_seconds(start_ns, end_ns, period_ns)
    try:
        import duckdb
    except ImportError as err:
        raise MeterError("billing from Parquet needs DuckDB: pip install -e .[fleet]") from err
    files = [str(p) for p in Path(root).rglob("*.parquet")]
    if not files:
        raise MeterError(f"no Parquet files under {root}")
    raw = [f"coalesce({f}, {_WIRE_FALLBACK[f]}) AS {f}" if f in _WIRE_FALLBACK else f
           for f in _SUM_FIELDS if f not in ESTIMATE_COLUMNS]
    inner = ", ".join(raw + [f"{estimate_sql(c)} AS {c}" for c in ESTIMATE_COLUMNS])
    sums = ", ".join(f"sum({f}) AS {f}" for f in _SUM_FIELDS)
    # A record is (host, seq): exports that overlap hold some records twice,
    # and DISTINCT bills each once (the copies are the same record, byte for byte).
    sql = (f"SELECT window_start_ns // $period AS p, tenant, host, compartment, {sums} FROM ("
           f"SELECT DISTINCT host, seq, window_start_ns, tenant, compartment, {inner} "
           f"FROM read_parquet($files, hive_partitioning = true, union_by_name = true) "
           f"WHERE window_start_ns >= $start AND window_start_ns < $end) "
           f"GROUP BY p, tenant, host, compartment ORDER BY p, tenant, host, compartment")
    con = duckdb.connect()
    try:
        result = con.execute(sql, {"start": start_ns, "end": end_ns, "period": period_ns, "files": files}).fetchall()
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MeterError(f"cannot bill from the Parquet files under {root}: {first}") from err
    finally:
        con.close()
    rows: dict[int, list[dict[str, Any]]] = {}
    for p, tenant, host, comp, *vals in result:
        rows.setdefault(int(p), []).append({"tenant": tenant, "host": host, "compartment": comp,
                                            **dict(zip(_SUM_FIELDS, vals))})
    return {k: usage_from_rollups(v, by_resource=by_resource) for k, v in sorted(rows.items())}


def _whole_seconds(start_ns: int, end_ns: int, period_ns: int) -> None:
    if end_ns <= start_ns:
        raise MeterError("the billing period is empty or reversed: --to must be after --from")
    if start_ns % 10**9 or end_ns % 10**9 or period_ns % 10**9 or period_ns <= 0:
        raise MeterError("billing and charge periods are whole seconds")


def merge_periods(by_period: dict[int, dict[Any, dict[str, int | None]]]) -> dict[str, dict[str, int | None]]:
    """Sum per-period usage into one usage per tenant (from per-tenant or per-resource keys)."""
    total: dict[str, dict[str, int | None]] = {}
    for usage in by_period.values():
        for key, u in usage.items():
            t = total.setdefault(key[0] if isinstance(key, tuple) else key, dict.fromkeys(_SUM_FIELDS))
            for f, v in u.items():
                if v is not None:
                    t[f] = (t[f] or 0) + v
    return total


#: The last whole second of int64 nanoseconds (2262-04-11T23:47:16Z).
_LAST_SECOND = (2**63 - 1) // 1_000_000_000


def parse_time_ns(text: str) -> int:
    """A billing time -> ns: ISO 8601 (UTC if no zone) or Unix seconds, whole seconds only.

    Raises ValueError with a sentence saying what is wrong.
    """
    import datetime

    try:
        secs: Decimal | None = Decimal(text)
    except InvalidOperation:
        secs = None
    if secs is None:
        try:
            dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{text!r} is not a time (ISO 8601 like 2026-11-26T14:00:00Z, or Unix seconds)") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.UTC)
        if dt.microsecond:
            raise ValueError("billing times are whole seconds") from None
        secs = Decimal(int(dt.timestamp()))
    if not secs.is_finite() or not 0 <= secs <= _LAST_SECOND:
        raise ValueError(f"{text!r} is outside the times records can hold (1970-01-01 to 2262-04-11)")
    if secs != secs.to_integral_value():
        raise ValueError("billing times are whole seconds")
    return int(secs) * 1_000_000_000
