"""Libvirt domain XML built from the data model, with ElementTree (values are escaped, never spliced)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

METADATA_NS = "https://sysvm.dev/xmlns/systemvm/1"
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


@dataclass(frozen=True)
class NicSpec:
    role: str
    mac: str
    bridge: str


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    domain_type: str  # "test" for the lab's test driver, "kvm" for real hosts
    memory_mib: int
    vcpus: int
    nics: list[NicSpec]
    vnc_listen: str = "127.0.0.1"
    boot_args: dict[str, str] = field(default_factory=dict)
    vm_type: str = ""
    disk_path: str = ""


def boot_args_line(args: dict[str, str]) -> str:
    """CloudStack's `key=value key=value` form, in insertion order."""
    return " ".join(f"{k}={v}" for k, v in args.items())


def build_domain_xml(spec: DomainSpec, *, runstate: int | None = None) -> str:
    """The domain definition; `runstate` embeds the test driver's initial state (lab hosts)."""
    ET.register_namespace("sysvm", METADATA_NS)
    dom = ET.Element("domain", {"type": spec.domain_type})
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{METADATA_NS}}}systemvm")
    ET.SubElement(meta, f"{{{METADATA_NS}}}type").text = spec.vm_type
    ET.SubElement(meta, f"{{{METADATA_NS}}}bootargs").text = boot_args_line(spec.boot_args)
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    # The guest reads its boot arguments from SMBIOS OEM strings (dmidecode -t 11).
    sysinfo = ET.SubElement(dom, "sysinfo", {"type": "smbios"})
    oem = ET.SubElement(sysinfo, "oemStrings")
    ET.SubElement(oem, "entry").text = "cloudstack:" + boot_args_line(spec.boot_args)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    ET.SubElement(os_el, "boot", {"dev": "hd"})
    ET.SubElement(os_el, "smbios", {"mode": "sysinfo"})
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    if spec.disk_path:
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": "qcow2"})
        ET.SubElement(disk, "source", {"file": spec.disk_path})
        ET.SubElement(disk, "target", {"dev": "vda", "bus": "virtio"})
    for nic in spec.nics:
        iface = ET.SubElement(devices, "interface", {"type": "bridge"})
        ET.SubElement(iface, "mac", {"address": nic.mac})
        ET.SubElement(iface, "source", {"bridge": nic.bridge})
        ET.SubElement(iface, "model", {"type": "virtio"})
    serial = ET.SubElement(devices, "serial", {"type": "pty"})
    ET.SubElement(serial, "target", {"port": "0"})
    console = ET.SubElement(devices, "console", {"type": "pty"})
    ET.SubElement(console, "target", {"type": "serial", "port": "0"})
    ET.SubElement(
        devices,
        "graphics",
        {"type": "vnc", "port": "-1", "autoport": "yes", "listen": spec.vnc_listen},
    )
    if runstate is not None:
        ET.register_namespace("test", TEST_NS)
        ET.SubElement(dom, f"{{{TEST_NS}}}runstate").text = str(runstate)
    return ET.tostring(dom, encoding="unicode")


def lab_node_xml(domains: list[str]) -> str:
    """A libvirt test-driver node file holding the given domain definitions."""
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, val in (("mhz", "2400"), ("model", "x86_64"), ("active", "64"), ("nodes", "1")):
        ET.SubElement(cpu, tag).text = val
    ET.SubElement(node, "memory").text = str(256 * 1024 * 1024)
    for xml in domains:
        node.append(ET.fromstring(xml))
    return ET.tostring(node, encoding="unicode")
