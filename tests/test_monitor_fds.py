"""Descriptor hand-overs on a monitor that other tasks use at the same time.

QEMU's socket chardev keeps a received descriptor until the command that takes it
runs in the main thread, while its I/O thread reads what comes next; when both
touch the pending descriptors at once QEMU dereferences NULL (seen here: QEMU
10.0.2 segfaulted in tcp_chr_recv during a begin whose lanes sent in parallel).
So a hand-over happens on a silent monitor: what was sent before is answered
first, and nothing else is sent until the command that takes the descriptor has.
"""

from __future__ import annotations

import asyncio
import os

import pytest

pytestmark = pytest.mark.asyncio


async def test_nothing_else_reaches_qemu_while_a_descriptor_is_pending(vm_factory):
    vm = await vm_factory([("vda", "qcow2", 1024 * 1024)], fill=(), paused=False)
    mon = vm.mon
    log: list[tuple[str, str]] = []
    real_execute, real_send_fd = mon._client.execute, mon._client.send_fd_scm

    async def execute(command, arguments=None):
        log.append(("start", command))
        try:
            return await real_execute(command, arguments)
        finally:
            log.append(("end", command))

    def send_fd(fd):
        log.append(("fd", ""))
        return real_send_fd(fd)

    mon._client.execute, mon._client.send_fd_scm = execute, send_fd
    fd = os.open("/dev/null", os.O_RDWR)
    try:

        async def chatter() -> None:
            for _ in range(30):
                await mon.execute("query-status")

        async def hand_overs() -> list[int]:
            sets = []
            for i in range(10):
                sets.append(await mon.add_fd(fd, f"pvb-test-{i}"))
                await asyncio.sleep(0)
            return sets

        *_, sets = await asyncio.gather(chatter(), chatter(), chatter(), hand_overs())
    finally:
        os.close(fd)
        mon._client.execute, mon._client.send_fd_scm = real_execute, real_send_fd
    for fdset in sets:
        await mon.execute("remove-fd", {"fdset-id": fdset})
    assert vm.proc.proc is not None and vm.proc.proc.returncode is None

    in_flight = 0
    pending_fd = False
    for kind, command in log:
        if kind == "fd":
            assert in_flight == 0, "a descriptor went out with commands in flight"
            pending_fd = True
        elif kind == "start":
            if pending_fd:
                assert command == "add-fd", f"{command} was sent while a descriptor was pending"
            in_flight += 1
        else:
            in_flight -= 1
            if command == "add-fd":
                pending_fd = False
    assert sum(1 for kind, _ in log if kind == "fd") == 10
