"""Another local user, for the tests where one is the attacker: ``nobody``.

The tests run as root (the orchestrator); the attacker's steps run in a child
process as nobody:nogroup with no supplementary groups (``setpriv``), with the
system Python and only the standard library, so that what it can do is exactly
what an unprivileged user on the host can do. Directories the scenario shares
with it live under /tmp (the tests' own temp dirs are root-only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NOBODY_UID = pwd.getpwnam("nobody").pw_uid
NOBODY_GID = pwd.getpwnam("nobody").pw_gid
PYTHON = "/usr/bin/python3"
SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@dataclass
class Result:
    rc: int
    out: str
    err: str


def argv(script: str, *args: str) -> list[str]:
    return [*SETPRIV, PYTHON, "-c", script, *args]


async def run(script: str, *args: str, timeout: float = 60.0) -> Result:
    """Run ``script`` (Python) as nobody and wait for it."""
    proc = await start(script, *args)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Result(proc.returncode or 0, out.decode(), err.decode())


async def start(script: str, *args: str) -> asyncio.subprocess.Process:
    """Start ``script`` as nobody (for attackers that loop while the victim works)."""
    return await asyncio.create_subprocess_exec(
        *argv(script, *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(proc: asyncio.subprocess.Process) -> Result:
    """Stop an attacker started with ``start`` (by its PID) and collect what it said."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return Result(proc.returncode or 0, out.decode(), err.decode())


@contextlib.contextmanager
def shared_dir(mode: int = 0o755) -> Iterator[Path]:
    """A fresh directory under /tmp that nobody can reach, root's, with ``mode``."""
    path = Path(tempfile.mkdtemp(prefix="pvb-shared-", dir="/tmp"))
    try:
        os.chmod(path, mode)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
