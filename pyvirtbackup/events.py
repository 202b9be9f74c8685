"""libvirt-style domain event callbacks: register, deregister, dispatch.

Callbacks get libvirt-python's arguments, so ported handlers keep their signature:
JOB_COMPLETED ``cb(conn, dom, params, opaque)``; BLOCK_JOB and BLOCK_JOB_2
``cb(conn, dom, disk, type, status, opaque)``. A coroutine function is run as a task.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .enums import DomainEventID
from .errors import ErrorDomain, ErrorNumber, VirError

log = logging.getLogger(__name__)


@dataclass
class _Registration:
    dom: Any  # a Domain, or None for every domain
    event_id: DomainEventID
    callback: Callable[..., Any]
    opaque: Any


class EventRegistry:
    def __init__(self) -> None:
        self._regs: dict[int, _Registration] = {}
        self._next = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def register(self, dom: Any, event_id: int, callback: Callable[..., Any], opaque: Any) -> int:
        try:
            eid = DomainEventID(event_id)
        except ValueError:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.NONE,
                f"unsupported event ID {event_id}; pyvirtbackup emits "
                + ", ".join(f"{e.name} ({e.value})" for e in DomainEventID),
            ) from None
        if not callable(callback):
            raise VirError(
                ErrorNumber.INVALID_ARG, ErrorDomain.NONE, "event callback is not callable"
            )
        self._next += 1
        self._regs[self._next] = _Registration(dom, eid, callback, opaque)
        return self._next

    def deregister(self, callback_id: int) -> None:
        if self._regs.pop(callback_id, None) is None:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.NONE,
                f"could not find event callback {callback_id} for deregistration",
            )

    def emit(self, conn: Any, dom: Any, event_id: DomainEventID, *args: Any) -> None:
        for reg in list(self._regs.values()):
            if reg.event_id != event_id or (reg.dom is not None and reg.dom is not dom):
                continue
            try:
                result = reg.callback(conn, dom, *args, reg.opaque)
            except Exception:
                log.exception("event callback for %s failed", event_id.name)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for callbacks that were coroutines."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
