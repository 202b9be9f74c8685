"""Following a running backup: QEMU's events in, one disk's end at a time (its
outcome recorded, then its nodes, jobs and bitmaps removed), and what to do when
the monitor drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from ..enums import BlockJobStatus
from ..errors import ErrorDomain, ErrorNumber, VirError
from . import teardown
from .jobcore import (
    CANCELLED,
    CANCELLING,
    COMPLETE,
    EXPORT_DELETE_TIMEOUT,
    FAILED,
    QUERY_ATTEMPTS,
    RUNNING,
    DiskRuntime,
    MonitorLost,
    progress,
)
from .monitor import Monitor
from .plan import DiskPlan

log = logging.getLogger(__name__)

DISK_END = "PVB_DISK_END"  # our own event: a disk without a block job ended
GUEST_SHUTDOWN = "PVB_GUEST_SHUTDOWN"
FULL_BELOW = 1 << 20  # a filesystem with less free space counts as full


class JobEvents:
    """The part of ``BackupJob`` that follows QEMU (a mixin: state lives in BackupJob)."""

    def _listen(self) -> None:
        self._handler = self.mon.add_event_handler(self._on_event)
        self._disconnect_handle = self.mon.on_disconnect(self._on_disconnect)

    def _unlisten(self) -> None:
        if self._handler is not None:
            self.mon.remove_event_handler(self._handler)
            self._handler = None
        if self._disconnect_handle is not None:
            self.mon.remove_disconnect_handler(self._disconnect_handle)
            self._disconnect_handle = None

    def _on_event(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        name = event.get("event")
        if name == "JOB_STATUS_CHANGE":
            jid = data.get("id")
            if jid in self._waiters:
                # a job that fails passes through "aborting"; one that succeeds never does
                if data.get("status") == "aborting":
                    self._aborting.add(jid)
                elif data.get("status") == "concluded":
                    fut = self._waiters[jid]
                    if not fut.done():
                        fut.set_result("aborted" if jid in self._aborting else "ok")
                return
            if jid in self.disks:
                self._events.put_nowait(event)
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            # a second source for a job's outcome, should query-jobs not answer
            if data.get("device") in self.disks:
                self._ended[data["device"]] = {**data, "cancelled": name == "BLOCK_JOB_CANCELLED"}
        elif name == "BLOCK_EXPORT_DELETED":
            ev = self._export_deleted.get(data.get("id", ""))
            if ev is not None:
                ev.set()
        elif name == "BLOCK_JOB_ERROR" and data.get("device") in self.disks:
            self._events.put_nowait(event)
        elif name == "SHUTDOWN" and data.get("guest"):
            # kept (paused) with PRESERVE_SHUTDOWN_DOMAIN, gone in a moment without it
            self.guest_shut_down = True
            self._events.put_nowait({"event": GUEST_SHUTDOWN})

    def _on_disconnect(self) -> None:
        for fut in self._waiters.values():  # a create job waits for nothing now
            if not fut.done():
                fut.set_exception(
                    VirError(
                        ErrorNumber.OPERATION_INVALID,
                        ErrorDomain.QEMU,
                        "domain is not running: the QEMU monitor went away",
                    )
                )
        self._events.put_nowait({"event": "PVB_DISCONNECTED"})

    async def _work(self) -> None:
        while not self.done.is_set() and not self.detached:
            event = await self._events.get()
            # handled in a task of its own, so that close() can let it finish: a
            # disk's cleanup cut in half would leave its record behind QEMU's truth
            self._busy = asyncio.create_task(self._handle_logged(event))
            try:
                await asyncio.shield(self._busy)
            finally:
                if self._busy.done():
                    self._busy = None

    async def _handle_logged(self, event: dict[str, Any]) -> None:
        try:
            await self._handle(event)
        except Exception:
            log.exception("processing %s failed", event)

    async def _handle(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        if name == "PVB_DISCONNECTED":
            await self._connection_lost()
            return
        if name == GUEST_SHUTDOWN:
            log.warning(
                "the guest shut down during the backup; %s",
                "QEMU is kept until the backup ends"
                if self.plan.shutdown_restore
                else "QEMU exits and the backup fails",
            )
            await self._changed()
            return
        if name == "BLOCK_JOB_ERROR":
            d = self.disks[data["device"]]
            op = data.get("operation", "I/O")
            d.error = d.error or f"{op} error"
            d.error_op = d.error_op or op
            return
        if name == DISK_END:  # a disk without a block job ended (abort, broken view)
            await self._disk_concluded(data["id"], ended=data)
            return
        if data.get("status") == "concluded":
            await self._disk_concluded(data["id"])

    def _gone_reason(self) -> str:
        if self.guest_shut_down:
            return (
                "the guest shut down and QEMU exited while the backup was running (begin "
                "with VIR_DOMAIN_BACKUP_BEGIN_PRESERVE_SHUTDOWN_DOMAIN to keep the domain "
                "until the backup completes)"
            )
        return "QEMU exited while the backup was running"

    async def _connection_lost(self) -> None:
        """The monitor dropped. QEMU gone for sure: finish as failed. QEMU still there:
        follow it on a new connection. Not known: stop following, keep the record."""
        if self.done.is_set():
            return
        self._unlisten()
        mon: Monitor | None = None
        if self.callbacks.reconnect is not None:
            try:
                mon = await self.callbacks.reconnect()
            except MonitorLost as exc:
                log.error(
                    "lost QEMU's monitor (%s); the backup's record is kept for the "
                    "next attach to take it over",
                    exc,
                )
                self.detached = True
                return
        if mon is None:
            await self._qemu_gone()
            return
        self.mon = mon
        self._listen()
        await self._reconcile({j["id"]: j for j in await self.mon.execute("query-jobs")})
        if not any(d.state in (RUNNING, CANCELLING) for d in self.disks.values()):
            await self._terminate()

    async def _job_info(self, jid: str) -> dict[str, Any]:
        """A concluded job's progress and error: from query-jobs, else from its events.

        Not knowing is never success: a job whose outcome cannot be read has failed.
        """
        if jid in self._lost:
            return {"error": "the backup job vanished from QEMU while no driver followed it"}
        for attempt in range(QUERY_ATTEMPTS):
            try:
                for j in await self.mon.execute("query-jobs"):
                    if j.get("id") == jid:
                        return j
                break
            except VirError as exc:
                log.warning("query-jobs for %s failed (%s)", jid, exc)
                if not self.mon.connected:
                    break
                await asyncio.sleep(0.5 * (attempt + 1))
        ended = self._ended.get(jid)
        if ended is not None:
            info: dict[str, Any] = {
                "current-progress": ended.get("offset", 0),
                "total-progress": ended.get("len", 0),
            }
            if ended.get("error") or ended.get("cancelled"):
                info["error"] = ended.get("error") or "Operation canceled"
            return info
        return {"error": "QEMU did not tell how the backup job ended; treating it as failed"}

    async def _disk_concluded(self, jid: str, ended: dict[str, Any] | None = None) -> None:
        """One disk's job concluded (or, without a block job, ``ended`` says how)."""
        d = self.disks[jid]
        if d.state not in (RUNNING, CANCELLING):
            return
        if self.mode == "pull":
            # clients go first: once this or any fleecing job stops, a scratch node
            # reads through to the live disk, and a reader would mix then and now
            await self._stop_exports(only_if_ours=bool(self._lost))
        if ended is not None:
            info: dict[str, Any] = {k: v for k, v in ended.items() if k == "error"}
            if ended.get("cancelled") and "error" not in info:
                info["error"] = "Operation canceled"  # what a cancelled QEMU job says
        else:
            info = await self._job_info(jid)
        if "current-progress" in info:
            d.current, d.total = progress(d.plan, info)
        elif d.plan.fleecing and not d.plan.has_qemu_job:
            used = await self._temp_used()
            d.current, d.total = used.get(d.plan.fleece_storage_node or "", 0), d.plan.size
        error = info.get("error")
        if error and self.guest_shut_down and not self.plan.shutdown_restore:
            error = self._gone_reason()  # QEMU cancels the jobs on its way out
        elif error and d.plan.fleecing and not (d.state == CANCELLING or self.cancel_requested):
            error = explain_fleecing_error(d.plan, d.error_op, str(error))
        if ended is not None and ended.get("broken"):
            d.state = FAILED  # a view that broke is an incomplete backup, aborted or not
        elif d.state == CANCELLING or (self.cancel_requested and error):
            d.state = CANCELLED
        elif error:
            d.state = FAILED
        else:
            d.state = COMPLETE
        if error:
            d.error = error
            self.first_error = self.first_error or error
        # the outcome is on disk before the job's trace in QEMU goes: a process
        # that dies from here on leaves a record the next one can finish
        await self._changed()
        if d.state in (FAILED, CANCELLED):
            await self._cancel_running()
        await self._clean_disk(d)
        last = not any(x.state in (RUNNING, CANCELLING) for x in self.disks.values())
        if last:  # libvirt emits JOB_COMPLETED before the last disk's BLOCK_JOB events
            await self._terminate()
        if self.callbacks.disk_done:
            status = {
                COMPLETE: BlockJobStatus.COMPLETED,
                FAILED: BlockJobStatus.FAILED,
                CANCELLED: BlockJobStatus.CANCELED,
            }[d.state]
            self.callbacks.disk_done(d.plan, status)

    async def _clean_disk(self, d: DiskRuntime) -> None:
        """Take the disk's job, nodes, filter and temporary bitmaps out of QEMU, and
        delete its fleecing image (never kept, whatever the outcome)."""
        dp = d.plan
        try:
            async with self._probe_lock:  # no probe reads a view being taken down
                problems = await teardown.take_down(self.mon, dp, job_lost=dp.job_id in self._lost)
        except VirError as exc:  # QEMU went away meanwhile: its nodes went with it
            problems = [] if not self.mon.connected else [str(exc)]
        for problem in problems:
            log.warning("%s", problem)
        if dp.fleecing and dp.sync != "none" and dp.fleece_path:
            self._remove_file(dp.fleece_path)
        d.cleaned = True
        await self._changed()

    async def _cancel_disk(self, jid: str) -> None:
        """Ask one running disk to stop: its block job if it has one, else it ends now."""
        d = self.disks[jid]
        d.state = CANCELLING
        if d.plan.has_qemu_job:
            try:
                await self.mon.execute("block-job-cancel", {"device": jid, "force": True})
                return
            except VirError as exc:
                if d.launched:  # it concluded meanwhile: its event is already queued
                    log.info("cancel of %s: %s", jid, exc)
                    return
        # no block job (a fleecing pull, or a push whose job never started)
        self._events.put_nowait({"event": DISK_END, "data": {"id": jid, "cancelled": True}})

    async def _cancel_running(self) -> None:
        for jid, other in self.disks.items():
            if other.state == RUNNING:
                await self._cancel_disk(jid)

    async def _temp_used(self) -> dict[str, int]:
        """Bytes each node's image holds, by node name: a pull's fleecing image is its
        libvirt disk_temp_used. One query for all disks."""
        sizes: dict[str, int] = {}
        with contextlib.suppress(VirError):
            for node in await self.mon.execute("query-named-block-nodes", {"flat": True}):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    sizes[node["node-name"]] = int(node["image"]["actual-size"])
        return sizes

    async def _stop_exports(self, *, only_if_ours: bool = False) -> None:
        """Remove every export (dropping clients) and the NBD server, once.

        With ``only_if_ours`` (QEMU may have been restarted since), QEMU-wide things
        are touched only if they are still ours: QEMU has one NBD server, and after
        a restart it may be the orchestrator's.
        """
        present: set[str] | None = None
        if only_if_ours and (self.exports_added or self.server_started):
            try:
                present = {e["id"] for e in await self.mon.execute("query-block-exports")}
            except VirError:
                present = set()
        ours_alive = present is None or bool(present & set(self.exports_added))
        for eid in list(self.exports_added):
            if present is not None and eid not in present:
                self.exports_added.remove(eid)
                continue
            deleted = self._export_deleted.setdefault(eid, asyncio.Event())
            try:
                await self.mon.execute("block-export-del", {"id": eid, "mode": "hard"})
            except VirError as exc:
                log.warning("could not delete export %s: %s", eid, exc)
                deleted.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(deleted.wait(), EXPORT_DELETE_TIMEOUT)
            if eid in self.exports_added:  # an abort and a disk's end may both stop it
                self.exports_added.remove(eid)
        if self.server_started:
            if ours_alive:
                with contextlib.suppress(VirError):
                    await self.mon.execute("nbd-server-stop")
            self.server_started = False
        for oid in list(self.objects_added):
            with contextlib.suppress(VirError):
                await self.mon.execute("object-del", {"id": oid})
            if oid in self.objects_added:
                self.objects_added.remove(oid)


def explain_fleecing_error(dp: DiskPlan, op: str | None, error: str) -> str:
    """Say what broke, the way an operator needs it: QEMU's own words for a broken
    snapshot are "Permission denied", which points nowhere."""
    if op == "write":
        return (
            f"writing the backup of disk '{dp.disk}' to '{dp.path}' failed: {error}; "
            "the guest's writes were not affected"
        )
    if op == "read" or "Permission denied" in error or "broke" in error:
        return broken_view_message(dp)
    return f"the backup of disk '{dp.disk}' failed: {error}; the guest's writes were not affected"


def broken_view_message(dp: DiskPlan) -> str:
    path = dp.fleece_path or "?"
    cause = f"no space left, an I/O error, or no answer within cbw-timeout={dp.cbw_timeout}s"
    with contextlib.suppress(OSError):
        fs = os.statvfs(os.path.dirname(path) or ".")
        free = fs.f_bavail * fs.f_frsize
        if free < FULL_BELOW:
            cause = f"its filesystem is full, {free} bytes free"
    return (
        f"the point-in-time view of disk '{dp.disk}' broke: its fleecing image '{path}' "
        f"could not take the data the guest overwrote ({cause}); the guest's writes were "
        "not affected, but this backup is incomplete"
    )
