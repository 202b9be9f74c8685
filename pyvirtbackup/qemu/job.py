"""Running a planned backup: prepare with rollback, one transaction, follow the jobs,
clean up per disk, and report the outcome.

The sequence is libvirt's (qemuBackupBegin and qemuBackupNotifyBlockjobEnd): stores
are created and opened, every disk starts in one ``transaction`` so all are captured
at the same instant, and as each disk's job concludes it is dismissed, its store
nodes deleted and its temporary bitmap removed. When the last disk is done, files
we created are deleted where the backup did not complete (and pull scratch files
always), and the result is recorded. Whatever happens, nothing of ours stays in QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from ..enums import JobOperation, JobType
from ..errors import ErrorDomain, ErrorNumber, VirError
from . import ownfiles, probe
from .executor import StepRunner
from .jobcore import (
    CANCELLED,
    CANCELLING,
    COMPLETE,
    FAILED,
    PREPARING,
    RUNNING,
    STARTED,
    Callbacks,
    DiskRuntime,
    JobResult,
    MonitorLost,
    finish_even_if_cancelled,
    progress,
)
from .jobevents import DISK_END, JobEvents, broken_view_message
from .listen import Listener
from .monitor import Monitor
from .plan import Plan, Step
from .reattach import JobRecord

__all__ = [
    "CANCELLED",
    "COMPLETE",
    "FAILED",
    "PREPARING",
    "RUNNING",
    "STARTED",
    "BackupJob",
    "Callbacks",
    "JobResult",
    "MonitorLost",
]

log = logging.getLogger(__name__)

VIEW_CHECK_INTERVAL = 2.0  # seconds between checks of a fleecing pull's views
ENDED = (COMPLETE, FAILED, CANCELLED)


class BackupJob(JobEvents, JobRecord, StepRunner):
    """One backup of one domain, from begin to the last cleanup.

    Its record (``snapshot()``, saved by the driver through ``Callbacks.changed``) is
    written before the first change to QEMU and again after every step that matters,
    so that a process that dies at any point leaves enough for the next one to take
    the job over or undo it: libvirt keeps the same in its status XML.
    """

    def __init__(
        self,
        mon: Monitor,
        plan: Plan,
        callbacks: Callbacks | None = None,
        *,
        listener: Listener | None = None,
    ) -> None:
        self.mon = mon
        self.plan = plan
        self.listener = listener  # the NBD server's socket, which the job cleans up
        self.callbacks = callbacks or Callbacks()
        self.disks = {dp.job_id: DiskRuntime(dp) for dp in plan.disks}
        self.phase = PREPARING
        self.started_wall = time.time()
        self._started = time.monotonic()
        self.finished_elapsed: int | None = None
        self.cancel_requested = False
        self.result: JobResult | None = None
        self.done = asyncio.Event()
        self.created_files: list[str] = []
        self.created_ids: dict[str, ownfiles.FileId] = {}  # only these are ever unlinked
        self.fdsets: dict[str, int] = {}  # image path -> QEMU fd set of our descriptor
        self._opened: dict[str, tuple[int, bool]] = {}  # created, not yet handed over
        self.exports_added: list[str] = []
        self.server_started = False
        self.objects_added: list[str] = []
        self.first_error: str | None = None
        self.detached = False  # stopped following (monitor lost, QEMU's fate unknown)
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._aborting: set[str] = set()
        self._handler: int | None = None
        self._disconnect_handle: int | None = None
        self._worker: asyncio.Task[None] | None = None
        self._busy: asyncio.Task[None] | None = None
        self._terminating = False
        self._export_deleted: dict[str, asyncio.Event] = {}
        self._lost: set[str] = set()
        self._ended: dict[str, dict[str, Any]] = {}  # BLOCK_JOB_COMPLETED/CANCELLED data
        self.guest_shut_down = False  # the guest powered off while the job ran
        self.paused_by_us = False  # the guest is stopped for the instant (on record)
        self.pause_ms: float | None = None  # how long the last instant paused the guest
        self._probe_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    # timing and stats -----------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.plan.mode

    def elapsed_ms(self) -> int:
        if self.finished_elapsed is not None:
            return self.finished_elapsed
        return int((time.monotonic() - self._started) * 1000)

    async def stats(self) -> dict[str, Any]:
        """Live statistics, libvirt's typed-parameter names (qemuBackupGetJobInfoStats)."""
        live: dict[str, dict[str, Any]] = {}
        if any(d.state == RUNNING for d in self.disks.values()) and self.mon.connected:
            with contextlib.suppress(VirError):
                live = {j["id"]: j for j in await self.mon.execute("query-jobs")}
        current = total = 0
        broken: list[str] = []
        used: dict[str, int] | None = None
        for jid, d in self.disks.items():
            if d.state == RUNNING and jid in live:
                cur, tot = progress(d.plan, live[jid])
            elif d.state == RUNNING and not d.plan.has_qemu_job and self.mon.connected:
                used = used if used is not None else await self._temp_used()
                cur, tot = used.get(d.plan.fleece_storage_node or "", 0), d.plan.size
                problem = await self._check_view(jid)
                if problem:
                    broken.append(problem)
            else:
                cur, tot = d.current, d.total
            current += cur
            total += tot
        stats: dict[str, Any] = {
            "type": JobType.UNBOUNDED,
            "operation": int(JobOperation.BACKUP),
            "time_elapsed": self.elapsed_ms(),
        }
        stats.update(self._disk_numbers(current, total))
        if broken:  # the job ends a moment later; say why now
            stats["errmsg"] = broken[0]
        return stats

    def _disk_numbers(self, current: int, total: int) -> dict[str, int]:
        if self.mode == "push":
            if total or current:
                return {
                    "disk_total": total,
                    "disk_processed": current,
                    "disk_remaining": max(total - current, 0),
                }
            return {}
        out = {}
        if current:
            out["disk_temp_used"] = current
        if total:
            out["disk_temp_total"] = total
        return out

    # begin ----------------------------------------------------------------------

    async def start(self) -> None:
        """Record the intent, make the stores, take the instant, then what follows.

        The instant is the transaction (checkpoint bitmaps, the direct jobs) and the
        switch of fleeced devices onto their filters, with the guest paused around
        both when it runs, so that every disk and bitmap share it. On failure (or
        cancellation) before the transaction succeeds everything added is rolled
        back; after it, the backup is aborted and cleaned up as after an abort, and
        the error is raised once nothing of ours is left.
        """
        self._listen()
        await self._changed()  # the intent: names of everything we are about to make
        lanes: list[list[Step]] = [[] for _ in self.plan.stores]
        undo: list[Step] = []
        try:
            # every file first, in one go: one record write for all of them, and the
            # descriptor hand-overs (which need a silent monitor) before the lanes
            for steps, out in zip(self.plan.stores, lanes, strict=True):
                for step in steps:
                    if step.kind == "create-file":
                        await self._open_image(step.args)
                        out.extend(step.undo)
            await self._changed()
            await self._hand_over_images()
            # then each disk's nodes in its own lane: QEMU answers them in turn, but
            # their round trips overlap, which is most of a many-disk begin
            results = await asyncio.gather(
                *(
                    self._run_lane([s for s in steps if s.kind != "create-file"], out)
                    for steps, out in zip(self.plan.stores, lanes, strict=True)
                ),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
            await self._changed()  # the files we created
            # then, in libvirt's order, the monitor prologue: TLS object, NBD server
            await self._run_lane(self.plan.prepare, undo)
            if self.plan.prepare:
                await self._changed()
            await self._pause()
            try:
                await self._transaction()
            except BaseException:
                await finish_even_if_cancelled(self._resume())
                raise
        except BaseException:
            for out in lanes:
                undo += out
            await finish_even_if_cancelled(self._rollback(undo))
            await finish_even_if_cancelled(self._drop_fdsets())
            if self.listener is not None:
                self.listener.cleanup()
            self._unlisten()
            self.done.set()
            raise
        self.phase = STARTED
        for d in self.disks.values():
            d.state = RUNNING
            d.launched = not d.plan.fleecing  # the direct jobs were in the transaction
        try:
            try:
                for step in self.plan.switch:
                    await self._run(step)
            finally:
                await finish_even_if_cancelled(self._resume())
            await self._changed()
            self._worker = asyncio.create_task(self._work(), name="pvb-backup-job")
            for step in self.plan.after:
                await self._run(step)
                if step.command == "transaction":  # the fleecing pushes' jobs
                    for d in self.disks.values():
                        d.launched = True
        except BaseException as exc:
            self.first_error = self.first_error or str(exc)
            if self._worker is None:
                self._worker = asyncio.create_task(self._work(), name="pvb-backup-job")
            await finish_even_if_cancelled(self.abort(wait=True))
            raise
        await self._changed()
        self._watch_snapshots()

    # a pull's views, checked while clients read -------------------------------------

    def _watch_snapshots(self) -> None:
        """Check a fleecing pull's views every few seconds: QEMU tells nobody when one
        breaks, and a broken one must end the backup promptly and loudly."""
        if self._watcher is None and any(not d.plan.has_qemu_job for d in self.disks.values()):
            self._watcher = asyncio.create_task(self._watch(), name="pvb-view-watch")

    def _stop_watching(self) -> None:
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self._watcher = None

    async def _watch(self) -> None:
        while not self.done.is_set() and not self.detached:
            await asyncio.sleep(VIEW_CHECK_INTERVAL)
            for jid, d in list(self.disks.items()):
                if d.state == RUNNING and not d.plan.has_qemu_job and self.mon.connected:
                    await self._check_view(jid)

    async def _check_view(self, jid: str) -> str | None:
        """Read the disk's view; if it broke, end the disk with the reason."""
        d = self.disks[jid]
        async with self._probe_lock:
            if d.state != RUNNING:
                return None
            try:
                error = await probe.view_error(self.mon, d.plan)
            except VirError as exc:  # taken down meanwhile, or QEMU gone: not a verdict
                log.info("could not check the view of disk %s: %s", d.plan.disk, exc)
                return None
        if error is None:
            return None
        message = broken_view_message(d.plan)
        log.error("%s (QEMU: %s)", message, error)
        d.error = d.error or message
        self._events.put_nowait(
            {"event": DISK_END, "data": {"id": jid, "error": message, "broken": True}}
        )
        return message

    # the instant --------------------------------------------------------------------

    async def _pause(self) -> None:
        """Stop a running guest for the instant, when devices are switched one by one.

        On record first: a process killed while the guest is stopped leaves the
        next attach a record that says to resume it.
        """
        if not self.plan.pauses:
            return
        status = (await self.mon.execute("query-status")).get("status")
        if status != "running":  # paused, prelaunch: nothing runs to be stopped
            return
        self.paused_by_us = True
        await self._changed()
        self._paused_at = time.monotonic()
        await self.mon.execute("stop")

    async def _resume(self) -> None:
        """Let the guest run again; tried hard, since a stopped guest is the worst outcome."""
        if not self.paused_by_us:
            return
        for attempt in range(3):
            try:
                await self.mon.execute("cont")
                break
            except VirError as exc:
                log.error("could not resume the guest after the backup's instant: %s", exc)
                if not self.mon.connected:
                    return  # the record still says paused: the next attach resumes it
                await asyncio.sleep(0.1 * (attempt + 1))
        self.pause_ms = (time.monotonic() - self._paused_at) * 1000
        self.paused_by_us = False

    def final_type(self) -> JobType:
        states = [d.state for d in self.disks.values()]
        if FAILED in states:
            return JobType.FAILED
        if CANCELLED in states and self.mode == "push":
            return JobType.CANCELLED
        return JobType.COMPLETED

    async def _terminate(self) -> None:
        if self._terminating:
            return
        self._terminating = True
        if self.mode == "push" and self.final_type() == JobType.COMPLETED:
            self._check_targets()
        final = self.final_type()
        # libvirt's rule (qemuBackupJobTerminate): a push keeps the targets we made
        # only if the whole backup completed; a half backup is no backup
        keep = self.mode == "push" and final == JobType.COMPLETED
        for dp in self.plan.disks:
            if dp.path in self.created_files and not keep:
                self._remove_file(dp.path)
            if dp.fleecing and dp.fleece_path and dp.fleece_path != dp.path:
                self._remove_file(dp.fleece_path)  # a fleecing image is never kept
        self._stop_watching()
        if self.listener is not None:
            self.listener.cleanup()
        with contextlib.suppress(VirError):
            await self._drop_fdsets()
        self.finished_elapsed = self.elapsed_ms()
        current = sum(d.current for d in self.disks.values())
        total = sum(d.total for d in self.disks.values())
        stats: dict[str, Any] = {
            "type": final,
            "operation": int(JobOperation.BACKUP),
            "time_elapsed": self.finished_elapsed,
        }
        stats.update(self._disk_numbers(current, total))
        stats["success"] = final == JobType.COMPLETED
        if self.first_error:
            stats["errmsg"] = self.first_error
        self.result = JobResult(final, stats)
        await self._restore_shutdown_action()
        self._unlisten()
        self.done.set()
        if self.callbacks.finished:
            res = self.callbacks.finished(self.result)
            if asyncio.iscoroutine(res):
                await res
        await self._carry_out_shutdown()

    def _check_targets(self) -> None:
        """A completed push's targets must still be the files QEMU wrote: a path that
        now names another file (replaced, renamed over, a link) holds no backup of
        ours, and saying "completed" would hand the user someone else's file."""
        for d in self.disks.values():
            path = d.plan.path
            ident = self.created_ids.get(path)
            if path not in self.created_files or ident is None:
                continue  # not ours to vouch for: a reused target, a block device
            if ownfiles.is_same(path, ident):
                continue
            d.state = FAILED
            d.error = (
                f"the target '{path}' of disk '{d.plan.disk}' was replaced while the backup "
                "ran: that path no longer names the file the backup wrote, so it holds no "
                f"backup of ours; someone who can write '{os.path.dirname(path) or '.'}' "
                "changed it"
            )
            log.error("%s", d.error)
            self.first_error = self.first_error or d.error

    async def _restore_shutdown_action(self) -> None:
        previous = self.plan.shutdown_restore
        if previous is None or not self.mon.connected:
            return
        try:
            await self.mon.execute("set-action", {"shutdown": previous})
        except VirError as exc:
            log.error("could not restore QEMU's shutdown action '%s': %s", previous, exc)

    async def _carry_out_shutdown(self) -> None:
        """The guest powered off while the backup ran and nobody resumed it since: do
        what it asked for now that the backup is over."""
        # status "shutdown" comes only from a guest power-off while the action was
        # pause, which also covers one no driver saw (the event came while none ran)
        if not (self.plan.shutdown_restore and self.mon.connected):
            return
        with contextlib.suppress(VirError):
            status = (await self.mon.execute("query-status")).get("status")
            if status == "shutdown" and self.plan.shutdown_restore == "poweroff":
                log.warning("the guest shut down during the backup; QEMU quits now")
                await self.mon.execute("quit")

    async def _qemu_gone(self) -> None:
        """QEMU exited: its nodes and jobs went with it; our files must go too."""
        reason = self._gone_reason()
        for d in self.disks.values():
            if d.state == RUNNING:
                d.state = FAILED
                d.error = reason
            elif d.state == CANCELLING:
                d.state = CANCELLED
            d.cleaned = True
        self.first_error = self.first_error or reason
        self.exports_added.clear()
        self.server_started = False
        self.objects_added.clear()
        await self._terminate()

    async def _changed(self) -> None:
        if self.callbacks.changed:
            res = self.callbacks.changed()
            if asyncio.iscoroutine(res):
                await res

    # abort ----------------------------------------------------------------------------

    async def abort(self, *, wait: bool = True, timeout: float = 120.0) -> None:
        """Cancel every running disk job; with ``wait``, return once all is cleaned up."""
        self.cancel_requested = True
        if self.mode == "pull" and self.mon.connected:
            # a view that broke since it was last checked fails the backup, abort or
            # not: its clients got errors, and the final stats must not say COMPLETED
            for jid, d in list(self.disks.items()):
                if d.state == RUNNING and not d.plan.has_qemu_job:
                    await self._check_view(jid)
            # clients go first: once a fleecing job is cancelled its scratch node
            # reads through to the live disk, and a client still reading would get
            # a mix of then and now
            await self._stop_exports()
        running = [jid for jid, d in self.disks.items() if d.state == RUNNING]
        # a disk that has ended but is not cleaned up yet is being taken down by the
        # event worker, which ends the job after its last disk: terminating here would
        # return before the nodes (and the filter in the guest's path) are gone
        pending = any(
            d.state in (RUNNING, CANCELLING) or (d.state in ENDED and not d.cleaned)
            for d in self.disks.values()
        )
        if not pending and not self.done.is_set():
            await self._terminate()
        for jid in running:
            # a disk may have concluded while we awaited the previous cancel: its
            # final state must not be overwritten, or the job never terminates
            if self.disks[jid].state == RUNNING:
                await self._cancel_disk(jid)
        await self._changed()
        if wait:
            try:
                await asyncio.wait_for(self.done.wait(), timeout)
            except TimeoutError:
                raise VirError(
                    ErrorNumber.OPERATION_TIMEOUT,
                    ErrorDomain.QEMU,
                    f"backup jobs did not stop within {timeout:g}s of the abort",
                ) from None

    async def close(self, timeout: float = 30.0) -> None:
        """Stop following the job (the driver detaches); QEMU's jobs keep running.

        A disk's end already being handled is let finish first (up to ``timeout``),
        so that what the record says matches QEMU.
        """
        if self._busy is not None and not self._busy.done():
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._busy), timeout)
        self._unlisten()
        self._stop_watching()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
