"""qemu-img and qemu-io, for tests, examples and benchmarks (the driver never needs them).

Images are made and checked with QEMU's own offline tools so that what a test or the
demo reports is what any operator would see with the same commands.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024


class ToolError(RuntimeError):
    """An image tool failed; carries the command and its output."""


@dataclass
class ToolResult:
    returncode: int
    stdout: str
    stderr: str


async def run(argv: Sequence[str], *, check: bool = True, timeout: float = 600.0) -> ToolResult:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ToolError(f"{' '.join(argv)} did not finish within {timeout:g}s") from None
    result = ToolResult(
        proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip()
        raise ToolError(f"{' '.join(argv)} exited with {result.returncode}: {output}")
    return result


async def create(path: str, size: int, fmt: str = "qcow2", *options: str) -> None:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    for opt in options:
        argv += ["-o", opt]
    await run([*argv, path, str(size)])


async def qemu_io(
    path: str, fmt: str, commands: Sequence[str], *, force_share: bool = False
) -> str:
    """Run qemu-io commands on an image that no QEMU has open (or read-only with -U)."""
    argv = ["qemu-io", "-f", fmt]
    if force_share:
        argv += ["-r", "-U"]
    for cmd in commands:
        argv += ["-c", cmd]
    result = await run([*argv, path], check=False)
    text = result.stdout + result.stderr
    if result.returncode != 0 or "Pattern verification failed" in text or "error" in text.lower():
        raise ToolError(f"qemu-io {list(commands)} on {path} failed: {text.strip()}")
    return text


async def write_pattern(path: str, fmt: str, writes: Sequence[tuple[int, int, int]]) -> None:
    """writes: (pattern byte, offset, length) triples, applied in order."""
    await qemu_io(path, fmt, [f"write -P {p:#x} {off} {ln}" for p, off, ln in writes])


async def check_pattern(path: str, fmt: str, reads: Sequence[tuple[int, int, int]]) -> None:
    await qemu_io(
        path, fmt, [f"read -P {p:#x} {off} {ln}" for p, off, ln in reads], force_share=True
    )


async def compare(
    a: str, b: str, *, fmt_a: str | None = None, fmt_b: str | None = None, strict: bool = False
) -> tuple[bool, str]:
    """qemu-img compare: (identical?, its message). Opens backing chains as they are."""
    argv = ["qemu-img", "compare", "-U"]
    if fmt_a:
        argv += ["-f", fmt_a]
    if fmt_b:
        argv += ["-F", fmt_b]
    if strict:
        argv.append("-s")
    result = await run([*argv, a, b], check=False)
    if result.returncode not in (0, 1):
        raise ToolError(f"qemu-img compare {a} {b} failed: {result.stderr.strip()}")
    return result.returncode == 0, (result.stdout + result.stderr).strip()


async def info(path: str, *, backing_chain: bool = False) -> Any:
    argv = ["qemu-img", "info", "-U", "--output=json"]
    if backing_chain:
        argv.append("--backing-chain")
    return json.loads((await run([*argv, path])).stdout)


async def convert(
    src: str,
    dst: str,
    *,
    src_fmt: str | None = None,
    dst_fmt: str = "qcow2",
    extra: Sequence[str] = (),
) -> None:
    argv = ["qemu-img", "convert", "-U", "-O", dst_fmt]
    if src_fmt:
        argv += ["-f", src_fmt]
    await run([*argv, *extra, src, dst])


async def rebase_unsafe(path: str, backing: str, backing_fmt: str = "qcow2") -> None:
    await run(["qemu-img", "rebase", "-u", "-b", backing, "-F", backing_fmt, path])
