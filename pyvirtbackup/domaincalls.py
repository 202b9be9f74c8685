"""The domain half of the driver table that libvirt clients need around a backup:
lookups, state and info, a domain XML written from discovery, block job info for
a disk under backup, job info, the guest agent's freeze and thaw, file descriptors
associated with a domain, and the connection's version and capabilities.

libvirt answers these from the definition it started QEMU with; we answer them
from QEMU (``qemu.vminfo``) and from the state directory, so a domain attached by
another process (``pyvirtbackup attach``) is found by the next lookup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from .conf.livexml import LiveDomain, format_capabilities, format_live_domain
from .driverbase import Domain, DriverBase, check_flags
from .enums import JobType
from .errors import ErrorDomain, ErrorNumber, VirError
from .qemu import jobinfo, vminfo
from .qemu.agent import GuestAgent
from .qemu.listen import Listener

log = logging.getLogger(__name__)

# libvirt 9.0's API is the one we match (virConnectGetLibVersion)
LIB_VERSION = 9_000_000

# virDomainState and the reasons libvirt gives for QEMU's run states
STATE_NOSTATE, STATE_RUNNING, STATE_PAUSED, STATE_SHUTOFF = 0, 1, 3, 5
STATE_CRASHED, STATE_PMSUSPENDED = 6, 7
_PAUSED_REASONS = {
    "paused": 1,  # USER
    "prelaunch": 1,
    "inmigrate": 2,  # MIGRATION
    "postmigrate": 2,
    "finish-migrate": 2,
    "save-vm": 3,  # SAVE
    "io-error": 5,  # IOERROR
    "watchdog": 6,  # WATCHDOG
    "shutdown": 8,  # SHUTTING_DOWN
    "guest-panicked": 10,  # CRASHED
}
BLOCK_JOB_INFO_BANDWIDTH_BYTES = 1
FD_ASSOCIATE_SECLABEL_RESTORE = 1
FD_ASSOCIATE_SECLABEL_WRITABLE = 2
# virDomainGetXMLDesc flags: SECURE, INACTIVE, UPDATE_CPU, MIGRATABLE (all the same here)
DOMAIN_XML_FLAGS = 1 | 2 | 4 | 8


def no_domain(what: str) -> VirError:
    return VirError(
        ErrorNumber.NO_DOMAIN, ErrorDomain.QEMU, f"Domain not found: no domain with matching {what}"
    )


def not_running(dom: Domain) -> VirError:
    return VirError(ErrorNumber.OPERATION_INVALID, ErrorDomain.QEMU, "domain is not running")


@dataclass
class FDGroup:
    """Descriptors a client associated with a domain (ours: duplicates of the client's)."""

    fds: list[int]
    owner: Any  # whoever associated them; they go when it says so (its connection closes)
    flags: int = 0

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


class DomainCalls(DriverBase):
    """Lookups, state, XML, block job info, job info, fs freeze/thaw, fd association."""

    # lookups ------------------------------------------------------------------------

    async def _attach_recorded(self, name: str) -> Domain:  # pragma: no cover - Driver's
        raise NotImplementedError

    async def connectDomainLookupByName(self, name: str) -> Domain:
        """The recorded domain ``name``, attached if it was not (or its QEMU came back)."""
        try:
            dstate = self.state.domain(name)
        except VirError:
            raise no_domain(f"name '{name}'") from None
        if not dstate.exists():
            stale = self.domains.get(name)
            if stale is not None and stale.job is None:
                await self.detach(stale)  # forgotten by another process meanwhile
            raise no_domain(f"name '{name}'")
        dom = self.domains.get(name)
        if dom is not None and dom.monitor.connected:
            return dom
        return await self._attach_recorded(name)

    async def connectDomainLookupByUUID(self, uuid: str) -> Domain:
        wanted = _uuid_text(uuid)
        for name in self.state.domain_names():
            record = self.state.domain(name).read_record() or {}
            if _uuid_text(record.get("uuid", "")) == wanted:
                return await self.connectDomainLookupByName(name)
        raise no_domain(f"uuid '{wanted}'")

    async def connectDomainLookupByID(self, domain_id: int) -> Domain:
        for dom in list(self.domains.values()):
            if dom.monitor.connected and self.domainGetID(dom) == domain_id:
                return dom
        raise no_domain(f"id {domain_id}")

    def domainGetID(self, dom: Domain) -> int:
        """libvirt's id of a running domain (given when first seen running), else -1."""
        if not dom.monitor.connected:
            return -1
        ids: dict[int, int] = self.__dict__.setdefault("_domain_ids", {})
        key = id(dom)
        if key not in ids or self.domains.get(dom.name) is not dom:
            ids[key] = self.__dict__.get("_next_domain_id", 1)
            self.__dict__["_next_domain_id"] = ids[key] + 1
        return ids[key]

    # state and info -----------------------------------------------------------------

    async def domainIsActive(self, dom: Domain) -> bool:
        self._check_domain(dom)
        return dom.monitor.connected

    async def domainGetState(self, dom: Domain, flags: int = 0) -> tuple[int, int]:
        """(virDomainState, reason) from QEMU's run state."""
        check_flags(flags, 0, "domainGetState")
        self._check_domain(dom)
        if not dom.monitor.connected:
            return STATE_SHUTOFF, 0
        try:
            status = await vminfo.read_status(dom.monitor)
        except VirError:
            return STATE_SHUTOFF, 0
        return _state_of(status)

    async def domainGetInfo(self, dom: Domain) -> dict[str, int]:
        """virDomainInfo: state, maxMem and memory (KiB), nrVirtCpu, cpuTime (unknown: 0)."""
        self._check_domain(dom)
        info = {"state": STATE_SHUTOFF, "maxMem": 0, "memory": 0, "nrVirtCpu": 0, "cpuTime": 0}
        if not dom.monitor.connected:
            return info
        try:
            vm = await vminfo.read(dom.monitor, [])
        except VirError:
            return info
        info.update(
            state=_state_of(vm.status)[0],
            maxMem=vm.memory_kib,
            memory=vm.memory_kib,
            nrVirtCpu=vm.vcpus,
        )
        return info

    async def domainGetXMLDesc(self, dom: Domain, flags: int = 0) -> str:
        """A domain XML written from what QEMU shows (see conf.livexml: partial)."""
        check_flags(flags, DOMAIN_XML_FLAGS, "domainGetXMLDesc")
        self._check_domain(dom)
        live = LiveDomain(name=dom.name, uuid=dom.uuid)
        if dom.monitor.connected:
            with contextlib.suppress(VirError):
                await self.refresh_disks(dom)
                vm = await vminfo.read(dom.monitor, [d.name for d in dom.disks])
                live.id = self.domainGetID(dom)
                live.virt_type = "kvm" if vm.kvm else "qemu"
                live.memory_kib, live.vcpus = vm.memory_kib, vm.vcpus
                live.arch, live.machine = vm.arch, vm.machine
                live.disks = self._domain_disks(dom)
                live.buses = vm.buses
        return format_live_domain(live)

    async def domainGetBlockJobInfo(self, dom: Domain, disk: str, flags: int = 0) -> dict[str, int]:
        """The backup's block job on ``disk`` (name or source path); {} when there is none."""
        check_flags(flags, BLOCK_JOB_INFO_BANDWIDTH_BYTES, "domainGetBlockJobInfo")
        await self._ready(dom)  # a recorded backup is taken over before it is reported
        if not dom.monitor.connected:
            raise not_running(dom)
        found = next((d for d in dom.disks if disk in (d.name, d.path)), None)
        if found is None:
            raise VirError(
                ErrorNumber.INVALID_ARG, ErrorDomain.QEMU, f"disk '{disk}' not found in domain"
            )
        job = dom.job
        if job is None or job.done.is_set():
            return {}
        progress = await jobinfo.disk_progress(job, found.name)
        if progress is None:
            return {}
        cur, end = progress
        return {"type": 5, "bandwidth": 0, "cur": cur, "end": end}  # BLOCK_JOB_TYPE_BACKUP

    async def domainGetJobInfo(self, dom: Domain) -> dict[str, int]:
        """virDomainJobInfo of the running backup: libvirt puts its bytes in file* and data*."""
        stats: dict[str, Any] = await self.domainGetJobStats(dom)  # type: ignore[attr-defined]
        info = dict.fromkeys(
            (
                "timeElapsed",
                "timeRemaining",
                "dataTotal",
                "dataProcessed",
                "dataRemaining",
                "memTotal",
                "memProcessed",
                "memRemaining",
                "fileTotal",
                "fileProcessed",
                "fileRemaining",
            ),
            0,
        )
        info["type"] = int(stats.get("type", JobType.NONE))
        info["timeElapsed"] = int(stats.get("time_elapsed", 0))
        total, done = int(stats.get("disk_total", 0)), int(stats.get("disk_processed", 0))
        info["fileTotal"] = info["dataTotal"] = total
        info["fileProcessed"] = info["dataProcessed"] = done
        info["fileRemaining"] = info["dataRemaining"] = max(total - done, 0)
        return info

    # guest agent ----------------------------------------------------------------------

    def _agent(self, dom: Domain) -> GuestAgent:
        self._check_domain(dom)
        if not dom.monitor.connected:
            raise not_running(dom)
        if not dom.agent:
            raise VirError(
                ErrorNumber.ARGUMENT_UNSUPPORTED,
                ErrorDomain.QEMU,
                "QEMU guest agent is not configured",
            )
        return GuestAgent(dom.agent)

    async def domainFSFreeze(
        self, dom: Domain, mountpoints: list[str] | None = None, flags: int = 0
    ) -> int:
        """Freeze the guest's filesystems (the listed ones, or all); returns how many."""
        check_flags(flags, 0, "domainFSFreeze")
        return await self._agent(dom).fsfreeze(mountpoints or None)

    async def domainFSThaw(
        self, dom: Domain, mountpoints: list[str] | None = None, flags: int = 0
    ) -> int:
        check_flags(flags, 0, "domainFSThaw")
        if mountpoints:
            raise VirError(
                ErrorNumber.ARGUMENT_UNSUPPORTED,
                ErrorDomain.QEMU,
                "specifying mountpoints is not supported",
            )
        return await self._agent(dom).fsthaw()

    # file descriptors ---------------------------------------------------------------------

    def _fd_groups(self) -> dict[tuple[str, str], FDGroup]:
        groups: dict[tuple[str, str], FDGroup] = self.__dict__.setdefault("_fd_group_table", {})
        return groups

    async def domainFDAssociate(
        self, dom: Domain, name: str, fds: list[int], flags: int = 0, *, owner: Any = None
    ) -> int:
        """Keep copies of ``fds`` as group ``name`` of ``dom`` (virDomainFDAssociate).

        A pull backup's ``<server transport='fd' fdgroup='name'/>`` then serves NBD
        on the listening socket passed. The group lasts until ``fd_groups_release``
        with the same ``owner`` (the daemon: when that client's connection closes)
        or until the name is associated again.
        """
        check_flags(
            flags,
            FD_ASSOCIATE_SECLABEL_RESTORE | FD_ASSOCIATE_SECLABEL_WRITABLE,
            "domainFDAssociate",
        )
        self._check_domain(dom)
        if not fds:
            return 0
        copies: list[int] = []
        try:
            for fd in fds:
                copies.append(os.dup(fd))
        except OSError as exc:
            for fd in copies:
                os.close(fd)
            raise VirError(
                ErrorNumber.SYSTEM_ERROR,
                ErrorDomain.QEMU,
                f"failed to duplicate passed fd with index '{len(copies)}': {exc.strerror}",
            ) from None
        old = self._fd_groups().pop((dom.name, name), None)
        if old is not None:
            old.close()
        self._fd_groups()[(dom.name, name)] = FDGroup(copies, owner, flags)
        return 0

    def fd_groups_release(self, owner: Any) -> None:
        """Close the groups ``owner`` associated (libvirt: when its connection closes)."""
        table = self._fd_groups()
        for key in [k for k, g in table.items() if g.owner is owner]:
            table.pop(key).close()

    def _fd_listener(self, dom: Domain, group: str) -> Listener:
        """The listening socket of fd group ``group``, ready to be handed to QEMU."""
        found = self._fd_groups().get((dom.name, group))
        if found is None or not found.fds:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.QEMU,
                f"file descriptor group '{group}' was not associated with domain "
                f"'{dom.name}' (virDomainFDAssociate first, on the same connection)",
            )
        if not dom.monitor.can_pass_fds:
            raise VirError(
                ErrorNumber.OPERATION_UNSUPPORTED,
                ErrorDomain.QEMU,
                "transport 'fd' needs a QMP monitor on a unix socket to pass the descriptor",
            )
        sock = socket.socket(fileno=os.dup(found.fds[0]))
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            stream = sock.type == socket.SOCK_STREAM
        except OSError:
            listening = stream = False
        if not (listening and stream):
            sock.close()
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.QEMU,
                f"file descriptor group '{group}' does not hold a listening stream socket",
            )
        return Listener("fd", sock)

    # the connection -------------------------------------------------------------------

    async def connectGetVersion(self) -> int:
        """The hypervisor's version (major * 1000000 + minor * 1000 + micro), from any
        running QEMU; 0 when none is attached."""
        for dom in list(self.domains.values()):
            if not dom.monitor.connected:
                continue
            with contextlib.suppress(VirError, KeyError, TypeError):
                qemu = (await dom.monitor.execute("query-version"))["qemu"]
                return (
                    int(qemu["major"]) * 1_000_000 + int(qemu["minor"]) * 1_000 + int(qemu["micro"])
                )
        return 0

    async def connectGetCapabilities(self) -> str:
        arch = os.uname().machine
        host_uuid = None
        with contextlib.suppress(OSError, ValueError):
            with open("/etc/machine-id") as f:
                host_uuid = str(uuidlib.UUID(f.read().strip()))
        return format_capabilities(host_uuid, arch, shutil.which(f"qemu-system-{arch}"))


def _state_of(status: str) -> tuple[int, int]:
    if status == "running":
        return STATE_RUNNING, 1  # BOOTED
    if status in ("suspended",):
        return STATE_PMSUSPENDED, 0
    if status == "guest-panicked":
        return STATE_CRASHED, 0
    return STATE_PAUSED, _PAUSED_REASONS.get(status, 0)


def _uuid_text(value: str | bytes) -> str:
    with contextlib.suppress(ValueError, TypeError):
        if isinstance(value, bytes):
            return str(uuidlib.UUID(bytes=value))
        return str(uuidlib.UUID(value))
    return str(value)
