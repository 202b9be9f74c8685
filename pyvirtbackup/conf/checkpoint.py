"""Placeholder, replaced by the <domaincheckpoint> definition."""


class CheckpointDef:
    pass


class CheckpointDisk:
    pass
