"""What the benchmark's rows share: the table, a QEMU with a driver, images."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirtbackup import DomainEventID, Driver, JobStatsFlags
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.process import DiskSpec, QemuProcess

MiB = 1024 * 1024
GiB = 1024 * MiB
# the baseline copy: QEMU's own tool, flushing the target at close as a backup does
CONVERT_WRITEBACK = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", "-t", "writeback"]


# --------------------------------------------------------------------- reporting


@dataclass
class Row:
    """One line of the table: our numbers, the baseline's, and what the goal was."""

    name: str
    ours: list[float]
    base: list[float] | None = None
    unit: str = "s"
    goal: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.ours)

    @property
    def ratio(self) -> float | None:
        if not self.base:
            return None
        return self.median / statistics.median(self.base)

    def spread(self) -> str:
        lo, hi = min(self.ours), max(self.ours)
        return f"{fmt(lo, self.unit)}–{fmt(hi, self.unit)}"


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "x":
        return f"{value:.3f}×"
    if unit == "%":
        return f"{value:.2f} %"
    return f"{value:g} {unit}"


def render(rows: list[Row]) -> str:
    head = "| measurement | ours (median) | spread | baseline (median) | ratio | goal |"
    out = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        base = fmt(statistics.median(r.base), r.unit) if r.base else "–"
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "–"
        name = r.name + (f" ({r.note})" if r.note else "")
        out.append(
            f"| {name} | {fmt(r.median, r.unit)} | {r.spread()} | {base} | {ratio} | {r.goal} |"
        )
    return "\n".join(out)


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    kvm = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    return (
        f"{platform.node()}: {os.cpu_count()} × {cpu}, {mem:.0f} GiB RAM, "
        f"{qemu.stdout.splitlines()[0]}, {kvm}, Python {platform.python_version()}"
    )


# --------------------------------------------------------------------- helpers


def drop_dirty() -> None:
    """Write back dirty pages so one measurement does not pay for the previous one."""
    os.sync()


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def reset_hwm(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


async def varied_image(
    path: str, size: int, data: int, fmt: str = "qcow2", stride: int | None = None
) -> None:
    """``data`` bytes in 1 MiB runs of varying patterns, spread evenly (or every
    ``stride`` bytes) from offset 0."""
    await imgtools.create(path, size, fmt)
    runs = data // MiB
    stride = stride or max(size // max(runs, 1), MiB)
    writes = [(1 + i % 251, i * stride, MiB) for i in range(runs)]
    for start in range(0, len(writes), 256):  # keep qemu-io command lines short
        await imgtools.write_pattern(path, fmt, writes[start : start + 256])


@dataclass
class Session:
    """A QEMU with some disks and a driver attached to it."""

    proc: QemuProcess
    driver: Driver
    dom: Any
    done: asyncio.Event

    @classmethod
    async def open(
        cls, disks: list[DiskSpec], state: Path, *, paused: bool = True, **driver_kw: Any
    ) -> Session:
        proc = await QemuProcess(disks, paused=paused).start()
        driver = Driver(state_dir=state, **driver_kw)
        dom = await driver.attach("bench", proc.backup_qmp_path)
        done = asyncio.Event()
        await driver.connectDomainEventRegisterAny(
            dom, DomainEventID.JOB_COMPLETED, lambda *a: done.set()
        )
        return cls(proc, driver, dom, done)

    async def push(self, xml: str, checkpoint_xml: str | None = None, **kw: Any) -> float:
        """Begin → JOB_COMPLETED (targets closed and flushed), in seconds."""
        self.done.clear()
        t0 = time.perf_counter()
        await self.driver.domainBackupBegin(self.dom, xml, checkpoint_xml, **kw)
        await asyncio.wait_for(self.done.wait(), 3600)
        took = time.perf_counter() - t0
        stats = await self.driver.domainGetJobStats(self.dom, JobStatsFlags.COMPLETED)
        if not stats.get("success"):
            raise RuntimeError(f"backup failed: {stats}")
        return took

    async def close(self) -> None:
        await self.driver.close()
        await self.proc.stop()


def push_xml(disk: str, target: str) -> str:
    return (
        f"<domainbackup><disks><disk name='{disk}'><target file='{target}'/></disk>"
        "</disks></domainbackup>"
    )


def rm(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def small_disks(work: Path, prefix: str, n: int) -> list[DiskSpec]:
    """``n`` 64 MiB qcow2 disks holding 4 MiB each, for rows about per-disk costs."""
    disks = []
    for i in range(n):
        path = str(work / f"{prefix}{n}-{i}.qcow2")
        await varied_image(path, 64 * MiB, 4 * MiB)
        disks.append(DiskSpec(f"vd{i:02d}", path))
    return disks


def remove_generated(disks: list[DiskSpec]) -> None:
    """The targets a begin without XML generated next to the disks."""
    for d in disks:
        assert d.path is not None
        for f in Path(d.path).parent.glob(Path(d.path).name + ".*"):
            f.unlink()
