"""Discovery rules: cgroups that managers create, named after what they hold.

A ``[[discover]]`` entry in the topology file (README, "Discovery") is a
:class:`Rule`: cgroup globs below a root, a regular expression over the
matched path whose groups (unescaped the systemd way) fill the tenant and
compartment templates. Presets give the layouts operators have: libvirt
VMs, systemd services and slices, Kubernetes pods (named from a pod list),
Docker, Podman and containerd containers.

A rule is re-read whenever the kernel charges a cgroup meter cannot name
yet (``Topology.refresh``), so a VM or pod started while metering runs
is billed to its own compartment from its first slice
(docs/architecture.md, "Discovery").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import string
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["PRESETS", "PodNames", "Rule", "systemd_unescape"]

log = logging.getLogger("meter")

_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def systemd_unescape(text: str) -> str:
    """A systemd-escaped unit name part as the manager was given it
    (``systemd-escape --unescape``): each ``\\xHH`` is the byte HH."""
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A manager's cgroup layout: where its units are, how to read their names."""

    globs: tuple[str, ...]
    match: str
    tenant: str
    compartment: str
    doc: str


#: The managers' layouts, systemd and cgroupfs drivers both (README, "Discovery").
PRESETS: dict[str, Preset] = {
    "libvirt": Preset(
        ("machine.slice/machine-qemu*.scope",),
        r"machine-qemu\\x2d(?:(?P<id>\d+)\\x2d)?(?P<name>[^/]+)\.scope",
        "{name}", "{name}", "QEMU/KVM guests started by libvirt: the domain's name"),
    "systemd-service": Preset(
        ("system.slice/*.service",),
        r"(?P<name>[^/]+)\.service", "{name}", "{name}", "systemd services: the unit's name"),
    "systemd-slice": Preset(
        ("*.slice/*.slice",),
        r"(?P<parent>[^/]+)\.slice/(?P=parent)-(?P<name>[^/]+)\.slice", "{name}", "{name}",
        "systemd slices below a slice (tenants.slice/tenants-acme.slice): the child's own part of the name"),
    "kubernetes": Preset(
        ("kubepods.slice/kubepods-pod*.slice", "kubepods.slice/kubepods-*.slice/kubepods-*-pod*.slice",
         "kubepods/pod*", "kubepods/*/pod*"),
        r"(?:kubepods-(?:[a-z]+-)?)?pod(?P<uid>[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})(?:\.slice)?",
        "{namespace}", "{pod}", "Kubernetes pods: namespace and pod name from the pod list, else the pod's uid"),
    "docker": Preset(
        ("system.slice/docker-*.scope", "docker/*"),
        r"(?:docker-|docker/)(?P<id>[0-9a-f]{64})(?:\.scope)?", "{id:.12}", "{id:.12}",
        "Docker containers: the short container id"),
    "podman": Preset(
        ("machine.slice/libpod-*.scope", "libpod_parent/libpod-*",
         "user.slice/user-*.slice/user@*.service/user.slice/libpod-*.scope"),
        r"libpod-(?P<id>[0-9a-f]{64})(?:\.scope)?", "{id:.12}", "{id:.12}",
        "Podman containers (rootful and rootless): the short container id"),
    "containerd": Preset(
        ("system.slice/nerdctl-*.scope", "system.slice/containerd-*.scope", "nerdctl/*", "default/*", "k8s.io/*"),
        r"(?:nerdctl-|containerd-|nerdctl/|default/|k8s\.io/)(?P<id>[0-9a-f]{64})(?:\.scope)?", "{id:.12}",
        "{id:.12}", "containerd containers (nerdctl, ctr): the short container id"),
}

#: Keys a [[discover]] entry may have.
RULE_KEYS = {"preset", "root", "cgroup", "match", "tenant", "compartment", "pods"}
#: Cgroups whose names a rule could not make, already warned about.
_UNNAMED: set[Path] = set()
#: Template fields a kubernetes rule adds from the pod list.
_POD_FIELDS = ("pod", "namespace")


class PodNames:
    """Pod uid -> (namespace, name), from a kubelet pod list: a JSON file, or
    the kubelet's read-only ``/pods`` endpoint (``http://HOST:10255/pods``).
    The list is read again when a pod it does not know is asked for: a file
    when it changed, the endpoint at most every ``REFETCH_S`` seconds (it is
    asked from the drain thread)."""

    #: Least time between two fetches of a kubelet endpoint.
    REFETCH_S = 5.0

    def __init__(self, source: str) -> None:
        self.source = source
        self._pods: dict[str, tuple[str, str]] = {}
        self._stamp: Any = None
        self._fetched = -float("inf")
        self._warned: set[str] = set()

    def lookup(self, uid: str) -> tuple[str, str] | None:
        if uid not in self._pods:
            self._load()
        return self._pods.get(uid)

    def _load(self) -> None:
        try:
            if self.source.startswith(("http://", "https://")):
                if time.monotonic() - self._fetched < self.REFETCH_S:
                    return
                self._fetched = time.monotonic()
                with urllib.request.urlopen(self.source, timeout=2) as resp:
                    data = json.load(resp)
            else:
                path = Path(self.source.removeprefix("file:"))
                st = path.stat()
                if self._stamp == (st.st_mtime_ns, st.st_size):
                    return
                self._stamp = (st.st_mtime_ns, st.st_size)
                data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            if self.source not in self._warned:
                self._warned.add(self.source)
                log.warning("meter: pod list %s unreadable (%s): pods are named by their uid", self.source, err)
            return
        items = data.get("items", []) if isinstance(data, dict) else []
        for item in items if isinstance(items, list) else []:
            meta = item.get("metadata", {}) if isinstance(item, dict) else {}
            uid, name, ns = meta.get("uid"), meta.get("name"), meta.get("namespace")
            if isinstance(uid, str) and isinstance(name, str) and isinstance(ns, str):
                self._pods[uid.lower()] = (ns, name)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One ``[[discover]]`` entry: which cgroups, and the names they get."""

    root: Path
    globs: tuple[str, ...]
    match: re.Pattern[str]
    tenant: str
    compartment: str
    preset: str | None = None
    pods: PodNames | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_table(cls, table: dict[str, Any], root: Path) -> Rule:
        """A rule from a [[discover]] table whose ``root`` is already resolved;
        raises :class:`ConfigError` with the ``key`` at fault (the parser adds
        file and line)."""
        preset_name = table.get("preset")
        preset = None
        if preset_name is not None:
            if preset_name not in PRESETS:
                raise ConfigError(f"unknown preset {preset_name!r} (expected one of: {', '.join(PRESETS)})",
                                  key="preset")
            preset = PRESETS[preset_name]
        globs = table.get("cgroup", preset.globs if preset else None)
        if isinstance(globs, str):
            globs = (globs,)
        if (not isinstance(globs, (list, tuple)) or not globs
                or not all(isinstance(g, str) and g and not g.startswith("/") and ".." not in g.split("/")
                           for g in globs)):
            raise ConfigError('must be a cgroup glob relative to the root (e.g. "machine.slice/*.scope"), '
                              "or a list of them" + ("" if preset else " (required without a preset)"), key="cgroup")
        pattern = table.get("match", preset.match if preset else r"(?P<name>[^/]+)")
        if not isinstance(pattern, str):
            raise ConfigError("must be a regular expression (a string)", key="match")
        try:
            re.compile(pattern)
            match = re.compile(rf"(?:^|/)(?:{pattern})$")
        except re.error as err:
            raise ConfigError(f"is not a regular expression: {err}", key="match") from None
        fields = set(match.groupindex) | (set(_POD_FIELDS) if preset_name == "kubernetes" else set())
        templates = {}
        for key in ("tenant", "compartment"):
            tmpl = table.get(key, getattr(preset, key) if preset else ("{name}" if "name" in fields else None))
            if not isinstance(tmpl, str) or not tmpl:
                raise ConfigError("must be a name template such as \"{name}\" over the match's groups", key=key)
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(tmpl) if f is not None}
            except ValueError as err:
                raise ConfigError(f"is not a name template: {err}", key=key) from None
            if unknown := sorted(used - fields):
                raise ConfigError(f"uses {', '.join(unknown)}, which the match does not capture "
                                  f"(it has: {', '.join(sorted(fields)) or 'no named groups'})", key=key)
            templates[key] = tmpl
        pods = table.get("pods")
        if pods is not None and (preset_name != "kubernetes" or not isinstance(pods, str) or not pods):
            raise ConfigError('is for preset = "kubernetes": a pod list file, or the kubelet\'s '
                              "http://HOST:10255/pods", key="pods")
        return cls(root, tuple(globs), match, templates["tenant"], templates["compartment"], preset_name,
                   PodNames(pods) if pods else None)

    def cgroups(self) -> Iterator[Path]:
        """The cgroups the globs find now, in a stable order."""
        for glob in self.globs:
            try:
                found = sorted(p for p in self.root.glob(glob) if p.is_dir())
            except OSError:
                continue  # a directory removed while looking
            yield from found

    def names(self, cgroup: Path) -> tuple[str, str] | None:
        """(tenant, compartment) of ``cgroup`` as the templates make them
        (not yet made valid names), or None if the match refuses it."""
        m = self.match.search(os.path.relpath(cgroup, self.root))
        if m is None:
            return None
        fields = {k: systemd_unescape(v) for k, v in m.groupdict().items() if v is not None}
        if self.preset == "kubernetes":
            uid = fields["uid"].replace("_", "-").lower()
            found = self.pods.lookup(uid) if self.pods is not None else None
            fields["uid"] = uid
            fields["namespace"], fields["pod"] = found if found else (uid, uid)
        try:
            return self.tenant.format(**fields), self.compartment.format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            # An optional group the template needs did not match: say so once,
            # its usage is the host's until the rule is fixed.
            if cgroup not in _UNNAMED:
                _UNNAMED.add(cgroup)
                log.warning("meter: cgroup %s matches a discovery rule but its names cannot be made (%s: %s); "
                            "its usage is billed to host: fix the rule's match or templates",
                            cgroup, type(err).__name__, err)
            return None
