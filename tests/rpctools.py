"""Helpers for the daemon's tests: one QEMU per module, the daemon as a user runs it
(``pyvirtbackup serve`` in a subprocess), the real clients (virsh, /usr/bin/python3
with libvirt-python, virtnbdbackup) as subprocesses.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest_asyncio

from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.process import DiskSpec, QemuProcess
from pyvirtbackup.rpc.server import DEFAULT_SOCKET

MiB = imgtools.MiB
PYVIRTBACKUP = [sys.executable, "-m", "pyvirtbackup"]
SYSTEM_PYTHON = "/usr/bin/python3"  # libvirt-python is Debian's C extension for it


def run(argv: list[str], *, timeout: float = 120.0, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)


class Daemon:
    """``pyvirtbackup --state-dir DIR serve --socket PATH``, in the foreground as a user runs it."""

    def __init__(self, state_dir: Path, socket_path: Path | None, *extra: str) -> None:
        """``socket_path`` None: no --socket, libvirt's default path."""
        self.state_dir = state_dir
        self.default_socket = socket_path is None
        self.socket_path = Path(DEFAULT_SOCKET) if socket_path is None else socket_path
        self.extra = list(extra)
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = state_dir.parent / f"serve-{self.socket_path.name}.log"
        self._log_from = 0

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket_path}"

    def serve_args(self) -> list[str]:
        where = [] if self.default_socket else ["--socket", str(self.socket_path)]
        return [*where, *self.extra]

    def start(self, timeout: float = 20.0) -> Daemon:
        self._log_from = len(self.log())
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [*PYVIRTBACKUP, "--state-dir", str(self.state_dir), "serve", *self.serve_args()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            text=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while "serving qemu:///system" not in self.log()[self._log_from :]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM, as systemd stops it; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run([*PYVIRTBACKUP, "--state-dir", str(state_dir), *args])


@dataclass
class RpcEnv:
    """A QEMU, the test's own monitor (the "orchestrator"), a daemon serving it as vm1."""

    proc: QemuProcess
    mon: Monitor
    daemon: Daemon
    workdir: Path
    disks: dict[str, tuple[str, str]]  # name -> (path, format)
    extra_qmp: str = ""  # a spare QMP socket of the same QEMU
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return self.daemon.uri

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir

    def virsh(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """virsh with this daemon's URI; options before the command go first too."""
        options = []
        while args and args[0].startswith("-"):
            options += args[:2]
            args = args[2:]
        return run(["virsh", *options, "-c", self.uri, *args], timeout=timeout)

    async def write(self, disk: str, pattern: int, offset: int, length: int) -> None:
        await self.mon.qemu_io(disk, f"write -P {pattern:#x} {offset} {length}")

    async def snapshot(self, disk: str, dest: Path) -> Path:
        """The disk's content now, as a raw file (flushed first)."""
        await self.mon.qemu_io(disk, "flush")
        path, fmt = self.disks[disk]
        await imgtools.convert(path, str(dest), src_fmt=fmt, dst_fmt="raw")
        return dest


async def start_env(
    workdir: Path,
    disks: list[tuple[str, str, int, str]],
    *daemon_args: str,
    fill: tuple[tuple[int, int, int], ...] = ((0x11, 0, 2 * MiB), (0x12, 5 * MiB, 1 * MiB)),
) -> RpcEnv:
    """QEMU with ``disks`` (name, format, size, bus), attached as vm1 with the CLI,
    and the daemon serving it."""
    workdir.mkdir(parents=True, exist_ok=True)
    specs, paths = [], {}
    for name, fmt, size, bus in disks:
        path = str(workdir / f"{name}.{fmt}")
        await imgtools.create(path, size, fmt)
        await imgtools.write_pattern(path, fmt, [w for w in fill if w[1] + w[2] <= size])
        specs.append(DiskSpec(name, path, fmt, bus))
        paths[name] = (path, fmt)
    spare = str(workdir / "spare-qmp.sock")
    proc = QemuProcess(specs, extra_args=["-qmp", f"unix:{spare},server=on,wait=off"])
    await proc.start()
    mon = Monitor("test-orchestrator")
    daemon = Daemon(workdir / "state", workdir / "libvirt-sock", *daemon_args)
    try:
        await mon.connect(proc.qmp_path)
        attached = await asyncio.to_thread(
            cli, daemon.state_dir, "attach", "vm1", "--qmp", proc.backup_qmp_path
        )
        assert attached.returncode == 0, attached.stderr
        await asyncio.to_thread(daemon.start)
    except BaseException:
        daemon.stop()
        await mon.close()
        await proc.stop()
        raise
    return RpcEnv(proc, mon, daemon, workdir, paths, spare)


async def stop_env(env: RpcEnv) -> None:
    rc = await asyncio.to_thread(env.daemon.stop)
    await env.mon.close()
    await env.proc.stop()
    assert rc == 0, f"daemon exit status {rc}: {env.daemon.log()[-3000:]}"


def env_fixture(disks: list[tuple[str, str, int, str]], *daemon_args: str) -> object:
    """A module-scoped RpcEnv fixture (one QEMU and one daemon for the module)."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def env(tmp_path_factory: object) -> AsyncIterator[RpcEnv]:
        workdir = tmp_path_factory.mktemp("rpc")  # type: ignore[attr-defined]
        rpc_env = await start_env(workdir, disks, *daemon_args)
        try:
            yield rpc_env
        finally:
            await stop_env(rpc_env)

    return env


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


def job_completed(env: RpcEnv) -> bool:
    out = env.virsh("domjobinfo", "vm1").stdout
    return "Job type:         None" in out
