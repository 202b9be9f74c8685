"""The daemon: libvirt's RPC on a unix socket, around one Driver, on one asyncio loop.

Who may connect: the socket is owner-only unless a group is given, and every
peer's uid is read with SO_PEERCRED (``client.peer_credentials``): root, the
daemon's own uid and, with a group, that group's members. Anyone else gets
AUTH_FAILED to its first call and the connection is closed. How each client is
served is ``client.Client``'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import stat

from ..driver import Driver
from ..errors import ErrorDomain, ErrorNumber, VirError
from .client import Client, Peer, peer_credentials

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/libvirt/libvirt-sock"
# a libvirt 9.0 client prefers this one when it exists (modular daemons)
MODULAR_SOCKET = "/var/run/libvirt/virtqemud-sock"
MAX_REQUESTS = 5  # calls of one client running at once (libvirt's max_client_requests)
MAX_CLIENTS = 1024
SHUTDOWN_GRACE = 30.0  # how long SIGTERM waits for calls still running
SWEEP_INTERVAL = 0.5  # how soon a domain detached by the CLI is let go


class Access:
    """Which peers may talk to the daemon."""

    def __init__(self, group: str | None = None) -> None:
        self.uids = {0, os.getuid()}
        self.gid: int | None = None
        self.members: set[str] = set()
        if group is not None:
            try:
                entry = grp.getgrnam(group)
            except KeyError:
                raise VirError(
                    ErrorNumber.INVALID_ARG, ErrorDomain.RPC, f"no group named '{group}'"
                ) from None
            self.gid = entry.gr_gid
            self.members = set(entry.gr_mem)

    def allows(self, peer: Peer) -> bool:
        if peer.uid in self.uids:
            return True
        if self.gid is None:
            return False
        if peer.gid == self.gid:
            return True
        try:
            user = pwd.getpwuid(peer.uid)
        except KeyError:
            return False
        return user.pw_gid == self.gid or user.pw_name in self.members


class Daemon:
    """Listens on ``path``; ``serve_forever`` until ``stop``."""

    def __init__(
        self,
        driver: Driver,
        path: str = DEFAULT_SOCKET,
        *,
        group: str | None = None,
        max_clients: int = MAX_CLIENTS,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        self.driver = driver
        self.path = path
        self.group = group
        self.access = Access(group)
        self.max_clients = max_clients
        self.max_requests = max_requests
        self.clients: set[Client] = set()
        self.calls: set[asyncio.Task[None]] = set()
        self._client_tasks: set[asyncio.Task[None]] = set()
        self._sock: socket.socket | None = None
        self._ident: tuple[int, int] | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    # the listening socket --------------------------------------------------------------

    def listen(self) -> None:
        """Bind the socket: owner-only from its first instant, group-readable if asked.

        An existing socket someone answers on is refused (a libvirt daemon, or another
        of ours); a stale one is replaced; any other file is never touched.
        """
        path = self.path
        _check_free(path)
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        mode = 0o660 if self.group else 0o600
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), mode)
            sock.bind(path)
            if self.access.gid is not None:
                os.chown(path, -1, self.access.gid)
            os.chmod(path, mode)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise VirError(
                ErrorNumber.SYSTEM_ERROR,
                ErrorDomain.RPC,
                f"cannot listen on '{path}': {exc.strerror or exc}",
            ) from None
        st = os.lstat(path)
        self._ident = (st.st_dev, st.st_ino)
        self._sock = sock
        if path == DEFAULT_SOCKET and os.path.exists(MODULAR_SOCKET):
            log.warning(
                "%s exists: libvirt clients will connect there, not here "
                "(remove it, or give clients ?socket=%s)",
                MODULAR_SOCKET,
                path,
            )

    async def serve_forever(self) -> None:
        if self._sock is None:
            self.listen()
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        log.info("listening on %s", self.path)
        self._accepting = asyncio.ensure_future(self._accept_loop(loop, self._sock))
        sweeping = asyncio.ensure_future(self._sweep())
        try:
            await self._stopped.wait()
        finally:
            sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping

    async def _sweep(self) -> None:
        """Let go of domains ``pyvirtbackup detach`` forgot meanwhile: QEMU serves one
        client per QMP socket, and the next ``attach`` of it must not wait for us."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for name, dom in list(self.driver.domains.items()):
                try:
                    gone = not self.driver.state.domain(name).exists()
                except VirError:
                    gone = True
                if gone and dom.job is None and self.driver.domains.get(name) is dom:
                    log.info("domain %s was detached; closing its monitor", name)
                    with contextlib.suppress(Exception):
                        await self.driver.detach(dom)

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self.clients) >= self.max_clients:
                log.warning("%d clients connected: refusing one more", len(self.clients))
                sock.close()
                continue
            try:
                peer = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            client = Client(self, sock, peer)
            self.clients.add(client)
            task = asyncio.ensure_future(client.run())
            self._client_tasks.add(task)
            task.add_done_callback(lambda t, c=client: self._client_gone(t, c))

    def _client_gone(self, task: asyncio.Task[None], client: Client) -> None:
        self._client_tasks.discard(task)
        self.clients.discard(client)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let running calls answer, then close every connection.

        Backups keep running in QEMU; the next daemon (or any attach) takes them over.
        """
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        self._close_listener()
        if self.calls:
            _, pending = await asyncio.wait(list(self.calls), timeout=grace)
            if pending:
                log.warning("%d calls still running after %.0f s; closing", len(pending), grace)
        for client in list(self.clients):  # their readers see the end; writers drain
            with contextlib.suppress(OSError):
                client.conn.sock.shutdown(socket.SHUT_RD)
        if self._client_tasks:
            await asyncio.wait(list(self._client_tasks), timeout=10.0)
        self._stopped.set()

    def _close_listener(self) -> None:
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)


def _check_free(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VirError(
            ErrorNumber.OPERATION_INVALID,
            ErrorDomain.RPC,
            f"'{path}' exists and is not a socket; refusing to replace it",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        alive = False
    else:
        alive = True
    finally:
        probe.close()
    if alive:
        raise VirError(
            ErrorNumber.OPERATION_INVALID,
            ErrorDomain.RPC,
            f"a daemon is already listening on '{path}' (libvirtd or virtqemud?); "
            "stop it, or give 'serve --socket' another path",
        )
    os.unlink(path)
