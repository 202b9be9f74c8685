"""What the parts of a running backup share: disk states, the job's record phases,
what the job tells the driver, and the few helpers every part uses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..enums import BlockJobStatus, JobType
from ..errors import ErrorDomain, ErrorNumber, VirError
from .monitor import Monitor
from .plan import DiskPlan

RUNNING, COMPLETE, FAILED, CANCELLING, CANCELLED = (
    "running",
    "complete",
    "failed",
    "cancelling",
    "cancelled",
)
CREATE_TIMEOUT = 300.0
EXPORT_DELETE_TIMEOUT = 30.0
QUERY_ATTEMPTS = 3
# phases of a job's record: what a later process must do with it
PREPARING, STARTED = "preparing", "started"


class MonitorLost(Exception):
    """The monitor dropped and QEMU's fate is unknown: stop following, keep the record."""


@dataclass
class DiskRuntime:
    plan: DiskPlan
    state: str = ""
    current: int = 0
    total: int = 0
    error: str | None = None
    cleaned: bool = False  # its QEMU job dismissed, store nodes and temp bitmap removed
    launched: bool = False  # its QEMU block job exists (fleecing starts it after the instant)
    error_op: str | None = None  # read or write, from BLOCK_JOB_ERROR


@dataclass
class JobResult:
    """What domainGetJobStats(COMPLETED) and the JOB_COMPLETED event report."""

    type: JobType
    stats: dict[str, Any]


@dataclass
class Callbacks:
    """How the job tells the driver what happened (all optional)."""

    changed: Callable[[], Awaitable[None] | None] | None = None
    disk_done: Callable[[DiskPlan, BlockJobStatus], None] | None = None
    finished: Callable[[JobResult], Awaitable[None] | None] | None = None
    # after the monitor connection dropped: a new Monitor if QEMU still answers,
    # None if it is gone for sure, or raise to stop following and keep the record
    reconnect: Callable[[], Awaitable[Monitor | None]] | None = None


def progress(dp: DiskPlan, qjob: dict[str, Any]) -> tuple[int, int]:
    """(processed, total) of one disk's job, as libvirt users read them.

    A ``sync=top`` job drops what it skips from QEMU's total; users of a full
    backup expect the disk's size there, so skipped bytes count as processed.
    """
    current = int(qjob.get("current-progress", 0))
    total = int(qjob.get("total-progress", 0))
    if dp.sync == "top":
        remaining = max(total - current, 0)
        return max(dp.size - remaining, 0), dp.size
    return current, total


def exists_error(path: str, disk: str) -> VirError:
    return VirError(
        ErrorNumber.INVALID_ARG, ErrorDomain.QEMU, f"store '{path}' for backup of '{disk}' exists"
    )


async def finish_even_if_cancelled(coro: Awaitable[Any]) -> None:
    """Run cleanup to its end even when the caller is cancelled (Ctrl-C, a timeout):
    a rollback cut short leaves nodes and files behind. The cancel is re-raised after."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()
