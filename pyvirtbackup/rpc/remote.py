"""REMOTE_PROGRAM's procedures mapped onto the driver table, one ``Session`` per client.

Each handler takes the decoded arguments (a dict shaped by ``protocol.SIGNATURES``)
and returns the reply value; a ``VirError`` travels back as ``remote_error`` with
libvirt's number and message prefix. Nothing here knows QMP: it only calls the
driver. A procedure without a handler is answered NO_SUPPORT, by name.
"""

from __future__ import annotations

import logging
import socket
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..checkpoints import Checkpoint
from ..domaincalls import LIB_VERSION
from ..driver import Domain, Driver
from ..enums import DomainEventID
from ..errors import ErrorDomain, ErrorNumber, VirError
from . import protocol as P
from .procnames import procedure_name
from .protocol import Proc, TypedParamType

log = logging.getLogger(__name__)

CONNECT_RO = 1  # virConnectFlags
DOMAIN_EVENT_ID_LAST = 27  # libvirt 9.0: every id below it may be registered
URI = "qemu:///system"
_EMITTED = frozenset(int(e) for e in DomainEventID)

# libvirt's message prefix per error number (virErrorMsg), so that clients print
# what libvirt's daemon would have sent
_PREFIXES = {
    ErrorNumber.INTERNAL_ERROR: "internal error",
    ErrorNumber.NO_SUPPORT: "this function is not supported by the connection driver",
    ErrorNumber.NO_CONNECT: "no connection driver available for",
    ErrorNumber.INVALID_ARG: "invalid argument",
    ErrorNumber.OPERATION_FAILED: "operation failed",
    ErrorNumber.XML_ERROR: "XML error",
    ErrorNumber.OPERATION_DENIED: "operation forbidden",
    ErrorNumber.NO_DOMAIN: "Domain not found",
    ErrorNumber.AUTH_FAILED: "authentication failed",
    ErrorNumber.OPERATION_INVALID: "Requested operation is not valid",
    ErrorNumber.CONFIG_UNSUPPORTED: "unsupported configuration",
    ErrorNumber.OPERATION_TIMEOUT: "Timed out during operation",
    ErrorNumber.ARGUMENT_UNSUPPORTED: "argument unsupported",
    ErrorNumber.OPERATION_ABORTED: "operation aborted",
    ErrorNumber.OPERATION_UNSUPPORTED: "Operation not supported",
    ErrorNumber.AGENT_UNRESPONSIVE: "Guest agent is not responding",
    ErrorNumber.XML_INVALID_SCHEMA: "XML document failed to validate against schema",
    ErrorNumber.INVALID_DOMAIN_CHECKPOINT: "Invalid domain checkpoint",
    ErrorNumber.NO_DOMAIN_CHECKPOINT: "Domain checkpoint not found",
    ErrorNumber.NO_DOMAIN_BACKUP: "Domain backup job id not found",
    ErrorNumber.CHECKPOINT_INCONSISTENT: "checkpoint inconsistent",
}

# the typed parameters of job stats, in libvirt's order, with libvirt's types
_JOB_PARAMS = (
    ("operation", TypedParamType.INT),
    ("time_elapsed", TypedParamType.ULLONG),
    ("time_remaining", TypedParamType.ULLONG),
    ("disk_total", TypedParamType.ULLONG),
    ("disk_processed", TypedParamType.ULLONG),
    ("disk_remaining", TypedParamType.ULLONG),
    ("disk_temp_used", TypedParamType.ULLONG),
    ("disk_temp_total", TypedParamType.ULLONG),
    ("success", TypedParamType.BOOLEAN),
    ("errmsg", TypedParamType.STRING),
)


def error_value(exc: VirError) -> dict[str, Any]:
    """A VirError as remote_error, with libvirt's message prefix for its number."""
    message = exc.message
    prefix = _PREFIXES.get(exc.code)
    if prefix and not message.startswith(prefix):
        message = f"{prefix}: {message}" if message else prefix
    return {
        "code": int(exc.code),
        "domain": int(exc.domain),
        "message": message,
        "level": P.VIR_ERR_ERROR,
        "dom": None,
        "str1": message,
        "str2": None,
        "str3": None,
        "int1": -1,
        "int2": -1,
        "net": None,
    }


def unsupported(number: int) -> VirError:
    name = procedure_name(number)
    what = f"REMOTE_PROC_{name} ({number})" if name else f"unknown procedure {number}"
    return VirError(
        ErrorNumber.NO_SUPPORT,
        ErrorDomain.REMOTE,
        f"{what} is not served by pyvirtbackup's daemon",
    )


def typed_params(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Job statistics as remote_typed_param, in libvirt's order (``type`` goes apart)."""
    out = []
    known = dict(_JOB_PARAMS)
    for field, ptype in _JOB_PARAMS:
        if field in stats:
            out.append({"field": field, "value": (ptype, _param_value(ptype, stats[field]))})
    for field, value in stats.items():
        if field == "type" or field in known:
            continue
        ptype = _guess_type(value)
        out.append({"field": field, "value": (ptype, _param_value(ptype, value))})
    return out


def _guess_type(value: Any) -> TypedParamType:
    if isinstance(value, bool):
        return TypedParamType.BOOLEAN
    if isinstance(value, int):
        return TypedParamType.ULLONG if value >= 0 else TypedParamType.LLONG
    if isinstance(value, float):
        return TypedParamType.DOUBLE
    return TypedParamType.STRING


def _param_value(ptype: TypedParamType, value: Any) -> Any:
    if ptype == TypedParamType.BOOLEAN:
        return bool(value)
    if ptype == TypedParamType.STRING:
        return str(value)
    if ptype == TypedParamType.DOUBLE:
        return float(value)
    return int(value)


@dataclass(frozen=True)
class Handler:
    func: Callable[[Session, dict[str, Any], list[int]], Awaitable[Any]]
    needs_open: bool = True
    writes: bool = False  # refused on a read-only connection


HANDLERS: dict[int, Handler] = {}


def handles(
    proc: Proc, *, needs_open: bool = True, writes: bool = False
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    def register(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        if proc not in P.SIGNATURES:  # pragma: no cover - a declaration is missing
            raise AssertionError(f"no signature declared for {proc!r}")
        HANDLERS[proc] = Handler(func, needs_open, writes)
        return func

    return register


EventSender = Callable[[int, dict[str, Any]], None]


class Session:
    """One client connection's view of the daemon: open or not, read-only or not,
    its event callbacks and its associated descriptors."""

    def __init__(self, driver: Driver, send_event: EventSender) -> None:
        self.driver = driver
        self.send_event = send_event
        self.opened = False
        self.readonly = False
        self.keepalive = False
        # our callbackID -> (event id, domain name or None, the driver's registration id)
        self.callbacks: dict[int, tuple[int, str | None, int | None]] = {}
        self._next_callback = 0

    async def call(self, number: int, args: Any, fds: list[int]) -> Any:
        handler = HANDLERS.get(number)
        if handler is None:
            raise unsupported(number)
        if handler.needs_open and not self.opened:
            raise VirError(
                ErrorNumber.INTERNAL_ERROR, ErrorDomain.RPC, "hypervisor connection not open"
            )
        if handler.writes and self.readonly:
            raise VirError(
                ErrorNumber.OPERATION_DENIED,
                ErrorDomain.REMOTE,
                "read only access prevents "
                + (f"REMOTE_PROC_{procedure_name(number)}" if procedure_name(number) else "it"),
            )
        return await handler.func(self, args, fds)

    async def close(self) -> None:
        """The connection is gone: its callbacks and descriptors go with it."""
        for _event, _name, reg in self.callbacks.values():
            if reg is not None:
                try:
                    await self.driver.connectDomainEventDeregisterAny(reg)
                except VirError:
                    pass
        self.callbacks.clear()
        self.driver.fd_groups_release(self)
        self.opened = False

    # wire <-> driver objects ------------------------------------------------------

    def wire_domain(self, dom: Domain) -> dict[str, Any]:
        try:
            raw = uuidlib.UUID(dom.uuid).bytes
        except (ValueError, TypeError):
            raw = uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"pyvirtbackup:{dom.name}").bytes
        return {"name": dom.name, "uuid": raw, "id": self.driver.domainGetID(dom)}

    def wire_checkpoint(self, chk: Checkpoint) -> dict[str, Any]:
        return {"name": chk.name, "dom": self.wire_domain(chk.domain)}

    async def domain(self, wire: dict[str, Any]) -> Domain:
        """The driver's domain for a remote_nonnull_domain (by name, uuid checked)."""
        try:
            dom = await self.driver.connectDomainLookupByName(wire["name"])
        except VirError:
            dom = await self.driver.connectDomainLookupByUUID(wire["uuid"])
        if wire["uuid"] != self.wire_domain(dom)["uuid"]:
            dom = await self.driver.connectDomainLookupByUUID(wire["uuid"])
        return dom

    async def checkpoint(self, wire: dict[str, Any]) -> Checkpoint:
        return Checkpoint(await self.domain(wire["dom"]), wire["name"])


# --- the connection ------------------------------------------------------------------


@handles(Proc.AUTH_LIST, needs_open=False)
async def auth_list(s: Session, args: Any, fds: list[int]) -> Any:
    return {"types": [P.REMOTE_AUTH_NONE]}


@handles(Proc.CONNECT_SUPPORTS_FEATURE, needs_open=False)
async def supports_feature(s: Session, args: Any, fds: list[int]) -> Any:
    feature = args["feature"]
    if feature == P.FEATURE_PROGRAM_KEEPALIVE:
        s.keepalive = True
        return {"supported": 1}
    if not s.opened:
        raise VirError(
            ErrorNumber.INTERNAL_ERROR, ErrorDomain.RPC, "hypervisor connection not open"
        )
    supported = feature in (
        P.FEATURE_FD_PASSING,
        P.FEATURE_TYPED_PARAM_STRING,
        P.FEATURE_REMOTE_EVENT_CALLBACK,
        P.FEATURE_REMOTE_CLOSE_CALLBACK,
    )
    return {"supported": int(supported)}


@handles(Proc.CONNECT_OPEN, needs_open=False)
async def connect_open(s: Session, args: Any, fds: list[int]) -> Any:
    name = args["name"]
    if name:
        parts = urlsplit(name)
        if parts.scheme != "qemu" or parts.path.rstrip("/") not in ("/system", ""):
            raise VirError(
                ErrorNumber.NO_CONNECT,
                ErrorDomain.RPC,
                f"{name}: pyvirtbackup's daemon serves {URI} only",
            )
    s.opened = True
    s.readonly = bool(args["flags"] & CONNECT_RO)
    return None


@handles(Proc.CONNECT_CLOSE)
async def connect_close(s: Session, args: Any, fds: list[int]) -> Any:
    await s.close()
    return None


@handles(Proc.CONNECT_REGISTER_CLOSE_CALLBACK)
async def register_close_callback(s: Session, args: Any, fds: list[int]) -> Any:
    return None


@handles(Proc.CONNECT_UNREGISTER_CLOSE_CALLBACK)
async def unregister_close_callback(s: Session, args: Any, fds: list[int]) -> Any:
    return None


@handles(Proc.CONNECT_GET_TYPE)
async def get_type(s: Session, args: Any, fds: list[int]) -> Any:
    return {"type": "QEMU"}


@handles(Proc.CONNECT_GET_VERSION)
async def get_version(s: Session, args: Any, fds: list[int]) -> Any:
    return {"hv_ver": await s.driver.connectGetVersion()}


@handles(Proc.CONNECT_GET_LIB_VERSION)
async def get_lib_version(s: Session, args: Any, fds: list[int]) -> Any:
    return {"lib_ver": LIB_VERSION}


@handles(Proc.CONNECT_GET_HOSTNAME)
async def get_hostname(s: Session, args: Any, fds: list[int]) -> Any:
    return {"hostname": socket.gethostname()}


@handles(Proc.CONNECT_GET_URI)
async def get_uri(s: Session, args: Any, fds: list[int]) -> Any:
    return {"uri": URI}


@handles(Proc.CONNECT_IS_SECURE)
async def is_secure(s: Session, args: Any, fds: list[int]) -> Any:
    return {"secure": 1}  # a local unix socket (or one reached over ssh)


@handles(Proc.CONNECT_GET_CAPABILITIES)
async def get_capabilities(s: Session, args: Any, fds: list[int]) -> Any:
    return {"capabilities": await s.driver.connectGetCapabilities()}


@handles(Proc.NODE_GET_SECURITY_MODEL)
async def node_security_model(s: Session, args: Any, fds: list[int]) -> Any:
    return {"model": [], "doi": []}  # no security driver: nothing to print


# --- domains -------------------------------------------------------------------------


@handles(Proc.DOMAIN_LOOKUP_BY_NAME)
async def lookup_by_name(s: Session, args: Any, fds: list[int]) -> Any:
    return {"dom": s.wire_domain(await s.driver.connectDomainLookupByName(args["name"]))}


@handles(Proc.DOMAIN_LOOKUP_BY_UUID)
async def lookup_by_uuid(s: Session, args: Any, fds: list[int]) -> Any:
    return {"dom": s.wire_domain(await s.driver.connectDomainLookupByUUID(args["uuid"]))}


@handles(Proc.DOMAIN_LOOKUP_BY_ID)
async def lookup_by_id(s: Session, args: Any, fds: list[int]) -> Any:
    await s.driver.connectListAllDomains()  # attach what was recorded meanwhile
    return {"dom": s.wire_domain(await s.driver.connectDomainLookupByID(args["id"]))}


@handles(Proc.CONNECT_LIST_ALL_DOMAINS)
async def list_all_domains(s: Session, args: Any, fds: list[int]) -> Any:
    doms = await s.driver.connectListAllDomains(args["flags"])
    wire = [s.wire_domain(d) for d in doms] if args["need_results"] else []
    return {"domains": wire, "ret": len(doms)}


@handles(Proc.CONNECT_NUM_OF_DOMAINS)
async def num_of_domains(s: Session, args: Any, fds: list[int]) -> Any:
    doms = await s.driver.connectListAllDomains()
    return {"num": sum(1 for d in doms if d.monitor.connected)}


@handles(Proc.CONNECT_LIST_DOMAINS)
async def list_domains(s: Session, args: Any, fds: list[int]) -> Any:
    doms = await s.driver.connectListAllDomains()
    ids = [s.driver.domainGetID(d) for d in doms if d.monitor.connected]
    return {"ids": ids[: max(args["maxids"], 0)]}


@handles(Proc.CONNECT_NUM_OF_DEFINED_DOMAINS)
async def num_of_defined(s: Session, args: Any, fds: list[int]) -> Any:
    doms = await s.driver.connectListAllDomains()
    return {"num": sum(1 for d in doms if not d.monitor.connected)}


@handles(Proc.CONNECT_LIST_DEFINED_DOMAINS)
async def list_defined(s: Session, args: Any, fds: list[int]) -> Any:
    doms = await s.driver.connectListAllDomains()
    names = [d.name for d in doms if not d.monitor.connected]
    return {"names": names[: max(args["maxnames"], 0)]}


@handles(Proc.DOMAIN_GET_INFO)
async def get_info(s: Session, args: Any, fds: list[int]) -> Any:
    return await s.driver.domainGetInfo(await s.domain(args["dom"]))


@handles(Proc.DOMAIN_GET_STATE)
async def get_state(s: Session, args: Any, fds: list[int]) -> Any:
    state, reason = await s.driver.domainGetState(await s.domain(args["dom"]), args["flags"])
    return {"state": state, "reason": reason}


@handles(Proc.DOMAIN_IS_ACTIVE)
async def is_active(s: Session, args: Any, fds: list[int]) -> Any:
    return {"active": int(await s.driver.domainIsActive(await s.domain(args["dom"])))}


@handles(Proc.DOMAIN_IS_PERSISTENT)
async def is_persistent(s: Session, args: Any, fds: list[int]) -> Any:
    await s.domain(args["dom"])
    return {"persistent": 1}  # recorded in the state directory until detached


@handles(Proc.DOMAIN_IS_UPDATED)
async def is_updated(s: Session, args: Any, fds: list[int]) -> Any:
    await s.domain(args["dom"])
    return {"updated": 0}


@handles(Proc.DOMAIN_GET_AUTOSTART)
async def get_autostart(s: Session, args: Any, fds: list[int]) -> Any:
    await s.domain(args["dom"])
    return {"autostart": 0}  # QEMU is started by someone else


@handles(Proc.DOMAIN_HAS_MANAGED_SAVE_IMAGE)
async def has_managed_save(s: Session, args: Any, fds: list[int]) -> Any:
    await s.domain(args["dom"])
    return {"result": 0}


@handles(Proc.DOMAIN_GET_OS_TYPE)
async def get_os_type(s: Session, args: Any, fds: list[int]) -> Any:
    await s.domain(args["dom"])
    return {"type": "hvm"}


@handles(Proc.DOMAIN_GET_MESSAGES)
async def get_messages(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    return {"msgs": [f"pyvirtbackup: {p}" for p in dom.recovery_problems]}


@handles(Proc.DOMAIN_GET_XML_DESC)
async def get_xml_desc(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    return {"xml": await s.driver.domainGetXMLDesc(dom, args["flags"])}


@handles(Proc.DOMAIN_GET_BLOCK_JOB_INFO)
async def get_block_job_info(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    info = await s.driver.domainGetBlockJobInfo(dom, args["path"], args["flags"])
    if not info:
        return {"found": 0, "type": 0, "bandwidth": 0, "cur": 0, "end": 0}
    return {"found": 1, **info}


@handles(Proc.DOMAIN_FSFREEZE, writes=True)
async def fsfreeze(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    count = await s.driver.domainFSFreeze(dom, args["mountpoints"], args["flags"])
    return {"filesystems": count}


@handles(Proc.DOMAIN_FSTHAW, writes=True)
async def fsthaw(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    count = await s.driver.domainFSThaw(dom, args["mountpoints"], args["flags"])
    return {"filesystems": count}


@handles(Proc.DOMAIN_FD_ASSOCIATE, writes=True)
async def fd_associate(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    await s.driver.domainFDAssociate(dom, args["name"], fds, args["flags"], owner=s)
    return None


# --- backups and jobs -------------------------------------------------------------------


@handles(Proc.DOMAIN_BACKUP_BEGIN, writes=True)
async def backup_begin(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    # flags pass through unchanged: the driver decides which it accepts
    await s.driver.domainBackupBegin(dom, args["backup_xml"], args["checkpoint_xml"], args["flags"])
    return None


@handles(Proc.DOMAIN_BACKUP_GET_XML_DESC)
async def backup_get_xml_desc(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    return {"xml": await s.driver.domainBackupGetXMLDesc(dom, args["flags"])}


@handles(Proc.DOMAIN_GET_JOB_STATS)
async def get_job_stats(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    stats = await s.driver.domainGetJobStats(dom, args["flags"])
    return {"type": int(stats.get("type", 0)), "params": typed_params(stats)}


@handles(Proc.DOMAIN_GET_JOB_INFO)
async def get_job_info(s: Session, args: Any, fds: list[int]) -> Any:
    return await s.driver.domainGetJobInfo(await s.domain(args["dom"]))


@handles(Proc.DOMAIN_ABORT_JOB, writes=True)
async def abort_job(s: Session, args: Any, fds: list[int]) -> Any:
    await s.driver.domainAbortJob(await s.domain(args["dom"]))
    return None


@handles(Proc.DOMAIN_ABORT_JOB_FLAGS, writes=True)
async def abort_job_flags(s: Session, args: Any, fds: list[int]) -> Any:
    await s.driver.domainAbortJob(await s.domain(args["dom"]), args["flags"])
    return None


# --- checkpoints -----------------------------------------------------------------------


@handles(Proc.DOMAIN_CHECKPOINT_CREATE_XML, writes=True)
async def checkpoint_create(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    chk = await s.driver.domainCheckpointCreateXML(dom, args["xml_desc"], args["flags"])
    return {"checkpoint": s.wire_checkpoint(chk)}


@handles(Proc.DOMAIN_CHECKPOINT_GET_XML_DESC)
async def checkpoint_get_xml_desc(s: Session, args: Any, fds: list[int]) -> Any:
    chk = await s.checkpoint(args["checkpoint"])
    return {"xml": await s.driver.domainCheckpointGetXMLDesc(chk, args["flags"])}


@handles(Proc.DOMAIN_LIST_ALL_CHECKPOINTS)
async def list_all_checkpoints(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    chks = await s.driver.domainListAllCheckpoints(dom, args["flags"])
    wire = [s.wire_checkpoint(c) for c in chks] if args["need_results"] else []
    return {"checkpoints": wire, "ret": len(chks)}


@handles(Proc.DOMAIN_CHECKPOINT_LIST_ALL_CHILDREN)
async def list_all_children(s: Session, args: Any, fds: list[int]) -> Any:
    chk = await s.checkpoint(args["checkpoint"])
    chks = await s.driver.domainCheckpointListAllChildren(chk, args["flags"])
    wire = [s.wire_checkpoint(c) for c in chks] if args["need_results"] else []
    return {"checkpoints": wire, "ret": len(chks)}


@handles(Proc.DOMAIN_CHECKPOINT_LOOKUP_BY_NAME)
async def checkpoint_lookup(s: Session, args: Any, fds: list[int]) -> Any:
    dom = await s.domain(args["dom"])
    chk = await s.driver.domainCheckpointLookupByName(dom, args["name"], args["flags"])
    return {"checkpoint": s.wire_checkpoint(chk)}


@handles(Proc.DOMAIN_CHECKPOINT_GET_PARENT)
async def checkpoint_parent(s: Session, args: Any, fds: list[int]) -> Any:
    chk = await s.checkpoint(args["checkpoint"])
    parent = await s.driver.domainCheckpointGetParent(chk, args["flags"])
    return {"parent": s.wire_checkpoint(parent)}


@handles(Proc.DOMAIN_CHECKPOINT_DELETE, writes=True)
async def checkpoint_delete(s: Session, args: Any, fds: list[int]) -> Any:
    chk = await s.checkpoint(args["checkpoint"])
    await s.driver.domainCheckpointDelete(chk, args["flags"])
    return None


# --- events ----------------------------------------------------------------------------


@handles(Proc.CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY)
async def event_register(s: Session, args: Any, fds: list[int]) -> Any:
    event_id = args["eventID"]
    name = (await s.domain(args["dom"])).name if args["dom"] is not None else None
    if not 0 <= event_id < DOMAIN_EVENT_ID_LAST:
        raise VirError(
            ErrorNumber.INTERNAL_ERROR, ErrorDomain.REMOTE, f"unsupported event ID {event_id}"
        )
    s._next_callback += 1
    callback_id = s._next_callback
    reg = None
    if event_id in _EMITTED:  # the others are accepted and never happen here
        relay = _relay(s, callback_id, DomainEventID(event_id), name)
        reg = await s.driver.connectDomainEventRegisterAny(None, event_id, relay)
    s.callbacks[callback_id] = (event_id, name, reg)
    return {"callbackID": callback_id}


@handles(Proc.CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY)
async def event_deregister(s: Session, args: Any, fds: list[int]) -> Any:
    found = s.callbacks.pop(args["callbackID"], None)
    if found is None:
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.NONE,
            f"could not find event callback {args['callbackID']} for deregistration",
        )
    if found[2] is not None:
        await s.driver.connectDomainEventDeregisterAny(found[2])
    return None


def _relay(
    s: Session, callback_id: int, event: DomainEventID, name: str | None
) -> Callable[..., None]:
    """A driver callback that sends ``event`` to this client as libvirt's daemon does."""

    def relay(conn: Any, dom: Domain, *rest: Any) -> None:
        if name is not None and dom.name != name:
            return
        wire = s.wire_domain(dom)
        if event == DomainEventID.JOB_COMPLETED:
            params = rest[0]
            s.send_event(
                Proc.DOMAIN_EVENT_CALLBACK_JOB_COMPLETED,
                {"callbackID": callback_id, "dom": wire, "params": typed_params(params)},
            )
        elif event == DomainEventID.BLOCK_JOB_2:
            disk, kind, status = rest[:3]
            s.send_event(
                Proc.DOMAIN_EVENT_BLOCK_JOB_2,
                {
                    "callbackID": callback_id,
                    "dom": wire,
                    "dst": disk,
                    "type": kind,
                    "status": status,
                },
            )
        elif event == DomainEventID.BLOCK_JOB:
            path, kind, status = rest[:3]
            s.send_event(
                Proc.DOMAIN_EVENT_CALLBACK_BLOCK_JOB,
                {
                    "callbackID": callback_id,
                    "msg": {"dom": wire, "path": path, "type": kind, "status": status},
                },
            )

    return relay
