"""A throwaway QEMU for tests, examples and the demo.

No guest OS is needed: the block layer, dirty bitmaps, block jobs and NBD exports
all work in a QEMU whose CPUs never run, and HMP ``qemu-io`` writes stand in for
the guest. QEMU starts paused (``-S``) so an idle test VM costs no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import ErrorDomain, ErrorNumber, VirError

QEMU_BINARY = os.environ.get("PYVIRTBACKUP_QEMU", "qemu-system-x86_64")

BUSES = ("scsi", "virtio", "ide")


def _die_with_parent() -> None:
    """In the child: a throwaway QEMU gets SIGTERM (a clean quit) when its parent dies.

    Tests and examples that are killed must not leave QEMUs behind.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: nothing to arrange
        pass


@dataclass
class DiskSpec:
    """A disk to attach: ``name`` becomes the device id (libvirt's target dev).

    ``path=None`` attaches an empty CD-ROM drive (a disk with no medium), which is
    what libvirt calls an empty disk. ``backing`` lists the images below ``path``
    as (path, format), top first: each gets its own read-only ``-blockdev`` nodes
    with names, as libvirt opens chains, instead of QEMU opening them implicitly
    from the image headers.
    """

    name: str
    path: str | None
    format: str = "qcow2"
    bus: str = "scsi"
    readonly: bool = False
    backing: tuple[tuple[str, str], ...] = ()

    @property
    def node(self) -> str:
        return f"{self.name}-fmt"

    @property
    def file_node(self) -> str:
        return f"{self.name}-file"


DiskLike = DiskSpec | tuple


def as_disk_spec(disk: DiskLike) -> DiskSpec:
    """Accept a DiskSpec or a tuple (name, path, format[, bus[, readonly]])."""
    return disk if isinstance(disk, DiskSpec) else DiskSpec(*disk)


def _device(d: DiskSpec, ide_unit: int) -> str:
    empty = d.path is None
    if d.bus == "scsi":
        model = "scsi-cd" if empty else "scsi-hd"
        dev = f"{model},bus=scsi0.0,id={d.name}"
    elif d.bus == "virtio":
        if empty:
            raise ValueError(f"virtio-blk disk {d.name!r} cannot be empty")
        dev = f"virtio-blk-pci,id={d.name}"
    else:
        # q35 has an AHCI controller with six ports; IDE disks cannot be read-only
        model = "ide-cd" if empty or d.readonly else "ide-hd"
        dev = f"{model},bus=ide.{ide_unit},id={d.name}"
    return dev if empty else f"{dev},drive={d.node}"


def _backing_args(d: DiskSpec) -> list[str]:
    """Named read-only nodes for a disk's backing chain, bottom first (each refers down)."""
    args: list[str] = []
    depth = len(d.backing)
    for i in range(depth, 0, -1):
        path, fmt = d.backing[i - 1]
        file_node = {
            "driver": "file",
            "filename": path,
            "node-name": f"{d.name}-b{i}-file",
            "read-only": True,
        }
        fmt_node: dict[str, object] = {
            "driver": fmt,
            "file": file_node["node-name"],
            "node-name": f"{d.name}-b{i}-fmt",
            "read-only": True,
        }
        if fmt == "qcow2":
            fmt_node["backing"] = f"{d.name}-b{i + 1}-fmt" if i < depth else None
        args += ["-blockdev", json.dumps(file_node), "-blockdev", json.dumps(fmt_node)]
    return args


def _disk_args(disks: list[DiskSpec]) -> list[str]:
    args: list[str] = []
    if any(d.bus == "scsi" for d in disks):
        args += ["-device", "virtio-scsi-pci,id=scsi0"]
    ide_unit = 0
    for d in disks:
        if d.bus not in BUSES:
            raise ValueError(f"unknown bus {d.bus!r} for disk {d.name!r}; use one of {BUSES}")
        if d.path is not None:
            file_node = {
                "driver": "file",
                "filename": d.path,
                "node-name": d.file_node,
                "read-only": d.readonly,
            }
            fmt_node = {
                "driver": d.format,
                "file": d.file_node,
                "node-name": d.node,
                "read-only": d.readonly,
            }
            if d.backing:
                fmt_node["backing"] = f"{d.name}-b1-fmt"
            args += _backing_args(d)
            args += ["-blockdev", json.dumps(file_node), "-blockdev", json.dumps(fmt_node)]
        args += ["-device", _device(d, ide_unit)]
        if d.bus == "ide":
            ide_unit += 1
    return args


class QemuProcess:
    """Start a QEMU with the given disks; stop it (quit, then by PID) on exit.

    ``qmp_path`` is a monitor for the caller (tests use it for qemu-io writes);
    ``backup_qmp_path`` is a second, independent monitor meant for pyvirtbackup,
    the way an orchestrator keeps its own monitor and hands out another.
    """

    def __init__(
        self,
        disks: list[DiskLike] | None = None,
        *,
        extra_args: list[str] | None = None,
        paused: bool = True,
        memory_mib: int = 128,
        start_timeout: float = 30.0,
    ) -> None:
        self.disks = [as_disk_spec(d) for d in disks or []]
        self.extra_args = list(extra_args or [])
        self.paused = paused
        self.memory_mib = memory_mib
        self.start_timeout = start_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self._dir: str | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def rundir(self) -> Path:
        assert self._dir is not None
        return Path(self._dir)

    @property
    def qmp_path(self) -> str:
        return str(self.rundir / "qmp.sock")

    @property
    def backup_qmp_path(self) -> str:
        return str(self.rundir / "backup-qmp.sock")

    @property
    def stderr_path(self) -> Path:
        return self.rundir / "stderr.log"

    @property
    def stdout_path(self) -> Path:
        """QEMU's stdout: where HMP qemu-io reports a failed write ("write failed: ...")."""
        return self.rundir / "stdout.log"

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    def guest_write_failures(self) -> int:
        """Writes of the stand-in guest (HMP qemu-io) that QEMU reported as failed."""
        return self.stdout_text().count("write failed")

    def argv(self) -> list[str]:
        argv = [
            QEMU_BINARY,
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35,accel=kvm:tcg",
            "-m",
            str(self.memory_mib),
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp",
            f"unix:{self.backup_qmp_path},server=on,wait=off",
        ]
        if self.paused:
            argv.append("-S")
        return argv + _disk_args(self.disks) + self.extra_args

    async def start(self) -> QemuProcess:
        if shutil.which(QEMU_BINARY) is None:
            raise VirError(
                ErrorNumber.NO_SUPPORT,
                ErrorDomain.QEMU,
                f"{QEMU_BINARY} not found; install Debian's qemu-system-x86",
            )
        self._dir = tempfile.mkdtemp(prefix="pyvirtbackup-qemu-")
        os.chmod(self._dir, 0o700)
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            await self._wait_for_sockets()
            await self._wait_for_monitor()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _wait_for_sockets(self) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            if self.proc.returncode is not None:
                raise VirError(
                    ErrorNumber.OPERATION_FAILED,
                    ErrorDomain.QEMU,
                    f"QEMU exited with status {self.proc.returncode} at start: "
                    f"{self.stderr_text().strip()}",
                )
            if os.path.exists(self.qmp_path) and os.path.exists(self.backup_qmp_path):
                return
            if loop.time() > deadline:
                raise VirError(
                    ErrorNumber.OPERATION_TIMEOUT,
                    ErrorDomain.QEMU,
                    f"QEMU did not open its QMP sockets within {self.start_timeout:g}s: "
                    f"{self.stderr_text().strip()}",
                )
            await asyncio.sleep(0.01)

    async def _wait_for_monitor(self) -> None:
        """QEMU opens its sockets before it opens the disks: only an answer proves it is up."""
        from .monitor import Monitor

        assert self.proc is not None
        mon = Monitor("pyvirtbackup-process")
        try:
            await mon.connect(self.qmp_path, timeout=self.start_timeout)
            await mon.execute("query-status", timeout=self.start_timeout)
        except VirError as exc:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5.0)
            status = self.proc.returncode
            raise VirError(
                ErrorNumber.OPERATION_FAILED,
                ErrorDomain.QEMU,
                f"QEMU did not start (exit status {status}): "
                f"{self.stderr_text().strip() or exc.message}",
            ) from None
        finally:
            await mon.close()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    async def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit cleanly (persistent bitmaps are written on a clean close)."""
        from .monitor import Monitor

        if self.proc is None or self.proc.returncode is not None:
            return
        mon = Monitor("pyvirtbackup-process")
        try:
            await mon.connect(self.qmp_path, timeout=5.0)
            with contextlib.suppress(VirError):
                await mon.execute("quit", timeout=5.0)
        except VirError:
            pass
        finally:
            await mon.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def stop(self) -> None:
        """quit, then SIGTERM, then SIGKILL, always by PID; remove the private directory."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                await self.quit()
            except Exception:  # stopping must go on to the signals whatever failed
                pass
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                if self.proc.returncode is not None:
                    break
                self.kill(sig)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), wait)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> QemuProcess:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
