"""libvirt's public flags and enums for backups, checkpoints, jobs and events.

The numeric values are libvirt's (include/libvirt/libvirt-domain*.h), so a value
read from pyvirtbackup means the same as one read from libvirt-python.
"""

from __future__ import annotations

import enum


class BackupBeginFlags(enum.IntFlag):
    REUSE_EXTERNAL = 1
    PRESERVE_SHUTDOWN_DOMAIN = 2  # libvirt 11.10


class CheckpointCreateFlags(enum.IntFlag):
    REDEFINE = 1
    QUIESCE = 2
    REDEFINE_VALIDATE = 4


class CheckpointXMLFlags(enum.IntFlag):
    SECURE = 1
    NO_DOMAIN = 2
    SIZE = 4


class CheckpointListFlags(enum.IntFlag):
    # ROOTS for domainListAllCheckpoints, DESCENDANTS for ListAllChildren: same bit
    ROOTS = 1
    DESCENDANTS = 1
    TOPOLOGICAL = 2
    LEAVES = 4
    NO_LEAVES = 8


class CheckpointDeleteFlags(enum.IntFlag):
    CHILDREN = 1
    METADATA_ONLY = 2
    CHILDREN_ONLY = 4


class JobOperation(enum.IntEnum):
    UNKNOWN = 0
    START = 1
    SAVE = 2
    RESTORE = 3
    MIGRATION_IN = 4
    MIGRATION_OUT = 5
    SNAPSHOT = 6
    SNAPSHOT_REVERT = 7
    DUMP = 8
    BACKUP = 9
    SNAPSHOT_DELETE = 10


class JobType(enum.IntEnum):
    NONE = 0
    BOUNDED = 1
    UNBOUNDED = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5


class JobStatsFlags(enum.IntFlag):
    COMPLETED = 1
    KEEP_COMPLETED = 2


class AbortJobFlags(enum.IntFlag):
    POSTCOPY = 1


class DomainEventID(enum.IntEnum):
    BLOCK_JOB = 8
    BLOCK_JOB_2 = 16
    JOB_COMPLETED = 21


class BlockJobType(enum.IntEnum):
    UNKNOWN = 0
    PULL = 1
    COPY = 2
    COMMIT = 3
    ACTIVE_COMMIT = 4
    BACKUP = 5


class BlockJobStatus(enum.IntEnum):
    COMPLETED = 0
    FAILED = 1
    CANCELED = 2
    READY = 3


class ConnectListAllDomainsFlags(enum.IntFlag):
    ACTIVE = 1 << 0
    INACTIVE = 1 << 1
    PERSISTENT = 1 << 2
    TRANSIENT = 1 << 3
    RUNNING = 1 << 4
    PAUSED = 1 << 5
    SHUTOFF = 1 << 6
    OTHER = 1 << 7
    MANAGEDSAVE = 1 << 8
    NO_MANAGEDSAVE = 1 << 9
    AUTOSTART = 1 << 10
    NO_AUTOSTART = 1 << 11
    HAS_SNAPSHOT = 1 << 12
    NO_SNAPSHOT = 1 << 13
    HAS_CHECKPOINT = 1 << 14
    NO_CHECKPOINT = 1 << 15


# Internal enums: values as they appear in libvirt's status XML and its C code.


class BackupType(enum.IntEnum):
    DEFAULT = 0
    PUSH = 1
    PULL = 2


class BackupDiskState(enum.IntEnum):
    NONE = 0
    RUNNING = 1
    COMPLETE = 2
    FAILED = 3
    CANCELLING = 4
    CANCELLED = 5


class BackupDiskBackupMode(enum.IntEnum):
    DEFAULT = 0
    FULL = 1
    INCREMENTAL = 2


class CheckpointDiskType(enum.IntEnum):
    DEFAULT = 0
    NO = 1
    BITMAP = 2
