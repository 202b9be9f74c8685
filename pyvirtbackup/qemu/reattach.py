"""A running backup's record, and taking the job over from it after a restart:
follow jobs still running, finish those that ended unseen, undo a begin that died
half way. libvirt keeps the same in its status XML across a libvirtd restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..errors import VirError
from . import jobrecord, teardown
from .jobcore import CANCELLING, PREPARING, RUNNING, STARTED, Callbacks
from .listen import Listener
from .monitor import Monitor
from .plan import DiskPlan, Plan

if TYPE_CHECKING:
    from .job import BackupJob


class JobRecord:
    """The part of ``BackupJob`` that writes and reads its record (a mixin)."""

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
            "paused_by_us": self.paused_by_us,
            "shutdown_restore": self.plan.shutdown_restore,
            "guest_shut_down": self.guest_shut_down,
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
        job.paused_by_us = bool(record.get("paused_by_us"))
        job.plan.shutdown_restore = record.get("shutdown_restore")
        job.guest_shut_down = bool(record.get("guest_shut_down"))
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
        problems = await self._resume_guest()
        problems += await jobrecord.spare_persistent_bitmaps(self.mon, self.plan.disks)
        jobs = {j["id"]: j for j in await self.mon.execute("query-jobs")}
        if self.phase == PREPARING:
            if not set(self.disks) & set(jobs):
                return problems + await self._undo_interrupted_begin(jobs)
            # the transaction ran before the process died: a started job
            self.phase = STARTED
            for d in self.disks.values():
                d.state = d.state or RUNNING
        problems += await self._reconcile(jobs)
        self._worker = asyncio.create_task(self._work(), name="pvb-backup-job")
        if not any(d.state in (RUNNING, CANCELLING) for d in self.disks.values()):
            await self._terminate()
        else:
            self._watch_snapshots()
        return problems

    async def _resume_guest(self) -> list[str]:
        """A process killed during the instant left the guest stopped: resume it."""
        if not self.paused_by_us:
            return []
        self.paused_by_us = False
        status = (await self.mon.execute("query-status")).get("status")
        if status != "paused":
            return []
        await self.mon.execute("cont")
        return ["the guest was left paused by a backup begin that was interrupted; it was resumed"]

    async def _reconcile(self, jobs: dict[str, dict[str, Any]]) -> list[str]:
        """Bring our view in line with QEMU's jobs (after a restart or a reconnect)."""
        problems: list[str] = []
        nodes: set[str] = set()
        if any(not d.plan.has_qemu_job for d in self.disks.values()):
            nodes = await teardown.node_names(self.mon)
        for jid, d in self.disks.items():
            if d.state not in (RUNNING, CANCELLING):
                if not d.cleaned:  # its outcome was recorded; finish its cleanup
                    await self._clean_disk(d)
                continue
            if not d.plan.has_qemu_job:  # a fleecing pull: its view is its job
                qjob = {"status": "running"} if d.plan.access_node in nodes else None
            else:
                qjob = jobs.get(jid)
            if qjob is None:
                problems.append(
                    f"backup job '{jid}' of disk '{d.plan.disk}' is gone from QEMU "
                    "(QEMU restarted, someone dismissed it, or the begin that made it was "
                    "interrupted before it started)"
                )
                self._lost.add(jid)
                await self._disk_concluded(jid)
            elif qjob.get("status") in ("concluded", "null"):
                await self._disk_concluded(jid)
            else:
                d.launched = True
        await self._changed()
        return problems

    async def _undo_interrupted_begin(self, jobs: dict[str, dict[str, Any]]) -> list[str]:
        """A begin died before its backup started: remove what its record says it made
        (a device already switched onto its filter is switched back)."""
        problems: list[str] = []
        for dp in self.plan.disks:
            prefix = f"pvb-create-{dp.store_id}"
            for jid in (f"{prefix}-storage", f"{prefix}-format", f"{prefix}-fleece-format"):
                if jid in jobs:
                    with contextlib.suppress(VirError):
                        await self.mon.execute("job-cancel", {"id": jid})
                    with contextlib.suppress(VirError):
                        await self.mon.execute("job-dismiss", {"id": jid})
            problems += await teardown.take_down(self.mon, dp, job_lost=True)
        await self._stop_exports(only_if_ours=True)
        await self._drop_fdsets()
        for path in list(self.created_files):
            self._remove_file(path)
        if self.listener is not None:
            self.listener.cleanup()
        self._unlisten()
        self.done.set()
        problems.append(
            "a backup begin was interrupted before its jobs started; what it had made was removed"
        )
        return problems
