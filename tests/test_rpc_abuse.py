"""Protocol abuse against ``pyvirtbackup serve``: truncated and oversized packets, wrong
program or version, unknown procedures, undecodable arguments, seeded random bytes,
clients that vanish mid-call, peers that are not allowed. After each, the daemon
still answers the real clients (virsh, and a libvirt-python connection held open for
the whole module).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtbackup.rpc import framing, xdr
from pyvirtbackup.rpc import protocol as P
from pyvirtbackup.rpc.framing import Header
from pyvirtbackup.rpc.protocol import MessageType, Proc

from .rpctools import SYSTEM_PYTHON, Daemon, MiB, RpcEnv, env_fixture, run

pytestmark = pytest.mark.asyncio(loop_scope="module")

env = env_fixture([("vda", "qcow2", 8 * MiB, "virtio")])


class RawClient:
    """A hand-made libvirt RPC client: whatever bytes a test wants, then the replies."""

    def __init__(self, path: str | Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.serial = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(
        self, proc: int, args_type: xdr.XdrType, args: object, prog: int = P.REMOTE_PROGRAM
    ) -> None:
        self.serial += 1
        header = Header(prog, 1, proc, MessageType.CALL, self.serial, 0)
        self.send(framing.build(header, args_type, args))

    def reply(self) -> tuple[Header, bytes]:
        length = framing.body_length(self._exact(4))
        body = self._exact(length)
        header, pos = framing.parse_header(body)
        return header, body[pos:]

    def error(self) -> dict:
        header, payload = self.reply()
        assert header.status == 1, header
        return xdr.decode(P.ERROR, payload)[0]

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def open(self) -> None:
        self.call(
            Proc.CONNECT_OPEN, P.SIGNATURES[Proc.CONNECT_OPEN].args, {"name": None, "flags": 0}
        )
        header, _ = self.reply()
        assert header.status == 0

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def held_client(env: RpcEnv) -> Iterator[subprocess.Popen[str]]:
    """libvirt-python holding one connection for the module: it must outlive the abuse."""
    script = (
        "import sys, libvirt\n"
        "conn = libvirt.open(sys.argv[1])\n"
        "dom = conn.lookupByName('vm1')\n"
        "for line in sys.stdin:\n"
        "    print(dom.name(), dom.isActive(), len(dom.XMLDesc(0)) > 0, flush=True)\n"
    )
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", script, env.uri],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    proc.stdin.close()
    proc.wait(30)


def still_serving(env: RpcEnv, held: subprocess.Popen[str]) -> None:
    assert env.daemon.alive()
    assert run(["virsh", "-c", env.uri, "domstate", "vm1"]).stdout.strip() == "paused"
    held.stdin.write("again\n")
    held.stdin.flush()
    assert held.stdout.readline().split() == ["vm1", "1", "True"]


async def test_truncated_and_short_packets(env: RpcEnv, held_client) -> None:
    # a length word promising more than ever comes, then the client leaves
    c = RawClient(env.daemon.socket_path)
    c.send(struct.pack(">I", 100) + b"\0" * 10)
    c.close()
    # a packet too short to hold a header closes that connection, and only that one
    c = RawClient(env.daemon.socket_path)
    c.send(struct.pack(">I", 12) + b"\0" * 8)
    assert c.closed_by_peer()
    c.close()
    # half a length word
    c = RawClient(env.daemon.socket_path)
    c.send(b"\0\0")
    c.close()
    still_serving(env, held_client)


async def test_oversized_lengths(env: RpcEnv, held_client) -> None:
    for length in (0xFFFFFFFF, P.MESSAGE_MAX + P.MESSAGE_LEN_MAX + 1):
        c = RawClient(env.daemon.socket_path)
        c.send(struct.pack(">I", length))
        assert c.closed_by_peer()
        c.close()
    # inside a well-framed call: a string claiming 2 GiB, an array claiming 4 billion items
    c = RawClient(env.daemon.socket_path)
    c.open()
    header = Header(P.REMOTE_PROGRAM, 1, Proc.DOMAIN_LOOKUP_BY_NAME, MessageType.CALL, 7, 0)
    packet = bytearray(framing.build(header, xdr.UINT, 0x7FFFFFFF))
    c.send(bytes(packet))
    err = c.error()
    assert err["code"] == 39 and "Unable to decode message payload" in err["message"]
    header = Header(P.REMOTE_PROGRAM, 1, Proc.DOMAIN_FSFREEZE, MessageType.CALL, 8, 0)
    args = xdr.encode(P.NONNULL_DOMAIN, {"name": "vm1", "uuid": b"\0" * 16, "id": 1})
    c.send(framing.build(header, xdr.FixedOpaque(len(args) + 4), args + b"\xff\xff\xff\xff"))
    err = c.error()
    assert err["code"] == 39 and "exceeds its limit 256" in err["message"]
    # the connection goes on: a good call after the bad ones
    c.call(Proc.CONNECT_GET_LIB_VERSION, xdr.VOID, None)
    header, payload = c.reply()
    assert header.status == 0 and xdr.decode(xdr.UHYPER, payload)[0] == 9_000_000
    c.close()
    still_serving(env, held_client)


async def test_wrong_program_version_and_unknown_procedures(env: RpcEnv, held_client) -> None:
    c = RawClient(env.daemon.socket_path)
    c.call(Proc.AUTH_LIST, xdr.VOID, None, prog=0x12345678)
    err = c.error()
    assert err["code"] == 39 and "Cannot find program 0x12345678" in err["message"]
    header = Header(P.REMOTE_PROGRAM, 2, Proc.AUTH_LIST, MessageType.CALL, 2, 0)
    c.send(framing.build(header, xdr.VOID, None))
    assert "Cannot find program" in c.error()["message"]
    c.open()
    c.call(9999, xdr.VOID, None)
    err = c.error()
    assert err["code"] == 3 and "unknown procedure 9999" in err["message"]
    c.call(185, xdr.VOID, None)
    err = c.error()
    assert err["code"] == 3
    assert "REMOTE_PROC_DOMAIN_SNAPSHOT_CREATE_XML (185)" in err["message"]
    # a reply or a stream packet from a client is ignored; calls go on
    c.send(framing.build(Header(P.REMOTE_PROGRAM, 1, 1, MessageType.REPLY, 3, 0), xdr.VOID, None))
    c.send(framing.build(Header(P.REMOTE_PROGRAM, 1, 1, MessageType.STREAM, 4, 2), xdr.VOID, None))
    c.call(Proc.CONNECT_GET_TYPE, xdr.VOID, None)
    header, payload = c.reply()
    assert header.status == 0 and xdr.decode(P.NONNULL_STRING, payload)[0] == "QEMU"
    # before CONNECT_OPEN only the handshake is served
    fresh = RawClient(env.daemon.socket_path)
    fresh.call(Proc.CONNECT_GET_TYPE, xdr.VOID, None)
    assert "connection not open" in fresh.error()["message"]
    fresh.close()
    c.close()
    still_serving(env, held_client)


async def test_seeded_random_bytes(env: RpcEnv, held_client) -> None:
    rng = random.Random(13)
    for i in range(150):
        c = RawClient(env.daemon.socket_path)
        size = rng.randint(1, 4096)
        data = bytearray(rng.getrandbits(8) for _ in range(size))
        if i % 3 == 0 and size >= 4:  # a plausible frame around random content
            struct.pack_into(">I", data, 0, min(size, 28 + rng.randint(0, 64)))
        if i % 5 == 0 and size >= 12:  # the right program, random everything else
            struct.pack_into(">II", data, 4, P.REMOTE_PROGRAM, 1)
        try:
            c.send(bytes(data))
        except OSError:
            pass
        c.close()
    still_serving(env, held_client)


async def test_client_vanishing_mid_call(env: RpcEnv, held_client, tmp_path: Path) -> None:
    """A begin whose client leaves before the answer: the job runs, and is abortable."""
    c = RawClient(env.daemon.socket_path)
    c.open()
    lookup = P.SIGNATURES[Proc.DOMAIN_LOOKUP_BY_NAME]
    c.call(Proc.DOMAIN_LOOKUP_BY_NAME, lookup.args, {"name": "vm1"})
    _, payload = c.reply()
    dom = xdr.decode(lookup.ret, payload)[0]["dom"]
    sock = tmp_path / "nbd.sock"
    xml = (
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
        f"<disks><disk name='vda'><scratch file='{tmp_path / 'scratch'}'/></disk></disks>"
        "</domainbackup>"
    )
    begin = P.SIGNATURES[Proc.DOMAIN_BACKUP_BEGIN]
    c.call(
        Proc.DOMAIN_BACKUP_BEGIN,
        begin.args,
        {"dom": dom, "backup_xml": xml, "checkpoint_xml": None, "flags": 0},
    )
    c.close()  # gone before the reply
    size = ""
    for _ in range(200):  # the begin goes on without its client, to the export
        size = run(["nbdinfo", "--size", f"nbd+unix:///vda?socket={sock}"]).stdout.strip()
        if size:
            break
        await asyncio.sleep(0.05)
    assert size == str(8 * MiB)
    assert (
        "Job type:         Unbounded" in run(["virsh", "-c", env.uri, "domjobinfo", "vm1"]).stdout
    )
    assert run(["virsh", "-c", env.uri, "domjobabort", "vm1"]).returncode == 0
    assert not sock.exists()
    still_serving(env, held_client)


async def test_socket_mode_and_peers_not_allowed(env: RpcEnv, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(env.daemon.socket_path).st_mode) == 0o600
    # a socket someone widened by hand: the uid check still turns strangers away
    open_dir = Path(tempfile.mkdtemp(prefix="pyvirtbackup-open-"))  # /tmp: reachable by all
    os.chmod(open_dir, 0o777)
    # its own (empty) state, private: a state dir others can write is refused
    other = Daemon(tmp_path / "other-state", open_dir / "sock")
    await asyncio.to_thread(other.start)
    try:
        os.chmod(open_dir / "sock", 0o666)
        result = run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "virsh",
                "-c",
                other.uri,
                "list",
            ],
            env={"PATH": os.environ["PATH"], "HOME": str(open_dir)},
        )
        assert result.returncode == 1
        assert "authentication failed: uid 65534 may not use this daemon" in result.stderr
        # root is let in
        assert run(["virsh", "-c", other.uri, "list", "--name"]).returncode == 0
    finally:
        assert await asyncio.to_thread(other.stop) == 0
        shutil.rmtree(open_dir)


async def test_refuses_a_socket_someone_serves(env: RpcEnv) -> None:
    second = Daemon(env.state_dir, env.daemon.socket_path)
    with pytest.raises(RuntimeError, match="already listening"):
        await asyncio.to_thread(second.start)
    assert env.daemon.alive()
