"""Rows about what a backup costs the guest: how long begin pauses it, and how long its
writes take while a push runs to a target much slower than its disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

from benchlib import (
    MiB,
    Row,
    Session,
    drop_dirty,
    remove_generated,
    rm,
    small_disks,
    varied_image,
)

from pyvirtbackup import BackupBeginFlags, Tuning
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.process import DiskSpec

KiB = 1024


async def bench_pause(work: Path, repeat: int) -> list[Row]:
    """How long begin stops a running guest so that all its disks share one instant:
    ``stop``, the transaction, one ``qom-set`` per disk, ``cont``."""
    rows = []
    for n in (1, 4, 16):
        disks = await small_disks(work, "pause", n)
        s = await Session.open(disks, work / f"state-pause{n}", paused=False)
        pauses: list[float] = []
        try:
            for _ in range(repeat):
                drop_dirty()
                await s.driver.domainBackupBegin(s.dom, None)
                assert s.dom.job is not None and s.dom.job.pause_ms is not None
                pauses.append(s.dom.job.pause_ms / 1000)
                await asyncio.wait_for(s.done.wait(), 600)
                s.done.clear()
                remove_generated(disks)
        finally:
            await s.close()
        goal = {1: "≤ 20 ms", 16: "≤ 100 ms"}.get(n, "")
        rows.append(Row(f"begin pauses the guest, {n} disk{'s' if n > 1 else ''}", pauses,
                        goal=goal))  # fmt: skip
    return rows


@contextlib.asynccontextmanager
async def slow_file(mountpoint: Path, size: int, bytes_per_second: int) -> AsyncIterator[Path]:
    """A file whose writes go at ``bytes_per_second``: nbdkit's memory disk behind its
    rate filter, mounted as a file with nbdfuse."""
    mountpoint.mkdir(exist_ok=True)
    path = mountpoint / "target"
    proc = await asyncio.create_subprocess_exec(
        "nbdfuse", str(path), "--command", "nbdkit", "-s", "--filter=rate", "memory",
        str(size), f"rate={bytes_per_second * 8}",
    )  # fmt: skip
    try:
        for _ in range(200):
            if path.exists():
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("nbdfuse did not mount")
        yield path
    finally:
        umount = await asyncio.create_subprocess_exec(
            "umount", str(mountpoint), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await umount.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _guest_writes(s: Session, offsets: list[int]) -> list[float]:
    """64 KiB writes through the device, each timed from the orchestrator's monitor."""
    took = []
    for i, offset in enumerate(offsets):
        t0 = time.perf_counter()
        await s.dom.monitor.qemu_io("vda", f"write -P {1 + i % 250:#x} {offset} 64k")
        took.append(time.perf_counter() - t0)
    return took


async def bench_guest_latency(work: Path, repeat: int) -> list[Row]:
    """p50/p99 of 64 KiB guest writes onto data the backup has not copied yet, while a
    push runs to a target ten times slower than the disk: fleecing, libvirt's direct
    sequence, and no backup at all, in turns."""
    size = 256 * MiB
    src = str(work / "guest.qcow2")
    await varied_image(src, size, size)
    # the disk's own speed, measured: the target gets a tenth of it
    t0 = time.perf_counter()
    await imgtools.run(["qemu-img", "convert", "-U", "-O", "raw", "-t", "writeback", src,
                        str(work / "speed.raw")])  # fmt: skip
    disk_rate = int(size / (time.perf_counter() - t0))
    rm(work / "speed.raw")
    target_rate = max(disk_rate // 10, 1 * MiB)
    # from the end of the disk back: the job copies upwards, these are still ahead of it
    offsets = [size - (i + 1) * 1 * MiB for i in range(100)]
    samples: dict[str, list[float]] = {"none": [], "direct": [], "fleecing": []}
    for r in range(repeat):
        for mode in ("none", "direct", "fleecing")[r % 3 :] + ("none", "direct", "fleecing")[
            : r % 3
        ]:
            s = await Session.open([DiskSpec("vda", src)], work / f"state-guest-{mode}-{r}")
            try:
                if mode == "none":
                    samples[mode] += await _guest_writes(s, offsets)
                    continue
                async with slow_file(work / f"slow-{mode}-{r}", size, target_rate) as target:
                    xml = (
                        f"<domainbackup><disks><disk name='vda'><driver type='raw'/>"
                        f"<target file='{target}'/></disk></disks></domainbackup>"
                    )
                    await s.driver.domainBackupBegin(
                        s.dom, xml, None, BackupBeginFlags.REUSE_EXTERNAL,
                        fleecing=mode == "fleecing", tuning=Tuning(max_workers=1),
                    )  # fmt: skip
                    samples[mode] += await _guest_writes(s, offsets)
                    await s.driver.domainAbortJob(s.dom)
            finally:
                await s.close()
            for leftover in Path(src).parent.glob(Path(src).name + ".fleece.*"):
                os.unlink(leftover)

    def pct(values: list[float], q: int) -> list[float]:
        return [statistics.quantiles(values, n=100)[q - 1]]

    note = f"target {target_rate // MiB} MiB/s, disk {disk_rate // MiB} MiB/s"
    rows = []
    for q in (50, 99):
        rows.append(Row(f"guest 64 KiB write p{q} during a push to a slow target, fleecing, vs no "
                        "backup", pct(samples["fleecing"], q), pct(samples["none"], q),
                        unit="s", goal="≤ 1.5×", note=note))  # fmt: skip
        rows.append(Row(f"guest 64 KiB write p{q}, libvirt's direct sequence, vs no backup",
                        pct(samples["direct"], q), pct(samples["none"], q), unit="s",
                        note=note))  # fmt: skip
    return rows
