"""The NBD half of a pull backup, as plan steps: TLS credentials, the server, the exports.

Pure except for ``check_tls_dir``, which only reads files: the point of planning
here is that every step has its undo before anything runs, and that a dry run
shows the NBD commands next to the store and transaction ones.

Order (libvirt's, qemuBackupBegin): the TLS object and the server start before the
transaction, so that a refusal there leaves no job behind; the exports are added
after it, because they export the scratch nodes the jobs write into.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..errors import ErrorDomain, ErrorNumber, VirError
from .plan import Plan, Step
from .tlsfiles import check_server_files
from .tlsfiles import tls_error as _tls_error

# What QEMU's tls-creds-x509 server endpoint loads from its directory: the first
# three it requires, the other two it reads when they exist.
TLS_REQUIRED_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
TLS_OPTIONAL_FILES = ("ca-crl.pem", "dh-params.pem")

TLS_ALIAS = "pvb-backup-tls0"
AUTHZ_ALIAS = "pvb-backup-authz0"
HANDSHAKE_FEATURE = "nbd-server-start.handshake-max-seconds"
LISTEN_FD_NAME = "pvb-nbd-listen"


@dataclass
class TlsCreds:
    """x509 credentials for the NBD server: a directory in QEMU's layout.

    ``allowed_dns``: libvirt's tls_allowed_dn_list, glob patterns of the client
    certificate Distinguished Names admitted (QEMU's ``tls-authz``); None admits
    any certificate the CA signed.
    """

    directory: str
    verify_peer: bool = True
    alias: str = TLS_ALIAS
    allowed_dns: list[str] | None = None
    authz_alias: str = AUTHZ_ALIAS


def check_tls_dir(directory: str, *, qemu: tuple[int, int] | None = None) -> None:
    """Find a missing, unreadable or unacceptable certificate, or a private key
    others could read, before anything is added to QEMU.

    QEMU would find it too, but only at object-add, after the scratch images
    exist, with a message that does not say how to fix it, and a newer QEMU
    refuses certificates an older one took (``tlsfiles``). ``qemu`` is the
    (uid, gid) QEMU runs as, for the private key's check (``check_private_key``).
    """
    hint = "set Driver(tls_x509_cert_dir=...) to a directory holding " + ", ".join(
        TLS_REQUIRED_FILES
    )
    if not os.path.isdir(directory):
        raise _tls_error(
            f"backup TLS directory '{directory}' does not exist or is not a directory; {hint}"
        )
    for name in TLS_REQUIRED_FILES + TLS_OPTIONAL_FILES:
        path = os.path.join(directory, name)
        if name in TLS_OPTIONAL_FILES and not os.path.lexists(path):
            continue
        try:
            with open(path, "rb") as f:
                head = f.read(65536)
        except FileNotFoundError:
            raise _tls_error(
                f"backup TLS file '{path}' is missing (dangling link?); {hint}"
            ) from None
        except OSError as exc:
            raise _tls_error(f"backup TLS file '{path}' is not readable: {exc.strerror}") from None
        if b"-----BEGIN " not in head:
            raise _tls_error(f"backup TLS file '{path}' is not a PEM file")
    check_private_key(os.path.join(directory, "server-key.pem"), qemu)
    check_server_files(directory)


def check_private_key(path: str, qemu: tuple[int, int] | None) -> None:
    """Refuse a private key others can read or replace, as OpenSSH refuses such keys.

    Owned by us, root or QEMU's user; nothing for others; group read only for
    QEMU's own group (a QEMU running as another user reads it that way), never
    group write.
    """
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    qemu_uid, qemu_gid = qemu if qemu is not None else (None, None)
    problem = None
    if st.st_uid not in (0, os.geteuid(), qemu_uid):
        problem = f"is owned by uid {st.st_uid}, who could read or replace it"
    elif mode & 0o007:
        problem = f"is readable by every user (mode {mode:04o})"
    elif mode & 0o030:
        problem = f"is writable by group {st.st_gid} (mode {mode:04o})"
    elif mode & 0o040 and st.st_gid != qemu_gid:
        problem = (
            f"is readable by group {st.st_gid} (mode {mode:04o}), which is not QEMU's "
            f"group{'' if qemu_gid is None else f' ({qemu_gid})'}"
        )
    if problem:
        raise _tls_error(
            f"backup TLS private key '{path}' {problem}; refusing it: chmod 600 it "
            "(or 640 with QEMU's group if QEMU runs as another user)"
        )


def tls_steps(creds: TlsCreds) -> list[Step]:
    """The server's credentials object; QEMU checks the certificates' content here."""
    return [
        Step(
            "qmp",
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": creds.alias,
                "dir": creds.directory,
                "endpoint": "server",
                "verify-peer": creds.verify_peer,
            },
            undo=[Step("qmp", "object-del", {"id": creds.alias})],
        )
    ]


def authz_steps(creds: TlsCreds) -> list[Step]:
    """An allow-list of client certificate names (QEMU's authz-list): anything not
    matched is refused, like libvirt's tls_allowed_dn_list."""
    rules = [{"match": dn, "policy": "allow", "format": "glob"} for dn in creds.allowed_dns or []]
    return [
        Step(
            "qmp",
            "object-add",
            {"qom-type": "authz-list", "id": creds.authz_alias, "policy": "deny", "rules": rules},
            undo=[Step("qmp", "object-del", {"id": creds.authz_alias})],
        )
    ]


def inet_address(host: str, port: int) -> dict[str, Any]:
    """QEMU 7.2's nbd-server-start takes only the legacy (wrapped) SocketAddress."""
    return {"type": "inet", "data": {"host": host, "port": str(port)}}


def unix_address(path: str) -> dict[str, Any]:
    return {"type": "unix", "data": {"path": path}}


def fd_address(name: str) -> dict[str, Any]:
    return {"type": "fd", "data": {"str": name}}


def server_steps(
    address: dict[str, Any],
    *,
    tls_alias: str | None = None,
    authz_alias: str | None = None,
    pass_fd: bool = False,
    publish: tuple[str, int] | None = None,
    handshake_max_seconds: int | None = None,
) -> list[Step]:
    """Start QEMU's (only) NBD server.

    With ``pass_fd`` the address is a socket we bound ourselves, handed over with
    ``getfd`` first: the port is known before QEMU sees it and a unix socket is in
    place with its mode before QEMU serves it. ``publish`` (path, mode) is for
    monitors that cannot pass descriptors: QEMU binds the unix socket inside our
    private directory, and the socket is given its mode there and linked to its
    path (``listen.publish``) before any export exists. ``handshake_max_seconds``
    (QEMU 10.0+) drops a client that does not finish its handshake in time.
    """
    steps: list[Step] = []
    if pass_fd:
        name = address["data"]["str"]
        steps.append(
            Step(
                "pass-fd",
                "getfd",
                {"fdname": name},
                # nbd-server-start consumes the descriptor; if it never ran, drop it
                undo=[Step("qmp", "closefd", {"fdname": name}, ignore_errors=True)],
            )
        )
    args: dict[str, Any] = {"addr": address}
    if tls_alias:
        args["tls-creds"] = tls_alias
    if authz_alias:
        args["tls-authz"] = authz_alias
    if handshake_max_seconds is not None:
        args["handshake-max-seconds"] = handshake_max_seconds
    steps.append(Step("qmp", "nbd-server-start", args, undo=[Step("qmp", "nbd-server-stop", {})]))
    if publish is not None:
        path, mode = publish
        steps.append(Step("publish-socket", "publish", {"path": path, "mode": mode}))
    return steps


def check_export_names(plan: Plan) -> None:
    """Two disks under one export name: QEMU would refuse the second after the jobs run."""
    counts = Counter(dp.export_name for dp in plan.disks)
    for name, n in counts.items():
        if n > 1:
            disks = [dp.disk for dp in plan.disks if dp.export_name == name]
            raise VirError(
                ErrorNumber.CONFIG_UNSUPPORTED,
                ErrorDomain.DOMAIN,
                f"export name '{name}' is given to disks {', '.join(map(repr, disks))}; "
                "each disk needs its own exportname",
            )


def export_steps(plan: Plan) -> list[Step]:
    """One read-only export of each disk's point-in-time view (the fleecing filter's
    snapshot-access node, or the scratch node the direct way), with the incremental
    bitmap if any: the disabled temporary one, as QEMU refuses to export a bitmap
    that still records.
    """
    steps = []
    for dp in plan.disks:
        args: dict[str, Any] = {
            "type": "nbd",
            "id": dp.export_id,
            "node-name": dp.access_node if dp.fleecing else dp.format_node,
            "name": dp.export_name,
            "writable": False,
        }
        if dp.export_bitmap and dp.fleecing:
            # the bitmap stays on the disk's node, which QEMU then wants named
            args["bitmaps"] = [{"node": dp.bitmap_node, "name": dp.export_bitmap}]
        elif dp.export_bitmap:
            args["bitmaps"] = [dp.export_bitmap]
        steps.append(Step("qmp", "block-export-add", args))
    return steps


def add_pull_steps(
    plan: Plan,
    address: dict[str, Any],
    *,
    tls: TlsCreds | None = None,
    pass_fd: bool = False,
    publish: tuple[str, int] | None = None,
    handshake_max_seconds: int | None = None,
) -> Plan:
    """Extend a planned pull backup with its NBD server and exports."""
    if plan.mode != "pull":
        raise ValueError("NBD steps belong to pull backups only")
    check_export_names(plan)
    authz = None
    if tls is not None:
        plan.prepare += tls_steps(tls)
        if tls.allowed_dns is not None:
            plan.prepare += authz_steps(tls)
            authz = tls.authz_alias
    plan.prepare += server_steps(
        address,
        tls_alias=tls.alias if tls else None,
        authz_alias=authz,
        pass_fd=pass_fd,
        publish=publish,
        handshake_max_seconds=handshake_max_seconds,
    )
    plan.after += export_steps(plan)
    return plan
