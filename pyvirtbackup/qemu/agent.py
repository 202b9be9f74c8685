"""QEMU's guest agent (qemu-ga) over its socket: freeze and thaw the guest's filesystems.

The agent speaks QMP-like JSON without a greeting. A connection may hold a stale
answer from an earlier client that gave up, so every conversation starts with
``guest-sync-delimited``: a 0xFF byte resets the agent's parser, the agent answers
with a 0xFF of its own before the sync reply, and everything before that marker is
discarded. One connection per conversation: the agent serves one client at a time,
and a backup tool freezes seldom.

Errors carry libvirt's numbers: no answer in time is AGENT_UNRESPONSIVE (86),
a refused command INTERNAL_ERROR (1) with the agent's own text, as libvirt's
qemuAgentCheckError reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any

from ..errors import ErrorDomain, ErrorNumber, VirError

DEFAULT_TIMEOUT = 5.0
_DELIMITER = b"\xff"
_MAX_LINE = 1 << 20


def _unresponsive(detail: str) -> VirError:
    return VirError(
        ErrorNumber.AGENT_UNRESPONSIVE,
        ErrorDomain.QEMU,
        detail,
    )


class GuestAgent:
    """A guest agent reachable at a unix socket path (QEMU's chardev for the virtio port)."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self._converse(command, arguments), self.timeout)
        except TimeoutError:
            raise _unresponsive(
                f"no answer to '{command}' within {self.timeout:g} s (is the agent "
                "running in the guest?)"
            ) from None

    async def _converse(self, command: str, arguments: dict[str, Any] | None) -> Any:
        try:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=_MAX_LINE)
        except OSError as exc:
            raise _unresponsive(
                f"QEMU guest agent is not connected: cannot reach '{self.path}': "
                f"{exc.strerror or exc}"
            ) from None
        try:
            await self._sync(reader, writer)
            message: dict[str, Any] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            reply = await self._read_reply(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise _unresponsive(
                f"connection to the agent failed during '{command}': {exc}"
            ) from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if "error" in reply:
            desc = reply["error"].get("desc", "unknown error")
            raise VirError(
                ErrorNumber.INTERNAL_ERROR,
                ErrorDomain.QEMU,
                f"unable to execute QEMU agent command '{command}': {desc}",
            )
        return reply.get("return")

    async def _sync(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        token = random.randrange(1, 2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        writer.write(_DELIMITER + json.dumps(request).encode() + b"\n")
        await writer.drain()
        await reader.readuntil(_DELIMITER)
        while True:
            reply = await self._read_reply(reader)
            if reply.get("return") == token:
                return

    @staticmethod
    async def _read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
        while True:
            line = await reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            line = line.strip(_DELIMITER + b" \r\n")
            if not line:
                continue
            value = json.loads(line)
            if isinstance(value, dict) and ("return" in value or "error" in value):
                return value

    async def fsfreeze(self, mountpoints: list[str] | None = None) -> int:
        """Freeze the listed filesystems (all when None); returns how many were frozen."""
        if mountpoints:
            result = await self.execute(
                "guest-fsfreeze-freeze-list", {"mountpoints": list(mountpoints)}
            )
        else:
            result = await self.execute("guest-fsfreeze-freeze")
        return int(result)

    async def fsthaw(self) -> int:
        return int(await self.execute("guest-fsfreeze-thaw"))

    async def fsfreeze_status(self) -> str:
        return str(await self.execute("guest-fsfreeze-status"))
