"""What the checkpoint and incremental tests share: backups run to the end, QEMU's bitmaps."""

from __future__ import annotations

import asyncio
from typing import Any

from pyvirtbackup import DomainEventID, Driver
from pyvirtbackup.driver import Domain
from pyvirtbackup.qemu.monitor import Monitor


async def run_backup(
    driver: Driver,
    dom: Domain,
    backup_xml: str | None,
    checkpoint_xml: str | None = None,
    *,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Begin a backup and wait for JOB_COMPLETED; returns the completed stats."""
    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_done(_conn: Any, _dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        if not done.done():
            done.set_result(params)

    cb = await driver.connectDomainEventRegisterAny(dom, DomainEventID.JOB_COMPLETED, on_done)
    try:
        await driver.domainBackupBegin(dom, backup_xml, checkpoint_xml)
        return await asyncio.wait_for(done, timeout)
    finally:
        await driver.connectDomainEventDeregisterAny(cb)


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
    """Node name -> bitmap name -> QEMU's description, for every node with bitmaps."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for node in await mon.execute("query-named-block-nodes", {"flat": True}):
        # a running backup's copy-before-write filter holds anonymous bitmaps
        found = {b["name"]: b for b in node.get("dirty-bitmaps") or [] if b.get("name")}
        if found:
            out[node["node-name"]] = found
    return out


async def node_names(mon: Monitor) -> set[str]:
    return {n["node-name"] for n in await mon.execute("query-named-block-nodes", {"flat": True})}
