"""What conf/ needs to know about a domain's disks, without any QEMU in sight."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DomainDisk:
    """One disk of the domain, as libvirt's ``<disk>`` would describe it.

    ``name`` is libvirt's ``<target dev>`` (our device id), ``type`` the storage type
    of its source (``file``, ``block``, ``network``...), ``format`` the top image
    format (``qcow2``, ``raw``...).
    """

    name: str
    path: str | None = None
    format: str = "qcow2"
    type: str = "file"
    readonly: bool = False
    empty: bool = False
