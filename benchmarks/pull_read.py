#!/usr/bin/env python3
"""How fast a full pull backup reads, next to reading the image file directly.

One throwaway QEMU with one qcow2 disk (half of it written, in 1 MiB runs); one
pull backup over a unix socket stays open while every client reads the whole
export several times; the same copies are made from the image file with
`qemu-img convert`. Medians of --runs, page cache warm, `sync` before each run,
output files deleted after each. No guest writes during the runs: this is the
read path alone (fleecing costs are paid by guest writes, not by readers).

    python benchmarks/pull_read.py [--size-mib 1024] [--runs 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyvirtbackup import Driver
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.process import DiskSpec, QemuProcess

MiB = 1024 * 1024


def to_raw(disk: str, out: str) -> list[str]:
    return ["-f", "qcow2", "-O", "raw", disk, out]


async def timed(argv: list[str], out: str | None) -> float:
    os.sync()
    t = time.monotonic()
    await imgtools.run(argv, timeout=900)
    took = time.monotonic() - t
    if out and os.path.exists(out):
        os.unlink(out)
    return took


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", help="work in DIR (default: a temporary directory in /tmp)")
    args = ap.parse_args()
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="pvb-pull-bench-", dir=args.dir))
    try:
        disk = str(work / "vda.qcow2")
        await imgtools.create(disk, size, "qcow2")
        writes = [(0x10 + i % 200, i * 2 * MiB, MiB) for i in range(size // (2 * MiB))]
        await imgtools.write_pattern(disk, "qcow2", writes)
        data = sum(w[2] for w in writes)
        out = str(work / "out.raw")
        sock = str(work / "nbd.sock")
        uri = f"nbd+unix:///vda?socket={sock}"
        shared = f"driver=qcow2,force-share=on,file.filename={disk}"  # QEMU holds the lock

        results: dict[str, list[float]] = {}
        async with QemuProcess([DiskSpec("vda", disk, "qcow2")]) as vm:
            async with Driver(state_dir=work / "state") as driver:
                dom = await driver.attach("bench", vm.backup_qmp_path)
                xml = (
                    f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
                    f"<disks><disk name='vda'><scratch file='{work / 'scratch.qcow2'}'/>"
                    "</disk></disks></domainbackup>"
                )
                os.sync()
                t = time.monotonic()
                await driver.domainBackupBegin(dom, xml)
                begin_s = time.monotonic() - t
                cases = {
                    "file: qemu-img convert -O raw": (
                        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", disk, out],
                        out,
                    ),
                    "file: qemu-img convert -O raw -t writeback": (
                        ["qemu-img", "convert", "-U", "-t", "writeback", *to_raw(disk, out)],
                        out,
                    ),
                    "pull: nbdcopy -> raw file": (["nbdcopy", uri, out], out),
                    "pull: nbdcopy -> null:": (["nbdcopy", uri, "null:"], None),
                    "pull: qemu-img convert -O raw": (
                        ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out],
                        out,
                    ),
                    "file: nbdcopy via qemu-nbd -> raw file": (
                        ["nbdcopy", "--", "[", "qemu-nbd", "-r", "--image-opts", shared, "]", out],
                        out,
                    ),
                }
                for _ in range(args.runs):  # interleaved, so drift hits every case alike
                    for name, (argv, dest) in cases.items():
                        results.setdefault(name, []).append(await timed(argv, dest))
                t = time.monotonic()
                await driver.domainAbortJob(dom)
                abort_s = time.monotonic() - t

        base = statistics.median(results["file: qemu-img convert -O raw"])
        print(
            f"image: {args.size_mib} MiB qcow2, {data // MiB} MiB of data; "
            f"{args.runs} runs, median (min) seconds; MiB/s of virtual size"
        )
        print(f"{'':45} {'median':>7} {'min':>7} {'MiB/s':>7} {'vs convert':>10}")
        for name, times in results.items():
            med = statistics.median(times)
            print(
                f"{name:45} {med:7.3f} {min(times):7.3f} {size / MiB / med:7.0f} {med / base:9.2f}x"
            )
        print(f"pull begin {begin_s * 1000:.0f} ms, abort and cleanup {abort_s * 1000:.0f} ms")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
