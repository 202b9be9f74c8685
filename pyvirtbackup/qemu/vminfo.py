"""What a libvirt client asks about a running QEMU besides its disks: run state,
vCPUs, memory, machine, accelerator, and each disk device's bus.

libvirt knows these from the domain definition it started QEMU with; we only have
QEMU, so they are read from it with queries that change nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from ..errors import VirError
from .monitor import Monitor

# QOM device types (prefixes) and the bus libvirt's <target bus> names for them
_BUS_BY_TYPE = (
    ("virtio-blk", "virtio"),
    ("vhost-user-blk", "virtio"),
    ("scsi-", "scsi"),
    ("ide-", "sata"),
    ("usb-storage", "usb"),
    ("usb-bot", "usb"),
    ("nvme", "nvme"),
    ("floppy", "fdc"),
)


@dataclass
class VmInfo:
    status: str  # QEMU's RunState: running, paused, prelaunch, inmigrate...
    vcpus: int = 0
    memory_kib: int = 0
    arch: str | None = None
    machine: str | None = None
    kvm: bool = False
    buses: dict[str, str] = field(default_factory=dict)  # device id -> bus


async def _query(mon: Monitor, command: str, args: dict | None = None) -> object:
    """A query's answer, or None when this QEMU has no such command or refuses it."""
    with contextlib.suppress(VirError):
        return await mon.execute(command, args)
    return None


async def read_status(mon: Monitor) -> str:
    answer = await mon.execute("query-status")
    return str(answer.get("status", "unknown"))


async def read(mon: Monitor, devices: list[str]) -> VmInfo:
    """Everything of VmInfo; ``devices`` are the disk device ids whose bus is wanted."""
    info = VmInfo(status=await read_status(mon))
    cpus = await _query(mon, "query-cpus-fast")
    if isinstance(cpus, list):
        info.vcpus = len(cpus)
    mem = await _query(mon, "query-memory-size-summary")
    if isinstance(mem, dict):
        info.memory_kib = int(mem.get("base-memory", 0)) // 1024
    target = await _query(mon, "query-target")
    if isinstance(target, dict):
        info.arch = target.get("arch")
    kvm = await _query(mon, "query-kvm")
    if isinstance(kvm, dict):
        info.kvm = bool(kvm.get("enabled"))
    machine = await _qom_type(mon, "/machine")
    if machine:
        info.machine = machine.removesuffix("-machine")
    for dev in devices:
        bus = await device_bus(mon, dev)
        if bus == "sata" and "q35" not in (info.machine or ""):
            bus = "ide"  # ide-hd on i440fx's IDE controller rather than q35's AHCI
        if bus:
            info.buses[dev] = bus
    return info


async def _qom_type(mon: Monitor, path: str) -> str | None:
    value = await _query(mon, "qom-get", {"path": path, "property": "type"})
    return value if isinstance(value, str) else None


async def device_bus(mon: Monitor, device_id: str) -> str | None:
    """libvirt's bus name for the device ``device_id`` (None when unknown)."""
    qtype = await _qom_type(mon, f"/machine/peripheral/{device_id}")
    if qtype is None:
        return None
    for prefix, bus in _BUS_BY_TYPE:
        if qtype.startswith(prefix):
            return bus
    return None
