"""pyvirtbackup: libvirt's backup and checkpoint API for QEMU, over QMP, in pure Python."""

# the driver imports everything above; keep it last
from .driver import Domain, Driver
from .enums import (
    AbortJobFlags,
    BackupBeginFlags,
    BackupDiskBackupMode,
    BackupDiskState,
    BackupType,
    BlockJobStatus,
    BlockJobType,
    CheckpointCreateFlags,
    CheckpointDeleteFlags,
    CheckpointDiskType,
    CheckpointListFlags,
    CheckpointXMLFlags,
    ConnectListAllDomainsFlags,
    DomainEventID,
    JobOperation,
    JobStatsFlags,
    JobType,
)
from .errors import ErrorDomain, ErrorNumber, VirError
from .qemu.plan import Tuning

__all__ = [
    "AbortJobFlags",
    "BackupBeginFlags",
    "BackupDiskBackupMode",
    "BackupDiskState",
    "BackupType",
    "BlockJobStatus",
    "BlockJobType",
    "CheckpointCreateFlags",
    "CheckpointDeleteFlags",
    "CheckpointDiskType",
    "CheckpointListFlags",
    "CheckpointXMLFlags",
    "ConnectListAllDomainsFlags",
    "Domain",
    "DomainEventID",
    "Driver",
    "ErrorDomain",
    "ErrorNumber",
    "JobOperation",
    "JobStatsFlags",
    "JobType",
    "Tuning",
    "VirError",
]
