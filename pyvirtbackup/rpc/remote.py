"""REMOTE_PROGRAM's procedures mapped onto the driver table.

Each handler takes the ``Session`` of its client, the decoded arguments (a dict
shaped by ``protocol.SIGNATURES``) and the descriptors passed with the call, and
returns the reply value; a ``VirError`` travels back as ``remote_error`` with
libvirt's number and message prefix. Nothing here knows QMP: it only calls the
driver. A procedure without a handler is answered NO_SUPPORT, by name.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..domaincalls import LIB_VERSION
from ..driver import Domain
from ..enums import DomainEventID
from ..errors import ErrorDomain, ErrorNumber, VirError
from . import protocol as P
from .protocol import Proc
from .session import Handler, Session, registrar, typed_params

CONNECT_RO = 1  # virConnectFlags
DOMAIN_EVENT_ID_LAST = 27  # libvirt 9.0: every id below it may be registered
URI = "qemu:///system"
_EMITTED = frozenset(int(e) for e in DomainEventID)

HANDLERS: dict[int, Handler] = {}
handles = registrar(HANDLERS)


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
