"""Fixtures: a real QEMU with fresh disks, always stopped by PID at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from pyvirtbackup import Driver
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.process import DiskSpec, QemuProcess

from .certs import Pki, make_pki

MiB = imgtools.MiB

# What a fresh test disk holds: (pattern, offset, length); the rest is unallocated.
DEFAULT_FILL: tuple[tuple[int, int, int], ...] = (
    (0x11, 0, 2 * MiB),
    (0x12, 4 * MiB, 1 * MiB),
    (0x13, 9 * MiB, 3 * MiB),
)


@dataclass
class TestDisk:
    __test__ = False  # a disk, not a test class, when a test module imports it

    name: str
    path: str
    format: str
    size: int
    bus: str = "scsi"
    readonly: bool = False
    backing: tuple[tuple[str, str], ...] = ()  # (path, format) below path, top first


@dataclass
class VM:
    """A running QEMU, its disks, and the test's own monitor (the 'orchestrator')."""

    proc: QemuProcess
    mon: Monitor
    disks: dict[str, TestDisk]
    workdir: Path
    extra: dict = field(default_factory=dict)

    @property
    def qmp(self) -> str:
        """The monitor socket meant for pyvirtbackup."""
        return self.proc.backup_qmp_path

    async def write(self, disk: str, pattern: int, offset: int, length: int) -> None:
        """A guest-like write through the device, as the guest would issue it."""
        await self.mon.qemu_io(disk, f"write -P {pattern:#x} {offset} {length}")

    async def snapshot(self, disk: str, dest: str) -> str:
        """Copy a disk's current content (flushing first) to a raw file, as a reference."""
        await self.mon.qemu_io(disk, "flush")
        d = self.disks[disk]
        await imgtools.convert(d.path, dest, src_fmt=d.format, dst_fmt="raw")
        return dest

    async def quit(self) -> None:
        await self.mon.close()
        await self.proc.quit()

    async def stop(self) -> None:
        await self.mon.close()
        await self.proc.stop()


DiskArg = tuple  # (name, format, size[, bus[, readonly]])

VMFactory = Callable[..., Awaitable[VM]]


async def make_disk(
    directory: Path, name: str, fmt: str, size: int, fill: Sequence[tuple[int, int, int]]
) -> str:
    path = str(directory / f"{name}.{fmt}")
    await imgtools.create(path, size, fmt)
    if fill:
        await imgtools.write_pattern(path, fmt, [w for w in fill if w[1] + w[2] <= size])
    return path


@pytest_asyncio.fixture
async def vm_factory(tmp_path: Path) -> AsyncIterator[VMFactory]:
    """Start QEMUs with fresh disks; every one is stopped (quit, then by PID) afterwards."""
    started: list[VM] = []

    async def start(
        disks: Sequence[DiskArg] = (("vda", "qcow2", 16 * MiB), ("vdb", "raw", 16 * MiB)),
        *,
        fill: Sequence[tuple[int, int, int]] = DEFAULT_FILL,
        existing: dict[str, TestDisk] | None = None,
        subdir: str = "images",
        extra_args: Sequence[str] = (),
        paused: bool = True,
    ) -> VM:
        workdir = tmp_path / subdir
        workdir.mkdir(exist_ok=True)
        test_disks: dict[str, TestDisk] = dict(existing or {})
        if not existing:
            for spec in disks:
                name, fmt, size, *rest = spec
                bus = rest[0] if rest else "scsi"
                readonly = bool(rest[1]) if len(rest) > 1 else False
                path = await make_disk(workdir, name, fmt, size, fill)
                test_disks[name] = TestDisk(name, path, fmt, size, bus, readonly)
        proc = QemuProcess(
            [
                DiskSpec(d.name, d.path, d.format, d.bus, d.readonly, d.backing)
                for d in test_disks.values()
            ],
            extra_args=list(extra_args),
            paused=paused,
        )
        await proc.start()
        mon = Monitor("test-orchestrator")
        try:
            await mon.connect(proc.qmp_path)
        except BaseException:
            await proc.stop()
            raise
        vm = VM(proc, mon, test_disks, workdir)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        with contextlib.suppress(Exception):
            await vm.stop()
        assert vm.proc.proc is None or vm.proc.proc.returncode is not None


@pytest_asyncio.fixture
async def driver(tmp_path: Path) -> AsyncIterator[Driver]:
    """A Driver with its own state directory, closed after the test."""
    drv = Driver(state_dir=tmp_path / "state")
    yield drv
    await drv.close()


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory another local user (nobody) can reach, for the multi-user tests."""
    from .otheruser import shared_dir

    with shared_dir() as path:
        yield path


def pytest_report_header() -> list[str]:
    """Which QEMU this pass runs against (scripts/test runs one pass per QEMU)."""
    lines = []
    for tool in ("qemu-system-x86_64", "qemu-img"):
        where = shutil.which(tool)
        version = "not found"
        if where:
            out = subprocess.run([where, "--version"], capture_output=True, text=True, timeout=30)
            version = out.stdout.splitlines()[0] if out.stdout else "no version"
        lines.append(f"{tool}: {where} ({version})")
    return lines


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for the TLS tests, from the recipe users are given (tests/certs.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True, scope="session")
def _no_qemu_left_behind() -> object:
    """Every QEMU a test started must be gone when the session ends."""
    before = _our_qemus()
    yield
    leftover = _our_qemus() - before
    assert not leftover, f"QEMU processes left behind: {sorted(leftover)}"


def _our_qemus() -> set[int]:
    """QEMUs this pytest started: its children, so that other test runs on the same
    machine (another checkout, a demo) are not taken for our leftovers."""
    me = os.getpid()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"pyvirtbackup-qemu-" not in cmdline or b"qemu-system" not in cmdline:
                continue
            # the parent pid is the 2nd field after the parenthesised command name
            stat_fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat_fields[1]) == me:
                pids.add(int(entry))
    return pids
