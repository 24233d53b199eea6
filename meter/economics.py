"""The paper's back-of-the-envelope cost model (section 2.1), every assumption a parameter.

State of the art: the vswitch runs on the host's cores, which the operator
pays for and nobody is billed for. Option 1: one dedicated core for all
tenant vswitches (billed at their utilisation). Option 2: each vswitch
shares its tenant's cores, freeing a host core for one more VM. Option 3:
one dedicated core per tenant vswitch, displacing tenants onto new servers.

Money is computed in decimal cents per day and reported in dollars per year
(x days / 100), as the paper does. With the defaults this reproduces the
paper's figures: net revenue 70,080 (state of the art), 83,220 (+18.75 %),
87,600 (+25 %) and 100,214.4 (+43 %) dollars per year, 43 new servers.
"""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal
from typing import Any

__all__ = ["Assumptions", "Outcome", "model", "tenant_charges"]


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """The paper's assumptions (defaults) — change any of them."""

    servers: int = 100
    cores_per_server: int = 12
    host_cores: int = 2
    vms_per_server: int = 10
    tenants_per_server: int = 5
    vms_per_tenant: int = 2
    price_per_vm_hour_cents: Decimal = Decimal(1)
    cost_per_host_core_hour_cents: Decimal = Decimal(1)
    vswitch_utilisation: Decimal = Decimal("0.5")
    server_price_dollars: Decimal = Decimal(2000)
    hours_per_day: int = 24
    days_per_year: int = 365
    #: Section 2.1.2: each tenant's share of a vswitch core (they add up to the utilisation).
    vswitch_usage: tuple[Decimal, ...] = tuple(Decimal(x) for x in ("0.01", "0.02", "0.02", "0.05", "0.10", "0.30"))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One option's yearly money, in dollars."""

    option: str
    income: Decimal
    spend: Decimal
    net_revenue: Decimal
    change_vs_state_of_the_art: Decimal  # fraction, 0.1875 = +18.75 %
    new_servers: int = 0
    capital_dollars: Decimal = Decimal(0)

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in dataclasses.asdict(self).items()}


def model(a: Assumptions | None = None) -> list[Outcome]:
    """State of the art and Options 1, 2, 3 under assumptions ``a``."""
    a = a or Assumptions()
    year = Decimal(a.days_per_year) / 100  # cents/day -> dollars/year
    price, cost, hours = a.price_per_vm_hour_cents, a.cost_per_host_core_hour_cents, a.hours_per_day
    vswitch_hours = hours * a.vswitch_utilisation

    def money(income_cents_day: Decimal, spend_cents_day: Decimal) -> tuple[Decimal, Decimal, Decimal]:
        income, spend = income_cents_day * year, spend_cents_day * year
        return income, spend, income - spend

    sota = money(price * hours * a.vms_per_server * a.servers, cost * a.host_cores * hours * a.servers)
    # Option 1: the host keeps one core, the other runs every tenant's vswitch.
    o1 = money(price * hours * a.vms_per_server * a.servers + price * vswitch_hours * 1 * a.servers,
               cost * 1 * hours * a.servers)
    # Option 2: vswitches share their tenants' cores; the freed host cores run more VMs.
    freed = a.host_cores - 1
    o2 = money(price * hours * (a.vms_per_server + freed) * a.servers, cost * 1 * hours * a.servers)
    # Option 3: a dedicated core per tenant vswitch.
    free = a.cores_per_server - 1
    per_tenant = a.vms_per_tenant + 1
    full = free // per_tenant
    partial_vms = max(0, free - full * per_tenant - 1)
    tenants = Decimal(full) + Decimal(partial_vms) / a.vms_per_tenant
    workload_vms = full * a.vms_per_tenant + partial_vms
    vswitch_vms = full + (1 if partial_vms else 0)
    displaced = (a.tenants_per_server - tenants) * a.servers
    new = math.ceil(displaced / tenants) if displaced > 0 else 0
    per_server = price * hours * workload_vms + price * vswitch_hours * vswitch_vms
    o3 = money(per_server * (a.servers + new), cost * 1 * hours * (a.servers + new))

    base = sota[2]
    out = [Outcome("state of the art", *sota, Decimal(0))]
    for name, (inc, sp, net) in (("option 1", o1), ("option 2", o2)):
        out.append(Outcome(name, inc, sp, net, (net - base) / base))
    out.append(Outcome("option 3", *o3, (o3[2] - base) / base, new, new * a.server_price_dollars))
    return out


def tenant_charges(a: Assumptions | None = None) -> list[dict[str, Any]]:
    """Section 2.1.2: what each tenant pays a year for its vswitch, per option.

    Options 1 and 3 bill vswitch time, so a tenant pays in proportion to its
    usage; Option 2 bills CPU the vswitch used on the tenant's own cores
    (cycles, not time slices): the same proportion of a core-hour price.
    The state of the art bills nobody: the host carries the vswitch.
    """
    a = a or Assumptions()
    year = Decimal(a.days_per_year) / 100
    out = []
    for usage in a.vswitch_usage:
        per_year = a.price_per_vm_hour_cents * a.hours_per_day * usage * year
        out.append({"usage": str(usage), "state_of_the_art": "0", "option_1": str(per_year),
                    "option_2": str(per_year), "option_3": str(per_year)})
    return out
