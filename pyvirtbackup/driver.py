"""The driver table: libvirt's backup and checkpoint entry points, as coroutines.

Thin on purpose: flag and argument checks, one backup job per domain, then ``conf``
for the XML and ``qemu`` for QMP, recording state and emitting events in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .backupcalls import BackupCalls
from .checkpoints import CheckpointTree
from .domaincalls import DomainCalls
from .driverbase import (
    DEFAULT_TLS_DIR,
    Domain,
    address_from_record,
    address_record,
    check_flags,
    check_identity,
    warn_tcp_monitor,
)
from .enums import (
    ConnectListAllDomainsFlags,
)
from .errors import ErrorDomain, ErrorNumber, VirError
from .qemu.features import probe as probe_features
from .qemu.job import BackupJob
from .qemu.monitor import Address, Monitor
from .state import DomainState, check_component

__all__ = ["DEFAULT_TLS_DIR", "Domain", "Driver"]

log = logging.getLogger(__name__)


class Driver(BackupCalls, DomainCalls):
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
    ``nbd_allow_plain_tcp`` allows a TCP server without TLS, which every local
    user can read (refused by default). ``tls_allowed_dn_list`` admits only
    client certificates whose Distinguished Name matches one of its glob
    patterns (libvirt's setting of that name; QEMU's tls-authz).

    ``nbd_handshake_max_seconds``: a client that has not finished its NBD (and
    TLS) handshake by then is dropped, where QEMU can do that (10.0+; see
    ``Domain.features``).

    Fleecing (on by default, ``fleecing=False`` or a begin's ``fleecing=False`` for
    libvirt's direct sequence): the guest's writes wait only for a local fleecing
    image, never for the backup's target or scratch; a write waits at most
    ``cbw_timeout`` seconds for it before the backup (not the write) fails. A push
    disk's image goes where ``pvb:fleecing`` says, else into ``fleecing_dir``, else
    next to the disk's image (else into the state directory).

    ``keep_failed_checkpoints``: libvirt keeps the checkpoint created with a push
    that then failed or was cancelled; by default we drop it (see backupcalls).
    ``connect_timeout`` bounds every wait for QEMU's monitor to answer a connect.
    """

    # attach / detach ------------------------------------------------------------------

    async def attach(
        self,
        name: str,
        qmp: Address,
        disks: Mapping[str, str] | None = None,
        agent: str | None = None,
    ) -> Domain:
        """Connect to a running QEMU and discover its disks.

        ``disks`` maps disk names to top format node names, for orchestrators whose
        devices have no ids pyvirtbackup could use; it replaces discovery. A backup
        recorded for the domain is taken over. ``agent`` is the unix socket of the
        guest agent's channel, for fs freeze/thaw.
        """
        return await self._attach(name, qmp, disks, agent=agent, take_over=True)

    async def _attach(
        self,
        name: str,
        qmp: Address,
        disks: Mapping[str, str] | None,
        *,
        take_over: bool,
        agent: str | None = None,
    ) -> Domain:
        """Attach; without ``take_over`` nothing is written and a recorded backup is
        left as it is until the first call that needs it (``_ready``)."""
        check_component(name, "domain")
        if name in self.domains:
            dom = self.domains[name]
            if dom.attached and dom.monitor.connected:
                if take_over:
                    await self._ready(dom)
                return dom
            await self.detach(dom)
        if not isinstance(qmp, str):
            warn_tcp_monitor(name, qmp)
        dstate = self.state.domain(name)
        mon = Monitor(f"pyvirtbackup-{name}")
        try:
            await mon.connect(qmp, timeout=self.connect_timeout)
            features = await probe_features(mon)
            found, nodes = await self._discover(mon, disks)
            record = dstate.read_record() or {}
            qemu_uuid = await self._qemu_uuid(mon)
            dom_uuid, from_qemu = check_identity(name, qmp, record, qemu_uuid)
            if take_over:
                record.update(
                    {
                        "name": name,
                        "uuid": dom_uuid,
                        "uuid_from_qemu": from_qemu,
                        "qmp": address_record(qmp),
                        "disks": dict(disks) if disks else None,
                        "agent": agent,
                    }
                )
                dstate.write_record(record)
            dom = Domain(name, dom_uuid, qmp, mon, found, nodes, dict(disks) if disks else None)
            dom.agent = agent
            dom.features = features
            dom.completed = dstate.read_completed(dom.recovery_problems, set_aside=take_over)
            dom.checkpoints = CheckpointTree.load(dstate)
        except BaseException:
            await mon.close()
            raise
        log.info("domain %s: QEMU %s", name, features.version_string)
        for f in features.features.values():
            log.debug("domain %s: %s %s: %s", name, f.name, f.present, f.reason)
        self.domains[name] = dom
        if not take_over:
            dom.takeover_pending = dstate.has_job()
            return dom
        try:
            await self._recover_job(dom)
        except BaseException:
            await self.detach(dom)
            raise
        return dom

    async def _qemu_uuid(self, mon: Monitor) -> str | None:
        """QEMU's -uuid, or None when it was started without one (all zeroes)."""
        with contextlib.suppress(VirError):
            value = (await mon.execute("query-uuid")).get("UUID", "")
            if value and value.strip("0-"):
                return str(value)
        return None

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
        check_flags(flags, sum(F), "connectListAllDomains")
        out: list[Domain] = []
        for name in self.state.domain_names():
            dom = self.domains.get(name)
            if dom is None or not dom.monitor.connected:
                dom = await self._attach_recorded(name)
            if self._domain_matches(dom, F(flags)):
                out.append(dom)
        return out

    async def _attach_recorded(self, name: str) -> Domain:
        """Attach for a listing: nothing is written, no recorded backup is acted on.

        Listing reads records that decide what gets deleted; it must never be the
        step that acts on them. One attach at a time per domain: QEMU serves a QMP
        socket to one client at a time, so a second connect would wait for the first.
        """
        lock = self.__dict__.setdefault("_attach_locks", {}).setdefault(name, asyncio.Lock())
        async with lock:
            dom = self.domains.get(name)
            if dom is not None and dom.monitor.connected:
                return dom
            return await self._attach_recorded_locked(name)

    async def _attach_recorded_locked(self, name: str) -> Domain:
        dstate = self.state.domain(name)
        record: dict[str, Any] = {}
        address: Address = ""
        try:
            record = dstate.read_record() or {}
            address = address_from_record(record)
        except VirError as exc:
            log.warning("domain %s: %s", name, exc.message)
        else:
            try:
                return await self._attach(
                    name, address, record.get("disks"), agent=record.get("agent"), take_over=False
                )
            except VirError as exc:
                log.info("domain %s is not reachable: %s", name, exc)
        dom = Domain(name, record.get("uuid", ""), address, Monitor(f"pyvirtbackup-{name}"))
        dom.completed = self._peek_completed(dstate)
        # metadata-only checkpoint calls (list, dumpxml, REDEFINE) need no QEMU
        dom.checkpoints = CheckpointTree.load(dstate)
        self.domains[name] = dom
        return dom

    @staticmethod
    def _peek_completed(dstate: DomainState) -> dict[str, Any] | None:
        try:
            return dstate.read_completed(set_aside=False)
        except VirError:
            return None

    async def peek_job(self, dom: Domain) -> dict[str, Any] | None:
        """The running backup's mode and progress, without taking it over (listings).

        A backup recorded by another process is read from its record and QEMU's
        ``query-jobs``; nothing is written and nothing in QEMU is touched.
        """
        self._check_domain(dom)
        if dom.job is not None and not dom.job.done.is_set():
            stats = await dom.job.stats()
            return {"mode": dom.job.mode, **stats, "type": int(stats["type"])}
        if not dom.takeover_pending or not dom.monitor.connected:
            return None
        try:
            record = self.state.domain(dom.name).read_job()
            if record is None:
                return None
            job = BackupJob.restore(dom.monitor, record[1])
        except (VirError, ValueError) as exc:
            log.warning("domain %s: the recorded backup is unreadable: %s", dom.name, exc)
            return None
        stats = await job.stats()
        return {"mode": job.mode, **stats, "type": int(stats["type"])}

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
