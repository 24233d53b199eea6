"""Bills: usage per tenant, priced by a price sheet, in decimal money.

A price sheet (TOML) prices each *meter*; quantities come from the store's
exact 1 s rollups (or from Parquet files of many hosts, see
:func:`usage_from_parquet`), so a bill is an integer sum of millisecond
records, converted once::

    currency = "EUR"
    [prices]
    cpu_second = "0.00002"          # per CPU-second (cpu_ns + softirq_ns - softirq_given_ns)
    gigacycle = "0.000001"          # per 10^9 cycles
    million_cache_misses = "0.0001" # per 10^6 cache misses
    kwh = "0.30"                    # per kWh of attributed energy
    gb = "0.01"                     # per GB (10^9 bytes) through the compartment's ports
    million_packets = "0.001"       # per 10^6 packets through its ports
    vf_gb = "0.005"                 # per GB through its SR-IOV VFs
    [tenant.acme]                   # per-tenant overrides of any price
    cpu_second = "0.000015"

Prices are decimal strings (a TOML float is read through its shortest
decimal repr). Each line's cost is rounded half-even to 6 decimals
(micro-units: millisecond bills are small); a total is the sum of its
lines. The pseudo-tenants (``host``, ``idle``, ``sched``, ``steal``,
``unattributed``, ``late``) are not billed.
"""

from __future__ import annotations

import dataclasses
import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .errors import ConfigError, MeterError
from .host import load_toml
from .topology import RESERVED

__all__ = [
    "METERS",
    "Invoice",
    "Line",
    "PriceSheet",
    "invoices",
    "merge_periods",
    "usage_from_parquet",
    "usage_from_rollups",
    "usage_from_store",
]

COST_QUANTUM = Decimal("0.000001")


@dataclasses.dataclass(frozen=True)
class PricedMeter:
    """A billable meter: which record fields, how they convert to the priced unit."""

    key: str
    fields: tuple[str, ...]
    divisor: Decimal
    unit: str
    description: str
    service: str
    #: Fields subtracted from the sum (time a compartment ran for others).
    minus: tuple[str, ...] = ()

    @property
    def all_fields(self) -> tuple[str, ...]:
        return self.fields + self.minus


#: The meters a price sheet can price, in invoice order.
METERS = (
    PricedMeter("cpu_second", ("cpu_ns", "softirq_ns"), Decimal(10**9), "CPU-second",
          "CPU time of the compartment's tasks and of the kernel's packet processing for it", "Compute",
          minus=("softirq_given_ns",)),
    PricedMeter("gigacycle", ("cycles",), Decimal(10**9), "10^9 cycles", "CPU cycles", "Compute"),
    PricedMeter("million_cache_misses", ("cache_misses",), Decimal(10**6), "10^6 cache misses", "Last-level cache misses",
          "Compute"),
    PricedMeter("kwh", ("energy_uj",), Decimal(3_600_000_000_000), "kWh", "Energy attributed to the compartment", "Compute"),
    PricedMeter("gb", ("rx_bytes", "tx_bytes"), Decimal(10**9), "GB", "Bytes through the compartment's ports", "Networking"),
    PricedMeter("million_packets", ("rx_packets", "tx_packets"), Decimal(10**6), "10^6 packets",
          "Packets through the compartment's ports", "Networking"),
    PricedMeter("vf_gb", ("vf_rx_bytes", "vf_tx_bytes"), Decimal(10**9), "GB", "Bytes through the compartment's SR-IOV VFs",
          "Networking"),
)
_BY_KEY = {m.key: m for m in METERS}
#: meter's own rows (host, idle, sched, steal, unattributed, late): no tenant's bill.
NOT_BILLED = RESERVED


#: Prices per unit are below this (a bill's costs then fit the decimal context's 28 digits).
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
        # Costs are exact to 28 digits, 6 of them decimals: a bill must not overflow them.
        raise ConfigError(f"a price must be below {MAX_PRICE:,} per unit, not {str(value)[:40]}", path=path, key=key)
    return abs(d)  # "-0" is 0


@dataclasses.dataclass(frozen=True)
class PriceSheet:
    """Prices per meter, a currency, and per-tenant overrides."""

    currency: str
    prices: dict[str, Decimal]
    overrides: dict[str, dict[str, Decimal]]
    source: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> PriceSheet:
        path = Path(path)
        data, _ = load_toml(path, "price sheet")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> PriceSheet:
        for key in data:
            if key not in ("currency", "prices", "tenant"):
                raise ConfigError("unknown key (expected currency, prices, tenant)", path=source, key=key)
        currency = data.get("currency", "")
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
            raise ConfigError("must be an ISO 4217 code such as \"EUR\"", path=source, key="currency")

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
        return cls(currency, prices, overrides, source)

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
        return self.overrides.get(tenant, {}).get(meter, self.prices.get(meter))


@dataclasses.dataclass(frozen=True)
class Line:
    """One line item: a meter's quantity, unit, unit price and cost."""

    meter: str
    description: str
    service: str
    consumed: int  # in base units (ns, cycles, µJ, bytes, packets)
    quantity: Decimal
    unit: str
    unit_price: Decimal
    cost: Decimal


@dataclasses.dataclass(frozen=True)
class Invoice:
    """A tenant's invoice for [start_ns, end_ns)."""

    tenant: str
    start_ns: int
    end_ns: int
    currency: str
    lines: tuple[Line, ...]

    @property
    def total(self) -> Decimal:
        return sum((line.cost for line in self.lines), Decimal(0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant, "start_ns": self.start_ns, "end_ns": self.end_ns, "currency": self.currency,
            "total": str(self.total),
            "lines": [{**dataclasses.asdict(line), "quantity": str(line.quantity), "unit_price": str(line.unit_price),
                       "cost": str(line.cost)} for line in self.lines],
        }


def usage_from_rollups(rows: list[dict[str, Any]]) -> dict[str, dict[str, int | None]]:
    """Per-tenant integer sums of every record field from rollup rows."""
    usage: dict[str, dict[str, int | None]] = {}
    fields = sorted({f for m in METERS for f in m.all_fields})
    for row in rows:
        u = usage.setdefault(row["tenant"], dict.fromkeys(fields))
        for f in fields:
            v = row.get(f)
            if v is not None:
                u[f] = (u[f] or 0) + int(v)
    return usage


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
        for m in METERS:
            values = [usage[name].get(f) for f in m.fields]
            if all(v is None for v in values):
                continue  # not measured for this tenant: no line, not a zero line
            consumed = sum(v or 0 for v in values) - sum(usage[name].get(f) or 0 for f in m.minus)
            unit_price = prices.price(name, m.key)
            if unit_price is None:
                if consumed == 0:
                    continue
                raise MeterError(f"tenant {name!r} used meter {m.key!r} but {prices.source or 'the price sheet'} "
                                 f"has no price for it: add {m.key} = \"...\" under [prices]")
            quantity = Decimal(consumed) / m.divisor
            cost = (quantity * unit_price).quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)
            lines.append(Line(m.key, m.description, m.service, consumed, quantity, m.unit, unit_price, cost))
        out.append(Invoice(name, start_ns, end_ns, prices.currency, tuple(lines)))
    return out


_SUM_FIELDS = tuple(sorted({f for m in METERS for f in m.all_fields}))


def usage_from_store(store: Any, start_ns: int, end_ns: int, period_ns: int) -> dict[int, dict[str, dict[str, int | None]]]:
    """Usage per charge period (index from start) per tenant, from the store's exact 1 s rollups."""
    _whole_seconds(start_ns, end_ns, period_ns)
    out: dict[int, list[dict[str, Any]]] = {}
    for row in store.rollup("rollup_1s", start_ns, end_ns):
        out.setdefault((row["period_start_ns"] - start_ns) // period_ns, []).append(row)
    return {k: usage_from_rollups(v) for k, v in sorted(out.items())}


def usage_from_parquet(root: str | Path, start_ns: int, end_ns: int, period_ns: int) -> dict[int, dict[str, dict[str, int | None]]]:
    """The same from a directory of Parquet files of many hosts, with plain SQL (DuckDB).

    The query is standard SQL over ``read_parquet``: Trino or Spark run the
    same GROUP BY over the same files.
    """
    _whole_seconds(start_ns, end_ns, period_ns)
    try:
        import duckdb
    except ImportError as err:
        raise MeterError("billing from Parquet needs DuckDB: pip install -e .[fleet]") from err
    files = [str(p) for p in Path(root).rglob("*.parquet")]
    if not files:
        raise MeterError(f"no Parquet files under {root}")
    sums = ", ".join(f"sum({f}) AS {f}" for f in _SUM_FIELDS)
    # A record is (host, seq): exports that overlap hold some records twice,
    # and DISTINCT bills each once (the copies are the same record, byte for byte).
    sql = (f"SELECT (window_start_ns - $start) // $period AS p, tenant, {sums} FROM ("
           f"SELECT DISTINCT host, seq, window_start_ns, tenant, {', '.join(_SUM_FIELDS)} "
           f"FROM read_parquet($files, hive_partitioning = true) "
           f"WHERE window_start_ns >= $start AND window_start_ns < $end) GROUP BY p, tenant ORDER BY p, tenant")
    con = duckdb.connect()
    try:
        result = con.execute(sql, {"start": start_ns, "end": end_ns, "period": period_ns, "files": files}).fetchall()
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MeterError(f"cannot bill from the Parquet files under {root}: {first}") from err
    finally:
        con.close()
    out: dict[int, dict[str, dict[str, int | None]]] = {}
    for p, tenant, *vals in result:
        out.setdefault(int(p), {})[tenant] = {f: (None if v is None else int(v)) for f, v in zip(_SUM_FIELDS, vals)}
    return out


def _whole_seconds(start_ns: int, end_ns: int, period_ns: int) -> None:
    if end_ns <= start_ns:
        raise MeterError("the billing period is empty or reversed: --to must be after --from")
    if start_ns % 10**9 or end_ns % 10**9 or period_ns % 10**9 or period_ns <= 0:
        raise MeterError("billing and charge periods are whole seconds")


def merge_periods(by_period: dict[int, dict[str, dict[str, int | None]]]) -> dict[str, dict[str, int | None]]:
    """Sum per-period usage into one usage per tenant."""
    total: dict[str, dict[str, int | None]] = {}
    for usage in by_period.values():
        for tenant, u in usage.items():
            t = total.setdefault(tenant, dict.fromkeys(_SUM_FIELDS))
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
