"""Listening sockets for a pull backup's NBD server, bound here and handed to QEMU.

Why bind them ourselves: libvirt makes its users choose a TCP port and fails when
it is taken; binding port 0 lets the kernel choose a free one with no race, and
the port is known before QEMU ever sees the socket. A unix socket bound here is
owner-only from its first instant, where QEMU's own bind follows QEMU's umask. And
QEMU unlinks whatever file sits at a unix path before binding it; we refuse to
replace anything but a stale socket.

Linux only, like QEMU's KVM: a unix socket's file takes its mode from the socket's
inode, which ``fchmod`` sets before ``bind``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass

from ..errors import ErrorDomain, ErrorNumber, VirError

BACKLOG = 16


def _system_error(what: str, exc: OSError) -> VirError:
    return VirError(ErrorNumber.SYSTEM_ERROR, ErrorDomain.QEMU, f"{what}: {exc.strerror or exc}")


@dataclass
class Listener:
    """A bound, listening socket and what is needed to clean up after it.

    ``sock`` is our copy; once QEMU holds its own (``getfd``) ours is released,
    or the kernel would go on accepting connections for a server that stopped.
    ``ident`` is the (device, inode, ctime) of a unix socket file we created: only
    that file is ever unlinked (inode numbers alone are reused at once). ``sock``
    is None for a socket QEMU binds itself.
    """

    transport: str  # tcp | unix
    sock: socket.socket | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    ident: tuple[int, int, int] | None = None

    def fileno(self) -> int:
        if self.sock is None:
            raise ValueError("this listener has no socket of ours")
        return self.sock.fileno()

    def release(self) -> None:
        """Close our copy of the socket (QEMU's copy keeps listening)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def cleanup(self) -> None:
        """Close our copy and remove the unix socket file if it is still ours.

        QEMU 7.2 unlinks the path itself at nbd-server-stop; this is for the
        paths where it never got the socket, or died.
        """
        self.release()
        if self.transport != "unix" or not self.path:
            return
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            return
        if self.ident is not None and _ident(st) != self.ident:
            return
        if _socket_alive(self.path):
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _ident(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _socket_alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def check_unix_path(path: str) -> None:
    """Make ``path`` free for a new socket: remove a stale socket, refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _system_error(f"cannot check NBD socket path '{path}'", exc) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.QEMU,
            f"NBD socket path '{path}' exists and is not a socket; refusing to replace it",
        )
    if _socket_alive(path):
        raise VirError(
            ErrorNumber.OPERATION_INVALID,
            ErrorDomain.QEMU,
            f"NBD socket path '{path}' is in use: a server is listening on it",
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def listen_unix(path: str, mode: int = 0o600) -> Listener:
    """Bind and listen on a unix socket whose file has exactly ``mode``."""
    check_unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # the file is created with the socket inode's mode less the umask: never
        # wider than asked; the chmod after only adds what the umask took away
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        os.chmod(path, mode)
        st = os.lstat(path)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        what = f"cannot listen on unix socket '{path}' for the NBD server"
        raise _system_error(what, exc) from None
    return Listener("unix", sock, path=path, ident=_ident(st))


def _resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise VirError(
            ErrorNumber.OPERATION_FAILED,
            ErrorDomain.QEMU,
            f"cannot resolve NBD server name '{host}': {exc.strerror}",
        ) from None
    seen = []
    for family, _type, _proto, _canon, addr in infos:
        if (family, addr) not in seen:
            seen.append((family, addr))
    return seen


def _bind_tcp(family: int, addr: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # ::1 or an IPv6 address means that address, not IPv4 as well
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def listen_tcp(host: str, port: int | None) -> Listener:
    """Listen on the first address ``host`` resolves to that can be bound.

    Only that address: a name like ``localhost`` never becomes a wildcard. With
    no ``port`` the kernel picks a free one.
    """
    last: OSError | None = None
    for family, addr in _resolve(host, port or 0):
        try:
            sock = _bind_tcp(family, addr)
        except OSError as exc:
            last = exc
            if exc.errno == errno.EADDRINUSE:
                break  # the port is taken; another address of the name will not help
            continue
        return Listener("tcp", sock, host=host, port=sock.getsockname()[1])
    where = f"{host}:{port}" if port else host
    assert last is not None
    raise _system_error(f"cannot listen on {where} for the NBD server", last) from None


def pick_tcp_port(host: str) -> int:
    """A port free on ``host`` now, for monitors that cannot take a descriptor.

    Racy by nature (it is free only until someone else binds it); the caller
    retries when QEMU finds it taken.
    """
    listener = listen_tcp(host, None)
    port = listener.port
    listener.release()
    assert port is not None
    return port
