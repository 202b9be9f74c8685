"""The backup half of the driver table: begin (push and pull, with a checkpoint in
the same transaction), the job's life and its record, GetXMLDesc, stats, abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from .checkpointcalls import CheckpointCalls
from .conf import BackupDef, BackupServer, CheckpointDef
from .conf.checkpoint import BITMAP, disk_by_name
from .driverbase import (
    PORT_PICK_ATTEMPTS,
    Domain,
    PreparedBackup,
    check_backing,
    check_flags,
    check_identity,
    check_plain_tcp,
)
from .enums import (
    AbortJobFlags,
    BackupBeginFlags,
    BlockJobStatus,
    BlockJobType,
    CheckpointCreateFlags,
    CheckpointXMLFlags,
    DomainEventID,
    JobStatsFlags,
    JobType,
)
from .errors import ErrorDomain, ErrorNumber, VirError
from .qemu import checkpoint_ops, listen, nbd, ownfiles
from .qemu.actions import process_shutdown_action
from .qemu.features import REMOVE_FD_AT_ONCE
from .qemu.fleecing import FleecingSettings
from .qemu.job import PREPARING, STARTED, BackupJob, Callbacks, JobResult, MonitorLost
from .qemu.listen import Listener
from .qemu.monitor import Monitor
from .qemu.plan import (
    DiskPlan,
    Plan,
    PlanDisk,
    Tuning,
    inconsistent_error,
    next_store_id,
    plan_backup,
)

log = logging.getLogger(__name__)

SHUTDOWN_ACTION = "set-action.shutdown"


class BackupCalls(CheckpointCalls):
    """libvirt's virDomainBackup* entry points, job stats and abort."""

    # backup ---------------------------------------------------------------------------

    async def domainBackupBegin(
        self,
        dom: Domain,
        backup_xml: str | None,
        checkpoint_xml: str | None = None,
        flags: int = 0,
        *,
        tuning: Tuning | Mapping[str, Any] | None = None,
        fleecing: bool | None = None,
    ) -> int:
        """Start a backup (virDomainBackupBegin); returns once every disk's job runs.

        With ``checkpoint_xml`` the checkpoint's bitmaps are added in the backup's
        own transaction, so the checkpoint and the backup are the same instant.
        ``fleecing`` overrides the Driver's choice for this backup (False: libvirt's
        direct sequence, where a full or slow target can fail or stall the guest).
        """
        self._check_begin_args(dom, flags)
        await self._ready(dom)
        if dom.job is not None or dom.begin_lock.locked():
            raise VirError(
                ErrorNumber.OPERATION_INVALID,
                ErrorDomain.QEMU,
                f"another backup job is already running on domain '{dom.name}'",
            )
        async with dom.begin_lock, dom.checkpoint_lock:
            prep = await self._prepare_backup(
                dom, backup_xml, checkpoint_xml, flags, tuning, fleecing
            )
            if prep.chk is not None:  # part of the record from the start
                dom.job_checkpoint = str(prep.chk.name)
                dom.job_checkpoint_xml = prep.chk.to_xml(CheckpointXMLFlags.SECURE)
            try:
                job = await self._start_prepared(dom, prep)
            except BaseException:
                dom.job_checkpoint = dom.job_checkpoint_xml = None
                if prep.chk is not None:  # its bitmaps exist only if our transaction ran
                    ran = prep.job is not None and prep.job.phase == STARTED
                    await checkpoint_ops.remove_new(
                        dom.monitor, str(prep.chk.name), prep.targets, created=ran
                    )
                raise
            if prep.chk is not None:
                await self._record_begin_checkpoint(dom, job, prep.chk, prep.targets)
                # the record may keep the XML until its next write: adopting a
                # checkpoint that is already saved does nothing
                dom.job_checkpoint_xml = None
        return 0

    async def backup_dry_run(
        self,
        dom: Domain,
        backup_xml: str | None,
        checkpoint_xml: str | None = None,
        flags: int = 0,
        *,
        tuning: Tuning | Mapping[str, Any] | None = None,
        fleecing: bool | None = None,
    ) -> list[dict[str, Any]]:
        """The commands domainBackupBegin would run, in order; nothing is changed.

        Only queries reach QEMU and no socket is bound (a port still to be picked
        shows as 0). Every check begin makes before touching anything is made here
        too, so a dry run that succeeds means begin would get that far.
        """
        self._check_begin_args(dom, flags)
        await self._ready(dom)
        async with dom.checkpoint_lock:
            prep = await self._prepare_backup(
                dom, backup_xml, checkpoint_xml, flags, tuning, fleecing
            )
        if prep.bdef.is_pull:
            self._nbd_listen(dom, prep.bdef, prep.plan, prep.tls, bind=False)
        return prep.plan.describe()

    def _check_begin_args(self, dom: Domain, flags: int) -> None:
        check_flags(
            flags,
            BackupBeginFlags.REUSE_EXTERNAL | BackupBeginFlags.PRESERVE_SHUTDOWN_DOMAIN,
            "domainBackupBegin",
        )
        self._check_domain(dom)
        if flags & BackupBeginFlags.PRESERVE_SHUTDOWN_DOMAIN and not dom.features.has(
            SHUTDOWN_ACTION
        ):
            raise VirError(
                ErrorNumber.OPERATION_UNSUPPORTED,
                ErrorDomain.QEMU,
                "VIR_DOMAIN_BACKUP_BEGIN_PRESERVE_SHUTDOWN_DOMAIN needs QEMU's set-action "
                "with a shutdown action, which this QEMU lacks",
            )

    async def _prepare_backup(
        self,
        dom: Domain,
        backup_xml: str | None,
        checkpoint_xml: str | None,
        flags: int,
        tuning: Tuning | Mapping[str, Any] | None,
        fleecing: bool | None = None,
    ) -> PreparedBackup:
        """Parse, align and plan: everything of begin that changes nothing."""
        reuse = bool(flags & BackupBeginFlags.REUSE_EXTERNAL)
        bdef = BackupDef.from_xml(backup_xml or "<domainbackup/>")
        chk = CheckpointDef.from_xml(checkpoint_xml) if checkpoint_xml is not None else None
        self._check_running(dom, "perform disk backup")
        job_tuning = self.tuning.merged(tuning)
        await self.refresh_disks(dom)
        # libvirt names generated targets after the checkpoint made with them
        suffix = chk.name if chk is not None else str(int(time.time()))
        bdef.align_disks(self._domain_disks(dom), suffix=suffix)
        targets = self._prepare_checkpoint(dom, chk) if chk is not None else []
        self._check_incremental_sources(dom, bdef)
        tls = self._pull_prepare(bdef, dom) if bdef.is_pull else None
        settings = FleecingSettings(
            enabled=self.fleecing if fleecing is None else fleecing, cbw_timeout=self.cbw_timeout
        )
        plan = await self._plan(dom, bdef, reuse, job_tuning, chk, targets, settings, suffix)
        prep = PreparedBackup(bdef, plan, reuse, job_tuning, tls, chk, targets, settings, suffix)
        prep.preserve_shutdown = bool(flags & BackupBeginFlags.PRESERVE_SHUTDOWN_DOMAIN)
        self._preserve_shutdown(dom, prep)
        return prep

    def _preserve_shutdown(self, dom: Domain, prep: PreparedBackup) -> None:
        """PRESERVE_SHUTDOWN_DOMAIN: a guest that powers off is paused until the backup
        ends, then QEMU goes as it was configured to."""
        if prep.preserve_shutdown:
            prep.plan.preserve_shutdown(process_shutdown_action(dom.monitor.peer_pid()))

    async def _start_prepared(self, dom: Domain, prep: PreparedBackup) -> BackupJob:
        """Start the planned job; a picked port taken meanwhile (TCP monitor) is picked again."""
        server = prep.bdef.server
        pick_port = prep.bdef.is_pull and server is not None and server.port is None
        attempt = 1
        while True:
            listener = (
                self._nbd_listen(dom, prep.bdef, prep.plan, prep.tls) if prep.bdef.is_pull else None
            )
            try:
                job = await self._start_job(dom, prep, listener)
                self._warn_plain_tcp(dom, prep.bdef)
                return job
            except VirError as exc:
                retry = (
                    pick_port
                    and not dom.monitor.can_pass_fds
                    and "Address already in use" in exc.message
                    and attempt < PORT_PICK_ATTEMPTS
                )
                if not retry:
                    raise
                log.info("picked NBD port was taken meanwhile; trying another: %s", exc)
                attempt += 1
                assert server is not None
                server.port = None
                prep.plan = await self._plan(
                    dom,
                    prep.bdef,
                    prep.reuse,
                    prep.tuning,
                    prep.chk,
                    prep.targets,
                    prep.fleecing,
                    prep.suffix,
                )
                self._preserve_shutdown(dom, prep)

    async def _start_job(
        self, dom: Domain, prep: PreparedBackup, listener: Listener | None
    ) -> BackupJob:
        job = BackupJob(dom.monitor, prep.plan, listener=listener)
        prep.job = job  # the caller learns how far it got, even if start fails
        job.callbacks = self._job_callbacks(dom, job)
        dom.job, dom.job_def = job, prep.bdef
        try:
            await job.start()
        except BaseException:
            if dom.job is job:
                dom.job = dom.job_def = None
            if job.phase == PREPARING:  # rolled back: the intent record goes too
                with contextlib.suppress(VirError):
                    self.state.domain(dom.name).delete_job()
            raise
        return job

    def _pull_prepare(self, bdef: BackupDef, dom: Domain) -> nbd.TlsCreds | None:
        """Pull checks that need no QEMU: where to listen, and the TLS files.

        libvirt refuses tcp without a port; we pick a free one instead (and
        GetXMLDesc shows it). Certificates are checked here, before any scratch
        image exists, where libvirt 9.0 finds a missing one only inside QEMU.
        """
        if bdef.server is None:
            bdef.server = BackupServer(transport="tcp", name="localhost")
        server = bdef.server
        if server.transport not in ("tcp", "unix", "fd"):
            raise VirError(
                ErrorNumber.OPERATION_UNSUPPORTED,
                ErrorDomain.QEMU,
                f"transport '{server.transport}' for <server> is not supported; "
                "use transport='tcp', 'unix' or 'fd'",
            )
        if not server.tls:
            if server.transport == "tcp":
                check_plain_tcp(server, self.nbd_allow_plain_tcp)
                bdef.plain_tcp = True
            return None
        nbd.check_tls_dir(self.tls_x509_cert_dir, qemu=dom.monitor.peer_ids)
        bdef.tls_alias = nbd.TLS_ALIAS
        return nbd.TlsCreds(
            self.tls_x509_cert_dir,
            self.tls_x509_verify,
            nbd.TLS_ALIAS,
            allowed_dns=self.tls_allowed_dn_list,
        )

    def _nbd_listen(
        self,
        dom: Domain,
        bdef: BackupDef,
        plan: Plan,
        tls: nbd.TlsCreds | None,
        *,
        bind: bool = True,
    ) -> Listener:
        """Bind the NBD server's socket and add the server and export steps.

        Over a unix monitor we bind the socket and hand it to QEMU (race-free
        port, owner-only unix socket); over a TCP monitor QEMU binds it, a unix
        socket inside a private directory, linked into place with its mode before
        any export exists.
        """
        server = bdef.server
        assert server is not None
        nbd.check_export_names(plan)
        pass_fd = dom.monitor.can_pass_fds
        publish: tuple[str, int] | None = None
        if server.transport == "fd":  # a listening socket the caller associated
            assert server.fdgroup is not None
            listener = self._fd_listener(dom, server.fdgroup)  # type: ignore[attr-defined]
            if not bind:
                listener.release()
            pass_fd = True
            address = nbd.fd_address(nbd.LISTEN_FD_NAME)
        elif not bind:  # a dry run: the same steps, no socket
            if pass_fd:
                address = nbd.fd_address(nbd.LISTEN_FD_NAME)
            elif server.transport == "unix":
                private = os.path.join(
                    os.path.dirname(server.socket or ""), listen.PRIVATE_PREFIX + "XXXXXXXX"
                )
                address = nbd.unix_address(os.path.join(private, listen.PRIVATE_NAME))
                publish = (server.socket or "", self.nbd_socket_mode)
            else:
                address = nbd.inet_address(server.name or "", server.port or 0)
            listener = Listener(
                server.transport, host=server.name, port=server.port, path=server.socket
            )
        elif pass_fd:
            if server.transport == "unix":
                assert server.socket is not None
                listener = listen.listen_unix(server.socket, self.nbd_socket_mode)
            else:
                assert server.name is not None
                listener = listen.listen_tcp(server.name, server.port)
                server.port = listener.port
            address = nbd.fd_address(nbd.LISTEN_FD_NAME)
        elif server.transport == "unix":
            assert server.socket is not None
            listen.check_unix_path(server.socket)
            # QEMU binds in a private directory; the socket moves into place with its mode
            listener = Listener(
                "unix", path=server.socket, private_dir=listen.make_private_dir(server.socket)
            )
            address = nbd.unix_address(listener.private_path)
            publish = (server.socket, self.nbd_socket_mode)
        else:
            assert server.name is not None
            server.port = server.port or listen.pick_tcp_port(server.name)
            address = nbd.inet_address(server.name, server.port)
            listener = Listener("tcp", host=server.name, port=server.port)
        handshake = None
        if dom.features.has(nbd.HANDSHAKE_FEATURE):
            handshake = self.nbd_handshake_max_seconds
        nbd.add_pull_steps(
            plan,
            address,
            tls=tls,
            pass_fd=pass_fd,
            publish=publish,
            handshake_max_seconds=handshake,
        )
        return listener

    def _warn_plain_tcp(self, dom: Domain, bdef: BackupDef) -> None:
        if bdef.plain_tcp and bdef.server is not None:
            log.warning("domain %s: %s", dom.name, bdef.exposure())

    async def _record_begin_checkpoint(
        self, dom: Domain, job: BackupJob, chk: CheckpointDef, targets: list[Any]
    ) -> None:
        """Save the checkpoint a begin created; if that fails, undo the whole begin.

        libvirt reports the error and lets the backup run with bitmaps no metadata
        knows; those are exactly the strays that break later checkpoints.
        """
        try:
            dom.checkpoints.add(chk, make_current=True)
        except VirError as exc:
            if not job.done.is_set():
                await job.abort(wait=True)
            await checkpoint_ops.remove_new(dom.monitor, str(chk.name), targets, created=True)
            raise VirError(
                ErrorNumber.INTERNAL_ERROR,
                ErrorDomain.QEMU,
                f"unable to save metadata for checkpoint {chk.name}: {exc.message}; "
                "the backup was aborted and the checkpoint's bitmaps removed",
            ) from None

    def _check_incremental_sources(self, dom: Domain, bdef: BackupDef) -> None:
        """An incremental disk its checkpoint does not cover gets a useful answer.

        Without this, a disk added after the checkpoint (or left out of it) fails the
        bitmap check like a broken bitmap would, and the way out offered is wrong:
        what it needs is ``backupmode='full'`` in the same backup.
        """
        domdisks = self._domain_disks(dom)
        for d in bdef.selected_disks():
            if d.backupmode != "incremental" or d.incremental not in dom.checkpoints:
                continue
            cdef = dom.checkpoints.get(d.incremental)
            covered = any(
                cd.checkpoint == BITMAP
                and (found := disk_by_name(domdisks, cd.name)) is not None
                and found.name == d.name
                for cd in cdef.disks
            )
            if not covered:
                raise inconsistent_error(
                    d.name,
                    d.incremental,
                    f"checkpoint '{d.incremental}' does not cover disk '{d.name}' (the disk "
                    "was added after it or left out of it)",
                    f"Back this disk up in full in the same backup: <disk name='{d.name}' "
                    "backupmode='full'>",
                )

    async def _plan(
        self,
        dom: Domain,
        bdef: BackupDef,
        reuse: bool,
        tuning: Tuning,
        chk: CheckpointDef | None = None,
        targets: list[Any] | None = None,
        fleecing: FleecingSettings | None = None,
        suffix: str = "",
    ) -> Plan:
        """The QEMU layer's defaults (qcow2 store, store index, fleecing images) and
        the plan."""
        fleecing = fleecing or FleecingSettings(enabled=False)
        plan_disks: list[PlanDisk] = []
        for d in bdef.selected_disks():
            d.format = d.format or "qcow2"
            if d.type == "file" and not reuse and d.path and os.path.lexists(d.path):
                raise VirError(
                    ErrorNumber.INVALID_ARG,
                    ErrorDomain.QEMU,
                    f"store '{d.path}' for backup of '{d.name}' exists",
                )
            if d.backing is not None:
                check_backing(d.name, d.path or "", d.backing)
            fleece_path = None
            if fleecing.enabled and not bdef.is_pull and d.fleecing != "no":
                fleece_path = d.fleecing or self._fleece_path(dom, d.name, suffix)
                if os.path.lexists(fleece_path):
                    raise VirError(
                        ErrorNumber.INVALID_ARG,
                        ErrorDomain.QEMU,
                        f"fleecing image '{fleece_path}' for backup of '{d.name}' exists",
                    )
            plan_disks.append(
                PlanDisk(
                    name=d.name,
                    path=d.path or "",
                    store_type=d.type,
                    fmt=d.format,
                    backupmode=d.backupmode or "full",
                    incremental=d.incremental,
                    export_name=d.exportname,
                    export_bitmap=d.exportbitmap,
                    backing_file=d.backing,
                    backing_fmt=d.backing_format,
                    fleece_path=fleece_path,
                    direct=d.fleecing == "no",
                )
            )
        nodes = dom.nodes  # read by refresh_disks at the start of this begin
        pass_fds, why = await self._image_fds(dom)
        actions: list[dict[str, Any]] = []
        if chk is not None:
            checkpoint_ops.check_free(targets or [], nodes)
            actions = checkpoint_ops.add_actions(str(chk.name), targets or [])
        plan = plan_backup(
            bdef.mode,
            plan_disks,
            {d.name: d for d in dom.disks},
            nodes,
            first_store_id=next_store_id(nodes),
            reuse_external=reuse,
            tuning=tuning,
            checkpoint_actions=actions,
            known_checkpoints=set(dom.checkpoints.defs),
            features=dom.features,
            fleecing_settings=fleecing,
            pass_fds=pass_fds,
        )
        if not pass_fds:
            self._check_image_dirs(plan, why)
        by_name = {dp.disk: dp for dp in plan.disks}
        for d in bdef.selected_disks():
            dp = by_name[d.name]
            d.index = dp.store_id
            if bdef.is_pull:  # GetXMLDesc shows the names clients ask for
                d.exportname, d.exportbitmap = dp.export_name, dp.export_bitmap
            if dp.direct_reason and fleecing.enabled:
                log.warning(
                    "domain %s disk %s: libvirt's direct sequence, without fleecing: %s",
                    dom.name,
                    d.name,
                    dp.direct_reason,
                )
        return plan

    async def _image_fds(self, dom: Domain) -> tuple[bool, str]:
        """Can the images we create reach QEMU as our descriptors? If not, why.

        Descriptors travel only over a unix monitor; and a QEMU before 9.1 closes a
        removed one only while the guest runs, so for a guest that does not run it
        would stay open in QEMU after the backup.
        """
        if not dom.monitor.can_pass_fds:
            return False, (
                "over this TCP monitor QEMU cannot be handed our descriptor instead (over "
                "a unix monitor it can)"
            )
        if dom.features.has(REMOVE_FD_AT_ONCE):
            return True, ""
        status = (await dom.monitor.execute("query-status")).get("status")
        if status == "running":
            return True, ""
        return False, (
            f"this QEMU ({dom.features.version_string}) would keep a handed descriptor "
            f"open while the guest is not running ({status}), so the image goes by name "
            "(QEMU 9.1 and later, or a running guest, take our descriptor instead)"
        )

    def _check_image_dirs(self, plan: Plan, why: str) -> None:
        """Images QEMU opens by name: refuse a directory another user can change, where
        the name could mean another file by the time QEMU opens it."""
        for dp in plan.disks:
            images = []
            if dp.create_file:
                images.append(("target" if plan.mode == "push" else "scratch", dp.path))
            if dp.fleecing and dp.fleece_path and dp.fleece_path != dp.path:
                images.append(("fleecing image", dp.fleece_path))
            for what, path in images:
                found = ownfiles.swappable_dir(path)
                if found is None:
                    continue
                directory, problem = found
                raise VirError(
                    ErrorNumber.OPERATION_DENIED,
                    ErrorDomain.QEMU,
                    f"directory '{directory}' of the {what} '{path}' of disk '{dp.disk}' "
                    f"{problem}: another user could make that name point at another file "
                    f"before QEMU opens it, and {why}; use a directory only root can "
                    "change, or make it sticky (chmod +t)",
                )

    def _fleece_path(self, dom: Domain, disk: str, suffix: str) -> str:
        """Where a push disk's fleecing image goes when the XML does not say.

        Next to the disk's own image by default: storage the guest already writes to
        at its own pace, with room for what the guest overwrites during the backup.
        """
        src = next((d for d in dom.disks if d.name == disk), None)
        base = os.path.basename(src.path) if src is not None and src.path else disk
        name = f"{base}.fleece.{suffix}"
        if self.fleecing_dir:
            return os.path.join(self.fleecing_dir, f"{dom.name}-{name}")
        if src is not None and src.path and src.type == "file":
            if os.path.isdir(os.path.dirname(src.path) or "."):
                return f"{src.path}.fleece.{suffix}"
        return str(self.state.fleecing_dir() / f"{dom.name}-{name}")

    def _save_job(self, dom: Domain) -> None:
        """Record the running job (status XML + what we created) for a later process."""
        job, bdef = dom.job, dom.job_def
        if job is None or bdef is None or job.done.is_set():
            return
        status = copy.deepcopy(bdef)
        states = {rt.plan.disk: rt.state for rt in job.disks.values()}
        for d in status.disks:
            if d.backup:
                d.state = states.get(d.name) or "running"
        record = job.snapshot()
        record["checkpoint"] = dom.job_checkpoint
        record["checkpoint_xml"] = dom.job_checkpoint_xml  # until its metadata is saved
        try:
            self.state.domain(dom.name).write_job(status.to_xml(internal=True), record)
        except VirError as exc:  # the job goes on; a later process will lack its record
            log.error("cannot record the running backup of %s: %s", dom.name, exc)

    def _job_callbacks(self, dom: Domain, job: BackupJob) -> Callbacks:
        return Callbacks(
            changed=lambda: self._save_job(dom),
            disk_done=lambda dp, status: self._disk_done(dom, dp, status),
            finished=lambda result: self._job_finished(dom, job, result),
            reconnect=lambda: self._reconnect(dom),
        )

    async def _reconnect(self, dom: Domain) -> Monitor | None:
        """After the monitor dropped: a new connection if QEMU still answers, None if
        nobody listens any more (QEMU is gone), MonitorLost if it cannot be told."""
        last = ""
        for attempt in range(3):
            mon = Monitor(f"pyvirtbackup-{dom.name}")
            try:
                await mon.connect(dom.qmp, timeout=self.connect_timeout)
            except VirError as exc:
                await mon.close()
                if exc.code == ErrorNumber.OPERATION_FAILED:  # refused, or no socket
                    return None
                last = exc.message
                await asyncio.sleep(1.0 * (attempt + 1))
                continue
            try:  # the same VM, not another one now listening on the socket
                record = self.state.domain(dom.name).read_record() or {"uuid": dom.uuid}
                qemu_uuid = await self._qemu_uuid(mon)  # type: ignore[attr-defined]
                check_identity(dom.name, dom.qmp, record, qemu_uuid)
            except VirError as exc:
                await mon.close()
                log.error("domain %s: %s", dom.name, exc.message)
                return None  # ours is gone; the other VM is left alone
            old, dom.monitor = dom.monitor, mon
            await old.close()
            log.warning("domain %s: QEMU's monitor dropped and was reconnected", dom.name)
            return mon
        raise MonitorLost(last or "no answer")

    async def _recover_job(self, dom: Domain) -> None:
        """Take over a backup that an earlier process started (libvirt keeps it in its
        status XML across a libvirtd restart; so do we, in the state directory)."""
        dstate = self.state.domain(dom.name)
        try:
            record = dstate.read_job()
            if record is None:
                return
            xml, resources = record
            bdef = BackupDef.from_xml(xml, internal=True)
            job = BackupJob.restore(dom.monitor, resources)
        except (VirError, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, VirError) and exc.code == ErrorNumber.OPERATION_DENIED:
                raise  # not damaged but untrusted: nothing of it is touched
            log.error(
                "the recorded backup of %s is unreadable (%s); it is set aside", dom.name, exc
            )
            dstate.set_aside_job()
            dom.recovery_problems.append(f"unreadable backup record set aside: {exc}")
            return
        job.callbacks = self._job_callbacks(dom, job)
        dom.job, dom.job_def = job, bdef
        dom.job_checkpoint = resources.get("checkpoint")
        problems = await job.resume()
        if job.result is None and job.done.is_set():  # a begin undone before it started
            dom.job = dom.job_def = None
            dom.job_checkpoint = None
            problems += await self._remove_undone_checkpoint(dom, resources.get("checkpoint"))
            dstate.delete_job()
        elif resources.get("checkpoint_xml"):
            problems += self._adopt_begin_checkpoint(dom, resources["checkpoint_xml"])
        for problem in problems:
            log.warning("domain %s: %s", dom.name, problem)
        dom.recovery_problems += problems
        self._save_job(dom)

    async def _remove_undone_checkpoint(self, dom: Domain, name: str | None) -> list[str]:
        """The bitmaps of an undone begin's checkpoint, if its transaction ran.

        Begin refuses a checkpoint whose bitmap exists already, so a bitmap of that
        name without checkpoint metadata was made by that begin.
        """
        if not name or name in dom.checkpoints:
            return []
        await self.refresh_disks(dom)
        removed = []
        for node in dom.nodes.values():
            if name in node.bitmaps:
                with contextlib.suppress(VirError):
                    await dom.monitor.execute(
                        "block-dirty-bitmap-remove", {"node": node.name, "name": name}
                    )
                    removed.append(node.name)
        if not removed:
            return []
        return [f"bitmaps of the interrupted begin's checkpoint '{name}' removed from {removed}"]

    def _adopt_begin_checkpoint(self, dom: Domain, xml: str) -> list[str]:
        """The begin that made this job died after its transaction and before saving
        its checkpoint: the bitmaps exist, so the checkpoint does too."""
        try:
            chk = CheckpointDef.from_xml(xml, CheckpointCreateFlags.REDEFINE)
        except VirError as exc:
            return [f"the interrupted begin's checkpoint is unreadable, not saved: {exc}"]
        if chk.name in dom.checkpoints:
            return []
        try:
            dom.checkpoints.add(chk, make_current=True)
        except VirError as exc:
            return [f"checkpoint '{chk.name}' of the interrupted begin not saved: {exc}"]
        return [f"checkpoint '{chk.name}' of the interrupted begin was saved"]

    def _disk_done(self, dom: Domain, dp: DiskPlan, status: BlockJobStatus) -> None:
        kind = int(BlockJobType.BACKUP)
        if dp.source_path:
            self.events.emit(self, dom, DomainEventID.BLOCK_JOB, dp.source_path, kind, int(status))
        self.events.emit(self, dom, DomainEventID.BLOCK_JOB_2, dp.disk, kind, int(status))

    async def _job_finished(self, dom: Domain, job: BackupJob, result: JobResult) -> None:
        stats = dict(result.stats)
        stats["type"] = int(stats["type"])
        dom.completed = stats
        dstate = self.state.domain(dom.name)
        try:
            dstate.write_completed(stats)
            dstate.delete_job()
        except VirError as exc:
            log.error("cannot record the finished backup of %s: %s", dom.name, exc)
        chk = dom.job_checkpoint
        dom.job_checkpoint = None
        failed_push = job.mode == "push" and result.type != JobType.COMPLETED
        if chk and failed_push and not self.keep_failed_checkpoints:
            # after begin has let go of the checkpoint lock (the job may end inside it)
            task = asyncio.ensure_future(self._drop_failed_checkpoint(dom, job, chk, stats))
            dom.finishing = task
            return
        self._job_gone(dom, job, stats)

    def _job_gone(self, dom: Domain, job: BackupJob, stats: dict[str, Any]) -> None:
        if dom.job is job:
            dom.job = dom.job_def = None
        self.events.emit(self, dom, DomainEventID.JOB_COMPLETED, dict(stats))

    async def _drop_failed_checkpoint(
        self, dom: Domain, job: BackupJob, name: str, stats: dict[str, Any]
    ) -> None:
        """A push that failed made no backup: the checkpoint taken with it goes, so that
        the next incremental is not based on an instant nothing was saved at."""
        try:
            async with dom.checkpoint_lock:
                if name in dom.checkpoints:
                    left = ""
                    if dom.monitor.connected:
                        await self._delete_bitmaps(dom, [name])
                    else:  # QEMU died: the same outcome, minus what only QEMU can do
                        left = self._bitmaps_left_behind(dom, name)
                    dom.checkpoints.reparent_children(name)
                    dom.checkpoints.remove(name, update_current=True)  # back to its parent
                    log.warning(
                        "domain %s: checkpoint '%s' removed, its backup did not complete%s",
                        dom.name,
                        name,
                        left,
                    )
        except VirError as exc:
            log.error(
                "domain %s: could not remove checkpoint '%s' of a failed backup: %s",
                dom.name,
                name,
                exc,
            )
        finally:
            self._job_gone(dom, job, stats)

    def _bitmaps_left_behind(self, dom: Domain, name: str) -> str:
        """What may stay of a dropped checkpoint when QEMU is gone: QEMU writes a new
        persistent bitmap into the image only when it closes it, so usually nothing;
        an image it had written it to keeps it, marked in use."""
        paths = {d.name: d.path for d in dom.disks}
        images = [
            paths.get(cd.name) or cd.name
            for cd in dom.checkpoints.get(name).disks
            if cd.checkpoint == BITMAP
        ]
        return (
            f"; QEMU is gone, and its bitmaps with it, unless it had written '{name}' into "
            + ", ".join(images)
            + f" already (then 'qemu-img bitmap --remove IMAGE {name}' removes it)"
        )

    async def domainBackupGetXMLDesc(self, dom: Domain, flags: int = 0) -> str:
        """The running backup's definition with every default filled in."""
        check_flags(flags, 0, "domainBackupGetXMLDesc")
        await self._ready(dom)
        if dom.job is None or dom.job_def is None:
            raise VirError(
                ErrorNumber.NO_DOMAIN_BACKUP, ErrorDomain.DOMAIN, "no domain backup job present"
            )
        return dom.job_def.to_xml()

    async def domainGetJobStats(self, dom: Domain, flags: int = 0) -> dict[str, Any]:
        """Progress of the running backup, or with COMPLETED the last finished one."""
        check_flags(
            flags, JobStatsFlags.COMPLETED | JobStatsFlags.KEEP_COMPLETED, "domainGetJobStats"
        )
        await self._ready(dom)
        if flags & JobStatsFlags.KEEP_COMPLETED and not flags & JobStatsFlags.COMPLETED:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.NONE,
                "flag VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED requires VIR_DOMAIN_JOB_STATS_COMPLETED",
            )
        if flags & JobStatsFlags.COMPLETED:
            if dom.completed is None:
                return {"type": int(JobType.NONE)}
            stats = dict(dom.completed)
            if not flags & JobStatsFlags.KEEP_COMPLETED:
                dom.completed = None
                with contextlib.suppress(VirError):
                    self.state.domain(dom.name).delete_completed()
            return stats
        if dom.job is None or dom.job.done.is_set():
            return {"type": int(JobType.NONE)}
        stats = await dom.job.stats()
        stats["type"] = int(stats["type"])
        return stats

    async def domainAbortJob(self, dom: Domain, flags: int = 0) -> int:
        """Cancel the running backup; returns once everything of it is cleaned up."""
        check_flags(flags, AbortJobFlags.POSTCOPY, "domainAbortJob")
        await self._ready(dom)
        job = dom.job
        if job is None or job.done.is_set():
            raise VirError(
                ErrorNumber.OPERATION_INVALID,
                ErrorDomain.QEMU,
                f"no job is active on domain '{dom.name}'",
            )
        if flags & AbortJobFlags.POSTCOPY:  # libvirt's answer for any job but a migration
            raise VirError(
                ErrorNumber.OPERATION_INVALID,
                ErrorDomain.QEMU,
                "current job is not outgoing migration in post-copy mode",
            )
        await job.abort(wait=True)
        if dom.finishing is not None:  # a failed push's checkpoint being dropped
            await dom.finishing
        await self.events.drain()
        return 0
