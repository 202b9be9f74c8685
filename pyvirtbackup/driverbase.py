"""What every part of the driver table shares: flag checks, the Domain object, and
the Driver's state (state directory, attached domains, events, settings).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checkpoints import CheckpointTree
from .conf import BackupDef, BackupServer, CheckpointDef, DomainDisk
from .enums import (
    CheckpointCreateFlags,
    CheckpointDeleteFlags,
    CheckpointListFlags,
)
from .errors import ErrorDomain, ErrorNumber, VirError
from .events import EventRegistry
from .qemu import blockgraph, nbd
from .qemu.blockgraph import Disk
from .qemu.features import QemuFeatures
from .qemu.fleecing import DEFAULT_CBW_TIMEOUT, FleecingSettings
from .qemu.job import BackupJob
from .qemu.monitor import Address, Monitor
from .qemu.plan import (
    Plan,
    Tuning,
)
from .state import State

log = logging.getLogger(__name__)

DEFAULT_TLS_DIR = "/etc/pki/pyvirtbackup"
# a picked port can be taken between our check and QEMU's bind only when QEMU binds
# it itself (a monitor over TCP cannot take our socket); then begin tries again
PORT_PICK_ATTEMPTS = 3


def check_flags(flags: int, allowed: int, function: str) -> None:
    # int(): the complement of an IntFlag stays inside the flag's own bits
    extra = int(flags) & ~int(allowed)
    if extra:
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.NONE,
            f"unsupported flags (0x{extra:x}) in function {function}",
        )


def check_exclusive(flags: int, a: enum.Flag, b: enum.Flag) -> None:
    """libvirt's VIR_EXCLUSIVE_FLAGS check, made before the driver sees the flags."""
    if flags & a and flags & b:
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.NONE,
            f"Flags '{flag_name(a)}' and '{flag_name(b)}' are mutually exclusive",
        )


def flag_name(flag: enum.Flag) -> str:
    prefix = {
        CheckpointCreateFlags: "VIR_DOMAIN_CHECKPOINT_CREATE_",
        CheckpointDeleteFlags: "VIR_DOMAIN_CHECKPOINT_DELETE_",
    }[type(flag)]
    return prefix + str(flag.name)


LIST_FLAGS = (
    CheckpointListFlags.TOPOLOGICAL | CheckpointListFlags.LEAVES | CheckpointListFlags.NO_LEAVES
)


def not_running_error(dom: Domain) -> VirError:
    """libvirt's virDomainObjCheckActive error."""
    return VirError(
        ErrorNumber.OPERATION_INVALID,
        ErrorDomain.QEMU,
        f"domain is not running: the QEMU monitor of '{dom.name}' is gone",
    )


def check_backing(disk: str, target: str, backing: str) -> None:
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


def address_record(qmp: Address) -> Any:
    return qmp if isinstance(qmp, str) else [qmp[0], int(qmp[1])]


def check_plain_tcp(server: BackupServer, allowed: bool) -> None:
    """NBD over TCP without TLS has no authentication: on 127.0.0.1 every local user
    can read the disks, elsewhere every host that reaches the address. Only on
    request (``Driver(nbd_allow_plain_tcp=True)``, the CLI's --allow-plain-tcp)."""
    if allowed:
        return
    raise VirError(
        ErrorNumber.OPERATION_DENIED,
        ErrorDomain.QEMU,
        f"a pull backup over TCP without TLS ({server.name}) lets every local user (and "
        "every host that can reach it) read the disks; use <server transport='unix' "
        "socket='...'/> in a directory only root can enter, or tls='yes', or allow plain "
        "TCP explicitly (Driver(nbd_allow_plain_tcp=True), --allow-plain-tcp)",
    )


def address_from_record(record: Mapping[str, Any]) -> Address:
    """The monitor address of a checked domain record (state.check_domain_record)."""
    qmp = record["qmp"]
    return qmp if isinstance(qmp, str) else (qmp[0], int(qmp[1]))


def _where(qmp: Address) -> str:
    return qmp if isinstance(qmp, str) else f"{qmp[0]}:{qmp[1]}"


def warn_tcp_monitor(name: str, qmp: Address) -> None:
    """QMP has neither encryption nor authentication: over TCP, whoever reaches the
    port controls QEMU (its disks, its memory, its command line)."""
    log.warning(
        "domain %s: QMP over TCP (%s) is cleartext and unauthenticated: anyone who can "
        "reach that port controls the QEMU, and descriptors cannot be passed, so sockets "
        "and files are opened by path. Give pyvirtbackup a unix socket instead "
        "(-qmp unix:PATH,server=on,wait=off in a directory only root can enter)",
        name,
        _where(qmp),
    )


def _uuid_key(value: str) -> str:
    return value.replace("-", "").lower()


def check_identity(
    name: str, qmp: Address, record: Mapping[str, Any], qemu_uuid: str | None
) -> tuple[str, bool]:
    """The domain's uuid, and whether QEMU told it; refuses another VM on the socket.

    libvirt knows a domain by its uuid. The first attach records QEMU's (-uuid), or
    a made-up one when QEMU has none; later attaches must find the same QEMU uuid
    (or, for a made-up one, still none): another VM listening on the recorded
    socket must not get this domain's checkpoints and backups.
    """
    recorded = record.get("uuid")
    if not recorded:
        return (qemu_uuid, True) if qemu_uuid else (str(uuidlib.uuid4()), False)
    from_qemu = bool(record.get("uuid_from_qemu", qemu_uuid is not None))
    if qemu_uuid is not None and _uuid_key(qemu_uuid) == _uuid_key(recorded):
        return recorded, True
    if qemu_uuid is None and not from_qemu:
        return recorded, False
    found = f"uuid {qemu_uuid}" if qemu_uuid else "no uuid"
    raise VirError(
        ErrorNumber.OPERATION_FAILED,
        ErrorDomain.DOMAIN,
        f"domain '{name}' is already defined with uuid {recorded}, but the QEMU at "
        f"{_where(qmp)} has {found}: another VM on the recorded socket? Refusing it. "
        f"If the VM was recreated on purpose, detach '{name}' and attach it again",
    )


@dataclass
class PreparedBackup:
    """A begin that has been checked and planned but has changed nothing yet."""

    bdef: BackupDef
    plan: Plan
    reuse: bool
    tuning: Tuning
    tls: nbd.TlsCreds | None
    chk: CheckpointDef | None = None  # created in the backup's transaction
    targets: list[Any] = field(default_factory=list)  # its (disk, bitmap) pairs
    fleecing: FleecingSettings | None = None
    suffix: str = ""  # what generated file names end with
    preserve_shutdown: bool = False
    job: Any = None  # the BackupJob once begin made it (how far it got, on failure)


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
    # the checkpoint created by the running backup's begin (its XML until recorded)
    job_checkpoint: str | None = field(default=None, repr=False)
    job_checkpoint_xml: str | None = field(default=None, repr=False)
    finishing: asyncio.Task[None] | None = field(default=None, repr=False)
    # what taking over an earlier process's backup found not matching QEMU
    recovery_problems: list[str] = field(default_factory=list, repr=False)
    # attached for a listing: a recorded backup not taken over yet (see _ready)
    takeover_pending: bool = field(default=False, repr=False)
    # what this QEMU supports, read at attach; nothing known until then
    features: QemuFeatures = field(default_factory=QemuFeatures.unknown, repr=False)
    agent: str | None = field(default=None, repr=False)  # the guest agent's socket

    def UUIDString(self) -> str:
        return self.uuid

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class DriverBase:
    """What the parts of the driver table share: settings, the state directory, the
    attached domains, the event registry, and the checks every entry point makes.
    ``Driver`` documents the settings."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        tls_x509_cert_dir: str | None = None,
        tls_x509_verify: bool = True,
        tuning: Tuning | Mapping[str, Any] | None = None,
        connect_timeout: float = 10.0,
        nbd_socket_mode: int = 0o600,
        nbd_allow_plain_tcp: bool = False,
        tls_allowed_dn_list: Sequence[str] | None = None,
        nbd_handshake_max_seconds: int = 10,
        keep_failed_checkpoints: bool = False,
        fleecing: bool = True,
        fleecing_dir: str | None = None,
        cbw_timeout: int = DEFAULT_CBW_TIMEOUT,
    ) -> None:
        self.state = State(state_dir)
        # libvirt keeps the checkpoint of a push that failed or was cancelled; the
        # next "incremental from the newest checkpoint" then misses the writes up to
        # it. We drop it unless told to keep libvirt's behaviour.
        self.keep_failed_checkpoints = keep_failed_checkpoints
        self.tls_x509_cert_dir = tls_x509_cert_dir or DEFAULT_TLS_DIR
        self.tls_x509_verify = tls_x509_verify
        self.nbd_socket_mode = nbd_socket_mode
        self.nbd_allow_plain_tcp = nbd_allow_plain_tcp
        if tls_allowed_dn_list is not None and not tls_x509_verify:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.NONE,
                "tls_allowed_dn_list needs tls_x509_verify: without a verified client "
                "certificate there is no name to allow",
            )
        self.tls_allowed_dn_list = (
            list(tls_allowed_dn_list) if tls_allowed_dn_list is not None else None
        )
        self.nbd_handshake_max_seconds = nbd_handshake_max_seconds
        self.fleecing = fleecing
        self.fleecing_dir = fleecing_dir
        self.cbw_timeout = cbw_timeout
        self.tuning = Tuning().merged(tuning)
        self.connect_timeout = connect_timeout
        self.domains: dict[str, Domain] = {}
        self.events = EventRegistry()

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

    def _check_domain(self, dom: Domain) -> Domain:
        if not isinstance(dom, Domain) or self.domains.get(dom.name) is not dom:
            raise VirError(
                ErrorNumber.NO_DOMAIN,
                ErrorDomain.DOMAIN,
                f"domain '{getattr(dom, 'name', dom)}' is not attached to this driver",
            )
        return dom

    async def _ready(self, dom: Domain) -> Domain:
        """``_check_domain``, and take over a recorded backup that a listing left alone."""
        self._check_domain(dom)
        if dom.takeover_pending:
            dom.takeover_pending = False
            try:
                await self._recover_job(dom)
            except BaseException:
                dom.takeover_pending = True
                raise
        return dom

    async def _recover_job(self, dom: Domain) -> None:  # pragma: no cover - BackupCalls'
        raise NotImplementedError

    def _check_running(self, dom: Domain, what: str) -> None:
        if not dom.monitor.connected:
            raise VirError(
                ErrorNumber.OPERATION_UNSUPPORTED,
                ErrorDomain.QEMU,
                f"cannot {what} for inactive domain '{dom.name}': its QEMU monitor "
                "is gone (QEMU exited?)",
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
