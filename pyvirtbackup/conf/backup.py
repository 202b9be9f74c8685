"""Placeholder, replaced by the <domainbackup> definition."""


class BackupDef:
    pass


class BackupDisk:
    pass


class BackupServer:
    pass
