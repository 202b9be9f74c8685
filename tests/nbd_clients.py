"""NBD clients for the pull tests: the real ones (nbdcopy, nbdinfo, qemu-img, qemu-io)
for the bytes, and a minimal hand-made one only where a test must control exactly
when the connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
from dataclasses import dataclass

from pyvirtbackup.qemu import imgtools

NBD_OPT_EXPORT_NAME = 1
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_FLAG_FIXED_NEWSTYLE = 1
NBD_FLAG_NO_ZEROES = 2
PROMPT = b"qemu-io> "


def unix_uri(socket_path: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={socket_path}"


def tcp_uri(host: str, port: int, export: str, tls_dir: str | None = None) -> str:
    if tls_dir is None:
        return f"nbd://{host}:{port}/{export}"
    return f"nbds://{host}:{port}/{export}?tls-certificates={tls_dir}"


async def nbdcopy(uri: str, dest: str, *, check: bool = True) -> imgtools.ToolResult:
    """Copy a whole export into a local file (or ``null:``)."""
    return await imgtools.run(["nbdcopy", uri, dest], check=check, timeout=120)


async def nbdinfo(uri: str, *args: str, check: bool = True) -> imgtools.ToolResult:
    return await imgtools.run(["nbdinfo", *args, uri], check=check, timeout=60)


async def dirty_extents(uri: str, context: str) -> list[tuple[int, int]]:
    """(offset, length) of the areas a metadata context marks (bit 1 = dirty)."""
    out = (await nbdinfo(uri, f"--map={context}", "--json")).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


@dataclass
class HeldClient:
    """qemu-io with the export open: a real NBD client that stays connected."""

    proc: asyncio.subprocess.Process

    @classmethod
    async def open(cls, uri: str) -> HeldClient:
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-r", "-f", "raw", uri,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        client = cls(proc)
        try:
            assert proc.stdout is not None
            await asyncio.wait_for(proc.stdout.readuntil(PROMPT), 20)
            out = await client.command("read 0 64k")
        except BaseException:
            await client.close()
            raise
        if "read 65536/65536 bytes" not in out:
            await client.close()
            raise AssertionError(f"qemu-io could not read {uri}: {out}")
        return client

    async def command(self, line: str, timeout: float = 20.0) -> str:
        """Send one qemu-io command; return its output (qemu-io flushes at its prompt)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        try:
            out = await asyncio.wait_for(self.proc.stdout.readuntil(PROMPT), timeout)
        except asyncio.IncompleteReadError as exc:  # qemu-io exited
            out = exc.partial
        return out.decode(errors="replace").removesuffix(PROMPT.decode())

    async def close(self) -> None:
        """Quit, then stop it by PID if it does not."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def read_then_drop(socket_path: str, export: str, length: int, keep: int) -> int:
    """Ask for ``length`` bytes, take ``keep`` of them, then drop the connection.

    The one place a hand-made client is needed: a real one cannot be told to
    vanish in the middle of a reply. Old-style export-name negotiation and simple
    replies (no structured replies asked for), so the data follows one header.
    Returns the export size the server announced.
    """
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        hello = await reader.readexactly(18)
        assert hello[:16] == b"NBDMAGICIHAVEOPT", hello
        (server_flags,) = struct.unpack(">H", hello[16:])
        no_zeroes = bool(server_flags & NBD_FLAG_NO_ZEROES)
        flags = NBD_FLAG_FIXED_NEWSTYLE | (NBD_FLAG_NO_ZEROES if no_zeroes else 0)
        name = export.encode()
        writer.write(struct.pack(">I", flags))
        writer.write(b"IHAVEOPT" + struct.pack(">II", NBD_OPT_EXPORT_NAME, len(name)) + name)
        await writer.drain()
        size, _tflags = struct.unpack(">QH", await reader.readexactly(10))
        if not no_zeroes:
            await reader.readexactly(124)
        writer.write(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 0, 1, 0, length))
        await writer.drain()
        magic, error, _handle = struct.unpack(">IIQ", await reader.readexactly(16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC and error == 0, (hex(magic), error)
        await reader.readexactly(keep)
        return size
    finally:
        # unread data in the socket makes the close a reset: the server sees the
        # client vanish in the middle of its reply
        writer.transport.abort()
