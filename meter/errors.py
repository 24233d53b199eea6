"""The one error hierarchy of meter.

Every error meter raises on purpose is a :class:`MeterError`. Each subclass
carries the context a user needs to fix the cause (a path, a line, a key, an
interface) and its ``str()`` is one sentence that names the thing and says
what to do. Low-level errors (``OSError``, bcc's ``Exception``, TOML decode
errors) are translated at the boundary with ``raise ... from err``.
"""

from __future__ import annotations

__all__ = [
    "BPFError",
    "CgroupError",
    "ConfigError",
    "HeadersError",
    "MeterError",
    "PerfEventError",
    "PrivilegeError",
    "SinkError",
]


class MeterError(Exception):
    """Base of every error meter raises on purpose."""

    #: The library setting that would fix this (e.g. "allow_remote", "store"),
    #: for front ends to name their own option for it; None when there is none.
    setting: str | None = None


class ConfigError(MeterError):
    """A topology or settings file (or value) is invalid.

    ``path`` is the file, ``line`` the 1-based line when known, ``key`` the
    dotted key when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
        setting: str | None = None,
    ) -> None:
        self.setting = setting
        self.path = path
        self.line = line
        self.key = key
        self.reason = message
        where = ""
        if path is not None:
            where = path
            if line is not None:
                where += f":{line}"
            where += ": "
        if key is not None:
            where += f"{key}: "
        super().__init__(f"{where}{message}")


class CgroupError(MeterError):
    """A cgroup path is missing, or cgroup v2 is not mounted."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class HeadersError(MeterError):
    """No kernel headers could be found or prepared for bcc."""


class PrivilegeError(MeterError):
    """meter lacks a privilege it needs (root or a named capability)."""

    def __init__(self, message: str, *, capability: str | None = None) -> None:
        self.capability = capability
        super().__init__(message)


class BPFError(MeterError):
    """A BPF program failed to compile, load or attach."""

    def __init__(self, message: str, *, program: str | None = None) -> None:
        self.program = program
        super().__init__(message)


class PerfEventError(MeterError):
    """A perf event could not be parsed or opened."""

    def __init__(self, message: str, *, event: str | None = None) -> None:
        self.event = event
        super().__init__(message)


class SinkError(MeterError):
    """A sink (file, store, exporter) could not take records."""

    def __init__(self, message: str, *, target: str | None = None, setting: str | None = None) -> None:
        self.target = target
        self.setting = setting
        super().__init__(message)
