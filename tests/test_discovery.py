"""Discovery rules: the layouts libvirt, systemd, Kubernetes and the container
runtimes create, named after what they hold, picked up while metering runs.

The layouts are built with the managers' own (escaped) directory names: on a
plain directory tree for the naming rules, under the real cgroup v2 mount for
what the kernel charges.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from meter import Topology
from meter.cgroup import cgroup_id, cpu_usage_usec
from meter.discovery import systemd_unescape
from meter.engine import Meter
from meter.errors import ConfigError
from meter.records import code, text
from meter.sources.fake import FakeCPU, FakeSources

CID = "4f1c2a9e8b7d6c5a4f1c2a9e8b7d6c5a4f1c2a9e8b7d6c5a4f1c2a9e8b7d6c5a"
UID = "0b5e1c7a-93d2-4f6e-8a1b-2c3d4e5f6a7b"
UID2 = "9f8e7d6c-5b4a-4321-8fed-cba987654321"


def _topo(tmp_path: Path, mount: Path, text: str) -> Topology:
    cfg = tmp_path / "topology.toml"
    cfg.write_text(text)
    return Topology.from_file(cfg, mount=mount)


def _found(topo: Topology, mount: Path) -> set[tuple[str, str, str]]:
    return {(c.tenant, c.name, str(c.cgroup.relative_to(mount))) for c in topo.compartments if c.discovered}


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    m = tmp_path / "cgroup"
    m.mkdir()
    return m


def _mk(mount: Path, *rels: str) -> None:
    for rel in rels:
        (mount / rel).mkdir(parents=True)


def test_systemd_unescape_reads_what_systemd_escape_writes():
    assert systemd_unescape(r"machine-qemu\x2d3\x2dacme\x2dvm1") == "machine-qemu-3-acme-vm1"
    assert systemd_unescape(r"caf\xc3\xa9") == "café"
    assert systemd_unescape("plain") == "plain"


LIBVIRT = r"machine.slice/machine-qemu\x2d3\x2dacme\x2dvm1.scope"


@pytest.mark.parametrize(("preset", "dirs", "want"), [
    ("libvirt", [LIBVIRT + "/libvirt/vcpu0", r"machine.slice/machine-qemu\x2dold\x2dvm.scope",
                 r"machine.slice/machine-lxc\x2d9\x2dbox.scope"],
     {("acme-vm1", "acme-vm1", LIBVIRT), ("old-vm", "old-vm", r"machine.slice/machine-qemu\x2dold\x2dvm.scope")}),
    ("systemd-service", ["system.slice/ovs-vswitchd.service", "system.slice/dbus.socket",
                         r"system.slice/system-getty.slice"],
     {("ovs-vswitchd", "ovs-vswitchd", "system.slice/ovs-vswitchd.service")}),
    ("systemd-slice", ["tenants.slice/tenants-acme.slice/vswitch.service", "tenants.slice/other.slice"],
     {("acme", "acme", "tenants.slice/tenants-acme.slice")}),
    ("docker", [f"system.slice/docker-{CID}.scope", f"docker/{CID[::-1]}", "system.slice/docker.service"],
     {(CID[:12], CID[:12], f"system.slice/docker-{CID}.scope"), (CID[::-1][:12], CID[::-1][:12], f"docker/{CID[::-1]}")}),
    ("podman", [f"machine.slice/libpod-{CID}.scope", f"machine.slice/libpod-conmon-{CID}.scope",
                f"libpod_parent/libpod-{CID[::-1]}"],
     {(CID[:12], CID[:12], f"machine.slice/libpod-{CID}.scope"),
      (CID[::-1][:12], CID[::-1][:12], f"libpod_parent/libpod-{CID[::-1]}")}),
    ("containerd", [f"system.slice/nerdctl-{CID}.scope", f"default/{CID[::-1]}", "default/not-a-container"],
     {(CID[:12], CID[:12], f"system.slice/nerdctl-{CID}.scope"), (CID[::-1][:12], CID[::-1][:12], f"default/{CID[::-1]}")}),
])
@pytest.mark.bpf
def test_each_preset_names_its_managers_cgroups(tmp_path, cgroups, preset, dirs, want):
    """Each manager's layout made under the real cgroup v2 mount, with the
    names it gives (escapes included), below a private root."""
    for rel in dirs:
        cgroups.make(rel)
    mount = cgroups.root.parent
    topo = _topo(tmp_path, mount, f'[[discover]]\npreset = "{preset}"\nroot = "{cgroups.root.name}"\n')
    assert _found(topo, cgroups.root) == want


def test_kubernetes_pods_are_named_from_the_pod_list_else_by_uid(tmp_path, mount):
    burstable = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    guaranteed = f"kubepods.slice/kubepods-pod{UID2.replace('-', '_')}.slice"
    cgroupfs = f"kubepods/besteffort/pod{UID2}"
    _mk(mount, burstable + f"/cri-containerd-{CID}.scope", guaranteed, cgroupfs, "kubepods.slice/kubepods-besteffort.slice")
    pods = tmp_path / "pods.json"
    pods.write_text(json.dumps({"kind": "PodList", "items": [
        {"metadata": {"name": "ovs-acme-7d9f", "namespace": "acme", "uid": UID}}]}))
    topo = _topo(tmp_path, mount, f'[[discover]]\npreset = "kubernetes"\npods = "{pods}"\n')
    found = _found(topo, mount)
    assert ("acme", "ovs-acme-7d9f", burstable) in found and (UID2, UID2, guaranteed) in found
    # The same uid under the cgroupfs driver: names already taken, so a hash of its path.
    (other,) = [c for c in found if c[2] == cgroupfs]
    assert other[0] == UID2 and other[1].startswith(UID2 + "-") and len(other[1]) == 46
    assert len(found) == 3


def test_a_rule_of_ones_own_names_tenant_and_compartment_from_the_path(tmp_path, mount):
    _mk(mount, "tenants/acme/vswitch", "tenants/acme/vm1", "tenants/globex/vswitch", "tenants/readme")
    topo = _topo(tmp_path, mount, """\
[[tenant]]
name = "acme"
[[tenant.compartment]]
name = "switch"
cgroup = "tenants/acme/vswitch"

[[discover]]
root = "tenants"
cgroup = "*/*"
match = '(?P<tenant>[a-z]+)/(?P<part>[a-z0-9]+)'
tenant = "{tenant}"
compartment = "{part}"
""")
    # A listed compartment keeps its cgroup: the rule does not find it again.
    assert _found(topo, mount) == {("acme", "vm1", "tenants/acme/vm1"), ("globex", "vswitch", "tenants/globex/vswitch")}
    assert [c.name for c in topo.compartments if not c.discovered] == ["switch"]
    assert topo.discovery_roots() == [(mount / "tenants", 2)]


def test_a_root_not_made_yet_stands_as_its_nearest_ancestor(tmp_path, mount):
    topo = _topo(tmp_path, mount, '[[discover]]\npreset = "libvirt"\n')
    assert topo.discovery_roots() == [(mount, 2)] and topo.compartments == ()
    _mk(mount, LIBVIRT)
    assert topo.discovery_roots() == [(mount / "machine.slice", 1)]
    assert _found(topo.refresh(), mount) == {("acme-vm1", "acme-vm1", LIBVIRT)}


@pytest.mark.parametrize(("text", "message"), [
    ('[[discover]]\npreset = "openstack"\n', r"topology.toml:2: discover\[0\].preset: unknown preset 'openstack'"),
    ('[[discover]]\ncgroup = "x/*"\ncompartment = "{vm}"\n',
     r"topology.toml:3: discover\[0\].compartment: uses vm, which the match does not capture \(it has: name\)"),
    ("[[discover]]\ncgroup = \"x/*\"\nmatch = '(?P<name>['\n", r"topology.toml:3: discover\[0\].match: is not a regular"),
    ('[[discover]]\npreset = "docker"\npods = "/tmp/pods.json"\n', r"topology.toml:3: discover\[0\].pods: is for preset"),
    ('[[discover]]\ncgroup = "/abs/*"\n', r"discover\[0\].cgroup: must be a cgroup glob relative to the root"),
    ('[[discover]]\nmatch = "x"\n', r"discover\[0\].cgroup: .*required without a preset"),
    ('[[discover]]\npreset = "docker"\nroot = "../.."\n', r"topology.toml:3: discover\[0\].root: '../..' is not below"),
    ('[[discover]]\npreset = "docker"\nlabel = 1\n', r"discover\[0\].label: unknown key"),
    ('discover = "docker"\n', r"topology.toml:1: discover: must be an array of tables"),
])
def test_a_bad_rule_is_one_line_naming_file_line_and_key(tmp_path, mount, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        _topo(tmp_path, mount, text)
    assert "\n" not in str(err.value)


def test_a_vm_started_while_metering_is_billed_from_its_first_slice(tmp_path, mount):
    """The kernel is told to charge machine.slice's children by their own ids;
    the first unknown one makes the rule look again and name the VM. A VM
    restarted under a new scope (libvirt's new id) is the same compartment."""
    _mk(mount, "machine.slice", "system.slice/sshd.service")
    topo = _topo(tmp_path, mount, '[[discover]]\npreset = "libvirt"\n')
    cpu = FakeCPU(ncpu=2)
    meter = Meter(topo, sources=FakeSources(cpu))
    meter.open()
    try:
        assert cpu.compartments.roots == {cgroup_id(mount / "machine.slice"): (1, 1)}
        assert cpu.compartments.other == cgroup_id(mount)
        # An id no rule names (what a partly resolved kernel would charge): the host's, and
        # the kernel is not told anything new (each new generation re-resolves every CPU).
        gen = meter._resolver.generation
        cpu.charge(cpu.now, cgroup_id(mount / "system.slice/sshd.service"), 50_000)
        cpu.advance(1)
        batch = meter.drain()
        assert int(batch["cpu_ns"][batch["tenant"] == code("host")].sum()) == 50_000
        assert meter._resolver.generation == gen
        _mk(mount, LIBVIRT + "/libvirt/vcpu0")
        cpu.charge(cpu.now, cgroup_id(mount / LIBVIRT), 400_000)  # what the kernel charges: depth 1 below the root
        cpu.advance(1)
        batch = meter.drain()
        vm = batch[batch["tenant"] == code("acme-vm1")]
        assert int(vm["cpu_ns"].sum()) == 400_000 and set(text(vm, "compartment")) == {"acme-vm1"}
        assert cpu.compartments.levels == {cgroup_id(mount / LIBVIRT): 2}
        again = r"machine.slice/machine-qemu\x2d4\x2dacme\x2dvm1.scope"
        _mk(mount, again)  # made first: a plain directory's inode (its id here) is not reused
        (mount / LIBVIRT / "libvirt/vcpu0").rmdir()
        (mount / LIBVIRT / "libvirt").rmdir()
        (mount / LIBVIRT).rmdir()
        cpu.charge(cpu.now, cgroup_id(mount / again), 300_000)
        cpu.advance(1)
        batch = meter.drain()
        assert int(batch["cpu_ns"][batch["tenant"] == code("acme-vm1")].sum()) == 300_000
        (vm_row,) = [r for r in meter.totals() if r["tenant"] == "acme-vm1"]
        # One row, present: its cgroup now is the new scope (the exporter keeps its series).
        assert vm_row["cpu_ns"] == 700_000 and vm_row["present"]
    finally:
        meter.close()


# -- the real kernel ------------------------------------------------------------------------

@pytest.mark.bpf
def test_vms_and_pods_started_while_metering_match_cpu_stat(tmp_path, cgroups):
    """A libvirt VM and a Kubernetes pod appear while metering runs, and do
    their work in child cgroups that are gone before the next drain (vCPU
    threads' cgroups, a container's): the kernel charges each to the cgroup
    its rule names, and the records equal the kernel's own cpu.stat of the
    VM's scope and the pod's slice."""
    base = cgroups.root
    cgroups.make("machine.slice")
    cgroups.make("kubepods.slice/kubepods-burstable.slice")
    pods = tmp_path / "pods.json"
    pods.write_text(json.dumps({"items": [{"metadata": {"name": "ovs-acme", "namespace": "acme", "uid": UID}}]}))
    rel = base.name
    topo = _topo(tmp_path, base.parent, f"""\
[[discover]]
preset = "libvirt"
root = "{rel}"

[[discover]]
preset = "kubernetes"
root = "{rel}"
pods = "{pods}"
""")
    pod_rel = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    with Meter(topo) as meter:
        time.sleep(0.02)
        vm, pod = cgroups.make(LIBVIRT), cgroups.make(pod_rel)
        for i in range(10):
            for unit, child in ((vm, f"libvirt/vcpu{i}"), (pod, f"cri-containerd-{CID[:60]}{i:04d}.scope")):
                cg = cgroups.make(str((unit / child).relative_to(base)))
                cgroups.burner(cg, 1.0, 0.02).wait()
                cgroups.remove(cg)
        used = {"acme-vm1": cpu_usage_usec(vm) * 1000, "acme": cpu_usage_usec(pod) * 1000}
        parts = list(meter.batches(0.1))
    batch = np.concatenate(parts)
    for tenant, want in used.items():
        got = int(batch["cpu_ns"][batch["tenant"] == code(tenant)].sum())
        # The billing target, 0.2 %, and cpu.stat's 1 us unit.
        assert abs(got - want) <= 0.002 * want + 1_000, (tenant, got, want)
    assert set(text(batch, "compartment")[batch["tenant"] == code("acme")]) == {"ovs-acme"}
    assert meter.stats.unresolved_cgroups == 0


def test_the_readmes_discovery_example_finds_what_it_says(tmp_path, mount):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("### Discovery", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    _mk(mount, LIBVIRT, "tenants.slice/tenants-acme.slice/vswitch.service")
    topo = _topo(tmp_path, mount, block.replace("/var/lib/meter/pods.json", str(tmp_path / "none.json")))
    assert _found(topo, mount) == {("acme-vm1", "acme-vm1", LIBVIRT),
                                   ("acme", "vswitch", "tenants.slice/tenants-acme.slice/vswitch.service")}


def test_pod_names_come_from_the_kubelets_pods_endpoint(tmp_path, mount):
    """The kubelet's read-only /pods endpoint (a local HTTP server with its
    PodList shape); a pod it does not list yet is asked for again, not on
    every drain."""
    import http.server
    import threading

    listing = {"items": [{"metadata": {"name": "ovs-acme", "namespace": "acme", "uid": UID}}]}
    asked = []

    class Kubelet(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = json.dumps(listing).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Kubelet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pod = f"kubepods/burstable/pod{UID}"
        _mk(mount, pod)
        url = f"http://127.0.0.1:{server.server_address[1]}/pods"
        topo = _topo(tmp_path, mount, f'[[discover]]\npreset = "kubernetes"\npods = "{url}"\n')
        assert _found(topo, mount) == {("acme", "ovs-acme", pod)}
        _mk(mount, f"kubepods/burstable/pod{UID2}")
        topo = topo.refresh()
        topo = topo.refresh()
        assert (UID2, UID2, f"kubepods/burstable/pod{UID2}") in _found(topo, mount)
        assert asked == ["/pods"]  # the second pod is unknown, but within REFETCH_S: not asked again
    finally:
        server.shutdown()


def test_a_cgroup_a_rule_cannot_name_is_said_not_silently_the_hosts(tmp_path, mount, caplog):
    """A template that needs an optional group the path did not have: the
    cgroup stays the host's, and a warning names it and the fix."""
    _mk(mount, "vms/acme-vm1", "vms/plain")
    topo = _topo(tmp_path, mount, """\
[[discover]]
cgroup = "vms/*"
match = '(?:(?P<tenant>[a-z]+)-)?(?P<vm>[a-z0-9]+)'
tenant = "{tenant}"
compartment = "{vm}"
""")
    assert _found(topo, mount) == {("acme", "vm1", "vms/acme-vm1")}
    said = [r.message for r in caplog.records if "names cannot be made" in r.message]
    assert len(said) == 1 and str(mount / "vms/plain") in said[0] and "billed to host" in said[0]
