"""XML definitions of backups and checkpoints: parse, validate, fill defaults, format.

This package knows libvirt's XML rules and nothing about QEMU.
"""

from .backup import BackupDef, BackupDisk, BackupServer
from .checkpoint import CheckpointDef, CheckpointDisk
from .domain import DomainDisk

__all__ = [
    "BackupDef",
    "BackupDisk",
    "BackupServer",
    "CheckpointDef",
    "CheckpointDisk",
    "DomainDisk",
]
