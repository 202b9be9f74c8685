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

# How long an abort or a close waits for coroutine callbacks still running.
DRAIN_TIMEOUT = 5.0


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
        self._tasks: set[asyncio.Future[Any]] = set()
        # callback tasks inside drain() right now: waiting for one of them would make
        # two callbacks that both abort wait for each other
        self._draining: set[asyncio.Future[Any]] = set()

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
                task.add_done_callback(lambda t, name=event_id.name: self._finished(t, name))

    def _finished(self, task: asyncio.Future[Any], event: str) -> None:
        """Forget a coroutine callback; log its failure (nobody else awaits it)."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event callback for %s failed", event, exc_info=task.exception())

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait (a bounded time) for callbacks that were coroutines.

        The calling task is left out: a coroutine callback that calls
        domainAbortJob (or closes the driver) drains from inside one of these
        tasks, and waiting for itself would never end. A callback still running
        after ``timeout`` is logged and left to finish on its own, so that an
        abort or a close returns even when a user's callback hangs.
        """
        current = asyncio.current_task()
        me = current if current is not None and current in self._tasks else None
        # a callback that drains skips the others draining too (they would wait for
        # each other); anyone else (close(), an abort from outside) waits for all
        skip = self._draining if me is not None else set()
        pending = [t for t in self._tasks if t is not me and t not in skip and not t.done()]
        if not pending:
            return
        if me is not None:
            self._draining.add(me)
        try:
            _, still = await asyncio.wait(pending, timeout=timeout)
        finally:
            if me is not None:
                self._draining.discard(me)
        for task in still:
            log.warning(
                "event callback %r still running after %.0f s; not waiting for it any longer",
                task,
                timeout,
            )
