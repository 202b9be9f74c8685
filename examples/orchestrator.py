#!/usr/bin/env python3
"""An asyncio orchestrator that embeds pyvirtbackup's Driver and backs up two VMs at once.

Each VM gets its own QEMU; one Driver serves both. Backups run concurrently (one job
per domain, as libvirt allows), progress is polled with domainGetJobStats, and the
end of each job arrives as a JOB_COMPLETED event. Then a second round takes an
incremental backup of each VM from the checkpoint the first round created.

    python examples/orchestrator.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from pyvirtbackup import DomainEventID, Driver, JobStatsFlags
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.process import DiskSpec, QemuProcess

MiB = 1024 * 1024


async def make_vm(workdir: Path, name: str) -> tuple[QemuProcess, Monitor]:
    disks = []
    for disk in ("vda", "vdb"):
        path = str(workdir / f"{name}-{disk}.qcow2")
        await imgtools.create(path, 64 * MiB)
        await imgtools.write_pattern(path, "qcow2", [(0x40 + len(disks), 0, 16 * MiB)])
        disks.append(DiskSpec(disk, path))
    proc = await QemuProcess(disks).start()
    guest = Monitor(f"{name}-guest")
    await guest.connect(proc.qmp_path)
    return proc, guest


async def backup(driver: Driver, dom, xml: str, checkpoint: str) -> dict:
    """One backup of one domain, start to finish, with a progress line now and then."""
    finished = asyncio.Event()
    cb = await driver.connectDomainEventRegisterAny(
        dom, DomainEventID.JOB_COMPLETED, lambda *a: finished.set()
    )
    try:
        await driver.domainBackupBegin(
            dom, xml, f"<domaincheckpoint><name>{checkpoint}</name></domaincheckpoint>"
        )
        while not finished.is_set():
            stats = await driver.domainGetJobStats(dom)
            if stats.get("disk_total"):
                pct = 100 * stats["disk_processed"] / stats["disk_total"]
                print(f"  {dom.name}: {pct:5.1f}% of {stats['disk_total'] / MiB:.1f} MiB")
            try:
                await asyncio.wait_for(finished.wait(), 0.2)
            except TimeoutError:
                pass
        return await driver.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
    finally:
        await driver.connectDomainEventDeregisterAny(cb)


def backup_xml(workdir: Path, dom_name: str, kind: str, incremental: str | None = None) -> str:
    """Both disks, targets named <vm>-<disk>.<kind>.qcow2 in workdir."""
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    disks = "".join(
        f"<disk name='{d}'><target file='{workdir}/{dom_name}-{d}.{kind}.qcow2'/></disk>"
        for d in ("vda", "vdb")
    )
    return f"<domainbackup>{inc}<disks>{disks}</disks></domainbackup>"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", metavar="DIR", help="keep images and backups in DIR")
    args = ap.parse_args()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="pyvirtbackup-orchestrator-"))
    workdir.mkdir(parents=True, exist_ok=True)
    vms = {}
    try:
        for name in ("web", "db"):
            vms[name] = await make_vm(workdir, name)
        async with Driver(state_dir=workdir / "state") as driver:
            doms = [
                await driver.attach(name, proc.backup_qmp_path) for name, (proc, _g) in vms.items()
            ]

            print("round 1: full backups of both VMs, each with checkpoint 'c1'")
            results = await asyncio.gather(
                *(backup(driver, dom, backup_xml(workdir, dom.name, "full"), "c1") for dom in doms)
            )
            for dom, res in zip(doms, results, strict=True):
                print(
                    f"  {dom.name}: success={res['success']} "
                    f"{res['disk_processed'] / MiB:.2f} MiB in {res['time_elapsed']} ms"
                )

            for name, (_p, guest) in vms.items():  # the guests write a little
                await guest.qemu_io("vda", f"write -P 0x{0x70 + len(name):x} 1M 256k")

            print("round 2: incremental backups from c1, each with checkpoint 'c2'")
            results = await asyncio.gather(
                *(
                    backup(driver, dom, backup_xml(workdir, dom.name, "inc", "c1"), "c2")
                    for dom in doms
                )
            )
            ok = True
            for dom, res in zip(doms, results, strict=True):
                ok &= bool(res["success"])
                print(
                    f"  {dom.name}: success={res['success']} "
                    f"{res['disk_processed'] / MiB:.2f} MiB in {res['time_elapsed']} ms"
                )
                names = [c.name for c in await driver.domainListAllCheckpoints(dom)]
                print(f"  {dom.name}: checkpoints {sorted(names)}")
        return 0 if ok else 1
    finally:
        for proc, guest in vms.values():
            await guest.close()
            await proc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
