#!/usr/bin/env python3
"""The main job: a full push backup of a running VM's two disks while its guest writes.

It starts a throwaway QEMU with two disks full of data, backs both up with
pyvirtbackup's libvirt-style API while a "guest" keeps writing to them, and checks
each backup with `qemu-img compare` against the disk as it was at the instant the
backup began. For scale, it also times `qemu-img convert -t writeback` of the same
image on the same machine.

    python examples/push_backup.py [--size-mib 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pyvirtbackup import DomainEventID, Driver, JobStatsFlags
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.process import DiskSpec, QemuProcess

MiB = 1024 * 1024


async def make_disks(workdir: Path, size: int) -> list[DiskSpec]:
    disks = []
    for name, fmt in (("vda", "qcow2"), ("vdb", "raw")):
        path = str(workdir / f"{name}.{fmt}")
        await imgtools.create(path, size, fmt)
        # half the disk holds data, in 1 MiB runs of varying patterns
        writes = [(0x10 + i % 200, i * 2 * MiB, MiB) for i in range(size // (2 * MiB))]
        await imgtools.write_pattern(path, fmt, writes)
        disks.append(DiskSpec(name, path, fmt))
    return disks


async def guest(mon: Monitor, size: int, stop: asyncio.Event) -> int:
    """Write 64 KiB blocks at random places, like a busy guest, until told to stop."""
    rnd = random.Random(42)
    count = 0
    while not stop.is_set():
        disk = rnd.choice(("vda", "vdb"))
        offset = rnd.randrange(size // 65536) * 65536
        await mon.qemu_io(disk, f"write -P {rnd.randrange(1, 255)} {offset} 64k")
        count += 1
        await asyncio.sleep(0)
    return count


def human(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="size of each disk (default 256)")
    ap.add_argument("--keep", metavar="DIR", help="keep images and backups in DIR")
    ap.add_argument("--debug", action="store_true", help="log every QMP command and its time")
    args = ap.parse_args()
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)8.1f %(message)s")
    size = args.size_mib * MiB

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="pyvirtbackup-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"workdir      {workdir}")
        disks = await make_disks(workdir, size)
        async with QemuProcess(disks) as vm, Monitor("demo-guest") as mon:
            await mon.connect(vm.qmp_path)
            print(
                f"QEMU         pid {vm.pid}, disks vda (qcow2) and vdb (raw), "
                f"{args.size_mib} MiB each, half written"
            )
            async with Driver(state_dir=workdir / "state") as driver:
                dom = await driver.attach("demo", vm.backup_qmp_path)
                finished = asyncio.Event()
                per_disk_done: dict[str, float] = {}

                def on_disk(conn, d, disk, kind, status, opaque) -> None:
                    per_disk_done[disk] = time.monotonic()

                await driver.connectDomainEventRegisterAny(
                    dom, DomainEventID.JOB_COMPLETED, lambda *a: finished.set()
                )
                await driver.connectDomainEventRegisterAny(dom, DomainEventID.BLOCK_JOB_2, on_disk)

                # the reference: the disks exactly as they are when the backup begins
                refs = {}
                for d in disks:
                    await mon.qemu_io(d.name, "flush")
                    refs[d.name] = str(workdir / f"{d.name}.at-begin.raw")
                    await imgtools.convert(d.path, refs[d.name], src_fmt=d.format, dst_fmt="raw")

                t0 = time.monotonic()
                await driver.domainBackupBegin(dom, "<domainbackup/>")
                begin_s = time.monotonic() - t0
                desc = await driver.domainBackupGetXMLDesc(dom) if dom.job else None
                stop = asyncio.Event()
                writer = asyncio.create_task(guest(mon, size, stop))
                await asyncio.wait_for(finished.wait(), 600)
                total_s = time.monotonic() - t0
                stop.set()
                writes = await writer
                stats = await driver.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
                failed_writes = vm.guest_write_failures()

            if desc:
                print("\nbackup XML (domainBackupGetXMLDesc while it ran):")
                print("  " + desc.rstrip().replace("\n", "\n  "))
            ok = stats.get("success") is True
            print(
                f"\nbackup       {'completed' if ok else 'FAILED: ' + stats.get('errmsg', '?')}; "
                f"begin returned in {begin_s * 1000:.0f} ms, all done in {total_s:.2f} s"
            )
            print(
                f"guest        {writes} writes of 64 KiB during the backup, "
                f"{failed_writes} of them failed\n"
            )
            print(f"{'disk':5} {'target':58} {'size':>11} {'time':>7} {'MiB/s':>8}  verdict")
            all_same = ok and failed_writes == 0
            for d in disks:
                target = f"{d.path}.{desc_suffix(desc)}" if desc else "?"
                took = per_disk_done.get(d.name, t0 + total_s) - t0
                same, msg = await imgtools.compare(refs[d.name], target, fmt_a="raw")
                all_same &= same
                verdict = "identical to the disk at begin" if same else f"DIFFERENT: {msg}"
                print(
                    f"{d.name:5} {target:58} {human(os.path.getsize(target)):>11} "
                    f"{took:6.2f}s {size / MiB / took:8.0f}  {verdict}"
                )
            print(
                f"{'all':5} {'(both disks, copied at the same time)':58} {'':>11} "
                f"{total_s:6.2f}s {2 * size / MiB / total_s:8.0f}"
            )
            # for scale: qemu-img convert of the same image, flushed at the end
            await mon.qemu_io("vda", "flush")
            conv = str(workdir / "vda.convert.qcow2")
            t1 = time.monotonic()
            await imgtools.convert(disks[0].path, conv, src_fmt="qcow2", extra=["-t", "writeback"])
            conv_s = time.monotonic() - t1
            print(
                f"\nfor scale    qemu-img convert -O qcow2 -t writeback of vda: {conv_s:.2f} s "
                f"({size / MiB / conv_s:.0f} MiB/s of virtual size)"
            )
        return 0 if all_same else 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def desc_suffix(desc: str) -> str:
    start = desc.index("<target file='") + len("<target file='")
    return desc[start : desc.index("'", start)].rsplit(".", 1)[1]


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
