"""Is a pull backup's point-in-time view still whole?

When the fleecing image cannot take the guest's old data, the copy-before-write
filter breaks the snapshot instead of failing the guest's write, and from then on
every read of the view fails. QEMU says so to nobody: there is no event and no query
(reference/qemu-7.2-notes.md §3f). A push notices through its job's failed reads; a
pull has no job, so we read one cluster of the view ourselves, inside QEMU, without
needing the NBD server's TLS: a mirror job from a 64 KiB window of the view into a
null sink, cancelled as soon as it is ready. Costs a few milliseconds and 64 KiB.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..errors import VirError
from .monitor import Monitor
from .plan import DiskPlan
from .teardown import drop_probe_job, node_names, probe_job_id, probe_nodes

WINDOW = 65536
PROBE_TIMEOUT = 30.0


async def _ensure_nodes(mon: Monitor, dp: DiskPlan) -> tuple[str, str]:
    window, sink = probe_nodes(dp)
    present = await node_names(mon)
    size = min(WINDOW, dp.size)
    if window not in present:
        await mon.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": window,
                "file": dp.access_node,
                "offset": 0,
                "size": size,
                "read-only": True,
            },
        )
    if sink not in present:
        await mon.execute("blockdev-add", {"driver": "null-co", "node-name": sink, "size": size})
    return window, sink


async def view_error(mon: Monitor, dp: DiskPlan) -> str | None:
    """QEMU's error reading the disk's view (``Permission denied`` once it broke), or
    None when it reads. Other failures (the view being taken down meanwhile) raise."""
    window, sink = await _ensure_nodes(mon, dp)
    jid = probe_job_id(dp)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[dict[str, Any]] = loop.create_future()
    ready = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if data.get("device") != jid:
            return
        if event.get("event") == "BLOCK_JOB_READY":
            ready.set()
        elif event.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            if not ended.done():
                ended.set_result(data)

    await drop_probe_job(mon, dp)  # left by a process killed mid-probe
    handle = mon.add_event_handler(on_event)
    try:
        await mon.execute(
            "blockdev-mirror",
            {
                "job-id": jid,
                "device": window,
                "target": sink,
                "sync": "full",
                "auto-dismiss": False,
            },
        )
        try:
            ready_wait = asyncio.ensure_future(ready.wait())
            await asyncio.wait(
                {ready_wait, ended}, timeout=PROBE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            ready_wait.cancel()
            if not ended.done():
                with contextlib.suppress(VirError):
                    await mon.execute("block-job-cancel", {"device": jid})
            data = await asyncio.wait_for(ended, PROBE_TIMEOUT)
        finally:
            await drop_probe_job(mon, dp)
    finally:
        mon.remove_event_handler(handle)
    error = data.get("error")
    return str(error) if error else None
