"""One client connection's state (``Session``), and what every procedure shares: the
handler registry, errors as ``remote_error`` with libvirt's message prefixes, job
statistics as typed parameters. The procedures themselves are in ``remote``.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..checkpoints import Checkpoint
from ..driver import Domain, Driver
from ..errors import ErrorDomain, ErrorNumber, VirError
from . import protocol as P
from .procnames import procedure_name
from .protocol import Proc, TypedParamType

log = logging.getLogger(__name__)

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


def registrar(
    table: dict[int, Handler],
) -> Callable[..., Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]]:
    """A decorator factory that records handlers in ``table``, by procedure number."""

    def handles(
        proc: Proc, *, needs_open: bool = True, writes: bool = False
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        def register(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            if proc not in P.SIGNATURES:  # pragma: no cover - a declaration is missing
                raise AssertionError(f"no signature declared for {proc!r}")
            table[proc] = Handler(func, needs_open, writes)
            return func

        return register

    return handles


EventSender = Callable[[int, dict[str, Any]], None]


class Session:
    """One client connection's view of the daemon: open or not, read-only or not,
    its event callbacks and its associated descriptors."""

    def __init__(
        self, driver: Driver, send_event: EventSender, handlers: dict[int, Handler]
    ) -> None:
        self.driver = driver
        self.handlers = handlers
        self.send_event = send_event
        self.opened = False
        self.readonly = False
        self.keepalive = False
        # our callbackID -> (event id, domain name or None, the driver's registration id)
        self.callbacks: dict[int, tuple[int, str | None, int | None]] = {}
        self._next_callback = 0

    async def call(self, number: int, args: Any, fds: list[int]) -> Any:
        handler = self.handlers.get(number)
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
