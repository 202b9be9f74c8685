"""The driver table: libvirt's backup and checkpoint entry points, as coroutines.

Thin on purpose: flag and argument checks, one backup job per domain, then ``conf``
for the XML and ``qemu`` for QMP, recording state and emitting events in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .checkpoints import Checkpoint, CheckpointTree
from .conf import BackupDef, BackupServer, CheckpointDef, DomainDisk
from .conf.checkpoint import BITMAP, disk_by_name
from .enums import (
    AbortJobFlags,
    BackupBeginFlags,
    BlockJobStatus,
    BlockJobType,
    CheckpointCreateFlags,
    CheckpointDeleteFlags,
    CheckpointListFlags,
    CheckpointXMLFlags,
    ConnectListAllDomainsFlags,
    DomainEventID,
    JobStatsFlags,
    JobType,
)
from .errors import ErrorDomain, ErrorNumber, VirError
from .events import EventRegistry
from .qemu import blockgraph, checkpoint_ops, listen, nbd
from .qemu.blockgraph import Disk
from .qemu.job import BackupJob, Callbacks, JobResult
from .qemu.listen import Listener
from .qemu.monitor import Address, Monitor
from .qemu.plan import (
    DiskPlan,
    Plan,
    PlanDisk,
    Tuning,
    inconsistent_error,
    next_store_id,
    plan_backup,
)
from .state import State, check_component

log = logging.getLogger(__name__)

DEFAULT_TLS_DIR = "/etc/pki/pyvirtbackup"
# a picked port can be taken between our check and QEMU's bind only when QEMU binds
# it itself (a monitor over TCP cannot take our socket); then begin tries again
PORT_PICK_ATTEMPTS = 3


def _check_flags(flags: int, allowed: int, function: str) -> None:
    # int(): the complement of an IntFlag stays inside the flag's own bits
    extra = int(flags) & ~int(allowed)
    if extra:
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.NONE,
            f"unsupported flags (0x{extra:x}) in function {function}",
        )


def _check_exclusive(flags: int, a: enum.Flag, b: enum.Flag) -> None:
    """libvirt's VIR_EXCLUSIVE_FLAGS check, made before the driver sees the flags."""
    if flags & a and flags & b:
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.NONE,
            f"Flags '{_flag_name(a)}' and '{_flag_name(b)}' are mutually exclusive",
        )


def _flag_name(flag: enum.Flag) -> str:
    prefix = {
        CheckpointCreateFlags: "VIR_DOMAIN_CHECKPOINT_CREATE_",
        CheckpointDeleteFlags: "VIR_DOMAIN_CHECKPOINT_DELETE_",
    }[type(flag)]
    return prefix + str(flag.name)


_LIST_FLAGS = (
    CheckpointListFlags.TOPOLOGICAL | CheckpointListFlags.LEAVES | CheckpointListFlags.NO_LEAVES
)


def _not_running(dom: Domain) -> VirError:
    """libvirt's virDomainObjCheckActive error."""
    return VirError(
        ErrorNumber.OPERATION_INVALID,
        ErrorDomain.QEMU,
        f"domain is not running: the QEMU monitor of '{dom.name}' is gone",
    )


def _check_backing(disk: str, target: str, backing: str) -> None:
    """The previous backup named by pvb:backing must exist (relative: next to the target).

    QEMU never opens it (the new target is opened with ``backing: null``), so a typo
    would only show when someone restores from the chain.
    """
    where = os.path.join(os.path.dirname(target), backing)
    if not os.path.exists(where):
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.QEMU,
            f"backing file '{backing}' for the backup of disk '{disk}' does not exist"
            + (f" (looked for {where})" if where != backing else ""),
        )


def _address_record(qmp: Address) -> Any:
    return qmp if isinstance(qmp, str) else [qmp[0], int(qmp[1])]


@dataclass
class _Prepared:
    """A begin that has been checked and planned but has changed nothing yet."""

    bdef: BackupDef
    plan: Plan
    reuse: bool
    tuning: Tuning
    tls: nbd.TlsCreds | None
    chk: CheckpointDef | None = None  # created in the backup's transaction
    targets: list[Any] = field(default_factory=list)  # its (disk, bitmap) pairs


@dataclass
class Domain:
    """A running QEMU that pyvirtbackup is attached to (libvirt's virDomain)."""

    name: str
    uuid: str
    qmp: Address
    monitor: Monitor = field(repr=False)
    disks: list[Disk] = field(default_factory=list, repr=False)
    nodes: dict[str, blockgraph.BlockNode] = field(default_factory=dict, repr=False)
    disk_nodes: dict[str, str] | None = field(default=None, repr=False)
    job: BackupJob | None = field(default=None, repr=False)
    job_def: BackupDef | None = field(default=None, repr=False)
    completed: dict[str, Any] | None = field(default=None, repr=False)
    begin_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    attached: bool = True
    checkpoints: CheckpointTree = field(default_factory=CheckpointTree, repr=False)
    # held by whatever changes checkpoints (their bitmaps or their tree)
    checkpoint_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # what taking over an earlier process's backup found not matching QEMU
    recovery_problems: list[str] = field(default_factory=list, repr=False)

    def UUIDString(self) -> str:
        return self.uuid

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class Driver:
    """libvirt's backup API for QEMUs started by someone else.

    ``state_dir`` holds checkpoint metadata and running-job records (default
    /var/lib/pyvirtbackup as root, else $XDG_STATE_HOME/pyvirtbackup).
    ``tuning`` sets how QEMU copies (see ``qemu.plan.Tuning``); each begin may
    override it.

    Pull backups: ``tls_x509_cert_dir`` holds the NBD server's certificates
    (ca-cert.pem, server-cert.pem, server-key.pem, as libvirt's
    backup_tls_x509_cert_dir) for ``<server tls='yes'>``; ``tls_x509_verify``
    makes clients show a certificate signed by that CA. ``nbd_socket_mode`` is the
    mode of a ``transport='unix'`` socket (owner-only by default).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        tls_x509_cert_dir: str | None = None,
        tls_x509_verify: bool = True,
        tuning: Tuning | Mapping[str, Any] | None = None,
        connect_timeout: float = 10.0,
        nbd_socket_mode: int = 0o600,
    ) -> None:
        self.state = State(state_dir)
        self.tls_x509_cert_dir = tls_x509_cert_dir or DEFAULT_TLS_DIR
        self.tls_x509_verify = tls_x509_verify
        self.nbd_socket_mode = nbd_socket_mode
        self.tuning = Tuning().merged(tuning)
        self.connect_timeout = connect_timeout
        self.domains: dict[str, Domain] = {}
        self.events = EventRegistry()

    # attach / detach ------------------------------------------------------------------

    async def attach(
        self,
        name: str,
        qmp: Address,
        disks: Mapping[str, str] | None = None,
    ) -> Domain:
        """Connect to a running QEMU and discover its disks.

        ``disks`` maps disk names to top format node names, for orchestrators whose
        devices have no ids pyvirtbackup could use; it replaces discovery.
        """
        check_component(name, "domain")
        if name in self.domains:
            dom = self.domains[name]
            if dom.attached and dom.monitor.connected:
                return dom
            await self.detach(dom)
        mon = Monitor(f"pyvirtbackup-{name}")
        await mon.connect(qmp, timeout=self.connect_timeout)
        try:
            found, nodes = await self._discover(mon, disks)
            dstate = self.state.domain(name)
            record = dstate.read_record() or {}
            dom_uuid = record.get("uuid") or await self._qemu_uuid(mon)
            record.update(
                {
                    "name": name,
                    "uuid": dom_uuid,
                    "qmp": _address_record(qmp),
                    "disks": dict(disks) if disks else None,
                }
            )
            dstate.write_record(record)
        except BaseException:
            await mon.close()
            raise
        dom = Domain(name, dom_uuid, qmp, mon, found, nodes, dict(disks) if disks else None)
        dom.completed = dstate.read_completed()
        dom.checkpoints = CheckpointTree.load(dstate)
        self.domains[name] = dom
        try:
            await self._recover_job(dom)
        except BaseException:
            await self.detach(dom)
            raise
        return dom

    async def _qemu_uuid(self, mon: Monitor) -> str:
        with contextlib.suppress(VirError):
            value = (await mon.execute("query-uuid")).get("UUID", "")
            if value and value.strip("0-"):
                return value
        return str(uuidlib.uuid4())

    async def _discover(
        self, mon: Monitor, mapping: Mapping[str, str] | None
    ) -> tuple[list[Disk], dict[str, blockgraph.BlockNode]]:
        query_block = await mon.execute("query-block")
        named = await mon.execute("query-named-block-nodes", {"flat": True})
        found = blockgraph.parse_disks(query_block, named)
        if mapping:
            found = blockgraph.disks_from_mapping(mapping, found, named)
        return found, blockgraph.parse_nodes(named)

    async def refresh_disks(self, dom: Domain) -> list[Disk]:
        """Read the disks and block nodes again (guests get disks hot-plugged)."""
        dom.disks, dom.nodes = await self._discover(dom.monitor, dom.disk_nodes)
        return dom.disks

    async def detach(self, dom: Domain) -> None:
        """Stop watching a domain. A running backup goes on in QEMU (re-attach to take it over)."""
        if dom.job is not None:
            await dom.job.close()
        dom.attached = False
        await dom.monitor.close()
        if self.domains.get(dom.name) is dom:
            del self.domains[dom.name]

    async def close(self) -> None:
        for dom in list(self.domains.values()):
            await self.detach(dom)
        await self.events.drain()

    async def __aenter__(self) -> Driver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connectListAllDomains(self, flags: int = 0) -> list[Domain]:
        """Every domain recorded in the state directory, attached on the way.

        A domain whose QEMU cannot be reached is listed as inactive (its monitor is
        not connected), as libvirt lists a persistent domain that is shut off.
        HAS_CHECKPOINT / NO_CHECKPOINT look at checkpoint metadata, which does not
        need QEMU. Domains are never transient, autostarted or managed-saved here.
        """
        F = ConnectListAllDomainsFlags
        _check_flags(flags, sum(F), "connectListAllDomains")
        out: list[Domain] = []
        for name in self.state.domain_names():
            dom = self.domains.get(name)
            if dom is None or not dom.monitor.connected:
                dom = await self._attach_recorded(name)
            if self._domain_matches(dom, F(flags)):
                out.append(dom)
        return out

    async def _attach_recorded(self, name: str) -> Domain:
        record = self.state.domain(name).read_record() or {}
        qmp = record.get("qmp")
        address: Address = qmp if isinstance(qmp, str) else (qmp[0], int(qmp[1]))
        try:
            return await self.attach(name, address, record.get("disks"))
        except VirError as exc:
            log.info("domain %s is not reachable: %s", name, exc)
        dom = Domain(name, record.get("uuid", ""), address, Monitor(f"pyvirtbackup-{name}"))
        dom.completed = self.state.domain(name).read_completed()
        # metadata-only checkpoint calls (list, dumpxml, REDEFINE) need no QEMU
        dom.checkpoints = CheckpointTree.load(self.state.domain(name))
        self.domains[name] = dom
        return dom

    def _domain_matches(self, dom: Domain, flags: ConnectListAllDomainsFlags) -> bool:
        F = ConnectListAllDomainsFlags
        active = dom.monitor.connected
        has_chk = bool(self.state.domain(dom.name).checkpoint_names())

        def pair(yes: F, no: F, value: bool) -> bool:
            if flags & (yes | no) in (0, yes | no):
                return True
            return value if flags & yes else not value

        return (
            pair(F.ACTIVE, F.INACTIVE, active)
            and pair(F.PERSISTENT, F.TRANSIENT, True)
            and pair(F.HAS_CHECKPOINT, F.NO_CHECKPOINT, has_chk)
            and pair(F.HAS_SNAPSHOT, F.NO_SNAPSHOT, False)
            and pair(F.MANAGEDSAVE, F.NO_MANAGEDSAVE, False)
            and pair(F.AUTOSTART, F.NO_AUTOSTART, False)
            and (
                not flags & (F.RUNNING | F.PAUSED | F.SHUTOFF | F.OTHER)
                or (bool(flags & (F.RUNNING | F.PAUSED | F.OTHER)) and active)
                or (bool(flags & F.SHUTOFF) and not active)
            )
        )

    async def domain_state(self, dom: Domain) -> str:
        """QEMU's run state ('running', 'paused', 'prelaunch'...) or 'shut off'."""
        if not dom.monitor.connected:
            return "shut off"
        try:
            return (await dom.monitor.execute("query-status")).get("status", "unknown")
        except VirError:
            return "shut off"

    async def forget(self, name: str) -> None:
        """Drop a domain's record (the CLI's detach). Refused while a backup is recorded."""
        dstate = self.state.domain(name)
        if not dstate.exists():
            raise VirError(
                ErrorNumber.NO_DOMAIN,
                ErrorDomain.DOMAIN,
                f"Domain not found: no domain with matching name '{name}'",
            )
        if dstate.read_job() is not None:
            raise VirError(
                ErrorNumber.OPERATION_INVALID,
                ErrorDomain.DOMAIN,
                f"domain '{name}' has a backup job recorded; end it with domjobabort first",
            )
        dom = self.domains.get(name)
        if dom is not None:
            await self.detach(dom)
        dstate.delete_record()

    def _check_domain(self, dom: Domain) -> Domain:
        if not isinstance(dom, Domain) or self.domains.get(dom.name) is not dom:
            raise VirError(
                ErrorNumber.NO_DOMAIN,
                ErrorDomain.DOMAIN,
                f"domain '{getattr(dom, 'name', dom)}' is not attached to this driver",
            )
        return dom

    def _check_running(self, dom: Domain, what: str) -> None:
        if not dom.monitor.connected:
            raise VirError(
                ErrorNumber.OPERATION_UNSUPPORTED,
                ErrorDomain.QEMU,
                f"cannot {what} for inactive domain '{dom.name}': its QEMU monitor "
                "is gone (QEMU exited?)",
            )

    # backup ---------------------------------------------------------------------------

    async def domainBackupBegin(
        self,
        dom: Domain,
        backup_xml: str | None,
        checkpoint_xml: str | None = None,
        flags: int = 0,
        *,
        tuning: Tuning | Mapping[str, Any] | None = None,
    ) -> int:
        """Start a backup (virDomainBackupBegin); returns once every disk's job runs.

        With ``checkpoint_xml`` the checkpoint's bitmaps are added in the backup's
        own transaction, so the checkpoint and the backup are the same instant.
        """
        self._check_begin_args(dom, flags)
        if dom.job is not None or dom.begin_lock.locked():
            raise VirError(
                ErrorNumber.OPERATION_INVALID,
                ErrorDomain.QEMU,
                f"another backup job is already running on domain '{dom.name}'",
            )
        async with dom.begin_lock, dom.checkpoint_lock:
            prep = await self._prepare_backup(dom, backup_xml, checkpoint_xml, flags, tuning)
            try:
                job = await self._start_prepared(dom, prep)
            except BaseException:
                if prep.chk is not None:  # the transaction may have run before the failure
                    await checkpoint_ops.remove_new(dom.monitor, str(prep.chk.name), prep.targets)
                raise
            if prep.chk is not None:
                await self._record_begin_checkpoint(dom, job, prep.chk, prep.targets)
            self._save_job(dom)
        return 0

    async def backup_dry_run(
        self,
        dom: Domain,
        backup_xml: str | None,
        checkpoint_xml: str | None = None,
        flags: int = 0,
        *,
        tuning: Tuning | Mapping[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """The commands domainBackupBegin would run, in order; nothing is changed.

        Only queries reach QEMU and no socket is bound (a port still to be picked
        shows as 0). Every check begin makes before touching anything is made here
        too, so a dry run that succeeds means begin would get that far.
        """
        self._check_begin_args(dom, flags)
        async with dom.checkpoint_lock:
            prep = await self._prepare_backup(dom, backup_xml, checkpoint_xml, flags, tuning)
        if prep.bdef.is_pull:
            self._nbd_listen(dom, prep.bdef, prep.plan, prep.tls, bind=False)
        return prep.plan.describe()

    def _check_begin_args(self, dom: Domain, flags: int) -> None:
        _check_flags(flags, BackupBeginFlags.REUSE_EXTERNAL, "domainBackupBegin")
        self._check_domain(dom)

    async def _prepare_backup(
        self,
        dom: Domain,
        backup_xml: str | None,
        checkpoint_xml: str | None,
        flags: int,
        tuning: Tuning | Mapping[str, Any] | None,
    ) -> _Prepared:
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
        tls = self._pull_prepare(bdef) if bdef.is_pull else None
        plan = await self._plan(dom, bdef, reuse, job_tuning, chk, targets)
        return _Prepared(bdef, plan, reuse, job_tuning, tls, chk, targets)

    async def _start_prepared(self, dom: Domain, prep: _Prepared) -> BackupJob:
        """Start the planned job; a picked port taken meanwhile (TCP monitor) is picked again."""
        server = prep.bdef.server
        pick_port = prep.bdef.is_pull and server is not None and server.port is None
        attempt = 1
        while True:
            listener = (
                self._nbd_listen(dom, prep.bdef, prep.plan, prep.tls) if prep.bdef.is_pull else None
            )
            try:
                return await self._start_job(dom, prep.bdef, prep.plan, listener)
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
                    dom, prep.bdef, prep.reuse, prep.tuning, prep.chk, prep.targets
                )

    async def _start_job(
        self, dom: Domain, bdef: BackupDef, plan: Plan, listener: Listener | None
    ) -> BackupJob:
        job = BackupJob(dom.monitor, plan, listener=listener)
        job.callbacks = self._job_callbacks(dom, job)
        dom.job, dom.job_def = job, bdef
        try:
            await job.start()
        except BaseException:
            if dom.job is job:
                dom.job = dom.job_def = None
            raise
        return job

    def _pull_prepare(self, bdef: BackupDef) -> nbd.TlsCreds | None:
        """Pull checks that need no QEMU: where to listen, and the TLS files.

        libvirt refuses tcp without a port; we pick a free one instead (and
        GetXMLDesc shows it). Certificates are checked here, before any scratch
        image exists, where libvirt 9.0 finds a missing one only inside QEMU.
        """
        if bdef.server is None:
            bdef.server = BackupServer(transport="tcp", name="localhost")
        server = bdef.server
        if server.transport not in ("tcp", "unix"):
            raise VirError(
                ErrorNumber.OPERATION_UNSUPPORTED,
                ErrorDomain.QEMU,
                f"transport '{server.transport}' for <server> is not supported; "
                "use transport='tcp' or transport='unix'",
            )
        if not server.tls:
            return None
        nbd.check_tls_dir(self.tls_x509_cert_dir)
        bdef.tls_alias = nbd.TLS_ALIAS
        return nbd.TlsCreds(self.tls_x509_cert_dir, self.tls_x509_verify, nbd.TLS_ALIAS)

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
        port, owner-only unix socket); over a TCP monitor QEMU binds it and we
        narrow a unix socket's mode before any export exists.
        """
        server = bdef.server
        assert server is not None
        nbd.check_export_names(plan)
        if not bind:  # a dry run: the same steps, no socket
            if dom.monitor.can_pass_fds:
                address = nbd.fd_address(nbd.LISTEN_FD_NAME)
            elif server.transport == "unix":
                address = nbd.unix_address(server.socket or "")
            else:
                address = nbd.inet_address(server.name or "", server.port or 0)
            nbd.add_pull_steps(plan, address, tls=tls, pass_fd=dom.monitor.can_pass_fds)
            return Listener(
                server.transport, host=server.name, port=server.port, path=server.socket
            )
        if dom.monitor.can_pass_fds:
            if server.transport == "unix":
                assert server.socket is not None
                listener = listen.listen_unix(server.socket, self.nbd_socket_mode)
            else:
                assert server.name is not None
                listener = listen.listen_tcp(server.name, server.port)
                server.port = listener.port
            nbd.add_pull_steps(plan, nbd.fd_address(nbd.LISTEN_FD_NAME), tls=tls, pass_fd=True)
            return listener
        if server.transport == "unix":
            assert server.socket is not None
            listen.check_unix_path(server.socket)
            nbd.add_pull_steps(
                plan,
                nbd.unix_address(server.socket),
                tls=tls,
                chmod=(server.socket, self.nbd_socket_mode),
            )
            return Listener("unix", path=server.socket)
        assert server.name is not None
        server.port = server.port or listen.pick_tcp_port(server.name)
        nbd.add_pull_steps(plan, nbd.inet_address(server.name, server.port), tls=tls)
        return Listener("tcp", host=server.name, port=server.port)

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
            await checkpoint_ops.remove_new(dom.monitor, str(chk.name), targets)
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

    def _domain_disks(self, dom: Domain) -> list[DomainDisk]:
        return [
            DomainDisk(
                name=d.name,
                path=d.path,
                format=d.format or "raw",
                type=d.type,
                readonly=d.readonly,
                empty=d.empty,
            )
            for d in dom.disks
        ]

    async def _plan(
        self,
        dom: Domain,
        bdef: BackupDef,
        reuse: bool,
        tuning: Tuning,
        chk: CheckpointDef | None = None,
        targets: list[Any] | None = None,
    ) -> Plan:
        """The QEMU layer's defaults (qcow2 store, store index) and the plan."""
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
                _check_backing(d.name, d.path or "", d.backing)
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
                )
            )
        nodes = dom.nodes  # read by refresh_disks at the start of this begin
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
        )
        by_name = {dp.disk: dp for dp in plan.disks}
        for d in bdef.selected_disks():
            dp = by_name[d.name]
            d.index = dp.store_id
            if bdef.is_pull:  # GetXMLDesc shows the names clients ask for
                d.exportname, d.exportbitmap = dp.export_name, dp.export_bitmap
        return plan

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
        try:
            self.state.domain(dom.name).write_job(status.to_xml(internal=True), job.snapshot())
        except VirError as exc:  # the job goes on; a later process will lack its record
            log.error("cannot record the running backup of %s: %s", dom.name, exc)

    def _job_callbacks(self, dom: Domain, job: BackupJob) -> Callbacks:
        return Callbacks(
            changed=lambda: self._save_job(dom),
            disk_done=lambda dp, status: self._disk_done(dom, dp, status),
            finished=lambda result: self._job_finished(dom, job, result),
        )

    async def _recover_job(self, dom: Domain) -> None:
        """Take over a backup that an earlier process started (libvirt keeps it in its
        status XML across a libvirtd restart; so do we, in the state directory)."""
        dstate = self.state.domain(dom.name)
        record = dstate.read_job()
        if record is None:
            return
        xml, resources = record
        try:
            bdef = BackupDef.from_xml(xml, internal=True)
            job = BackupJob.restore(dom.monitor, resources)
        except (VirError, KeyError, TypeError, ValueError) as exc:
            log.error(
                "the recorded backup of %s is unreadable (%s); it is set aside", dom.name, exc
            )
            dstate.set_aside_job()
            dom.recovery_problems.append(f"unreadable backup record set aside: {exc}")
            return
        job.callbacks = self._job_callbacks(dom, job)
        dom.job, dom.job_def = job, bdef
        problems = await job.resume()
        for problem in problems:
            log.warning("domain %s: %s", dom.name, problem)
        dom.recovery_problems += problems
        self._save_job(dom)

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
        if dom.job is job:
            dom.job = dom.job_def = None
        self.events.emit(self, dom, DomainEventID.JOB_COMPLETED, dict(stats))

    async def domainBackupGetXMLDesc(self, dom: Domain, flags: int = 0) -> str:
        """The running backup's definition with every default filled in."""
        _check_flags(flags, 0, "domainBackupGetXMLDesc")
        self._check_domain(dom)
        if dom.job is None or dom.job_def is None:
            raise VirError(
                ErrorNumber.NO_DOMAIN_BACKUP, ErrorDomain.DOMAIN, "no domain backup job present"
            )
        return dom.job_def.to_xml()

    async def domainGetJobStats(self, dom: Domain, flags: int = 0) -> dict[str, Any]:
        """Progress of the running backup, or with COMPLETED the last finished one."""
        _check_flags(
            flags, JobStatsFlags.COMPLETED | JobStatsFlags.KEEP_COMPLETED, "domainGetJobStats"
        )
        self._check_domain(dom)
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
        _check_flags(flags, 0, "domainAbortJob")
        if flags & AbortJobFlags.POSTCOPY:  # pragma: no cover - refused by _check_flags
            raise VirError(ErrorNumber.OPERATION_INVALID, ErrorDomain.QEMU, "no post-copy job")
        self._check_domain(dom)
        job = dom.job
        if job is None or job.done.is_set():
            raise VirError(
                ErrorNumber.OPERATION_INVALID,
                ErrorDomain.QEMU,
                f"no job is active on domain '{dom.name}'",
            )
        await job.abort(wait=True)
        await self.events.drain()
        return 0

    # checkpoints ----------------------------------------------------------------------

    async def domainCheckpointCreateXML(self, dom: Domain, xml: str, flags: int = 0) -> Checkpoint:
        """Create a checkpoint (its bitmaps, one instant) or, with REDEFINE, its metadata."""
        _check_exclusive(flags, CheckpointCreateFlags.REDEFINE, CheckpointCreateFlags.QUIESCE)
        if flags & CheckpointCreateFlags.REDEFINE_VALIDATE and not (
            flags & CheckpointCreateFlags.REDEFINE
        ):
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.NONE,
                "Flag 'VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE' is required by flag "
                "'VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE'",
            )
        _check_flags(
            flags,
            CheckpointCreateFlags.REDEFINE | CheckpointCreateFlags.REDEFINE_VALIDATE,
            "domainCheckpointCreateXML",
        )
        self._check_domain(dom)
        redefine = bool(flags & CheckpointCreateFlags.REDEFINE)
        if not redefine:
            self._check_running(dom, "create checkpoint")
        chk = CheckpointDef.from_xml(xml, flags & CheckpointCreateFlags.REDEFINE)
        async with dom.checkpoint_lock:
            if redefine:
                await self._redefine_checkpoint(
                    dom, chk, bool(flags & CheckpointCreateFlags.REDEFINE_VALIDATE)
                )
            else:
                await self._create_checkpoint(dom, chk)
        return Checkpoint(dom, str(chk.name))

    def _prepare_checkpoint(self, dom: Domain, chk: CheckpointDef) -> list[Any]:
        """Everything before the bitmaps exist: align, QEMU's rules, name, parent, domain.

        Returns the (disk, bitmap) pairs to create; ``dom.disks`` must be fresh.
        """
        domdisks = self._domain_disks(dom)
        chk.align_disks(domdisks)
        by_name = {d.name: d for d in dom.disks}
        targets = [(by_name[cd.name], cd.bitmap) for cd in chk.disks if cd.checkpoint == BITMAP]
        checkpoint_ops.check_prepare(str(chk.name), targets)
        if chk.name in dom.checkpoints:
            raise VirError(
                ErrorNumber.OPERATION_FAILED,
                ErrorDomain.DOMAIN,
                f"domain moment {chk.name} already exists",
            )
        chk.parent_name = dom.checkpoints.current
        chk.set_domain(dom.name, dom.uuid, domdisks)
        return targets

    async def _create_checkpoint(self, dom: Domain, chk: CheckpointDef) -> None:
        await self.refresh_disks(dom)
        targets = self._prepare_checkpoint(dom, chk)
        await checkpoint_ops.create(dom.monitor, str(chk.name), targets)
        try:
            dom.checkpoints.add(chk, make_current=True)
        except VirError as exc:
            await checkpoint_ops.remove_new(dom.monitor, str(chk.name), targets)
            raise VirError(
                ErrorNumber.INTERNAL_ERROR,
                ErrorDomain.QEMU,
                f"unable to save metadata for checkpoint {chk.name}: {exc.message}",
            ) from None

    async def _redefine_checkpoint(self, dom: Domain, chk: CheckpointDef, validate: bool) -> None:
        """Metadata only (libvirt's RedefinePrep + Commit); QEMU is only read, to validate.

        It becomes current when its parent is current or no checkpoint is; a name
        already known is replaced, its children kept.
        """
        tree = dom.checkpoints
        chk.redefine_prep(dom.uuid, tree.parents())
        make_current = tree.current is None or (
            chk.parent_name is not None and chk.parent_name == tree.current
        )
        if validate:
            if not dom.monitor.connected:
                raise _not_running(dom)
            await self.refresh_disks(dom)
            nodes = await blockgraph.query_nodes(dom.monitor)
            checkpoint_ops.validate(
                self._checkpoint_targets(dom, chk),
                nodes,
                f"Checkpoint '{chk.name}' was not redefined. Redefine it without "
                "REDEFINE_VALIDATE to keep its metadata anyway, or take a full backup "
                "with a new checkpoint",
            )
        tree.add(chk, make_current=make_current)

    def _checkpoint_targets(self, dom: Domain, chk: CheckpointDef) -> list[Any]:
        """(disk, bitmap) for the checkpoint's bitmap disks still in the domain.

        A disk unplugged since is skipped, as libvirt tolerates it.
        """
        domdisks = self._domain_disks(dom)
        by_name = {d.name: d for d in dom.disks}
        targets = []
        for cd in chk.disks:
            found = disk_by_name(domdisks, cd.name)
            if cd.checkpoint == BITMAP and cd.bitmap and found is not None:
                targets.append((by_name[found.name], cd.bitmap))
        return targets

    def _lookup(self, chk: Checkpoint) -> tuple[Domain, CheckpointDef]:
        if not isinstance(chk, Checkpoint):
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.NONE,
                f"expected a Checkpoint, not {type(chk).__name__}",
            )
        dom = self._check_domain(chk.domain)
        return dom, dom.checkpoints.get(chk.name)

    async def domainListAllCheckpoints(self, dom: Domain, flags: int = 0) -> list[Checkpoint]:
        """The domain's checkpoints, parents before children (ROOTS, LEAVES, NO_LEAVES)."""
        _check_flags(flags, _LIST_FLAGS | CheckpointListFlags.ROOTS, "domainListAllCheckpoints")
        self._check_domain(dom)
        return [Checkpoint(dom, n) for n in dom.checkpoints.names(flags)]

    async def domainCheckpointListAllChildren(
        self, chk: Checkpoint, flags: int = 0
    ) -> list[Checkpoint]:
        """Children of a checkpoint, or with DESCENDANTS everything below it."""
        _check_flags(
            flags, _LIST_FLAGS | CheckpointListFlags.DESCENDANTS, "domainCheckpointListAllChildren"
        )
        dom, _ = self._lookup(chk)
        return [Checkpoint(dom, n) for n in dom.checkpoints.names(flags, start=chk.name)]

    async def domainCheckpointLookupByName(
        self, dom: Domain, name: str, flags: int = 0
    ) -> Checkpoint:
        _check_flags(flags, 0, "domainCheckpointLookupByName")
        self._check_domain(dom)
        dom.checkpoints.get(name)
        return Checkpoint(dom, name)

    async def domainCheckpointGetParent(self, chk: Checkpoint, flags: int = 0) -> Checkpoint:
        _check_flags(flags, 0, "domainCheckpointGetParent")
        dom, _ = self._lookup(chk)
        parent = dom.checkpoints.parent(chk.name)
        if parent is None:
            raise VirError(
                ErrorNumber.NO_DOMAIN_CHECKPOINT,
                ErrorDomain.QEMU,
                f"checkpoint '{chk.name}' does not have a parent",
            )
        return Checkpoint(dom, parent)

    async def domainCheckpointGetXMLDesc(self, chk: Checkpoint, flags: int = 0) -> str:
        """The checkpoint's XML; with SIZE each disk's bytes written since it."""
        _check_flags(
            flags,
            CheckpointXMLFlags.SECURE | CheckpointXMLFlags.NO_DOMAIN | CheckpointXMLFlags.SIZE,
            "domainCheckpointGetXMLDesc",
        )
        dom, cdef = self._lookup(chk)
        if not flags & CheckpointXMLFlags.SIZE:
            return cdef.to_xml(flags)
        if not dom.monitor.connected:
            raise _not_running(dom)
        async with dom.checkpoint_lock:
            cdef = dom.checkpoints.get(chk.name)
            await self.refresh_disks(dom)
            sizes = await checkpoint_ops.dirty_sizes(
                dom.monitor, self._checkpoint_targets(dom, cdef)
            )
        shown = copy.deepcopy(cdef)
        for cd in shown.disks:
            cd.size = sizes.get(cd.name)
        return shown.to_xml(flags)

    async def domainCheckpointDelete(self, chk: Checkpoint, flags: int = 0) -> int:
        """Delete a checkpoint: its bitmaps in every layer, then its metadata.

        Beyond libvirt 9.0: a bitmap already missing from a disk does not block the
        delete (that is the state users most need to get out of); what is missing,
        or had to stay in an implicitly opened backing image, is logged as a warning.
        """
        _check_exclusive(flags, CheckpointDeleteFlags.CHILDREN, CheckpointDeleteFlags.CHILDREN_ONLY)
        _check_flags(
            flags,
            CheckpointDeleteFlags.CHILDREN
            | CheckpointDeleteFlags.METADATA_ONLY
            | CheckpointDeleteFlags.CHILDREN_ONLY,
            "domainCheckpointDelete",
        )
        dom, _ = self._lookup(chk)
        metadata_only = bool(flags & CheckpointDeleteFlags.METADATA_ONLY)
        if not metadata_only:
            self._check_running(dom, "delete checkpoint")
        with_children = bool(
            flags & (CheckpointDeleteFlags.CHILDREN | CheckpointDeleteFlags.CHILDREN_ONLY)
        )
        keep_self = bool(flags & CheckpointDeleteFlags.CHILDREN_ONLY)
        async with dom.checkpoint_lock:
            tree = dom.checkpoints
            tree.get(chk.name)
            below = tree.descendants(chk.name) if with_children else []
            victims = below + ([] if keep_self else [chk.name])
            if not metadata_only and victims:
                await self._delete_bitmaps(dom, victims)
            if with_children:
                had_current = tree.current in below
                for name in below:
                    tree.remove(name, update_current=False)
                if had_current:
                    tree.set_current(chk.name)
            else:
                tree.reparent_children(chk.name)
            if not keep_self:
                tree.remove(chk.name, update_current=True)
        return 0

    async def _delete_bitmaps(self, dom: Domain, names: list[str]) -> None:
        await self.refresh_disks(dom)
        targets = []
        for name in names:
            targets += self._checkpoint_targets(dom, dom.checkpoints.get(name))
        removal = await checkpoint_ops.delete(dom.monitor, targets)
        for disk, bitmap in removal.missing:
            log.warning(
                "domain %s: bitmap '%s' was already missing from disk '%s'; deleted the "
                "rest of the checkpoint and its metadata",
                dom.name,
                bitmap,
                disk,
            )
        for disk, bitmap, node, image in removal.left:
            log.warning(
                "domain %s: bitmap '%s' stays in backing image %s of disk '%s': QEMU opened "
                "it implicitly (node %s), so it cannot be reopened read-write. Remove it "
                "with 'qemu-img bitmap --remove %s %s' when no QEMU has the image open",
                dom.name,
                bitmap,
                image,
                disk,
                node,
                image,
                bitmap,
            )

    # events ---------------------------------------------------------------------------

    async def connectDomainEventRegisterAny(
        self,
        dom: Domain | None,
        event_id: int,
        callback: Callable[..., Any],
        opaque: Any = None,
    ) -> int:
        """Call ``callback`` on ``event_id`` for ``dom`` (None: every domain)."""
        if dom is not None:
            self._check_domain(dom)
        return self.events.register(dom, event_id, callback, opaque)

    async def connectDomainEventDeregisterAny(self, callback_id: int) -> int:
        self.events.deregister(callback_id)
        return 0
