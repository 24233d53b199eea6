"""The command line's conventions, shared by every ``meter`` command.

Errors are one line on stderr (``meter: error: ...``) and exit status 1,
click's usage errors included; a library error that a flag fixes names the
flag. The topology and counter options, and a terminal-or-not console.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from .errors import MeterError
from .paths import meter_path
from .topology import Topology

__all__ = ["SECONDS", "MeterGroup", "console", "counters", "counters_option", "errors", "fail", "load_topology",
           "topology_options"]

F = TypeVar("F", bound=Callable[..., Any])


#: What the library's errors leave to the command line: the flag that fixes them.
FLAG_HINTS = {"allow_remote": " (--allow-remote)", "listen": " (--listen)", "store": " (--store)",
               "window_ms": " (--window-ms)"}


def fail(message: str) -> None:
    click.echo(f"meter: error: {message}", err=True)
    sys.exit(1)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn meter's errors into one line and exit 1; Ctrl-C is not an error."""
    try:
        yield
    except MeterError as err:
        fail(str(err) + FLAG_HINTS.get(err.setting or "", ""))


def topology_options(fn: F) -> F:
    fn = click.option("--cgroup-root", type=click.Path(), default=None,
                      help="Each child cgroup of PATH is a compartment (default: the cgroup v2 mount).")(fn)
    fn = click.option("--config", "config", type=click.Path(), default=None,
                      help="Topology TOML file (tenants, compartments, cgroups, interfaces, discovery rules; "
                           "default: $METER_CONFIG, else /etc/meter/topology.toml as root when it exists).")(fn)
    return fn


def default_config() -> str | None:
    """The topology file used without --config and --cgroup-root: ``$METER_CONFIG``
    (which must exist), else the system's (root) or the user's XDG one, if it exists."""
    path = meter_path("METER_CONFIG", "/etc/meter/topology.toml", "XDG_CONFIG_HOME", ".config", "topology.toml")
    if os.environ.get("METER_CONFIG"):
        return str(path)
    try:
        return str(path) if path.is_file() else None
    except OSError:
        return None  # a directory this user cannot look into holds no config of theirs


def load_topology(config: str | None, cgroup_root: str | None) -> Topology:
    if config and cgroup_root:
        raise click.UsageError("give --config or --cgroup-root, not both")
    config = config or (None if cgroup_root else default_config())
    if config:
        return Topology.from_file(config)
    return Topology.discover(cgroup_root)


def counters(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        field, sep, event = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not FIELD=EVENT (e.g. cycles=sw:cpu-clock)", param_hint="--counters")
        out[field.strip()] = event.strip()
    return out


counters_option = click.option(
    "--counters", default=None, metavar="FIELD=EVENT,...",
    help="Perf events per record field, e.g. cycles=hw:cycles,cache_misses=hw:cache-misses "
         "(default: hardware cycles, instructions, cache-misses; cycles estimated without a PMU).")


def console(width: int) -> Any:
    """A rich console; not a terminal: a fixed width (rich would assume 80 columns)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=width)


class Seconds(click.ParamType):
    """A positive, finite number of seconds (click's FloatRange lets nan through)."""

    name = "seconds"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(v) or v <= 0:
            self.fail(f"{value!r} is not a positive, finite number of seconds", param, ctx)
        return v


SECONDS = Seconds()


#: Where meter's own code lives: its warnings are shown, whatever their kind.
_OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _for_developers(category: type[Warning], filename: str) -> bool:
    """A dependency's notice that it, or a library under it, uses an API due to go.

    Only that dependency's developers can act on it (the cryptography release of
    2026-11 warns about Debian's pyOpenSSL that botocore imports); printed, it
    would break the one-line error a ``meter`` command promises.
    """
    dated = issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) \
        or "Deprecat" in category.__name__
    return dated and not os.path.abspath(filename).startswith(_OWN)


def quiet_dependency_notices() -> None:
    """Leave the deprecation notices of meter's dependencies unprinted (see _for_developers)."""
    show = warnings.showwarning

    def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:
        if not _for_developers(category, filename):
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


class MeterGroup(click.Group):
    """The command group, with click's usage errors in meter's one-line form, exit 1."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        quiet_dependency_notices()
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as err:
            path = err.ctx.command_path if err.ctx else "meter"
            fail(f"{err.format_message()} (see {path} --help)".replace("\n", " "))
        except click.ClickException as err:
            fail(err.format_message().replace("\n", " "))
        except click.Abort:
            click.echo("meter: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
