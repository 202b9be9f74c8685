"""Running plan steps: QMP commands, QMP jobs (create, wait, dismiss), descriptors,
and the local files we create; each step done leaves its undo, and a rollback runs
them in reverse until nothing of a failed begin is left.

A file we create is opened by us, O_EXCL and never through a link, and over a unix
monitor QEMU gets that descriptor (``add-fd``) and opens ``/dev/fdset/N``, never the
path: whoever can write the directory could make the path name another file in
between. Our fd sets carry ``fdset_tag(path)`` so that whatever happens, the ones
left in QEMU can be found and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from ..errors import ErrorDomain, ErrorNumber, VirError
from . import ownfiles, teardown
from .jobcore import CREATE_TIMEOUT, exists_error, finish_even_if_cancelled
from .plan import Step, with_fdset

log = logging.getLogger(__name__)


def fdset_tag(path: str) -> str:
    """The opaque string our fd set of an image carries in ``query-fdsets``."""
    return f"pyvirtbackup:{path}"


def _create_error(path: str, exc: OSError) -> VirError:
    return VirError(
        ErrorNumber.SYSTEM_ERROR,
        ErrorDomain.QEMU,
        f"cannot create backup store '{path}': {exc.strerror}",
    )


class StepRunner:
    """The part of ``BackupJob`` that runs steps (a mixin: state lives in BackupJob)."""

    async def _run_lane(self, steps: list[Step], undo: list[Step]) -> None:
        """Run steps in order, keeping in ``undo`` what reverses the ones done so far.

        A step cancelled half way (Ctrl-C, a timeout around begin) may have reached
        QEMU already: its undo is kept too (undoing what never happened only fails,
        and a rollback carries on past that).
        """
        for step in steps:
            try:
                await self._run(step)
            except asyncio.CancelledError:
                undo.extend(step.undo)
                raise
            undo.extend(step.undo)

    async def _run(self, step: Step) -> None:
        if step.kind == "release-fd":
            await self._release_fd(step.args["path"])
        elif step.kind == "remove-file":
            self._remove_file(step.args["path"])
        elif step.kind == "qmp":
            try:
                await self.mon.execute(step.command, self._args(step))
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

    def _args(self, step: Step) -> dict[str, Any]:
        """The step's arguments, with the image it names given as our fd set."""
        if step.fdset is None:
            return step.args
        fdset_id = self.fdsets.get(step.fdset)
        if fdset_id is None:  # pragma: no cover - a planner bug; never fall back to the path
            raise AssertionError(f"no fd set for '{step.fdset}' at {step.command}")
        return with_fdset(step.args, step.fdset, f"/dev/fdset/{fdset_id}")

    async def _open_image(self, args: dict[str, Any]) -> None:
        """Create an image (a ``create-file`` step, run by ``BackupJob.start`` before
        the lanes): ours alone (0600, O_EXCL, not through a link), sized if raw, its
        descriptor kept until ``_hand_over_images``. Put on
        record (by the caller) before QEMU sees it: a process killed from then on
        leaves the next one what to delete (by its inode) and which fd set to remove.
        """
        path = args["path"]
        flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR | os.O_CLOEXEC
        if args.get("direct"):
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise exists_error(path, args.get("disk") or self._disk_of(path)) from None
        except OSError as exc:
            raise _create_error(path, exc) from None
        try:
            self.created_files.append(path)
            self.created_ids[path] = ownfiles.file_id(os.fstat(fd))
            if args.get("size"):
                os.ftruncate(fd, args["size"])
        except OSError as exc:
            os.close(fd)
            self._remove_file(path)
            raise _create_error(path, exc) from None
        self._opened[path] = (fd, bool(args.get("pass_fd")))

    async def _hand_over_images(self) -> None:
        """Give QEMU the descriptors of the images opened so, then close ours."""
        try:
            while self._opened:
                path, (fd, pass_fd) = next(iter(self._opened.items()))
                try:
                    if pass_fd:
                        self.fdsets[path] = await self.mon.add_fd(fd, fdset_tag(path))
                finally:
                    del self._opened[path]
                    os.close(fd)
        finally:
            for fd, _ in self._opened.values():  # not handed over: a rollback follows
                os.close(fd)
            self._opened.clear()

    async def _release_fd(self, path: str) -> None:
        """Remove the image's fd set: its nodes hold their own copies, and an fd set of
        ours must not outlive the begin."""
        fdset_id = self.fdsets.pop(path, None)
        if fdset_id is None or not self.mon.connected:
            return
        try:
            await self.mon.execute("remove-fd", {"fdset-id": fdset_id})
        except VirError as exc:
            log.warning("could not remove fd set %d of '%s': %s", fdset_id, path, exc)

    async def _drop_fdsets(self) -> None:
        """Remove every fd set of ours QEMU still lists for this job's images (a begin
        cut short, or a QEMU that closes removed ones only while the guest runs)."""
        if not self.mon.connected:
            return
        tags = {fdset_tag(p): p for dp in self.plan.disks for p in (dp.path, dp.fleece_path) if p}
        try:
            found = await self.mon.execute("query-fdsets")
        except VirError as exc:
            log.warning("could not list QEMU's fd sets: %s", exc)
            return
        for fdset in found:
            ours = [fd for fd in fdset.get("fds", []) if fd.get("opaque") in tags]
            if not ours:
                continue
            with contextlib.suppress(VirError):
                await self.mon.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})
            for path in {tags[fd["opaque"]] for fd in ours}:
                self.fdsets.pop(path, None)
        with contextlib.suppress(VirError):
            left = [
                fd["opaque"]
                for fdset in await self.mon.execute("query-fdsets")
                for fd in fdset.get("fds", [])
                if fd.get("opaque") in tags
            ]
            if left:
                log.warning(
                    "QEMU keeps the removed descriptors of %s open until the guest runs",
                    ", ".join(tags[t] for t in left),
                )

    def _disk_of(self, path: str) -> str:
        for d in self.plan.disks:
            if path in (d.path, d.fleece_path):
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
            await self.mon.execute(step.command, self._args(step))
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
                await finish_even_if_cancelled(teardown.drop_job(self.mon, jid))
        if error:
            raise VirError(
                ErrorNumber.OPERATION_FAILED, ErrorDomain.QEMU, f"failed to format image: '{error}'"
            )

    async def _rollback(self, undo: list[Step]) -> None:
        for step in reversed(undo):
            try:
                await self._run(step)
            except Exception as exc:  # keep undoing the rest
                log.warning("rollback step %s failed: %s", step.describe(), exc)

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
