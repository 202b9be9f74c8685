"""What the fault cases measure, and the table made of it.

Each case of ``tests/test_faults.py`` drives one fault into a real QEMU while a
stand-in guest (HMP ``qemu-io -d <dev>``, through the device, like guest I/O) writes
onto data the backup has not copied yet, and reports four numbers: guest writes
that failed, guest writes missing from the disk afterwards, things of the backup
left behind (in QEMU, in the state directory, on the filesystem), and the job's
final type and errmsg. The tests assert them; with ``PVB_FAULTS_JSON`` set they
also append one JSON line per case to that file, which ``scripts/faults`` turns
into the README's table (``python -m tests.faulttools FILE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyvirtbackup import JobType, VirError
from pyvirtbackup.qemu import imgtools

from .conftest import VM

FAULTS_ENV = "PVB_FAULTS_JSON"

# the table's rows, in this order; a case not listed goes last
ORDER = (
    "target-full",
    "target-full-direct",
    "fleecing-full",
    "scratch-full",
    "scratch-full-abort",
    "scratch-full-abort-seen",
    "slow-target",
    "slow-target-direct",
    "abort",
    "qemu-killed-push",
    "qemu-killed-pull",
    "driver-killed-push",
    "client-vanishes",
    # written with the PRESERVE_SHUTDOWN_DOMAIN work: the guest powers off mid-backup
    "guest-shutdown",
    "guest-shutdown-preserve",
)


# ----------------------------------------------------------------- the guest


@dataclass
class GuestWrite:
    disk: str
    pattern: int
    offset: int
    length: int
    failed: bool  # QEMU said "write failed" for it
    latency_ms: float  # the HMP round trip: qemu-io returns once the write completed
    copied_before: int | None = None  # the disk's backup job progress when it was issued


class Guest:
    """The stand-in guest: each write timed and checked against QEMU's stdout, where
    HMP qemu-io reports a failed write (its reply stays empty); all of them checked on
    the disk once QEMU is gone."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.writes: list[GuestWrite] = []

    async def write(
        self, disk: str, pattern: int, offset: int, length: int, *, job: str | None = None
    ) -> GuestWrite:
        for w in self.writes:
            if w.disk == disk and offset < w.offset + w.length and w.offset < offset + length:
                raise ValueError("the stand-in guest's writes must not overlap")
        copied = None
        if job is not None:
            for j in await self.vm.mon.execute("query-jobs"):
                if j.get("id") == job:
                    copied = int(j.get("current-progress", 0))
        failed_before = self.vm.proc.guest_write_failures()
        t0 = time.monotonic()
        await self.vm.write(disk, pattern, offset, length)
        latency = (time.monotonic() - t0) * 1000
        failed = self.vm.proc.guest_write_failures() > failed_before
        w = GuestWrite(disk, pattern, offset, length, failed, latency, copied)
        self.writes.append(w)
        return w

    async def overwrite(
        self,
        disk: str,
        start: int,
        count: int,
        length: int,
        *,
        stride: int | None = None,
        first_pattern: int = 0x40,
        job: str | None = None,
    ) -> list[GuestWrite]:
        """``count`` writes of ``length`` from ``start``, each with its own pattern."""
        stride = stride or length
        return [
            await self.write(disk, first_pattern + i, start + i * stride, length, job=job)
            for i in range(count)
        ]

    async def flush(self, disk: str) -> None:
        await self.vm.mon.qemu_io(disk, "flush")

    @property
    def errors(self) -> int:
        return sum(w.failed for w in self.writes)

    def latencies(self) -> list[float]:
        return [w.latency_ms for w in self.writes]

    async def lost(self) -> list[GuestWrite]:
        """The writes whose data is not on the disk. Run once QEMU has exited."""
        missing: list[GuestWrite] = []
        for disk in sorted({w.disk for w in self.writes}):
            d = self.vm.disks[disk]
            mine = [w for w in self.writes if w.disk == disk]
            argv = ["qemu-io", "-f", d.format, "-r", "-U"]
            for w in mine:
                argv += ["-c", f"read -P {w.pattern:#x} {w.offset} {w.length}"]
            result = await imgtools.run([*argv, d.path], check=False, timeout=60)
            text = result.stdout + result.stderr
            bad = {int(m) for m in re.findall(r"Pattern verification failed at offset (\d+)", text)}
            done = {int(m) for m in re.findall(r"read \d+/\d+ bytes at offset (\d+)", text)}
            if result.returncode != 0 and not done:  # a failed check also exits non-zero
                raise AssertionError(f"qemu-io could not read {d.path}: {text}")
            missing += [w for w in mine if w.offset in bad or w.offset not in done]
        return missing


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def latency_note(before: Sequence[float], during: Sequence[float]) -> str:
    return (
        f"guest write latency p50/p99 {statistics.median(during):.1f}/"
        f"{percentile(during, 99):.1f} ms during the backup, "
        f"{statistics.median(before):.1f}/{percentile(before, 99):.1f} ms before it"
    )


# ------------------------------------------------------- what must be left as it was


def files_under(dirs: Iterable[Path]) -> set[str]:
    """Every file, socket and link below ``dirs`` (directories are only structure)."""
    found: set[str] = set()
    for top in dirs:
        for root, _subdirs, names in os.walk(top):
            found.update(os.path.join(root, n) for n in names)
    return found


async def qemu_view(vm: VM) -> dict[str, Any]:
    """Nodes, named bitmaps, which node each device uses, and the run state."""
    named = await vm.mon.execute("query-named-block-nodes", {"flat": True})
    return {
        "nodes": {n["node-name"] for n in named},
        "bitmaps": {
            (n["node-name"], b["name"])
            for n in named
            for b in n.get("dirty-bitmaps") or []
            if b.get("name")
        },
        "devices": {
            b.get("qdev"): (b.get("inserted") or {}).get("node-name")
            for b in await vm.mon.execute("query-block")
        },
        "status": (await vm.mon.execute("query-status")).get("status"),
    }


@dataclass
class Scene:
    """QEMU and the watched directories as they were before the backup began."""

    vm: VM
    dirs: list[Path]
    qemu: dict[str, Any]
    files: set[str]

    @classmethod
    async def take(cls, vm: VM, dirs: Sequence[Path]) -> Scene:
        return cls(vm, list(dirs), await qemu_view(vm), files_under(dirs))

    async def left_in_qemu(self) -> list[str]:
        """What of the backup is still in a QEMU that runs: jobs, nodes, bitmaps,
        exports, the NBD server, a device still on our filter, a guest left paused."""
        mon = self.vm.mon
        now = await qemu_view(self.vm)
        left = [f"job {j['id']} ({j['status']})" for j in await mon.execute("query-jobs")]
        left += [f"node {n}" for n in sorted(now["nodes"] - self.qemu["nodes"])]
        left += [f"bitmap {n}/{b}" for n, b in sorted(now["bitmaps"] - self.qemu["bitmaps"])]
        left += [f"export {e['id']}" for e in await mon.execute("query-block-exports")]
        for dev, node in self.qemu["devices"].items():
            if now["devices"].get(dev) != node:
                left.append(f"device {dev} uses {now['devices'].get(dev)}, not {node}")
        if self.qemu["status"] == "running" and now["status"] != "running":
            left.append(f"guest left {now['status']}")
        try:
            await mon.execute("nbd-server-stop")
            left.append("NBD server still running")
        except VirError as exc:  # "not running" is what we want to hear
            if "not running" not in exc.message:
                left.append(f"NBD server in an unknown state: {exc.message}")
        return left

    def left_on_disk(self, keep: Iterable[str | Path] = ()) -> list[str]:
        """Files and sockets that appeared (beyond ``keep``) or vanished since ``take``.

        The finished job's stats (the state directory's ``completed-job.json``) are
        libvirt's to keep until read with domainGetJobStats(COMPLETED).
        """
        now = files_under(self.dirs)
        allowed = {str(p) for p in keep}
        new = {p for p in now - self.files if os.path.basename(p) != "completed-job.json"}
        left = [f"file {p}" for p in sorted(new - allowed)]
        left += [f"deleted {p}" for p in sorted(self.files - now)]
        return left


# ------------------------------------------------------------------ the row


@dataclass
class Row:
    case: str
    title: str
    qemu: str
    writes: int
    guest_write_errors: int
    guest_writes_lost: int
    left_behind: list[str]
    job_type: str
    errmsg: str | None
    note: str = ""
    qemu_checked: bool = True  # False: QEMU was gone, only files and state were checked
    extra: dict[str, Any] = field(default_factory=dict)


def job_type_name(value: int | None) -> str:
    if value is None:
        return "none"
    with contextlib.suppress(ValueError):
        return JobType(int(value)).name
    return str(value)


def record(row: Row) -> Row:
    """Append the row to $PVB_FAULTS_JSON (one JSON object a line), if it is set."""
    path = os.environ.get(FAULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(row), sort_keys=True) + "\n")
    return row


def check(
    row: Row,
    job_type: JobType,
    errmsg_has: Sequence[str] = (),
    *,
    guest_errors: int = 0,
    lost: int | None = 0,
) -> None:
    """The assertions of a fault case: one message with the whole row when one fails."""
    problems = []
    if row.guest_write_errors != guest_errors:
        problems.append(f"{row.guest_write_errors} guest write errors, expected {guest_errors}")
    if lost is not None and row.guest_writes_lost != lost:
        problems.append(f"{row.guest_writes_lost} guest writes lost, expected {lost}")
    if row.left_behind:
        problems.append(f"left behind: {row.left_behind}")
    if row.job_type != job_type.name:
        problems.append(f"job ended {row.job_type}, expected {job_type.name}")
    for part in errmsg_has:
        if part not in (row.errmsg or ""):
            problems.append(f"errmsg lacks {part!r}")
    assert not problems, f"{row.title}: {'; '.join(problems)} (errmsg: {row.errmsg!r})"


# ---------------------------------------------------------------- slow target


@contextlib.asynccontextmanager
async def slow_nbd_file(mountdir: Path, size: int, delay: str) -> AsyncIterator[Path]:
    """A file whose writes each take ``delay``: nbdkit's memory plugin behind its delay
    filter, mounted as a file with nbdfuse (nbdkit is started by nbdfuse and exits
    with it). Unmounted, and both stopped by PID, at the end."""
    mountdir.mkdir()
    target = mountdir / "target"
    argv = [
        "nbdfuse",
        str(target),
        "[",
        "nbdkit",
        "--exit-with-parent",
        "--filter=delay",
        "memory",
        str(size),
        f"wdelay={delay}",
        "]",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        for _ in range(200):
            if target.exists():
                break
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"nbdfuse exited: {err.decode(errors='replace')}")
            await asyncio.sleep(0.05)
        assert target.exists() and target.stat().st_size == size, "nbdfuse did not mount"
        yield target
    finally:
        await imgtools.run(["umount", str(mountdir)], check=False)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            await imgtools.run(["umount", "-l", str(mountdir)], check=False)


# -------------------------------------------------------------------- the table


def short(text: str | None, limit: int = 150) -> str:
    """An errmsg for a table cell: directories dropped from paths, cut at ``limit``."""
    if not text:
        return ""
    text = re.sub(r"'/[^']*/([^'/]+)'", r"'\1'", text)
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(rows: Sequence[dict[str, Any]]) -> str:
    qemus: list[str] = []  # in the order they ran
    for r in rows:
        if r["qemu"] not in qemus:
            qemus.append(r["qemu"])

    def key(r: dict[str, Any]) -> tuple[int, str, int]:
        pos = ORDER.index(r["case"]) if r["case"] in ORDER else len(ORDER)
        return pos, r["case"], qemus.index(r["qemu"])

    lines = [
        "| case | QEMU | guest write errors | guest writes lost | left behind | job outcome |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for r in sorted(rows, key=key):
        left = str(len(r["left_behind"]))
        if r["left_behind"]:
            left += ": " + short("; ".join(r["left_behind"]), 80)
        if not r.get("qemu_checked", True):
            left += " (QEMU gone: files and state)"
        outcome = r["job_type"]
        if r["errmsg"]:
            outcome += ": " + short(r["errmsg"])
        lines.append(
            f"| {r['title']} | {r['qemu']} | {r['guest_write_errors']} of {r['writes']} "
            f"| {r['guest_writes_lost']} | {left} | {outcome} |"
        )
        if r.get("note"):
            notes.append(f"- {r['title']}, QEMU {r['qemu']}: {r['note']}")
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.faulttools RESULTS.jsonl", file=sys.stderr)
        return 2
    text = Path(argv[0]).read_text() if Path(argv[0]).exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        print(f"faulttools: no fault rows in {argv[0]}", file=sys.stderr)
        return 1
    sys.stdout.write(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
