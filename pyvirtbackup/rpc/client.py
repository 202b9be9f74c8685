"""One connected client of the daemon: reading packets (with the descriptors passed
beside them), running its calls, writing replies and events in order.

Per client: a reader that takes packets apart (closing the connection at the first
packet it cannot frame), up to ``max_requests`` calls running at once (more wait
unread, as libvirt's max_client_requests), and a writer that sends replies and
events in order. A client that goes away mid-call leaves the call to finish
(a begin or an abort half done would be worse than a reply nobody reads); its
event callbacks and associated descriptors go when its calls have ended.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ErrorDomain, ErrorNumber, VirError
from . import framing, xdr
from . import protocol as P
from .framing import FramingError, Header
from .protocol import MessageStatus, MessageType
from .remote import HANDLERS
from .session import Session, error_value, unsupported

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger(__name__)

MAX_QUEUED_BYTES = 64 << 20  # unsent replies and events of a client that stopped reading
_RECV_SIZE = 256 * 1024
_FD_SPACE = socket.CMSG_SPACE(P.MESSAGE_NUM_FDS_MAX * 4)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


class Connection:
    """A client socket read with recvmsg, so that descriptors passed with
    SCM_RIGHTS are kept in arrival order beside the bytes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self.eof = False

    async def _fill(self) -> None:
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(_RECV_SIZE, _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            except OSError:
                data, ancdata, flags = b"", [], 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise FramingError("descriptors were cut off (too many passed at once)")
            if len(self._fds) > P.MESSAGE_NUM_FDS_MAX:
                raise FramingError("more descriptors passed than any call announced")
            if not data:
                self.eof = True
                raise EOFError
            self._buf += data
            return

    async def _readable(self) -> None:
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self.loop.remove_reader(fd)

    async def read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def take_fds(self, count: int) -> list[int]:
        """The descriptors of a call: each came with one byte after the packet."""
        await self.read_exact(count)
        if len(self._fds) < count:
            raise FramingError(f"{count} descriptors announced, {len(self._fds)} received")
        return [self._fds.popleft() for _ in range(count)]

    def close(self) -> None:
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())
        with contextlib.suppress(OSError):
            self.sock.close()


class Client:
    """One connected client: its reader, its running calls, its writer."""

    def __init__(self, daemon: Daemon, sock: socket.socket, peer: Peer) -> None:
        self.daemon = daemon
        self.peer = peer
        self.conn = Connection(sock)
        self.session = Session(daemon.driver, self._send_event, HANDLERS)
        self.allowed = daemon.access.allows(peer)
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queued = 0
        self._slots = asyncio.Semaphore(daemon.max_requests)
        self.calls: set[asyncio.Task[None]] = set()
        self.closed = False
        self._writer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<client pid={self.peer.pid} uid={self.peer.uid}>"

    async def run(self) -> None:
        self._writer = asyncio.ensure_future(self._write_loop())
        try:
            await self._read_loop()
        except EOFError:
            pass
        except FramingError as exc:
            log.warning("%r: %s; closing the connection", self, exc)
        except Exception:  # a bug of ours must not take the daemon down
            log.exception("%r: unexpected failure; closing the connection", self)
        finally:
            await self._finish()

    async def _read_loop(self) -> None:
        while not self.closed:
            length = framing.body_length(await self.conn.read_exact(P.MESSAGE_LEN_MAX))
            body = await self.conn.read_exact(length)
            header, pos = framing.parse_header(body)
            fds: list[int] = []
            if header.type == MessageType.CALL_WITH_FDS:
                count, pos = framing.parse_fd_count(body, pos)
                fds = await self.conn.take_fds(count)
            if not self.allowed:
                self._refuse(header)
                _close_fds(fds)
                return
            await self._dispatch(header, body, pos, fds)

    def _refuse(self, header: Header) -> None:
        log.warning("%r: uid %d is not allowed; connection refused", self, self.peer.uid)
        if header.type in (MessageType.CALL, MessageType.CALL_WITH_FDS):
            self._reply_error(
                header,
                VirError(
                    ErrorNumber.AUTH_FAILED,
                    ErrorDomain.RPC,
                    f"uid {self.peer.uid} may not use this daemon (root, uid {os.getuid()} "
                    "or members of the group given to 'serve --group' may)",
                ),
            )
        self.closed = True

    async def _dispatch(self, header: Header, body: bytes, pos: int, fds: list[int]) -> None:
        is_call = header.type in (MessageType.CALL, MessageType.CALL_WITH_FDS)
        if header.prog == P.KEEPALIVE_PROGRAM and header.vers == P.KEEPALIVE_PROTOCOL_VERSION:
            _close_fds(fds)
            if header.type == MessageType.MESSAGE and header.proc == P.KEEPALIVE_PROC_PING:
                pong = Header(
                    P.KEEPALIVE_PROGRAM,
                    P.KEEPALIVE_PROTOCOL_VERSION,
                    P.KEEPALIVE_PROC_PONG,
                    MessageType.MESSAGE,
                    0,
                    MessageStatus.OK,
                )
                self._queue(framing.build(pong, xdr.VOID, None))
            return
        if header.prog != P.REMOTE_PROGRAM or header.vers != P.REMOTE_PROTOCOL_VERSION:
            _close_fds(fds)
            if is_call:
                self._reply_error(
                    header,
                    VirError(
                        ErrorNumber.RPC,
                        ErrorDomain.RPC,
                        f"Cannot find program {header.prog:#x} version {header.vers}",
                    ),
                )
            return
        if not is_call:  # replies, stream data, events from a client: nothing to answer
            _close_fds(fds)
            log.debug("%r: ignoring message of type %d", self, header.type)
            return
        if header.status != MessageStatus.OK:
            _close_fds(fds)
            self._reply_error(
                header,
                VirError(
                    ErrorNumber.RPC,
                    ErrorDomain.RPC,
                    f"Unexpected message status {header.status}",
                ),
            )
            return
        await self._slots.acquire()  # at most max_requests running: read no further
        task = asyncio.ensure_future(self._call(header, body[pos:], fds))
        self.calls.add(task)
        self.daemon.calls.add(task)
        task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self.calls.discard(task)
        self.daemon.calls.discard(task)
        self._slots.release()

    async def _call(self, header: Header, payload: bytes, fds: list[int]) -> None:
        try:
            signature = P.SIGNATURES.get(header.proc)
            try:
                if signature is None:
                    raise unsupported(header.proc)
                try:
                    args, _ = xdr.decode(signature.args, payload)
                except xdr.XdrError as exc:
                    raise VirError(
                        ErrorNumber.RPC,
                        ErrorDomain.RPC,
                        f"Unable to decode message payload: {exc}",
                    ) from None
                ret = await self.session.call(header.proc, args, fds)
            except VirError as exc:
                self._reply_error(header, exc)
                return
            except Exception as exc:
                log.exception("%r: procedure %d failed", self, header.proc)
                self._reply_error(
                    header, VirError(ErrorNumber.INTERNAL_ERROR, ErrorDomain.RPC, str(exc))
                )
                return
            try:
                packet = framing.build(framing.reply_header(header), signature.ret, ret)
            except (xdr.XdrError, framing.TooLarge) as exc:
                log.error("%r: reply to procedure %d cannot be sent: %s", self, header.proc, exc)
                self._reply_error(
                    header,
                    VirError(ErrorNumber.INTERNAL_ERROR, ErrorDomain.RPC, f"reply not sent: {exc}"),
                )
                return
            self._queue(packet)
        finally:
            _close_fds(fds)

    def _reply_error(self, header: Header, exc: VirError) -> None:
        reply = framing.reply_header(header, error=True)
        self._queue(framing.build(reply, P.ERROR, error_value(exc)))

    def _send_event(self, proc: int, value: dict[str, Any]) -> None:
        if self.closed:
            return
        header = Header(
            P.REMOTE_PROGRAM, P.REMOTE_PROTOCOL_VERSION, proc, MessageType.MESSAGE, 1, 0
        )
        try:
            self._queue(framing.build(header, P.EVENTS[proc], value))
        except (xdr.XdrError, framing.TooLarge) as exc:
            log.error("%r: event %d cannot be sent: %s", self, proc, exc)

    def _queue(self, packet: bytes) -> None:
        if self._writer is None or self._writer.done():
            return
        self._queued += len(packet)
        if self._queued > MAX_QUEUED_BYTES:
            log.warning("%r: does not read what it is sent; closing the connection", self)
            self._stop_writer()
            return
        self._out.put_nowait(packet)

    def _stop_writer(self) -> None:
        self.closed = True
        if self._writer is not None:
            self._writer.cancel()
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            packet = await self._out.get()
            if packet is None:
                return
            try:
                await loop.sock_sendall(self.conn.sock, packet)
            except OSError:
                self.closed = True  # gone; what is still queued has nobody to read it
                return
            self._queued -= len(packet)

    async def _finish(self) -> None:
        """The client is gone or closed: let its calls end, then drop what it held."""
        self.closed = True
        if self.calls:
            await asyncio.gather(*list(self.calls), return_exceptions=True)
        try:
            await self.session.close()
        except Exception:
            log.exception("%r: cleanup failed", self)
        self._out.put_nowait(None)
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._writer, 5.0)
        self.conn.close()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
