"""Running the ``pyvirtbackup`` command in a subprocess, as an operator would."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CLIResult:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class CLI:
    """``pyvirtbackup --state-dir DIR ...`` with this interpreter, in a new process each time."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pyvirtbackup", "--state-dir", str(self.state_dir), *args]

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    async def __call__(self, *args: str, timeout: float = 60.0) -> CLIResult:
        proc = await self.start(*args)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return CLIResult(proc.returncode or 0, out.decode(), err.decode())

    async def ok(self, *args: str, timeout: float = 60.0) -> CLIResult:
        res = await self(*args, timeout=timeout)
        assert res.rc == 0, f"pyvirtbackup {' '.join(args)} failed ({res.rc}): {res.err}"
        return res
