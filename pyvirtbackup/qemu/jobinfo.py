"""One disk's part of a running backup, as virDomainGetBlockJobInfo reports it.

libvirt registers each disk of a backup as a block job of type BACKUP; tools
(virtnbdbackup) ask for it before starting their own backup, to find one that
is still running.
"""

from __future__ import annotations

import contextlib

from ..errors import VirError
from .job import BackupJob
from .jobcore import RUNNING, progress


async def disk_progress(job: BackupJob, disk: str) -> tuple[int, int] | None:
    """(current, end) of ``disk``'s copy while it runs, None when it has no job now."""
    for jid, rt in job.disks.items():
        if rt.plan.disk != disk or rt.state != RUNNING:
            continue
        with contextlib.suppress(VirError):
            for qjob in await job.mon.execute("query-jobs"):
                if qjob.get("id") == jid:
                    return progress(rt.plan, qjob)
        return rt.current, rt.total
    return None
