"""Event callbacks that are coroutines: drain() must never wait for its own caller.

A coroutine callback runs as a task; domainAbortJob and close() drain those tasks.
A callback that aborts drains from inside one of them, so waiting for every task
would wait for itself forever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pyvirtbackup import DomainEventID
from pyvirtbackup.events import EventRegistry

from .conftest import MiB

pytestmark = pytest.mark.asyncio


async def test_coroutine_callback_calling_abort_does_not_hang(vm_factory, driver):
    """The review's case: a BLOCK_JOB_2 callback stops the rest of the backup."""
    vm = await vm_factory([("vda", "qcow2", 1 * MiB), ("vdb", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    done = asyncio.Event()

    async def on_block_job(conn, d, disk, kind, status, opaque):
        if disk == "vda":  # "one disk is through: stop the rest"
            await driver.domainAbortJob(d)
            done.set()

    await driver.connectDomainEventRegisterAny(dom, DomainEventID.BLOCK_JOB_2, on_block_job)
    await driver.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        driver.events._tasks.clear()  # a task stuck gathering itself could never finish
    assert dom.job is None


async def test_drain_from_inside_a_callback_returns_and_waits_for_the_others():
    events = EventRegistry()
    order: list[str] = []
    other_may_end = asyncio.Event()

    async def slow(conn, dom, params, opaque):
        await other_may_end.wait()
        order.append("slow done")

    async def drainer(conn, dom, params, opaque):
        other_may_end.set()
        await events.drain()
        await asyncio.sleep(0.05)  # an outside drain (close()) must wait for this too
        order.append("drainer done")

    events.register(None, DomainEventID.JOB_COMPLETED, slow, None)
    events.register(None, DomainEventID.JOB_COMPLETED, drainer, None)
    events.emit(None, None, DomainEventID.JOB_COMPLETED, {})
    await asyncio.wait_for(events.drain(), 2)
    assert order == ["slow done", "drainer done"]


async def test_two_callbacks_draining_do_not_wait_for_each_other():
    events = EventRegistry()

    async def drainer(conn, dom, params, opaque):
        await asyncio.sleep(0)  # both are running before either drains
        await events.drain()

    events.register(None, DomainEventID.JOB_COMPLETED, drainer, None)
    events.register(None, DomainEventID.JOB_COMPLETED, drainer, None)
    events.emit(None, None, DomainEventID.JOB_COMPLETED, {})
    await asyncio.wait_for(events.drain(), 2)  # not drain's timeout, nor forever


async def test_a_hanging_callback_is_logged_and_not_waited_for(caplog):
    events = EventRegistry()
    forever = asyncio.Event()

    async def hangs(conn, dom, params, opaque):
        await forever.wait()

    events.register(None, DomainEventID.JOB_COMPLETED, hangs, None)
    events.emit(None, None, DomainEventID.JOB_COMPLETED, {})
    with caplog.at_level(logging.WARNING, logger="pyvirtbackup.events"):
        await asyncio.wait_for(events.drain(timeout=0.2), 2)
    assert "still running after" in caplog.text
    forever.set()
    await events.drain()
    assert not events._tasks


async def test_a_failing_coroutine_callback_is_logged(caplog):
    events = EventRegistry()

    async def fails(conn: Any, dom: Any, params: Any, opaque: Any) -> None:
        raise RuntimeError("callback bug")

    events.register(None, DomainEventID.JOB_COMPLETED, fails, None)
    with caplog.at_level(logging.ERROR, logger="pyvirtbackup.events"):
        events.emit(None, None, DomainEventID.JOB_COMPLETED, {})
        await events.drain()
        await asyncio.sleep(0)  # done callbacks run on the next loop pass
    assert "event callback for JOB_COMPLETED failed" in caplog.text
    assert "callback bug" in caplog.text
