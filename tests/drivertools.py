"""Helpers for driver tests: a driver per test, waiting for the end of a job, QEMU leftovers,
backup and checkpoint XML, QEMU's bitmaps."""

from __future__ import annotations

import asyncio
from typing import Any

from pyvirtbackup import DomainEventID, Driver, JobStatsFlags
from pyvirtbackup.qemu.monitor import Monitor


class EventLog:
    """Every JOB_COMPLETED and BLOCK_JOB(_2) event of a driver, for assertions."""

    def __init__(self) -> None:
        self.completed: list[dict[str, Any]] = []
        self.block_jobs: list[tuple[str, int, int]] = []
        self.block_jobs_by_path: list[tuple[str, int, int]] = []
        self.done = asyncio.Event()

    async def register(self, driver: Driver, dom: Any) -> None:
        await driver.connectDomainEventRegisterAny(dom, DomainEventID.JOB_COMPLETED, self._job)
        await driver.connectDomainEventRegisterAny(dom, DomainEventID.BLOCK_JOB_2, self._blk2)
        await driver.connectDomainEventRegisterAny(dom, DomainEventID.BLOCK_JOB, self._blk)

    def _job(self, conn: Any, dom: Any, params: dict[str, Any], opaque: Any) -> None:
        self.completed.append(params)
        self.done.set()

    def _blk2(self, conn: Any, dom: Any, disk: str, kind: int, status: int, opaque: Any) -> None:
        self.block_jobs.append((disk, kind, status))

    def _blk(self, conn: Any, dom: Any, path: str, kind: int, status: int, opaque: Any) -> None:
        self.block_jobs_by_path.append((path, kind, status))

    async def wait(self, timeout: float = 60.0) -> dict[str, Any]:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.completed[-1]


async def wait_completed(driver: Driver, dom: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll like a libvirt user would until the job is over; return its final stats."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while dom.job is not None:
        if loop.time() > deadline:
            raise TimeoutError("backup job did not finish")
        await asyncio.sleep(0.02)
    keep = JobStatsFlags.COMPLETED | JobStatsFlags.KEEP_COMPLETED
    return await driver.domainGetJobStats(dom, keep)


async def unthrottle(mon: Monitor) -> None:
    for job in await mon.execute("query-jobs"):
        if job.get("type") == "backup" and job.get("status") == "running":
            await mon.execute("block-job-set-speed", {"device": job["id"], "speed": 0})


async def leftovers(mon: Monitor, original_nodes: set[str]) -> dict[str, Any]:
    """What pyvirtbackup might have left in QEMU: jobs, extra nodes, exports, temp bitmaps,
    and fd sets of images it handed over (tagged ``pyvirtbackup:<path>``)."""
    jobs = await mon.execute("query-jobs")
    nodes = {n["node-name"] for n in await mon.execute("query-named-block-nodes", {"flat": True})}
    exports = await mon.execute("query-block-exports")
    bitmaps = [
        (n["node-name"], b["name"])
        for n in await mon.execute("query-named-block-nodes", {"flat": True})
        for b in n.get("dirty-bitmaps", [])
        if b.get("name", "").startswith(("backup-", "pvb-"))
    ]
    return {
        "jobs": jobs,
        "extra_nodes": sorted(nodes - original_nodes),
        "exports": exports,
        "temp_bitmaps": bitmaps,
        "fdsets": await our_fdsets(mon),
    }


NOTHING_LEFT = {"jobs": [], "extra_nodes": [], "exports": [], "temp_bitmaps": [], "fdsets": []}


async def our_fdsets(mon: Monitor) -> list[str]:
    """The images whose descriptors QEMU still holds in an fd set of ours."""
    return sorted(
        fd["opaque"].split(":", 1)[1]
        for fdset in await mon.execute("query-fdsets")
        for fd in fdset.get("fds", [])
        if str(fd.get("opaque", "")).startswith("pyvirtbackup:")
    )


async def node_names(mon: Monitor) -> set[str]:
    return {n["node-name"] for n in await mon.execute("query-named-block-nodes", {"flat": True})}


async def run_backup(
    driver: Driver, dom: Any, backup_xml: str | None, checkpoint_xml: str | None = None
) -> dict[str, Any]:
    """Begin a backup and wait for its end; returns the completed job's stats."""
    await driver.domainBackupBegin(dom, backup_xml, checkpoint_xml)
    return await wait_completed(driver, dom)


def push_xml(
    targets: dict[str, str],
    *,
    incremental: str | None = None,
    backing: dict[str, str] | None = None,
    modes: dict[str, str] | None = None,
) -> str:
    """A push <domainbackup> with a target per disk, optional pvb:backing and backupmode."""
    backing = backing or {}
    modes = modes or {}
    disks = []
    for name, path in targets.items():
        mode = f" backupmode='{modes[name]}'" if name in modes else ""
        ref = f" pvb:backing='{backing[name]}'" if name in backing else ""
        disks.append(f"<disk name='{name}'{mode}><target file='{path}'{ref}/></disk>")
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (
        "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'>"
        f"{inc}<disks>{''.join(disks)}</disks></domainbackup>"
    )


def checkpoint_xml(name: str, disks: list[str] | None = None) -> str:
    listed = "".join(f"<disk name='{d}'/>" for d in disks or [])
    return (
        f"<domaincheckpoint><name>{name}</name>"
        + (f"<disks>{listed}</disks>" if disks else "")
        + "</domaincheckpoint>"
    )


async def bitmaps(mon: Monitor) -> dict[str, dict[str, dict[str, Any]]]:
    """Node name -> bitmap name -> QEMU's description, for every node with named bitmaps."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for node in await mon.execute("query-named-block-nodes", {"flat": True}):
        # a running backup's copy-before-write filter holds anonymous bitmaps
        found = {b["name"]: b for b in node.get("dirty-bitmaps") or [] if b.get("name")}
        if found:
            out[node["node-name"]] = found
    return out
