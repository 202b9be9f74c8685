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
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..enums import BlockJobStatus, JobOperation, JobType
from ..errors import ErrorDomain, ErrorNumber, VirError
from . import jobrecord, ownfiles
from .listen import Listener
from .monitor import Monitor
from .plan import DiskPlan, Plan, Step

log = logging.getLogger(__name__)

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


def _progress(dp: DiskPlan, qjob: dict[str, Any]) -> tuple[int, int]:
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


def _exists_error(path: str, disk: str) -> VirError:
    return VirError(
        ErrorNumber.INVALID_ARG, ErrorDomain.QEMU, f"store '{path}' for backup of '{disk}' exists"
    )


class BackupJob:
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
        for jid, d in self.disks.items():
            if d.state == RUNNING and jid in live:
                cur, tot = _progress(d.plan, live[jid])
                current += cur
                total += tot
            else:
                current += d.current
                total += d.total
        stats: dict[str, Any] = {
            "type": JobType.UNBOUNDED,
            "operation": int(JobOperation.BACKUP),
            "time_elapsed": self.elapsed_ms(),
        }
        stats.update(self._disk_numbers(current, total))
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
        """Record the intent, make the stores, run the transaction, then the exports.

        On failure (or cancellation) before the transaction succeeds everything
        added is rolled back; after it, the jobs are cancelled and cleaned up as
        after an abort, and the error is raised once nothing of ours is left.
        """
        self._listen()
        await self._changed()  # the intent: names of everything we are about to make
        lanes: list[list[Step]] = [[] for _ in self.plan.stores]
        undo: list[Step] = []
        try:
            # each disk's store is made in its own lane: QEMU answers them in turn,
            # but their round trips overlap, which is most of a many-disk begin
            results = await asyncio.gather(
                *(
                    self._run_lane(steps, out)
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
            await self._transaction()
        except BaseException:
            for out in lanes:
                undo += out
            await _finish_even_if_cancelled(self._rollback(undo))
            if self.listener is not None:
                self.listener.cleanup()
            self._unlisten()
            self.done.set()
            raise
        self.phase = STARTED
        for d in self.disks.values():
            d.state = RUNNING
        await self._changed()
        self._worker = asyncio.create_task(self._work(), name="pvb-backup-job")
        try:
            for step in self.plan.after:
                await self._run(step)
        except BaseException as exc:
            self.first_error = self.first_error or str(exc)
            await _finish_even_if_cancelled(self.abort(wait=True))
            raise
        await self._changed()

    async def _transaction(self) -> None:
        """The one transaction. If QEMU did not answer in time, ask what happened:
        rolling back a transaction that did run would orphan running jobs."""
        try:
            await self.mon.transaction(self.plan.transaction)
        except VirError as exc:
            if exc.code != ErrorNumber.OPERATION_TIMEOUT:
                raise
            jobs = {j["id"] for j in await self.mon.execute("query-jobs", timeout=300)}
            if not set(self.disks) <= jobs:
                raise
            log.warning("the transaction answered late but ran; going on")

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

    # a record that outlives the process, and taking a job over from it -------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a later process needs to take this job over (or clean up after it)."""
        return {
            "version": 2,
            "phase": self.phase,
            "mode": self.mode,
            "started": self.started_wall,
            "disks": [
                {
                    "plan": asdict(d.plan),
                    "state": d.state,
                    "current": d.current,
                    "total": d.total,
                    "error": d.error,
                    "cleaned": d.cleaned,
                }
                for d in self.disks.values()
            ],
            "created_files": list(self.created_files),
            "created_ids": {p: list(i) for p, i in self.created_ids.items()},
            "exports": list(self.exports_added),
            "nbd_server": self.server_started,
            "objects": list(self.objects_added),
            "cancel_requested": self.cancel_requested,
            "first_error": self.first_error,
            "nbd_listener": (
                {
                    "transport": self.listener.transport,
                    "host": self.listener.host,
                    "port": self.listener.port,
                    "path": self.listener.path,
                    "ident": list(self.listener.ident) if self.listener.ident else None,
                    "private_dir": self.listener.private_dir,
                }
                if self.listener is not None
                else None
            ),
        }

    @classmethod
    def restore(
        cls, mon: Monitor, record: dict[str, Any], callbacks: Callbacks | None = None
    ) -> BackupJob:
        """Rebuild a job from ``snapshot()``; ``resume()`` then reconciles it with QEMU.

        A record that is not as we write it raises ``jobrecord.RecordError``.
        """
        jobrecord.check(record)
        plans = [DiskPlan(**d["plan"]) for d in record["disks"]]
        job = cls(mon, Plan(mode=record["mode"], disks=plans), callbacks)
        job.phase = record.get("phase", STARTED)
        for d in record["disks"]:
            rt = job.disks[d["plan"]["job_id"]]
            rt.state = d.get("state") or (RUNNING if job.phase == STARTED else "")
            rt.current, rt.total = d.get("current", 0), d.get("total", 0)
            rt.error, rt.cleaned = d.get("error"), bool(d.get("cleaned"))
        job.started_wall = float(record.get("started", time.time()))
        job._started = time.monotonic() - max(time.time() - job.started_wall, 0.0)
        job.created_files = list(record.get("created_files", []))
        job.created_ids = {p: (i[0], i[1]) for p, i in record.get("created_ids", {}).items()}
        job.exports_added = list(record.get("exports", []))
        job.server_started = bool(record.get("nbd_server"))
        job.objects_added = list(record.get("objects", []))
        job.cancel_requested = bool(record.get("cancel_requested"))
        job.first_error = record.get("first_error")
        lrec = record.get("nbd_listener")
        if lrec:
            ident = tuple(lrec["ident"]) if lrec.get("ident") else None
            job.listener = Listener(
                lrec["transport"],
                host=lrec.get("host"),
                port=lrec.get("port"),
                path=lrec.get("path"),
                ident=ident,  # type: ignore[arg-type]
                private_dir=lrec.get("private_dir"),
            )
        return job

    async def resume(self) -> list[str]:
        """Take over in QEMU: follow jobs still running, finish those that ended unseen,
        undo a begin that died before its transaction.

        Returns what did not match QEMU, for the caller to report. A vanished job's
        disk is failed and its leftovers cleaned, never dropped silently.
        """
        self._listen()
        spared = await jobrecord.spare_persistent_bitmaps(self.mon, self.plan.disks)
        jobs = {j["id"]: j for j in await self.mon.execute("query-jobs")}
        if self.phase == PREPARING:
            if not set(self.disks) & set(jobs):
                return spared + await self._undo_interrupted_begin(jobs)
            # the transaction ran before the process died: a started job
            self.phase = STARTED
            for d in self.disks.values():
                d.state = d.state or RUNNING
        problems = spared + await self._reconcile(jobs)
        self._worker = asyncio.create_task(self._work(), name="pvb-backup-job")
        if not any(d.state in (RUNNING, CANCELLING) for d in self.disks.values()):
            await self._terminate()
        return problems

    async def _reconcile(self, jobs: dict[str, dict[str, Any]]) -> list[str]:
        """Bring our view in line with QEMU's jobs (after a restart or a reconnect)."""
        problems: list[str] = []
        for jid, d in self.disks.items():
            if d.state not in (RUNNING, CANCELLING):
                if not d.cleaned:  # its outcome was recorded; finish its cleanup
                    await self._clean_disk(d)
                continue
            qjob = jobs.get(jid)
            if qjob is None:
                problems.append(
                    f"backup job '{jid}' of disk '{d.plan.disk}' is gone from QEMU "
                    "(QEMU restarted, or someone dismissed it)"
                )
                self._lost.add(jid)
                await self._disk_concluded(jid)
            elif qjob.get("status") in ("concluded", "null"):
                await self._disk_concluded(jid)
        await self._changed()
        return problems

    async def _undo_interrupted_begin(self, jobs: dict[str, dict[str, Any]]) -> list[str]:
        """A begin died before its transaction: remove what its record says it made."""
        nodes = {
            n["node-name"]
            for n in await self.mon.execute("query-named-block-nodes", {"flat": True})
        }
        for dp in self.plan.disks:
            for jid in (f"pvb-create-{dp.store_id}-storage", f"pvb-create-{dp.store_id}-format"):
                if jid in jobs:
                    with contextlib.suppress(VirError):
                        await self.mon.execute("job-cancel", {"id": jid})
                    with contextlib.suppress(VirError):
                        await self.mon.execute("job-dismiss", {"id": jid})
            for node in (dp.format_node, dp.storage_node):
                if node in nodes:
                    with contextlib.suppress(VirError):
                        await self.mon.execute("blockdev-del", {"node-name": node})
        await self._stop_exports(only_if_ours=True)
        for path in list(self.created_files):
            self._remove_file(path)
        if self.listener is not None:
            self.listener.cleanup()
        self._unlisten()
        self.done.set()
        return [
            "a backup begin was interrupted before its jobs started; what it had made was removed"
        ]

    async def _run_lane(self, steps: list[Step], undo: list[Step]) -> None:
        """Run steps in order, keeping in ``undo`` what reverses the ones done so far."""
        for step in steps:
            await self._run(step)
            undo.extend(step.undo)

    async def _run(self, step: Step) -> None:
        if step.kind == "create-file":
            self._create_file(step.args["path"], step.args.get("disk", ""))
        elif step.kind == "remove-file":
            self._remove_file(step.args["path"])
        elif step.kind == "qmp":
            try:
                await self.mon.execute(step.command, step.args)
            except VirError:
                if step.ignore_errors:
                    return
                raise
            self._note_resource(step)
        elif step.kind == "qmp-job":
            await self._run_qmp_job(step)
        elif step.kind == "pass-fd":
            if self.listener is None:  # pragma: no cover - a driver bug
                raise AssertionError("a pass-fd step needs the job's listener")
            await self.mon.pass_fd(self.listener.fileno(), step.args["fdname"])
            # QEMU holds its own copy now; ours would keep accepting connections
            # after QEMU's server stopped
            self.listener.release()
        elif step.kind == "publish-socket":
            if self.listener is None:  # pragma: no cover - a driver bug
                raise AssertionError("a publish-socket step needs the job's listener")
            self.listener.publish(step.args["mode"])
        else:  # pragma: no cover - a planner bug
            raise AssertionError(f"unknown step kind {step.kind}")

    def _note_resource(self, step: Step) -> None:
        if step.command == "block-export-add":
            self.exports_added.append(step.args["id"])
        elif step.command == "nbd-server-start":
            self.server_started = True
        elif step.command == "nbd-server-stop":
            self.server_started = False
        elif step.command == "object-add":
            self.objects_added.append(step.args["id"])
        elif step.command == "object-del" and step.args["id"] in self.objects_added:
            self.objects_added.remove(step.args["id"])

    def _create_file(self, path: str, disk: str) -> None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise _exists_error(path, disk or self._disk_of(path)) from None
        except OSError as exc:
            raise VirError(
                ErrorNumber.SYSTEM_ERROR,
                ErrorDomain.QEMU,
                f"cannot create backup store '{path}': {exc.strerror}",
            ) from None
        try:
            ident = ownfiles.file_id(os.fstat(fd))
        finally:
            os.close(fd)
        self.created_files.append(path)
        self.created_ids[path] = ident

    def _disk_of(self, path: str) -> str:
        for d in self.plan.disks:
            if d.path == path:
                return d.disk
        return "?"

    def _remove_file(self, path: str) -> None:
        if path in self.created_files:
            ownfiles.unlink_if_same(path, self.created_ids.pop(path, None))
            self.created_files.remove(path)

    async def _run_qmp_job(self, step: Step) -> None:
        jid = step.args["job-id"]
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[jid] = fut
        started = True  # from the moment it is sent: a cancel may come before the answer
        try:
            await self.mon.execute(step.command, step.args)
            outcome = await asyncio.wait_for(fut, CREATE_TIMEOUT)
            error = None
            if outcome == "aborted":  # only then is there an error to fetch
                jobs = {j["id"]: j for j in await self.mon.execute("query-jobs")}
                error = jobs.get(jid, {}).get("error") or "the job was aborted"
            await self.mon.execute("job-dismiss", {"id": jid})
            started = False
        except TimeoutError:
            raise VirError(
                ErrorNumber.OPERATION_TIMEOUT,
                ErrorDomain.QEMU,
                f"{step.command} job '{jid}' did not finish within {CREATE_TIMEOUT:g}s",
            ) from None
        finally:
            self._waiters.pop(jid, None)
            if started:  # failed or cancelled half way: the job must not stay in QEMU
                await _finish_even_if_cancelled(self._drop_job(jid))
        if error:
            raise VirError(
                ErrorNumber.OPERATION_FAILED, ErrorDomain.QEMU, f"failed to format image: '{error}'"
            )

    async def _drop_job(self, jid: str) -> None:
        """Cancel and dismiss a job of ours, whatever state it is in."""
        if not self.mon.connected:
            return
        with contextlib.suppress(VirError):
            await self.mon.execute("job-cancel", {"id": jid})
        for _ in range(50):
            try:
                await self.mon.execute("job-dismiss", {"id": jid})
                return
            except VirError as exc:
                if "not found" in exc.message or "No job" in exc.message:
                    return
            await asyncio.sleep(0.1)

    async def _rollback(self, undo: list[Step]) -> None:
        for step in reversed(undo):
            try:
                await self._run(step)
            except Exception as exc:  # keep undoing the rest
                log.warning("rollback step %s failed: %s", step.describe(), exc)

    # events -----------------------------------------------------------------------

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
        if name == "BLOCK_JOB_ERROR":
            op = data.get("operation", "I/O")
            self.disks[data["device"]].error = self.disks[data["device"]].error or f"{op} error"
            return
        if data.get("status") == "concluded":
            await self._disk_concluded(data["id"])

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

    # one disk's end ---------------------------------------------------------------------

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

    async def _disk_concluded(self, jid: str) -> None:
        d = self.disks[jid]
        if d.state not in (RUNNING, CANCELLING):
            return
        if self.mode == "pull":
            # clients go first: once this or any fleecing job stops, a scratch node
            # reads through to the live disk, and a reader would mix then and now
            await self._stop_exports(only_if_ours=bool(self._lost))
        info = await self._job_info(jid)
        if "current-progress" in info:
            d.current, d.total = _progress(d.plan, info)
        error = info.get("error")
        if d.state == CANCELLING or (self.cancel_requested and error):
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
        """Dismiss the disk's job and remove its store nodes and temporary bitmap."""
        dp = d.plan
        if dp.job_id not in self._lost:
            with contextlib.suppress(VirError):
                await self.mon.execute("job-dismiss", {"id": dp.job_id})
        for node in (dp.format_node, dp.storage_node):
            try:
                await self.mon.execute("blockdev-del", {"node-name": node})
            except VirError as exc:
                if dp.job_id not in self._lost:
                    log.warning("could not delete node %s: %s", node, exc)
        if self.mode == "push" and dp.bitmap and dp.bitmap_node:
            with contextlib.suppress(VirError):
                await self.mon.execute(
                    "block-dirty-bitmap-remove", {"node": dp.bitmap_node, "name": dp.bitmap}
                )
        d.cleaned = True
        await self._changed()

    async def _cancel_running(self) -> None:
        for jid, other in self.disks.items():
            if other.state == RUNNING:
                other.state = CANCELLING
                with contextlib.suppress(VirError):
                    await self.mon.execute("block-job-cancel", {"device": jid, "force": True})

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
            self.exports_added.remove(eid)
        if self.server_started:
            if ours_alive:
                with contextlib.suppress(VirError):
                    await self.mon.execute("nbd-server-stop")
            self.server_started = False
        for oid in list(self.objects_added):
            with contextlib.suppress(VirError):
                await self.mon.execute("object-del", {"id": oid})
            self.objects_added.remove(oid)

    # the end --------------------------------------------------------------------------

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
        final = self.final_type()
        # libvirt's rule (qemuBackupJobTerminate): a push keeps the targets we made
        # only if the whole backup completed; a half backup is no backup
        keep = self.mode == "push" and final == JobType.COMPLETED
        for dp in self.plan.disks:
            if dp.path in self.created_files and not keep:
                self._remove_file(dp.path)
        if self.listener is not None:
            self.listener.cleanup()
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
        self._unlisten()
        self.done.set()
        if self.callbacks.finished:
            res = self.callbacks.finished(self.result)
            if asyncio.iscoroutine(res):
                await res

    async def _qemu_gone(self) -> None:
        """QEMU exited: its nodes and jobs went with it; our files must go too."""
        for d in self.disks.values():
            if d.state == RUNNING:
                d.state = FAILED
                d.error = "QEMU exited while the backup was running"
            elif d.state == CANCELLING:
                d.state = CANCELLED
            d.cleaned = True
        self.first_error = self.first_error or "QEMU exited while the backup was running"
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
            # clients go first: once a fleecing job is cancelled its scratch node
            # reads through to the live disk, and a client still reading would get
            # a mix of then and now
            await self._stop_exports()
        running = [jid for jid, d in self.disks.items() if d.state == RUNNING]
        pending = any(d.state in (RUNNING, CANCELLING) for d in self.disks.values())
        if not pending and not self.done.is_set():
            await self._terminate()
        for jid in running:
            # a disk may have concluded while we awaited the previous cancel: its
            # final state must not be overwritten, or the job never terminates
            if self.disks[jid].state != RUNNING:
                continue
            self.disks[jid].state = CANCELLING
            try:
                await self.mon.execute("block-job-cancel", {"device": jid, "force": True})
            except VirError as exc:
                # the job may have concluded meanwhile: its event is already queued
                log.info("cancel of %s: %s", jid, exc)
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
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None


async def _finish_even_if_cancelled(coro: Awaitable[Any]) -> None:
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
