#!/usr/bin/env python3
"""A full pull backup: a real NBD client copies a running VM's disk while its guest writes.

It starts a throwaway QEMU with one disk full of data, begins a pull backup with
pyvirtbackup's libvirt-style API, copies the export with `nbdcopy` into a raw file
while a "guest" keeps writing to the disk, ends the job with domainAbortJob (pull
backups never end by themselves), and checks the copy with `qemu-img compare`
against the disk as it was at the instant the backup began.

    python examples/pull_backup.py [--size-mib 256] [--transport unix|tcp]
        [--tls SERVER_DIR CLIENT_DIR] [--keep DIR]

With --tls the server uses the x509 files in SERVER_DIR (ca-cert.pem,
server-cert.pem, server-key.pem) and nbdcopy those in CLIENT_DIR (ca-cert.pem,
client-cert.pem, client-key.pem); the transport is then tcp on localhost.

Not here yet: the incremental copy (only the extents that
`nbdinfo --map=qemu:dirty-bitmap:backup-vda` marks dirty). The driver has what it
needs (a checkpoint with the full backup, then `<incremental>` in pull mode; see
tests/test_incremental.py); the client side of the copy is still to write.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lxml import etree

from pyvirtbackup import DomainEventID, Driver, JobStatsFlags
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.process import DiskSpec, QemuProcess

MiB = 1024 * 1024


async def make_disk(workdir: Path, size: int) -> DiskSpec:
    path = str(workdir / "vda.qcow2")
    await imgtools.create(path, size, "qcow2")
    # half the disk holds data, in 1 MiB runs of varying patterns
    writes = [(0x10 + i % 200, i * 2 * MiB, MiB) for i in range(size // (2 * MiB))]
    await imgtools.write_pattern(path, "qcow2", writes)
    return DiskSpec("vda", path, "qcow2")


async def guest(mon: Monitor, size: int, stop: asyncio.Event) -> int:
    """Write 64 KiB blocks at random places, like a busy guest, until told to stop."""
    rnd = random.Random(7)
    count = 0
    while not stop.is_set():
        offset = rnd.randrange(size // 65536) * 65536
        await mon.qemu_io("vda", f"write -P {rnd.randrange(1, 255)} {offset} 64k")
        count += 1
        await asyncio.sleep(0)
    return count


def export_uri(desc: str, client_tls_dir: str | None) -> str:
    """The NBD URI of vda's export, from what domainBackupGetXMLDesc reports."""
    root = etree.fromstring(desc.encode())
    server = root.find("server")
    export = root.find("disks/disk[@name='vda']").get("exportname")
    if server.get("transport") == "unix":
        return f"nbd+unix:///{export}?socket={server.get('socket')}"
    host_port = f"{server.get('name')}:{server.get('port')}"
    if client_tls_dir:
        return f"nbds://{host_port}/{export}?tls-certificates={client_tls_dir}"
    return f"nbd://{host_port}/{export}"


def backup_xml(workdir: Path, transport: str, tls: bool) -> str:
    if tls:
        server = "<server name='localhost' tls='yes'/>"  # no port: a free one is picked
    elif transport == "tcp":
        server = "<server name='127.0.0.1'/>"
    else:
        server = f"<server transport='unix' socket='{workdir / 'nbd.sock'}'/>"
    return (
        f"<domainbackup mode='pull'>{server}<disks><disk name='vda'>"
        f"<scratch file='{workdir / 'vda.scratch.qcow2'}'/></disk></disks></domainbackup>"
    )


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="size of the disk (default 256)")
    ap.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    ap.add_argument("--tls", nargs=2, metavar=("SERVER_DIR", "CLIENT_DIR"))
    ap.add_argument("--keep", metavar="DIR", help="keep images and the backup in DIR")
    args = ap.parse_args()
    size = args.size_mib * MiB
    server_tls, client_tls = args.tls or (None, None)

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="pyvirtbackup-pull-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"workdir      {workdir}")
        disk = await make_disk(workdir, size)
        async with QemuProcess([disk]) as vm, Monitor("demo-guest") as mon:
            await mon.connect(vm.qmp_path)
            print(f"QEMU         pid {vm.pid}, vda (qcow2) {args.size_mib} MiB, half written")
            driver_args = {"tls_x509_cert_dir": server_tls} if server_tls else {}
            async with Driver(state_dir=workdir / "state", **driver_args) as driver:
                dom = await driver.attach("demo", vm.backup_qmp_path)
                completed = asyncio.Event()
                await driver.connectDomainEventRegisterAny(
                    dom, DomainEventID.JOB_COMPLETED, lambda *a: completed.set()
                )
                # the reference: the disk exactly as it is when the backup begins
                await mon.qemu_io("vda", "flush")
                ref = str(workdir / "vda.at-begin.raw")
                await imgtools.convert(disk.path, ref, src_fmt="qcow2", dst_fmt="raw")

                t0 = time.monotonic()
                await driver.domainBackupBegin(
                    dom, backup_xml(workdir, args.transport, bool(server_tls))
                )
                begin_s = time.monotonic() - t0
                desc = await driver.domainBackupGetXMLDesc(dom)
                print("\nbackup XML (domainBackupGetXMLDesc):")
                print("  " + desc.rstrip().replace("\n", "\n  "))
                uri = export_uri(desc, client_tls)

                stop = asyncio.Event()
                writer = asyncio.create_task(guest(mon, size, stop))
                backup = str(workdir / "vda.backup.raw")
                t1 = time.monotonic()
                try:
                    await imgtools.run(["nbdcopy", uri, backup])
                finally:
                    copy_s = time.monotonic() - t1
                    stop.set()
                    writes = await writer
                live = await driver.domainGetJobStats(dom)

                t2 = time.monotonic()
                await driver.domainAbortJob(dom)  # the end of a pull backup
                abort_s = time.monotonic() - t2
                await asyncio.wait_for(completed.wait(), 10)
                stats = await driver.domainGetJobStats(dom, JobStatsFlags.COMPLETED)

            same, msg = await imgtools.compare(ref, backup, fmt_a="raw", fmt_b="raw")
            print(
                f"\nbegin        {begin_s * 1000:.0f} ms; abort and cleanup {abort_s * 1000:.0f} ms"
            )
            print(
                f"copy         nbdcopy {uri}\n"
                f"             {size / MiB:.0f} MiB in {copy_s:.2f} s "
                f"({size / MiB / copy_s:.0f} MiB/s of virtual size)"
            )
            print(
                f"guest        {writes} writes of 64 KiB meanwhile; scratch held "
                f"{live.get('disk_temp_used', 0) / MiB:.1f} MiB of old data"
            )
            print(f"job          success={stats.get('success')} type={stats.get('type')}")
            print(
                "verdict      "
                + ("identical to the disk at begin" if same else f"DIFFERENT: {msg}")
            )
            return 0 if same and stats.get("success") else 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
