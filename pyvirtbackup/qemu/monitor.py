"""One QMP connection: commands with timeouts, QMP errors as VirError, event fan-out.

Every QMP failure becomes a VirError that keeps QEMU's own text, the way libvirt
reports "unable to execute QEMU command 'X': <QEMU's reason>". A QEMU that is gone
or does not answer is an error with a clear message, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    QMPError,
)
from qemu.qmp.protocol import Runstate, StateError

from ..errors import ErrorDomain, ErrorNumber, VirError

log = logging.getLogger(__name__)

Address = str | tuple[str, int]
EventHandler = Callable[[dict[str, Any]], None]

DEFAULT_TIMEOUT = 60.0


class QMPCommandError(VirError):
    """A command QEMU refused. ``qmp_class`` and ``desc`` are QEMU's own."""

    def __init__(self, command: str, qmp_class: str, desc: str) -> None:
        super().__init__(
            ErrorNumber.INTERNAL_ERROR,
            ErrorDomain.QEMU,
            f"unable to execute QEMU command '{command}': {desc}",
        )
        self.command = command
        self.qmp_class = qmp_class
        self.desc = desc


def _not_running(detail: str) -> VirError:
    return VirError(
        ErrorNumber.OPERATION_INVALID, ErrorDomain.QEMU, f"domain is not running: {detail}"
    )


class Monitor:
    """A QMP client for one QEMU.

    qemu.qmp's default listener keeps every event forever and cannot be removed; a
    driver attached for weeks must not grow, so it is given a filter that accepts
    nothing, and events go only to our own listener and the registered handlers.
    Handlers run on the event loop and must not block.
    """

    def __init__(self, name: str = "pyvirtbackup") -> None:
        self._client = QMPClient(name)
        self._client.events.names = {"<none: pyvirtbackup keeps no event history>"}
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._handlers: dict[int, EventHandler] = {}
        self._next_handler = 0
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._disconnect_handlers: dict[int, Callable[[], None]] = {}
        self.address: Address | None = None
        self.peer_ids: tuple[int, int] | None = None
        self.disconnected = asyncio.Event()
        self._hmp_qdev: dict[str, str] = {}
        self._reap_lock = asyncio.Lock()
        self.commands_sent = 0  # QMP round trips, for benchmarks
        self._fd_lock = asyncio.Lock()
        # descriptor hand-overs happen with no other command in flight (_with_descriptor)
        self._fd_gate = asyncio.Event()
        self._fd_gate.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0

    # connection -------------------------------------------------------------

    async def connect(self, address: Address, timeout: float = 10.0) -> None:
        self.address = address
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        try:
            await asyncio.wait_for(self._client.connect(address), timeout)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self._client.disconnect()
            raise VirError(
                ErrorNumber.OPERATION_TIMEOUT,
                ErrorDomain.QEMU,
                f"QEMU monitor at {where} did not answer within {timeout:g}s",
            ) from None
        except ConnectError as exc:
            reason = exc.exc if getattr(exc, "exc", None) is not None else exc
            raise VirError(
                ErrorNumber.OPERATION_FAILED,
                ErrorDomain.QEMU,
                f"cannot connect to QEMU monitor at {where}: {reason}",
            ) from None
        self.peer_ids = self._peer_ids()
        self._pump = asyncio.create_task(self._pump_events(), name="qmp-events")
        self._watch = asyncio.create_task(self._watch_state(), name="qmp-state")

    def _peer_ids(self) -> tuple[int, int] | None:
        """(uid, gid) of the QEMU at the other end of a unix monitor (SO_PEERCRED):
        whose group may read the TLS key QEMU loads. None over TCP."""
        writer = getattr(self._client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        _pid, uid, gid = struct.unpack("3i", raw)
        return uid, gid

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING and not self.disconnected.is_set()

    def on_disconnect(self, callback: Callable[[], None]) -> int:
        """Call ``callback`` once the connection is lost; returns a handle to remove it."""
        self._next_handler += 1
        self._disconnect_handlers[self._next_handler] = callback
        return self._next_handler

    def remove_disconnect_handler(self, handle: int) -> None:
        self._disconnect_handlers.pop(handle, None)

    async def _watch_state(self) -> None:
        # the connection may already be going (QEMU died right after the greeting):
        # waiting for the next change would then wait for a disconnect nobody makes
        state = self._client.runstate
        while state not in (Runstate.DISCONNECTING, Runstate.IDLE):
            state = await self._client.runstate_changed()
        self.disconnected.set()
        # reap the client's reader tasks now, or asyncio complains about their EOFError
        await self._reap()
        for cb in list(self._disconnect_handlers.values()):
            try:
                cb()
            except Exception:  # a broken callback must not hide the others
                log.exception("disconnect handler failed")

    async def _reap(self) -> None:
        # one disconnect at a time: a second, concurrent one strands the first's
        # gathered reader exceptions
        async with self._reap_lock:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._client.disconnect())

    async def close(self) -> None:
        self._disconnect_handlers.clear()
        await self._reap()
        self.disconnected.set()
        for task in (self._watch, self._pump):
            if task is None:
                continue
            if task is self._watch:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), 1.0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pump = self._watch = None

    async def __aenter__(self) -> Monitor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # commands ---------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        while not self._fd_gate.is_set():  # a descriptor is on its way: wait
            await self._fd_gate.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._send(command, arguments, timeout)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _send(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        if self.disconnected.is_set() or self._client.runstate != Runstate.RUNNING:
            raise _not_running(f"no connection to its monitor for '{command}'")
        started = time.monotonic()
        self.commands_sent += 1
        try:
            result = await asyncio.wait_for(self._client.execute(command, arguments), timeout)
            log.debug("%s took %.1f ms", command, (time.monotonic() - started) * 1000)
            return result
        except ExecuteError as exc:
            raise QMPCommandError(command, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise VirError(
                ErrorNumber.OPERATION_TIMEOUT,
                ErrorDomain.QEMU,
                f"QEMU command '{command}' got no answer within {timeout:g}s",
            ) from None
        except (ExecInterruptedError, StateError, ConnectionError, EOFError) as exc:
            raise _not_running(f"connection lost during '{command}': {exc}") from None

    async def transaction(
        self, actions: list[dict[str, Any]], properties: dict[str, Any] | None = None
    ) -> None:
        args: dict[str, Any] = {"actions": actions}
        if properties:
            args["properties"] = properties
        await self.execute("transaction", args)

    @property
    def can_pass_fds(self) -> bool:
        """Descriptors travel only over a unix socket (SCM_RIGHTS)."""
        return isinstance(self.address, str)

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU its own copy of ``fd`` under ``name`` (``getfd``)."""
        await self._with_descriptor(fd, "getfd", {"fdname": name}, name)

    async def add_fd(self, fd: int, opaque: str) -> int:
        """Give QEMU its own copy of ``fd`` in a new fd set (``add-fd``); returns the
        set's id, which QEMU opens as ``/dev/fdset/N``. ``opaque`` tags it as ours in
        ``query-fdsets``."""
        reply = await self._with_descriptor(fd, "add-fd", {"opaque": opaque}, opaque)
        return int(reply["fdset-id"])

    async def _with_descriptor(
        self, fd: int, command: str, arguments: dict[str, Any], label: str
    ) -> Any:
        """Send ``fd`` (SCM_RIGHTS) and the command that takes it, with the monitor
        otherwise silent.

        QEMU attaches a received descriptor to the next command that takes one, so
        two hand-overs must not interleave. And nothing else may reach QEMU until
        that command has run: its chardev reads further bytes in the monitor's I/O
        thread while the main thread takes the descriptor, and that race crashed
        QEMU 10.0 here (a NULL read in tcp_chr_recv, with lanes sending in
        parallel). So commands already sent are answered first, new ones wait.
        """
        async with self._fd_lock:
            self._fd_gate.clear()
            try:
                await self._idle.wait()
                if not self.connected:
                    raise _not_running(f"no connection to its monitor for '{command}'")
                try:
                    self._client.send_fd_scm(fd)
                except (QMPError, OSError) as exc:
                    raise VirError(
                        ErrorNumber.OPERATION_FAILED,
                        ErrorDomain.QEMU,
                        f"cannot pass descriptor '{label}' to QEMU: {exc}",
                    ) from None
                return await self._send(command, arguments, DEFAULT_TIMEOUT)
            finally:
                self._fd_gate.set()

    def peer_pid(self) -> int | None:
        """QEMU's process id, from the unix socket's peer credentials (None over TCP)."""
        if not self.can_pass_fds or not self.connected:
            return None
        try:
            sock = self._client._writer.transport.get_extra_info("socket")  # type: ignore[union-attr]
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except (AttributeError, OSError):
            return None
        pid, _uid, _gid = struct.unpack("3i", creds)
        return pid or None

    async def hmp(self, command_line: str) -> str:
        return await self.execute("human-monitor-command", {"command-line": command_line})

    async def qemu_io(self, device_id: str, command: str) -> None:
        """Write like the guest would, through the device's own BlockBackend.

        HMP answers "" on success and puts errors in its text reply, so any text is
        an error. virtio-blk's id names the PCI proxy; its backend has another path,
        found once through query-block.
        """
        if '"' in command:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.QEMU,
                f"qemu-io command must not contain a double quote: {command}",
            )
        qdev = await self._qdev_for(device_id)
        out = await self.hmp(f'qemu-io -d {qdev} "{command}"')
        if out.strip():
            raise VirError(
                ErrorNumber.OPERATION_FAILED,
                ErrorDomain.QEMU,
                f"qemu-io '{command}' on {device_id} failed: {out.strip()}",
            )

    async def _qdev_for(self, device_id: str) -> str:
        if device_id not in self._hmp_qdev:
            for dev in await self.execute("query-block"):
                qdev = dev.get("qdev", "")
                if qdev in (device_id, f"/machine/peripheral/{device_id}/virtio-backend"):
                    self._hmp_qdev[device_id] = qdev
                    break
            else:
                self._hmp_qdev[device_id] = device_id
        return self._hmp_qdev[device_id]

    # events -----------------------------------------------------------------

    def add_event_handler(self, handler: EventHandler) -> int:
        self._next_handler += 1
        self._handlers[self._next_handler] = handler
        return self._next_handler

    def remove_event_handler(self, handle: int) -> None:
        self._handlers.pop(handle, None)

    async def _pump_events(self) -> None:
        while True:
            event = await self._listener.get()
            for handler in list(self._handlers.values()):
                try:
                    handler(dict(event))
                except Exception:
                    log.exception("event handler failed for %s", event.get("event"))
