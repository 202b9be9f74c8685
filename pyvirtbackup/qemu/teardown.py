"""Taking one disk's backup out of QEMU, in the only order QEMU allows.

Used when a disk's job ends, on abort, and when a later process cleans up after
one that died: so every step checks what is still there instead of trusting how far
the record says we got, and carries on past what fails (logging it), since leaving
the rest behind would be worse. A persistent bitmap is never removed here, whatever
the plan names: ours are all temporary, so a persistent one is a checkpoint's.

Fleecing's order (qemu-7.2-notes pitfalls 2 and 3): the snapshot-access view goes
before the device is switched back (while it exists, the filter refuses other
writers of the disk), the device is switched back only if it still uses our filter
(setting ``drive`` to the node it already uses aborts QEMU 7.2), then the filter,
then the fleecing image it wrote to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..errors import VirError
from .monitor import Monitor
from .plan import DiskPlan

log = logging.getLogger(__name__)


def probe_nodes(dp: DiskPlan) -> tuple[str, str]:
    """The two nodes a pull's snapshot probe reads through (see ``qemu.probe``)."""
    return f"pvb-{dp.store_id}-probe", f"pvb-{dp.store_id}-sink"


def probe_job_id(dp: DiskPlan) -> str:
    return f"pvb-probe-{dp.disk}"


async def drop_job(mon: Monitor, jid: str) -> None:
    """Cancel and dismiss a job of ours, whatever state it is in."""
    if not mon.connected:
        return
    with contextlib.suppress(VirError):
        await mon.execute("job-cancel", {"id": jid})
    for _ in range(50):
        try:
            await mon.execute("job-dismiss", {"id": jid})
            return
        except VirError as exc:
            if "not found" in exc.message or "No job" in exc.message:
                return
        await asyncio.sleep(0.1)


async def drop_probe_job(mon: Monitor, dp: DiskPlan) -> None:
    """A probe cut short (its process killed) leaves its mirror job behind."""
    jid = probe_job_id(dp)
    if any(j.get("id") == jid for j in await mon.execute("query-jobs")):
        await drop_job(mon, jid)


async def node_names(mon: Monitor) -> set[str]:
    return set(await _nodes(mon))


async def _nodes(mon: Monitor) -> dict[str, set[str]]:
    """Node names, each with the names of its persistent bitmaps."""
    return {
        n["node-name"]: {b.get("name") for b in n.get("dirty-bitmaps") or [] if b.get("persistent")}
        for n in await mon.execute("query-named-block-nodes", {"flat": True})
    }


async def restore_device(mon: Monitor, dp: DiskPlan) -> str | None:
    """Point the device back at what it used before, if it still uses our filter.

    Returns a problem to report, or None.
    """
    if not (dp.fleecing and dp.qdev and dp.cbw_node and dp.attached_node):
        return None
    try:
        current = await mon.execute("qom-get", {"path": dp.qdev, "property": "drive"})
    except VirError as exc:  # the device was unplugged: nothing points at the filter
        log.info("device %s of disk %s: %s", dp.qdev, dp.disk, exc)
        return None
    if current != dp.cbw_node:
        return None
    try:
        await mon.execute(
            "qom-set", {"path": dp.qdev, "property": "drive", "value": dp.attached_node}
        )
    except VirError as exc:
        return (
            f"the device of disk '{dp.disk}' still writes through the backup's filter "
            f"'{dp.cbw_node}': switching it back to '{dp.attached_node}' failed: {exc.message}"
        )
    return None


async def take_down(mon: Monitor, dp: DiskPlan, *, job_lost: bool = False) -> list[str]:
    """Remove the disk's job, nodes and temporary bitmaps; returns what could not be."""
    problems: list[str] = []
    if dp.has_qemu_job and not job_lost:
        with contextlib.suppress(VirError):
            await mon.execute("job-dismiss", {"id": dp.job_id})
    nodes = await _nodes(mon)
    present = set(nodes)

    async def delete(*nodes: str | None) -> None:
        for node in nodes:
            if not node or node not in present:
                continue
            try:
                await mon.execute("blockdev-del", {"node-name": node})
                present.discard(node)
            except VirError as exc:
                problems.append(f"could not delete node '{node}' of disk '{dp.disk}': {exc}")

    async def remove_bitmap(node: str | None) -> None:
        if dp.bitmap and node and dp.bitmap in nodes.get(node, ()):
            # ours are never persistent: this one is a checkpoint's or another tool's
            problems.append(
                f"bitmap '{dp.bitmap}' on node '{node}' is persistent, so it is not a "
                "temporary bitmap of ours; it was left alone"
            )
            return
        if dp.bitmap and node and node in present:
            with contextlib.suppress(VirError):  # gone already, or never made
                await mon.execute("block-dirty-bitmap-remove", {"node": node, "name": dp.bitmap})

    pull_fleecing = dp.fleecing and dp.sync == "none"
    if not pull_fleecing:  # the push target, or the direct way's scratch
        await delete(dp.format_node, dp.storage_node)
    if not dp.fleecing:
        if dp.sync != "none":  # a pull's temporary bitmap went with its scratch node
            await remove_bitmap(dp.bitmap_node)
        return problems
    await drop_probe_job(mon, dp)
    await delete(*probe_nodes(dp))
    await remove_bitmap(dp.bitmap_node)
    await remove_bitmap(dp.instant_bitmap_node)
    await delete(dp.access_node)
    problem = await restore_device(mon, dp)
    if problem:
        problems.append(problem)
        return problems  # the filter is still in the guest's path: it must stay
    await delete(dp.cbw_node, dp.fleece_node, dp.fleece_storage_node)
    return problems
