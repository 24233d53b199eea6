"""FinOps FOCUS 1.2 rows from invoices: one row per meter per charge period.

The mandatory columns come first in the specification's order, then
ConsumedQuantity/ConsumedUnit, ResourceId, SubAccountId (the tenant),
SkuMeter, Tags, and meter's own columns prefixed ``x_``. Times are UTC
whole seconds (``2026-11-26T14:00:00Z``); money is decimal text.
"""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from typing import Any

from .bill import Invoice

__all__ = ["FOCUS_COLUMNS", "focus_rows"]

FOCUS_COLUMNS = (
    "BillingAccountId", "BillingAccountName", "BillingPeriodStart", "BillingPeriodEnd",
    "ChargePeriodStart", "ChargePeriodEnd", "BilledCost", "EffectiveCost", "ListCost", "ContractedCost",
    "BillingCurrency", "ChargeCategory", "ChargeClass", "ChargeDescription", "InvoiceIssuerName",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName", "PricingQuantity", "PricingUnit",
    "ConsumedQuantity", "ConsumedUnit", "ResourceId", "SubAccountId", "SkuMeter", "Tags",
    "x_UnitPrice", "x_Meter", "x_Hosts",
)


def _ts(ns: int) -> str:
    if ns % 1_000_000_000:
        raise ValueError("FOCUS charge periods are whole seconds")
    return datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def focus_rows(periods: list[list[Invoice]], billing_start_ns: int, billing_end_ns: int, *,
               account: str = "meter", issuer: str = "meter", hosts: str = "") -> list[dict[str, Any]]:
    """FOCUS rows for invoices grouped by charge period (one list per period)."""
    rows = []
    for invs in periods:
        for inv in invs:
            for line in inv.lines:
                cost = str(line.cost)
                rows.append({
                    "BillingAccountId": account,
                    "BillingAccountName": account,
                    "BillingPeriodStart": _ts(billing_start_ns),
                    "BillingPeriodEnd": _ts(billing_end_ns),
                    "ChargePeriodStart": _ts(inv.start_ns),
                    "ChargePeriodEnd": _ts(inv.end_ns),
                    "BilledCost": cost,
                    "EffectiveCost": cost,
                    "ListCost": cost,
                    "ContractedCost": cost,
                    "BillingCurrency": inv.currency,
                    "ChargeCategory": "Usage",
                    "ChargeClass": None,
                    "ChargeDescription": line.description,
                    "InvoiceIssuerName": issuer,
                    "ProviderName": issuer,
                    "PublisherName": issuer,
                    "ServiceCategory": line.service,
                    "ServiceName": "Tenant virtual switch metering",
                    "PricingQuantity": str(line.quantity.normalize() if line.quantity else Decimal(0)),
                    "PricingUnit": line.unit,
                    "ConsumedQuantity": str(line.quantity.normalize() if line.quantity else Decimal(0)),
                    "ConsumedUnit": line.unit,
                    "ResourceId": f"{inv.tenant}/{line.meter}",
                    "SubAccountId": inv.tenant,
                    "SkuMeter": line.meter,
                    "Tags": json.dumps({"tenant": inv.tenant}),
                    "x_UnitPrice": str(line.unit_price),
                    "x_Meter": line.meter,
                    "x_Hosts": hosts,
                })
    return rows
