"""FinOps FOCUS 1.2 rows from charges: one row per resource, meter and charge period.

Columns: the specification's mandatory ones, then those that apply to a
meter that bills usage at unit prices with negotiated prices, sub-accounts
and tags (ChargeFrequency, InvoiceId, ServiceSubcategory, ListUnitPrice,
ContractedUnitPrice, ConsumedQuantity/Unit, ResourceId/Name, SubAccount,
SKU columns, Tags, CommitmentDiscountStatus), then meter's own columns prefixed ``x_``. What each
column holds is in the README ("FOCUS"). Times are UTC whole seconds
(``2026-11-26T14:00:00Z``); money, prices and quantities are decimal text
with a fixed number of decimals per column (never E-notation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .bill import SERVICES, Charge, PriceSheet, billing_period, money, price_text, quantity_text
from .records import utc_text

__all__ = ["FOCUS_COLUMNS", "focus_rows"]

FOCUS_COLUMNS = (
    "BillingAccountId", "BillingAccountName", "BillingPeriodStart", "BillingPeriodEnd",
    "ChargePeriodStart", "ChargePeriodEnd", "BilledCost", "EffectiveCost", "ListCost", "ContractedCost",
    "BillingCurrency", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargeFrequency", "InvoiceId",
    "InvoiceIssuerName", "ProviderName", "PublisherName", "ServiceCategory", "ServiceSubcategory", "ServiceName",
    "PricingQuantity", "PricingUnit", "ListUnitPrice", "ContractedUnitPrice", "ConsumedQuantity", "ConsumedUnit",
    "ResourceId", "ResourceName", "SubAccountId", "SubAccountName", "SkuId", "SkuPriceId", "SkuMeter",
    "SkuPriceDetails", "Tags", "CommitmentDiscountStatus", "x_Meter", "x_Host", "x_Estimated", "x_PriceSheet",
)


def _ts(ns: int) -> str:
    if ns % 1_000_000_000:
        raise ValueError("FOCUS charge periods are whole seconds")
    return utc_text(ns)


def focus_rows(charges: list[Charge], sheet: PriceSheet, *, period: str = "month", account: str = "meter",
               issuer: str = "meter", invoice_of: Callable[[Charge], str | None] | None = None) -> list[dict[str, Any]]:
    """FOCUS rows of ``charges`` (see :func:`meter.bill.charges`).

    ``period`` is the billing period (``month`` or ``day``, UTC calendar);
    ``invoice_of`` gives the id of the issued invoice a charge is on, if any.
    """
    rows = []
    for ch in charges:
        line = ch.line
        service = SERVICES[line.service]
        bp_start, bp_end = billing_period(ch.start_ns, period)
        cost = money(line.cost)
        quantity = quantity_text(line.quantity)
        tags = {"meter/tenant": ch.tenant, "meter/compartment": ch.compartment, "meter/host": ch.host}
        if line.estimated:
            tags["meter/estimated"] = line.estimated
        rows.append({
            "BillingAccountId": account,
            "BillingAccountName": account,
            "BillingPeriodStart": _ts(bp_start),
            "BillingPeriodEnd": _ts(bp_end),
            "ChargePeriodStart": _ts(ch.start_ns),
            "ChargePeriodEnd": _ts(ch.end_ns),
            "BilledCost": cost,
            "EffectiveCost": cost,
            "ListCost": money(line.list_cost),
            "ContractedCost": cost,
            "BillingCurrency": sheet.currency,
            "ChargeCategory": "Usage",
            "ChargeClass": None,
            "ChargeDescription": line.description,
            "ChargeFrequency": "Usage-Based",
            "InvoiceId": invoice_of(ch) if invoice_of else None,
            "InvoiceIssuerName": issuer,
            "ProviderName": issuer,
            "PublisherName": issuer,
            "ServiceCategory": service.category,
            "ServiceSubcategory": service.subcategory,
            "ServiceName": service.name,
            "PricingQuantity": quantity,
            "PricingUnit": line.unit,
            "ListUnitPrice": price_text(line.list_unit_price),
            "ContractedUnitPrice": price_text(line.unit_price),
            "ConsumedQuantity": quantity,
            "ConsumedUnit": line.unit,
            "ResourceId": f"{ch.host}/{ch.tenant}/{ch.compartment}",
            "ResourceName": ch.compartment,
            "SubAccountId": ch.tenant,
            "SubAccountName": ch.tenant,
            "SkuId": f"meter-{line.meter}",
            "SkuPriceId": sheet.sku_price_id(line.meter),
            "SkuMeter": line.description,
            "SkuPriceDetails": json.dumps({"x_Meter": line.meter, "x_PricingUnit": line.unit}),
            "Tags": json.dumps(tags),
            # No commitment discounts: null. The validator's ConsumedQuantity rules read it (rule
            # ConsumedQuantity-C-005-C's condition), and fail on a table without the column.
            "CommitmentDiscountStatus": None,
            "x_Meter": line.meter,
            "x_Host": ch.host,
            "x_Estimated": line.estimated or None,
            "x_PriceSheet": sheet.digest[:16],
        })
    return rows
