"""Listening sockets for a pull backup's NBD server, bound here and handed to QEMU.

Why bind them ourselves: libvirt makes its users choose a TCP port and fails when
it is taken; binding port 0 lets the kernel choose a free one with no race, and
the port is known before QEMU ever sees the socket. QEMU unlinks whatever file
sits at a unix path before binding it; we refuse to replace anything but a stale
socket of our own.

A unix socket never appears at its path before it has its final mode, and it is
never chmodded by a path another user could swap: it is bound (by us, or by QEMU
when the monitor cannot pass descriptors) inside a fresh 0700 directory next to
its path, given its mode there, and then hard-linked into place, which fails
rather than replace anything that appeared meanwhile. The socket's directory must
be one other users cannot rename things in (owned by us or root; writable by
others only if sticky), or none of this would hold.

Linux only, like QEMU's KVM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile
from dataclasses import dataclass

from ..errors import ErrorDomain, ErrorNumber, VirError

BACKLOG = 16
PRIVATE_PREFIX = ".pvb-nbd-"
PRIVATE_NAME = "nbd.sock"


def _system_error(what: str, exc: OSError) -> VirError:
    return VirError(ErrorNumber.SYSTEM_ERROR, ErrorDomain.QEMU, f"{what}: {exc.strerror or exc}")


@dataclass
class Listener:
    """A bound, listening socket and what is needed to clean up after it.

    ``sock`` is our copy; once QEMU holds its own (``getfd``) ours is released,
    or the kernel would go on accepting connections for a server that stopped.
    ``ident`` is the (device, inode, ctime) of a unix socket file we created: only
    that file is ever unlinked (inode numbers alone are reused at once). ``sock``
    is None for a socket QEMU binds itself, in ``private_dir`` until ``publish``
    moves it to ``path``.
    """

    transport: str  # tcp | unix
    sock: socket.socket | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    ident: tuple[int, int, int] | None = None
    private_dir: str | None = None

    @property
    def private_path(self) -> str:
        assert self.private_dir is not None
        return os.path.join(self.private_dir, PRIVATE_NAME)

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
        if self.private_dir is not None:
            remove_private_dir(self.private_dir)
            self.private_dir = None
        if self.transport != "unix" or not self.path or self.ident is None:
            return
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if not stat.S_ISSOCK(st.st_mode) or _ident(st) != self.ident:
            return
        if _socket_alive(self.path):
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def publish(self, mode: int) -> None:
        """Move the socket QEMU bound in ``private_dir`` to ``path`` with ``mode``."""
        self.ident = publish(self.private_path, self.path or "", mode)
        remove_private_dir(self.private_dir or "")
        self.private_dir = None


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
    """Make ``path`` free for a new socket: remove a stale socket of ours, refuse anything
    else, and refuse a directory where others could swap what we put there."""
    check_socket_dir(path)
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
    if st.st_uid != os.geteuid():
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.QEMU,
            f"NBD socket path '{path}' is a stale socket of uid {st.st_uid}; refusing to "
            "replace another user's file",
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def check_socket_dir(path: str) -> None:
    """The socket's directory: others must not be able to rename or replace entries in
    it (owned by us or root; writable by group or others only if sticky)."""
    directory = os.path.dirname(path) or "."
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise _system_error(f"cannot use directory '{directory}' for the NBD socket", exc) from None
    problem = None
    if st.st_uid not in (0, os.geteuid()):
        problem = f"is owned by uid {st.st_uid}"
    elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        problem = (
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}) and not sticky"
        )
    if problem:
        raise VirError(
            ErrorNumber.OPERATION_DENIED,
            ErrorDomain.QEMU,
            f"directory '{directory}' of NBD socket '{path}' {problem}: another user could "
            "replace the socket or what it points to; use a directory only root (or we) "
            "can write",
        )


def make_private_dir(path: str) -> str:
    """A fresh 0700 directory next to ``path`` (same filesystem, so a link can move
    a socket from it to ``path``)."""
    try:
        return tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=os.path.dirname(path) or ".")
    except OSError as exc:
        raise _system_error(f"cannot make a private directory next to '{path}'", exc) from None


def remove_private_dir(directory: str) -> None:
    """Remove a private directory of ours and the socket bound in it, if any."""
    inner = os.path.join(directory, PRIVATE_NAME)
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(inner).st_mode):
            os.unlink(inner)
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def publish(private: str, path: str, mode: int) -> tuple[int, int, int]:
    """Give the socket at ``private`` (in our private directory) ``mode`` and link it
    to ``path``; returns the identity of the socket now at ``path``.

    The chmod happens where nobody else can reach, and link() never replaces: a
    file that appeared at ``path`` since it was checked makes this fail instead.
    """
    try:
        os.chmod(private, mode)
        before = os.lstat(private)
        os.link(private, path, follow_symlinks=False)
    except FileExistsError:
        raise VirError(
            ErrorNumber.INVALID_ARG,
            ErrorDomain.QEMU,
            f"NBD socket path '{path}' appeared while the socket was being set up; "
            "refusing to replace it",
        ) from None
    except OSError as exc:
        raise _system_error(f"cannot put the NBD socket at '{path}'", exc) from None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(private)
    st = os.lstat(path)
    if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):  # pragma: no cover
        raise VirError(
            ErrorNumber.INTERNAL_ERROR, ErrorDomain.QEMU, f"NBD socket '{path}' was replaced"
        )
    return _ident(st)


def listen_unix(path: str, mode: int = 0o600) -> Listener:
    """Bind and listen on a unix socket that appears at ``path`` with exactly ``mode``."""
    check_unix_path(path)
    private = make_private_dir(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        inner = os.path.join(private, PRIVATE_NAME)
        sock.bind(inner)
        sock.listen(BACKLOG)
        ident = publish(inner, path, mode)
    except BaseException as exc:
        sock.close()
        remove_private_dir(private)
        if isinstance(exc, OSError):
            what = f"cannot listen on unix socket '{path}' for the NBD server"
            raise _system_error(what, exc) from None
        raise
    remove_private_dir(private)
    return Listener("unix", sock, path=path, ident=ident)


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
