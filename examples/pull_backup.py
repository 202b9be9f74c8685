#!/usr/bin/env python3
"""A full, then an incremental pull backup of a running VM, copied by real NBD clients.

It starts a throwaway QEMU with one disk half full of data and, with pyvirtbackup's
libvirt-style API:

round 1  begins a pull backup that also creates checkpoint c1, copies the whole
         export with `nbdcopy` into full.qcow2 while a "guest" keeps writing to the
         disk, and ends the job with domainAbortJob (pull backups never end by
         themselves);
         then the guest writes some more, scattered 64 KiB blocks;
round 2  begins an incremental pull backup from c1 that creates checkpoint c2, asks
         the export which extents changed since c1 (`nbdinfo --map` on the dirty
         bitmap QEMU exports next to the data), creates inc.qcow2 on top of
         full.qcow2 and copies only those extents into it with `qemu-img convert`,
         and ends the job the same way.

Each copy is checked with `qemu-img compare` against the disk as it was at the
instant its backup began: full.qcow2 alone for round 1, the chain inc.qcow2 ->
full.qcow2 for round 2. The exit code is 0 only if both are identical.

    python examples/pull_backup.py [--size-mib 64] [--transport unix|tcp]
        [--tls SERVER_DIR CLIENT_DIR] [--keep DIR]

With --tls the server uses the x509 files in SERVER_DIR (ca-cert.pem,
server-cert.pem, server-key.pem) and the clients those in CLIENT_DIR (ca-cert.pem,
client-cert.pem, client-key.pem); the transport is then tcp on localhost.
With --keep, DIR keeps full.qcow2, inc.qcow2 and the references they were compared to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from pyvirtbackup import Domain, DomainEventID, Driver, JobStatsFlags
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.process import DiskSpec, QemuProcess

MiB = 1024 * 1024
TLS_OBJECT_ID = "tls0"  # the id of qemu-img's --object tls-creds-x509, when --tls


# ---------------------------------------------------------------------------
# The VM and its guest
# ---------------------------------------------------------------------------


async def make_disk(workdir: Path, size: int) -> DiskSpec:
    path = str(workdir / "vda.qcow2")
    await imgtools.create(path, size, "qcow2")
    # half the disk holds data, in 1 MiB runs of varying patterns
    writes = [(0x10 + i % 200, i * 2 * MiB, MiB) for i in range(size // (2 * MiB))]
    await imgtools.write_pattern(path, "qcow2", writes)
    return DiskSpec("vda", path, "qcow2")


async def guest_write(mon: Monitor, rnd: random.Random, size: int) -> None:
    """One 64 KiB write at a random 64 KiB-aligned place, as the guest would do it."""
    offset = rnd.randrange(size // 65536) * 65536
    await mon.qemu_io("vda", f"write -P {rnd.randrange(1, 255)} {offset} 64k")


async def busy_guest(mon: Monitor, size: int, stop: asyncio.Event, seed: int) -> int:
    """Write 64 KiB blocks at random places, about 200 a second, until told to stop."""
    rnd = random.Random(seed)
    count = 0
    while not stop.is_set():
        await guest_write(mon, rnd, size)
        count += 1
        await asyncio.sleep(0.005)
    return count


# ---------------------------------------------------------------------------
# The export, as domainBackupGetXMLDesc describes it, for each kind of client
# ---------------------------------------------------------------------------


@dataclass
class Export:
    """Where a client finds one disk's export."""

    uri: str  # for libnbd's tools: nbdcopy, nbdinfo
    qemu: dict[str, Any]  # the same export as QEMU block options, for qemu-img
    qemu_objects: list[str]  # the --object arguments qemu-img needs with those (TLS)
    bitmap: str | None  # the dirty bitmap exported next to the data (incremental only)


def find_export(desc: str, disk: str, client_tls_dir: str | None) -> Export:
    """Read the server and the export names from domainBackupGetXMLDesc's answer."""
    root = etree.fromstring(desc.encode())
    server = root.find("server")
    node = root.find(f"disks/disk[@name='{disk}']")
    name = node.get("exportname")
    qemu: dict[str, Any] = {"driver": "nbd", "export": name}
    objects: list[str] = []
    if server.get("transport") == "unix":
        socket = server.get("socket")
        uri = f"nbd+unix:///{name}?socket={socket}"
        qemu["server"] = {"type": "unix", "path": socket}
    else:
        host, port = server.get("name"), server.get("port")
        qemu["server"] = {"type": "inet", "host": host, "port": port}
        if client_tls_dir:
            uri = f"nbds://{host}:{port}/{name}?tls-certificates={client_tls_dir}"
            # QEMU reads the same three files (ca-cert.pem, client-*.pem) from the dir
            objects += [
                "--object",
                f"tls-creds-x509,id={TLS_OBJECT_ID},endpoint=client,dir={client_tls_dir}",
            ]
            qemu["tls-creds"] = TLS_OBJECT_ID
        else:
            uri = f"nbd://{host}:{port}/{name}"
    return Export(uri, qemu, objects, node.get("exportbitmap"))


def image_opts(opts: dict[str, Any], prefix: str = "") -> str:
    """QEMU's dotted key=value syntax for --image-opts (a comma in a value is doubled)."""
    parts = []
    for key, value in opts.items():
        if isinstance(value, dict):
            parts.append(image_opts(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={str(value).replace(',', ',,')}")
    return ",".join(parts)


# ---------------------------------------------------------------------------
# The clients: what a backup application runs while the job is going
# ---------------------------------------------------------------------------


async def copy_full(export: Export, target: str, size: int) -> tuple[int, list[str]]:
    """Copy the whole export into a new qcow2 image with nbdcopy.

    nbdcopy writes to NBD, so qemu-nbd serves the new image to it: nbdcopy starts
    it itself with `[ ... ]` and talks to it over a private socket. The image
    comes from qemu-img create and reads as zeros, so nbdcopy can skip the zeros.
    """
    await imgtools.run(["qemu-img", "create", "-q", "-f", "qcow2", target, str(size)])
    argv = ["nbdcopy", "--destination-is-zero", export.uri,
            "--", "[", "qemu-nbd", "-f", "qcow2", target, "]"]  # fmt: skip
    await imgtools.run(argv)
    return size, [shlex.join(argv)]


def dirty_map_argv(export: Export) -> list[str]:
    """nbdinfo's map of the dirty bitmap QEMU exports next to the data.

    The backup's bitmap (GetXMLDesc's exportbitmap) is the metadata context
    qemu:dirty-bitmap:<exportbitmap>; in it bit 1 of an extent's type means dirty.
    """
    return ["nbdinfo", f"--map=qemu:dirty-bitmap:{export.bitmap}", "--json", export.uri]


async def dirty_extents(export: Export) -> list[tuple[int, int]]:
    """(offset, length) of what changed since the incremental's checkpoint, with
    neighbouring dirty extents merged so that each run is copied at once."""
    extents = json.loads((await imgtools.run(dirty_map_argv(export))).stdout)
    merged: list[tuple[int, int]] = []
    for e in extents:
        if not e["type"] & 1:
            continue
        if merged and sum(merged[-1]) == e["offset"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + e["length"])
        else:
            merged.append((e["offset"], e["length"]))
    return merged


def copy_range_argv(export: Export, target: str, offset: int, length: int) -> list[str]:
    """qemu-img convert of one range of the export into the same range of target.

    QEMU's raw driver can show a window (offset, size) of any image, so both sides
    are windows: the source one over the NBD export, the target one over the qcow2
    image (opened with its backing file, as qemu-img always does). -n: write into
    the existing target; qemu-img then writes zeros where the export reads as zeros,
    so an extent the guest zeroed hides the older data in full.qcow2 too.

    (nbdcopy copies whole exports only. `qemu-img dd ... skip=N count=M` into a file
    and `qemu-io -c "write -s FILE OFF LEN"` work too, but dd's count counts from
    the export's start, not from skip, and write -s silently repeats a short file.)
    """
    window = {"driver": "raw", "offset": offset, "size": length}
    qcow2 = {"driver": "qcow2", "file": {"driver": "file", "filename": target}}
    return [
        "qemu-img", "convert", "-n", *export.qemu_objects,
        "--image-opts", image_opts({**window, "file": export.qemu}),
        "--target-image-opts", image_opts({**window, "file": qcow2}),
    ]  # fmt: skip


async def copy_incremental(
    export: Export, target: str, backing: str, size: int
) -> tuple[int, list[str]]:
    """Create target on top of backing, then copy only the dirty extents into it."""
    extents = await dirty_extents(export)
    # a relative backing name keeps the pair movable (it is relative to target's dir)
    await imgtools.run(["qemu-img", "create", "-q", "-f", "qcow2",
                        "-b", backing, "-F", "qcow2", target, str(size)])  # fmt: skip
    for offset, length in extents:  # one at a time: one writer per qcow2 image
        await imgtools.run(copy_range_argv(export, target, offset, length))
    copied = sum(length for _offset, length in extents)
    lines = [shlex.join(dirty_map_argv(export)), f"  -> {len(extents)} dirty extents"]
    if extents:
        first = copy_range_argv(export, target, *extents[0])
        lines += ["then one qemu-img convert per extent, the first:", shlex.join(first)]
    return copied, lines


# ---------------------------------------------------------------------------
# One pull backup, begin to end
# ---------------------------------------------------------------------------


def backup_xml(workdir: Path, transport: str, tls: bool, incremental: str | None) -> str:
    if tls:
        server = "<server name='localhost' tls='yes'/>"  # no port: a free one is picked
    elif transport == "tcp":
        server = "<server name='127.0.0.1'/>"
    else:
        server = f"<server transport='unix' socket='{workdir / 'nbd.sock'}'/>"
    # with <incremental>, the export also carries what changed since that checkpoint
    since = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (
        f"<domainbackup mode='pull'>{since}{server}<disks><disk name='vda'>"
        f"<scratch file='{workdir / 'vda.scratch.qcow2'}'/></disk></disks></domainbackup>"
    )


@dataclass
class Round:
    """What one pull backup did, for the summary."""

    title: str
    desc: str = ""
    begin_s: float = 0.0
    copy_s: float = 0.0
    copied: int = 0
    command: list[str] = field(default_factory=list)
    writes: int = 0
    scratch: int = 0
    abort_s: float = 0.0
    success: bool = False
    same: bool = False
    verdict: str = ""


async def pull_backup(
    driver: Driver,
    dom: Domain,
    mon: Monitor,
    disk: DiskSpec,
    xml: str,
    checkpoint: str,
    copy: Callable[[Export], Awaitable[tuple[int, list[str]]]],
    *,
    reference: str,
    client_tls: str | None,
    seed: int,
    result: Round,
) -> None:
    """Begin a pull backup with a checkpoint, let ``copy`` read the export while the
    guest writes, end the job. ``reference`` gets the disk as it is at the begin."""
    size = (await imgtools.info(disk.path))["virtual-size"]
    completed = asyncio.Event()
    callback = await driver.connectDomainEventRegisterAny(
        dom, DomainEventID.JOB_COMPLETED, lambda *a: completed.set()
    )
    try:
        # the reference: the disk exactly as it is when the backup begins (the
        # guest is quiet now; it writes again once the backup has begun)
        await mon.qemu_io("vda", "flush")
        await imgtools.convert(disk.path, reference, src_fmt="qcow2", dst_fmt="raw")

        # begin: the export and the checkpoint are the same instant
        t0 = time.monotonic()
        await driver.domainBackupBegin(
            dom, xml, f"<domaincheckpoint><name>{checkpoint}</name></domaincheckpoint>"
        )
        result.begin_s = time.monotonic() - t0
        result.desc = await driver.domainBackupGetXMLDesc(dom)
        export = find_export(result.desc, "vda", client_tls)

        # copy while the guest writes: the export stays frozen at the begin
        stop = asyncio.Event()
        writer = asyncio.create_task(busy_guest(mon, size, stop, seed))
        t1 = time.monotonic()
        try:
            result.copied, command = await copy(export)
        finally:
            result.copy_s = time.monotonic() - t1
            stop.set()
            result.writes = await writer
        result.command = command
        live = await driver.domainGetJobStats(dom)
        result.scratch = live.get("disk_temp_used", 0)

        # end: a pull backup ends when its client says so
        t2 = time.monotonic()
        await driver.domainAbortJob(dom)
        result.abort_s = time.monotonic() - t2
        await asyncio.wait_for(completed.wait(), 10)
        stats = await driver.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
        result.success = bool(stats.get("success"))
    finally:
        await driver.connectDomainEventDeregisterAny(callback)


async def verify(result: Round, image: str, reference: str) -> None:
    """qemu-img compare opens image with its backing chain, as a restore would."""
    result.same, msg = await imgtools.compare(image, reference, fmt_a="qcow2", fmt_b="raw")
    result.verdict = "identical to the disk at begin" if result.same else f"DIFFERENT: {msg}"


def report(result: Round, size: int) -> None:
    print(f"\n{result.title}")
    print("  backup XML (domainBackupGetXMLDesc):")
    print("    " + result.desc.rstrip().replace("\n", "\n    "))
    print(f"  begin      {result.begin_s * 1000:.0f} ms")
    print("  copy       " + "\n             ".join(result.command))
    print(
        f"             {result.copied / MiB:.1f} MiB of {size / MiB:.0f} MiB "
        f"({100 * result.copied / size:.1f} %) in {result.copy_s:.2f} s "
        f"({result.copied / MiB / result.copy_s:.0f} MiB/s)"
    )
    print(
        f"  guest      {result.writes} writes of 64 KiB meanwhile; scratch held "
        f"{result.scratch / MiB:.1f} MiB of old data"
    )
    print(f"  end        domainAbortJob, {result.abort_s * 1000:.0f} ms; success={result.success}")
    print(f"  verdict    {result.verdict}")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64, help="size of the disk (default 64)")
    ap.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    ap.add_argument("--tls", nargs=2, metavar=("SERVER_DIR", "CLIENT_DIR"))
    ap.add_argument("--keep", metavar="DIR", help="keep images and the backups in DIR")
    args = ap.parse_args()
    size = args.size_mib * MiB
    server_tls, client_tls = args.tls or (None, None)
    if client_tls:
        client_tls = str(Path(client_tls).resolve())  # nbdcopy and qemu-img run elsewhere

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="pyvirtbackup-pull-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    full, inc = str(workdir / "full.qcow2"), str(workdir / "inc.qcow2")
    # an earlier run with the same --keep DIR left its backups and the driver's
    # record of its checkpoints (of a VM that is gone): start afresh
    for leftover in (full, inc):
        Path(leftover).unlink(missing_ok=True)
    shutil.rmtree(workdir / "state", ignore_errors=True)
    rounds = [
        Round("round 1: full pull backup, checkpoint c1 -> full.qcow2"),
        Round("round 2: incremental pull backup since c1, checkpoint c2 -> inc.qcow2"),
    ]
    try:
        print(f"workdir      {workdir}")
        disk = await make_disk(workdir, size)
        async with QemuProcess([disk]) as vm, Monitor("demo-guest") as mon:
            await mon.connect(vm.qmp_path)
            print(f"QEMU         pid {vm.pid}, vda (qcow2) {args.size_mib} MiB, half written")
            driver_args: dict[str, object] = {"tls_x509_cert_dir": server_tls} if server_tls else {}
            if args.transport == "tcp" and not server_tls:
                # plain TCP lets every local user read the disk: only when asked for
                driver_args["nbd_allow_plain_tcp"] = True
            async with Driver(state_dir=workdir / "state", **driver_args) as driver:
                dom = await driver.attach("demo", vm.backup_qmp_path)

                def xml(since: str | None) -> str:
                    return backup_xml(workdir, args.transport, bool(server_tls), since)

                # round 1: everything, into full.qcow2
                ref1 = str(workdir / "vda.at-begin-1.raw")
                await pull_backup(
                    driver, dom, mon, disk, xml(None), "c1",
                    lambda export: copy_full(export, full, size),
                    reference=ref1, client_tls=client_tls, seed=7, result=rounds[0],
                )  # fmt: skip
                await verify(rounds[0], full, ref1)

                # between the backups the guest writes some more, 1 block per 4 MiB
                scattered = random.Random(11)
                between = max(4, args.size_mib // 4)
                for _ in range(between):
                    await guest_write(mon, scattered, size)

                # round 2: only what changed since c1, into inc.qcow2 on top of full.qcow2
                ref2 = str(workdir / "vda.at-begin-2.raw")
                await pull_backup(
                    driver, dom, mon, disk, xml("c1"), "c2",
                    lambda export: copy_incremental(export, inc, "full.qcow2", size),
                    reference=ref2, client_tls=client_tls, seed=13, result=rounds[1],
                )  # fmt: skip
                await verify(rounds[1], inc, ref2)
                checkpoints = [c.name for c in await driver.domainListAllCheckpoints(dom)]

        report(rounds[0], size)
        print(f"\nguest        {between} writes of 64 KiB between the backups")
        report(rounds[1], size)
        inc_size = (await imgtools.info(inc))["actual-size"]
        print(
            f"\nchain        inc.qcow2 ({inc_size / MiB:.1f} MiB on disk) -> full.qcow2; "
            f"checkpoints now {', '.join(sorted(checkpoints))} "
            "(the next incremental starts from c2)"
        )
        ok = all(r.same and r.success for r in rounds)
        print("result       " + ("both backups identical" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
