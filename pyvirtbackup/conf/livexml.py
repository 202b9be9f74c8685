"""The domain XML a libvirt client gets from ``virDomainGetXMLDesc``, and the host
capabilities XML, written from what was discovered in QEMU.

Partial by nature: pyvirtbackup never defined the domain, so only what QEMU tells
is there (name, uuid, id, type, memory, vCPUs, machine, and each disk: type,
device, driver, source, target dev and bus, readonly). Backup tools read the
disks (virtnbdbackup needs target dev, driver type and, for files, source file);
nothing here is meant to define a domain elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .domain import DomainDisk
from .xmlutil import XMLWriter

_SOURCE_ATTR = {"file": "file", "block": "dev", "dir": "dir", "network": "name"}


@dataclass
class LiveDomain:
    name: str
    uuid: str
    id: int | None = None  # None: not running (libvirt prints no id)
    virt_type: str = "kvm"
    memory_kib: int = 0
    vcpus: int = 0
    arch: str | None = None
    machine: str | None = None
    disks: list[DomainDisk] = field(default_factory=list)
    buses: dict[str, str] = field(default_factory=dict)  # disk name -> bus


def format_live_domain(dom: LiveDomain) -> str:
    w = XMLWriter()
    w.open("domain", [("type", dom.virt_type), ("id", dom.id)])
    w.text("name", dom.name)
    w.text("uuid", dom.uuid or None)
    if dom.memory_kib:
        w.text("memory", dom.memory_kib, [("unit", "KiB")])
        w.text("currentMemory", dom.memory_kib, [("unit", "KiB")])
    if dom.vcpus:
        w.text("vcpu", dom.vcpus, [("placement", "static")])
    w.open("os")
    w.text("type", "hvm", [("arch", dom.arch), ("machine", dom.machine)])
    w.close("os")
    if dom.disks:
        w.open("devices")
        for disk in dom.disks:
            _disk(w, disk, dom.buses.get(disk.name))
        w.close("devices")
    else:
        w.empty("devices")
    w.close("domain")
    return w.getvalue()


def _disk(w: XMLWriter, disk: DomainDisk, bus: str | None) -> None:
    # in libvirt only removable media can be empty
    device = "cdrom" if disk.empty else "disk"
    w.open("disk", [("type", disk.type), ("device", device)])
    w.empty("driver", [("name", "qemu"), ("type", disk.format)])
    if not disk.empty and disk.path is not None:
        w.empty("source", [(_SOURCE_ATTR.get(disk.type, "file"), disk.path)])
    w.empty("target", [("dev", disk.name), ("bus", bus)])
    if disk.readonly:
        w.empty("readonly")
    w.close("disk")


def format_capabilities(host_uuid: str | None, arch: str, emulator: str | None) -> str:
    """Enough of ``<capabilities>`` for clients that look for the guest types served."""
    w = XMLWriter()
    w.open("capabilities")
    w.open("host")
    w.text("uuid", host_uuid)
    w.open("cpu")
    w.text("arch", arch)
    w.close("cpu")
    w.close("host")
    w.open("guest")
    w.text("os_type", "hvm")
    w.open("arch", [("name", arch)])
    w.text("wordsize", 64 if arch.endswith("64") else 32)
    w.text("emulator", emulator)
    w.empty("domain", [("type", "qemu")])
    w.empty("domain", [("type", "kvm")])
    w.close("arch")
    w.close("guest")
    w.close("capabilities")
    return w.getvalue()
