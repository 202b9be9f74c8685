#!/usr/bin/env python3
"""pyvirtbackup's benchmark: every row a ratio measured side by side in the same run.

It makes its own images and throwaway QEMUs, repeats each measurement, and prints
medians with their spread. Baselines are QEMU's own tools run on the same image in
the same run (`qemu-img convert -t writeback`, local reads), so the ratios hold on
any machine even when absolute numbers do not.

    python benchmarks/bench.py [--repeat 5] [--only push,sparse,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchlib import (
    CONVERT_WRITEBACK,
    GiB,
    MiB,
    Row,
    Session,
    drop_dirty,
    machine,
    push_xml,
    remove_generated,
    render,
    reset_hwm,
    rm,
    small_disks,
    varied_image,
    vm_hwm_kib,
    vm_rss_kib,
)
from guestbench import bench_guest_latency, bench_pause

from pyvirtbackup import CheckpointXMLFlags, Driver, Tuning
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.process import DiskSpec

# --------------------------------------------------------------------- rows


async def bench_push_full(work: Path, repeat: int) -> list[Row]:
    """2 GiB qcow2, 1 GiB of varied data: push full (fleecing, our default), libvirt's
    direct sequence, and qemu-img convert -t writeback, in turns on the same image."""
    src = str(work / "full.qcow2")
    await varied_image(src, 2 * GiB, 1 * GiB)
    took: dict[str, list[float]] = {"ours": [], "direct": [], "base": []}
    hwm: list[float] = []
    s = await Session.open([DiskSpec("vda", src)], work / "state")
    order = ["ours", "direct", "base"]
    try:
        for i in range(repeat):
            for which in order[i % 3 :] + order[: i % 3]:
                target = str(work / f"push-{which}.qcow2")
                rm(target)
                drop_dirty()
                if which == "ours":
                    rss = vm_rss_kib(s.proc.pid)
                    reset_hwm(s.proc.pid)
                    took[which].append(await s.push(push_xml("vda", target)))
                    hwm.append((vm_hwm_kib(s.proc.pid) - rss) / 1024)
                elif which == "direct":
                    took[which].append(await s.push(push_xml("vda", target), fleecing=False))
                else:
                    t0 = time.perf_counter()
                    await imgtools.run([*CONVERT_WRITEBACK, src, target])
                    took[which].append(time.perf_counter() - t0)
                rm(target)
    finally:
        await s.close()
    return [
        Row(
            "push full, 2 GiB qcow2 with 1 GiB data, until flushed, vs `qemu-img convert -t "
            "writeback`",
            took["ours"],
            took["base"],
            goal="≤ 1.0×",
        ),
        Row(
            "that push (fleecing) vs libvirt's direct sequence",
            took["ours"],
            took["direct"],
            goal="≤ 1.05×",
        ),
        Row(
            "QEMU memory growth during that push (VmHWM − RSS before)",
            hwm,
            unit="MiB",
            goal="≤ 16 MiB per disk",
        ),
    ]


async def bench_incremental(work: Path, repeat: int) -> list[Row]:
    """1 GiB qcow2, 512 MiB of data: incremental push with 1 % dirty vs the full push.

    Per round: a full push creating checkpoint c1, guest-like writes dirtying 1 % of
    the disk in 64 KiB pieces spread over it, an incremental push from c1 into a
    target backed by the full one (pvb:backing), both checkpoints deleted again.
    The first round's chain is compared with the disk, so the times are for a
    correct backup.
    """
    src = str(work / "inc.qcow2")
    size, piece = 1 * GiB, 64 * 1024
    await varied_image(src, size, 512 * MiB)
    pieces = size // 100 // piece
    stride = size // pieces // piece * piece
    full, inc = str(work / "inc-full.qcow2"), str(work / "inc-inc.qcow2")
    fulls: list[float] = []
    incs: list[float] = []
    base: list[float] = []
    s = await Session.open([DiskSpec("vda", src)], work / "state-inc")
    mon = Monitor("bench")
    await mon.connect(s.proc.qmp_path)
    try:
        for i in range(repeat):
            rm(full)
            rm(inc)
            target = str(work / "inc-convert.qcow2")
            drop_dirty()
            t0 = time.perf_counter()
            await imgtools.run([*CONVERT_WRITEBACK, src, target])
            base.append(time.perf_counter() - t0)
            rm(target)
            drop_dirty()
            fulls.append(
                await s.push(
                    push_xml("vda", full), "<domaincheckpoint><name>c1</name></domaincheckpoint>"
                )
            )
            for n in range(pieces):
                await mon.qemu_io("vda", f"write -P {0x40 + n % 64:#x} {n * stride} {piece}")
            drop_dirty()
            xml = (
                "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'>"
                "<incremental>c1</incremental><disks><disk name='vda'>"
                f"<target file='{inc}' pvb:backing='{os.path.basename(full)}'/>"
                "</disk></disks></domainbackup>"
            )
            incs.append(await s.push(xml, "<domaincheckpoint><name>c2</name></domaincheckpoint>"))
            if i == 0:
                await mon.qemu_io("vda", "flush")
                same, message = await imgtools.compare(inc, src)
                if not same:
                    raise RuntimeError(f"incremental chain differs from the disk: {message}")
            for name in ("c1", "c2"):
                chk = await s.driver.domainCheckpointLookupByName(s.dom, name)
                await s.driver.domainCheckpointDelete(chk)
    finally:
        await mon.close()
        await s.close()
        rm(full)
        rm(inc)
    dirty = f"{pieces} × 64 KiB = {pieces * piece / MiB:.0f} MiB"
    return [
        Row(
            "push full + checkpoint, 1 GiB qcow2 with 512 MiB data, until flushed",
            fulls,
            base,
            goal="≤ 1.0× qemu-img convert -t writeback",
        ),
        Row(
            f"push incremental, 1 % dirty ({dirty}), same disk, vs that full push",
            incs,
            fulls,
            goal="≤ 3 % of the full",
        ),
    ]


async def bench_sparse(work: Path, repeat: int) -> list[Row]:
    """64 GiB virtual, 256 MiB written: time and target size must follow the data.

    The baseline is the same 256 MiB on a 1 GiB disk: a ratio near 1 says the
    virtual size costs nothing.
    """
    sparse, dense = str(work / "sparse.qcow2"), str(work / "dense.qcow2")
    # the same data at the same offsets: only the virtual size differs
    await varied_image(sparse, 64 * GiB, 256 * MiB, stride=4 * MiB)
    await varied_image(dense, 1 * GiB, 256 * MiB, stride=4 * MiB)
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    sizes: list[float] = []
    s = await Session.open([DiskSpec("vda", sparse), DiskSpec("vdb", dense)], work / "state-sparse")
    try:
        for i in range(repeat):
            for disk, kind in (("vda", "sparse"), ("vdb", "dense"))[:: 1 if i % 2 == 0 else -1]:
                target = str(work / f"sparse-{kind}-target.qcow2")
                rm(target)
                drop_dirty()
                times[kind].append(await s.push(push_xml(disk, target)))
                if kind == "sparse":
                    sizes.append(os.stat(target).st_blocks * 512 / MiB)
                rm(target)
    finally:
        await s.close()
    return [
        Row(
            "push full, 64 GiB virtual with 256 MiB written, vs 1 GiB virtual with the same",
            times["sparse"],
            times["dense"],
            goal="≈ 1× (follows the data)",
        ),
        Row("  the 64 GiB disk's target, allocated size", sizes, unit="MiB", goal="≈ 256 MiB"),
    ]


async def bench_pull(work: Path, repeat: int) -> list[Row]:
    """A full pull read by nbdcopy and by qemu-img, against the same tool reading the file.

    1 GiB qcow2 with 512 MiB of data. nbdcopy reads the image locally through
    qemu-nbd (it reads raw files only); qemu-img reads the qcow2 file itself. The
    copies go to raw files on the same filesystem, flushed (``sync``) by the clock.
    """
    src = str(work / "pull.qcow2")
    await varied_image(src, 1 * GiB, 512 * MiB)
    sock = str(work / "pull-nbd.sock")
    out = str(work / "pull-out.raw")
    s = await Session.open([DiskSpec("vda", src)], work / "state-pull")
    xml = (
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
        f"<disk name='vda'><scratch file='{work}/pull-scratch.qcow2'/></disk></disks>"
        "</domainbackup>"
    )
    uri = f"nbd+unix:///vda?socket={sock}"
    # qemu-nbd 7.2 has no --force-share: open the file without taking its lock
    local_nbd = [
        "[",
        "qemu-nbd",
        "-r",
        "--image-opts",
        f"driver=qcow2,file.driver=file,file.filename={src},file.locking=off",
        "]",
    ]
    methods = {
        "nbdcopy export": ["nbdcopy", uri, out],
        "nbdcopy local": ["nbdcopy", "--", *local_nbd, out],
        "qemu-img export": ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out],
        "qemu-img local": ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", src, out],
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    try:
        await s.driver.domainBackupBegin(s.dom, xml)
        for i in range(repeat):
            for name in list(methods)[:: 1 if i % 2 == 0 else -1]:
                rm(out)
                drop_dirty()
                t0 = time.perf_counter()
                await imgtools.run(methods[name])
                os.sync()
                times[name].append(time.perf_counter() - t0)
                rm(out)
        await s.driver.domainAbortJob(s.dom)
    finally:
        await s.close()
    return [
        Row(
            "pull full read, nbdcopy from the export vs nbdcopy of the file (via qemu-nbd)",
            times["nbdcopy export"],
            times["nbdcopy local"],
            goal="throughput ≥ 0.95× local, i.e. ratio ≤ 1.05",
        ),
        Row(
            "pull full read, qemu-img convert from the export vs of the file",
            times["qemu-img export"],
            times["qemu-img local"],
        ),
    ]


async def bench_checkpoints(work: Path, repeat: int) -> list[Row]:
    """100 checkpoints on a disk: create, list, SIZE and delete, per call."""
    src = str(work / "chk.qcow2")
    await varied_image(src, 1 * GiB, 64 * MiB)
    create: list[float] = []
    listing: list[float] = []
    size: list[float] = []
    delete: list[float] = []
    s = await Session.open([DiskSpec("vda", src)], work / "state-chk")
    try:
        for _ in range(repeat):
            for n in range(100):
                t0 = time.perf_counter()
                await s.driver.domainCheckpointCreateXML(
                    s.dom, f"<domaincheckpoint><name>c{n:03d}</name></domaincheckpoint>"
                )
                create.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            chks = await s.driver.domainListAllCheckpoints(s.dom)
            listing.append(time.perf_counter() - t0)
            assert len(chks) == 100
            first = await s.driver.domainCheckpointLookupByName(s.dom, "c000")
            t0 = time.perf_counter()
            await s.driver.domainCheckpointGetXMLDesc(first, CheckpointXMLFlags.SIZE)
            size.append(time.perf_counter() - t0)
            for chk in reversed(chks):
                t0 = time.perf_counter()
                await s.driver.domainCheckpointDelete(chk)
                delete.append(time.perf_counter() - t0)
    finally:
        await s.close()
    return [
        Row("checkpoint create (each, up to 100 on the disk)", create),
        Row("list 100 checkpoints", listing, goal="≤ 50 ms"),
        Row("SIZE of the oldest of 100 checkpoints", size),
        Row("checkpoint delete (each, of 100)", delete),
    ]


def redefine_xml(name: str, uuid: str, filler: str, size: int) -> str:
    """A checkpoint to REDEFINE whose <domain> is padded to ``size`` bytes with
    sibling elements ``filler``: the shape that made validation quadratic."""
    head = (
        f"<domaincheckpoint><name>{name}</name><creationTime>1700000000</creationTime>"
        f"<domain type='kvm'><name>bench</name><uuid>{uuid}</uuid><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/images/vda.qcow2'/><target dev='vda'/></disk></devices>"
    )
    tail = "</domain></domaincheckpoint>"
    count = max(0, (size - len(head) - len(tail)) // len(filler))
    return head + filler * count + tail


async def bench_bounds(work: Path, repeat: int) -> list[Row]:
    """Bounded inputs: a 1 MB REDEFINE (refused by its element count, or accepted),
    and attach and a first listing with 1000 stored checkpoints."""
    from pyvirtbackup import CheckpointCreateFlags, VirError

    src = str(work / "bounds.qcow2")
    await varied_image(src, 64 * MiB, 4 * MiB)
    state = work / "state-bounds"
    refused: list[float] = []
    accepted: list[float] = []
    attach: list[float] = []
    listing: list[float] = []
    s = await Session.open([DiskSpec("vda", src)], state)
    try:
        uuid = s.dom.UUIDString()
        many = redefine_xml("big", uuid, "<x/>", 1_000_000)  # 250,000 elements
        fewer = redefine_xml("big", uuid, f"<x a='{'v' * 60}'/>", 1_000_000)  # ~14,000
        redefine = CheckpointCreateFlags.REDEFINE
        for _ in range(repeat):
            t0 = time.perf_counter()
            try:
                await s.driver.domainCheckpointCreateXML(s.dom, many, redefine)
            except VirError:
                pass
            refused.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await s.driver.domainCheckpointCreateXML(s.dom, fewer, redefine)
            accepted.append(time.perf_counter() - t0)
        chk = await s.driver.domainCheckpointLookupByName(s.dom, "big")
        await s.driver.domainCheckpointDelete(chk, 2)  # METADATA_ONLY
        parent = ""
        for n in range(1000):
            await s.driver.domainCheckpointCreateXML(
                s.dom,
                f"<domaincheckpoint><name>k{n:04d}</name>{parent}"
                f"<creationTime>{1700000000 + n}</creationTime>"
                "<disks><disk name='vda' checkpoint='no'/></disks></domaincheckpoint>",
                redefine,
            )
            parent = f"<parent><name>k{n:04d}</name></parent>"
        await s.driver.close()  # QEMU serves one client per monitor socket
        for _ in range(repeat):
            async with Driver(state_dir=state) as fresh:
                t0 = time.perf_counter()
                dom = await fresh.attach("bench", s.proc.backup_qmp_path)
                attach.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert len(await fresh.domainListAllCheckpoints(dom)) == 1000
                listing.append(time.perf_counter() - t0)
    finally:
        await s.close()
    return [
        Row("REDEFINE of a 1 MB checkpoint, 250,000 elements (refused)", refused, goal="≤ 100 ms"),
        Row("REDEFINE of a 1 MB checkpoint, 14,000 elements (accepted)", accepted, goal="≤ 100 ms"),
        Row("attach with 1000 stored checkpoints", attach, goal="≤ 200 ms"),
        Row("first listing of 1000 stored checkpoints", listing),
    ]


async def bench_begin_latency(work: Path, repeat: int) -> list[Row]:
    """domainBackupBegin call → return, for 1, 8 and 16 disks, and its QMP round trips."""
    rows = []
    for n in (1, 8, 16):
        disks = await small_disks(work, "lat", n)
        s = await Session.open(disks, work / f"state-lat{n}")
        times: list[float] = []
        trips: list[float] = []
        try:
            for r in range(repeat):
                drop_dirty()
                mon = s.dom.monitor
                before = mon.commands_sent
                t0 = time.perf_counter()
                await s.driver.domainBackupBegin(s.dom, None)
                times.append(time.perf_counter() - t0)
                trips.append(mon.commands_sent - before)
                await asyncio.wait_for(s.done.wait(), 600)
                s.done.clear()
                remove_generated(disks)
                del r
        finally:
            await s.close()
        goal = {1: "≤ 50 ms", 16: "≤ 200 ms"}.get(n, "")
        rows.append(
            Row(
                f"begin latency, {n} disk{'s' if n > 1 else ''}",
                times,
                goal=goal,
                note=f"{statistics.median(trips):.0f} QMP round trips",
            )
        )
    return rows


async def bench_driver_cost(work: Path, repeat: int) -> list[Row]:
    """The driver's own CPU time and Python memory for one full push of 1 GiB."""
    src = str(work / "cost.qcow2")
    await varied_image(src, 1 * GiB, 512 * MiB)
    cpu: list[float] = []
    mem: list[float] = []
    s = await Session.open([DiskSpec("vda", src)], work / "state-cost")
    try:
        for _ in range(repeat):
            target = str(work / "cost-target.qcow2")
            rm(target)
            drop_dirty()
            tracemalloc.start()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            await s.push(push_xml("vda", target))
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            _cur, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            cpu.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
            mem.append(peak / MiB)
            rm(target)
    finally:
        await s.close()
    return [
        Row("driver CPU time per full push (1 GiB disk)", cpu),
        Row("driver Python memory peak per full push", mem, unit="MiB"),
    ]


async def bench_tuning(work: Path, repeat: int) -> list[Row]:
    """QEMU's copy settings on the push of bench_push_full's image: time and memory."""
    src = str(work / "full.qcow2")
    if not os.path.exists(src):
        await varied_image(src, 2 * GiB, 1 * GiB)
    settings: list[tuple[str, dict[str, Any]]] = [
        ("QEMU's defaults (64 workers, 1 MiB chunks)", {"max_workers": 64}),
        ("max-workers 4", {"max_workers": 4}),
        ("max-workers 8", {"max_workers": 8}),
        ("max-workers 16", {"max_workers": 16}),
        (
            "max-workers 8, copy offload (use-copy-range)",
            {"max_workers": 8, "use_copy_range": True},
        ),
        ("max-workers 8, target O_DIRECT", {"max_workers": 8, "target_cache_direct": True}),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in settings}
    hwm: dict[str, list[float]] = {name: [] for name, _ in settings}
    s = await Session.open([DiskSpec("vda", src)], work / "state-tuning")
    try:
        for i in range(repeat):
            order = settings if i % 2 == 0 else list(reversed(settings))
            for name, tuning in order:
                target = str(work / "tuning.qcow2")
                rm(target)
                drop_dirty()
                rss = vm_rss_kib(s.proc.pid)
                reset_hwm(s.proc.pid)
                times[name].append(await s.push(push_xml("vda", target), tuning=Tuning(**tuning)))
                hwm[name].append((vm_hwm_kib(s.proc.pid) - rss) / 1024)
                rm(target)
    finally:
        await s.close()
    base_name = settings[0][0]
    rows = []
    for name, _ in settings:
        rows.append(
            Row(
                f"tuning: {name}",
                times[name],
                times[base_name],
                note=f"QEMU grows {statistics.median(hwm[name]):.0f} MiB",
            )
        )
    return rows


BENCHES: dict[str, Callable[[Path, int], Awaitable[list[Row]]]] = {
    "pause": bench_pause,
    "guest": bench_guest_latency,
    "tuning": bench_tuning,
    "push": bench_push_full,
    "incremental": bench_incremental,
    "sparse": bench_sparse,
    "pull": bench_pull,
    "checkpoints": bench_checkpoints,
    "bounds": bench_bounds,
    "latency": bench_begin_latency,
    "cost": bench_driver_cost,
}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", help="comma-separated: " + ",".join(BENCHES))
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    ap.add_argument("--workdir", help="where images go (default: a temporary directory)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pyvirtbackup-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    print(f"repeat: {args.repeat}, workdir: {work}\n", flush=True)
    rows: list[Row] = []
    try:
        for name in names:
            t0 = time.monotonic()
            got = await BENCHES[name](work, args.repeat)
            rows += got
            print(
                render(got).split("\n", 2)[2],
                f"   [{name}: {time.monotonic() - t0:.0f} s]",
                flush=True,
            )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + render(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine(), "rows": [r.__dict__ | {"ratio": r.ratio} for r in rows]},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
