"""The fault table: what a failing or stalling backup costs the guest, against a real QEMU.

Each case drives one fault while the stand-in guest (HMP ``qemu-io -d``, through the
device like guest I/O) overwrites data the backup has not copied yet, and checks four
numbers (tests/faulttools.py): guest writes that failed, guest writes missing from
the disk once QEMU has exited, what of the backup is left in QEMU, the state
directory and the filesystem, and the job's final type and errmsg. The guest runs
(``paused=False``), so begin's pause and resume is part of every case.

``scripts/faults`` runs this module once per QEMU and prints the README's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from pyvirtbackup import BackupBeginFlags, Driver, JobType
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.plan import ON_CBW_ERROR

from .conftest import VM, MiB
from .drivertools import bitmaps, push_xml, unthrottle, wait_completed
from .faulttools import (
    Guest,
    Row,
    Scene,
    check,
    job_type_name,
    latency_note,
    record,
    slow_nbd_file,
)
from .guestos import power_off_disk_args
from .nbd_clients import HeldClient, nbdcopy, read_then_drop, unix_uri
from .test_push import small_tmpfs

pytestmark = pytest.mark.asyncio

DISK = 32 * MiB
# two disks, every cluster holding data the backup must copy: a qcow2 one on scsi
# (the job copies what is allocated) and a raw one on virtio-blk (another device
# path to switch onto the filter, and the job copies everything)
DISKS = (("vda", "qcow2", DISK, "scsi"), ("vdb", "raw", DISK, "virtio"))
# the guest overwrites the second half of each disk, 1 MiB at a time, while the jobs
# (throttled) still copy the first: every write lands on data not copied yet
HALF, WRITES = DISK // 2, 16
THROTTLE = {"speed": 4 * MiB}
GUEST_NOT_AFFECTED = "the guest's writes were not affected"
# a checkpoint made with the backup (a raw disk cannot hold one); a failed push drops it
CHECKPOINT = (
    "<domaincheckpoint><name>c1</name><disks>"
    "<disk name='vda' checkpoint='bitmap'/><disk name='vdb' checkpoint='no'/>"
    "</disks></domaincheckpoint>"
)


# an incremental backup: vda from checkpoint c0 (made before, see since_checkpoint),
# vdb, a raw disk that cannot hold a checkpoint, in full
INCREMENTAL_PUSH = (
    "<domainbackup><incremental>c0</incremental><disks>"
    "<disk name='vda'/><disk name='vdb' backupmode='full'/></disks></domainbackup>"
)


async def since_checkpoint(driver, dom, vm: VM) -> None:
    """Checkpoint c0 on vda, then all of vda rewritten: an incremental from c0 has to
    copy the whole disk, through a temporary bitmap of the backup's own."""
    await driver.domainCheckpointCreateXML(
        dom, CHECKPOINT.replace("<name>c1</name>", "<name>c0</name>")
    )
    await vm.write("vda", 0x12, 0, DISK)


async def temporary_bitmaps(vm: VM) -> list[tuple[str, str]]:
    return [
        (node, name)
        for node, found in (await bitmaps(vm.mon)).items()
        for name in found
        if name.startswith("backup-")
    ]


def stray_checkpoints(dom) -> tuple[str, ...]:
    """A failed or cancelled push drops the checkpoint made with it (c1); c0 stays."""
    found = sorted(set(dom.checkpoints.defs) - {"c0"})
    return tuple(f"checkpoint {name} of the failed push" for name in found)


async def running_vm(vm_factory, disks=DISKS) -> VM:
    size = max(d[2] for d in disks)
    return await vm_factory(list(disks), fill=[(0x11, 0, size)], paused=False)


async def overwrite(guest: Guest, *, push: bool = True, disks=("vda", "vdb")) -> None:
    """The guest writes to both disks in turn, as a guest with two busy disks would."""
    for i in range(WRITES):
        for n, disk in enumerate(disks):
            await guest.write(
                disk,
                0x40 + 0x20 * n + i,
                HALF + i * MiB,
                MiB,
                job=f"pvb-backup-{disk}" if push else None,
            )


async def finish(
    case: str,
    title: str,
    vm: VM,
    dom,
    guest: Guest,
    scene: Scene,
    final: dict,
    *,
    qemu_alive: bool = True,
    keep: tuple = (),
    note: str = "",
    extra_left: tuple[str, ...] = (),
) -> Row:
    """Measure the four numbers once the job is over, record the row, return it."""
    left = list(extra_left)
    if qemu_alive:
        left += await scene.left_in_qemu()
    errors = guest.errors  # QEMU's stdout goes with its run directory at stop
    if qemu_alive:
        await vm.quit()
    lost = await guest.lost()
    left += scene.left_on_disk(keep)
    row = Row(
        case=case,
        title=title,
        qemu=dom.features.version_string.split(" (")[0],
        writes=len(guest.writes),
        guest_write_errors=errors,
        guest_writes_lost=len(lost),
        left_behind=left,
        job_type=job_type_name(final.get("type")),
        errmsg=final.get("errmsg"),
        note=note,
        qemu_checked=qemu_alive,
        extra={
            "failed_writes": [[w.disk, w.offset] for w in guest.writes if w.failed],
            "lost_writes": [[w.disk, w.offset] for w in lost],
            "latency_ms": [round(w.latency_ms, 2) for w in guest.writes],
            "copied_before": [w.copied_before for w in guest.writes],
            "time_elapsed_ms": final.get("time_elapsed"),
        },
    )
    return record(row)


def assert_ahead_of_the_copy(guest: Guest) -> None:
    """The writes hit data the job had not copied yet (else they test nothing).

    A job's progress counts what it copied in order, plus (direct sequence) the old
    data copied inside guest writes, so it never understates how far the copy got.
    A write issued once the job has ended (it failed meanwhile) saw no job: the
    guest goes on writing after a failed backup, and those writes count too.
    """
    assert guest.writes[0].copied_before is not None, "the job was gone before the guest wrote"
    behind = [
        (w.disk, w.offset)
        for w in guest.writes
        if w.copied_before is not None and w.copied_before > w.offset
    ]
    assert not behind, f"writes at {behind} came after the copy had passed them"


def pull_xml(sock: Path, scratch: dict[str, Path], *, incremental: str | None = None) -> str:
    """A pull over a unix socket; ``incremental``: vda from that checkpoint, vdb full."""
    mode = {"vdb": " backupmode='full'"} if incremental else {}
    disks = "".join(
        f"<disk name='{d}'{mode.get(d, '')}><scratch file='{p}'/></disk>"
        for d, p in scratch.items()
    )
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (
        f"<domainbackup mode='pull'>{inc}<server transport='unix' socket='{sock}'/>"
        f"<disks>{disks}</disks></domainbackup>"
    )


async def snapshots(vm: VM, where: Path) -> dict[str, str]:
    """Each disk's content now, as raw files (the reference for "the disk at begin")."""
    return {d: await vm.snapshot(d, str(where / f"ref-{d}.raw")) for d in vm.disks}


# ------------------------------------------------------------ the measures themselves


async def test_the_measures_see_failed_and_lost_writes_and_leftovers(vm_factory, tmp_path):
    """Each number can be other than zero: a failed write, a write missing from the
    disk, a node, a bitmap, a paused guest and a stray file are all seen."""
    vm = await running_vm(vm_factory, [("vda", "qcow2", 4 * MiB, "scsi")])
    scene = await Scene.take(vm, [tmp_path])
    guest = Guest(vm)
    kept = await guest.write("vda", 0x42, 0, 64 * 1024)
    undone = await guest.write("vda", 0x43, MiB, 64 * 1024)
    beyond = await guest.write("vda", 0x44, 4 * MiB, 64 * 1024)  # past the end: QEMU fails it
    assert (kept.failed, undone.failed, beyond.failed) == (False, False, True)
    assert guest.errors == 1
    await vm.mon.execute("blockdev-add", {"driver": "null-co", "node-name": "stray"})
    await vm.mon.execute("block-dirty-bitmap-add", {"node": "vda-fmt", "name": "stray"})
    await vm.mon.execute("stop")
    (tmp_path / "stray.file").write_text("left by someone\n")
    assert await scene.left_in_qemu() == ["node stray", "bitmap vda-fmt/stray", "guest left paused"]
    await vm.quit()
    await imgtools.write_pattern(vm.disks["vda"].path, "qcow2", [(0x11, MiB, 64 * 1024)])
    assert [w.pattern for w in await guest.lost()] == [0x43, 0x44]
    assert scene.left_on_disk() == [f"file {tmp_path / 'stray.file'}"]


# ------------------------------------------------------------ storage that fills up


@pytest.mark.parametrize("fleecing", [True, False], ids=["fleecing", "direct"])
async def test_target_full(vm_factory, driver, tmp_path, fleecing):
    """vda's push target fills its filesystem mid-backup (vdb's has room). With
    fleecing the backup fails and the guest never notices; libvirt's direct sequence
    (the contrast row) copies old data inside the guest's writes, and on a QEMU
    without ``on-cbw-error`` those writes fail and are lost."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    (tmp_path / "out").mkdir()
    with small_tmpfs(tmp_path / "full", "8m") as full:
        target = f"{full}/vda.qcow2"
        targets = {"vda": target, "vdb": f"{tmp_path}/out/vdb.qcow2"}
        scene = await Scene.take(vm, [tmp_path])
        await driver.domainBackupBegin(
            dom, push_xml(targets), CHECKPOINT, tuning=THROTTLE, fleecing=fleecing
        )
        await overwrite(guest)
        during = await driver.domainGetJobStats(dom)  # what an operator sees meanwhile
        final = await wait_completed(driver, dom)
        row = await finish(
            "target-full" if fleecing else "target-full-direct",
            "target full (push)" if fleecing else "target full (push, --no-fleecing)",
            vm,
            dom,
            guest,
            scene,
            final,
            extra_left=stray_checkpoints(dom),
            note=(
                f"right after the guest's writes ({guest.errors} failed), domainGetJobStats "
                f"said {'running' if during.get('type') == JobType.UNBOUNDED else 'ended'}, "
                + (f"errmsg {during['errmsg']!r}" if during.get("errmsg") else "no errmsg")
            ),
        )
    assert_ahead_of_the_copy(guest)
    if fleecing:
        check(row, JobType.FAILED, ["'vda'", target, "No space left on device", GUEST_NOT_AFFECTED])
        return
    # libvirt's sequence: what QEMU does is what the guest gets
    if dom.features.has(ON_CBW_ERROR):
        expected_errors = 0  # QEMU 10.1+: the direct job breaks instead of the write
    else:
        expected_errors = row.guest_write_errors
        assert expected_errors > 0, "the direct sequence on this QEMU fails guest writes"
    check(
        row,
        JobType.FAILED,
        ["No space left on device"],
        guest_errors=expected_errors,
        lost=expected_errors,
    )
    assert row.extra["failed_writes"] == row.extra["lost_writes"], (
        "exactly the writes QEMU failed are missing from the disk"
    )
    assert all(disk == "vda" for disk, _ in row.extra["failed_writes"]), (
        "only the disk whose target filled loses writes"
    )


async def test_fleecing_image_full(vm_factory, driver, tmp_path):
    """vda's fleecing image (pvb:fleecing on a small filesystem) cannot take the old
    data the guest overwrites: the snapshot breaks, the backup fails naming the image
    and why, the guest's writes all land."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    out = tmp_path / "out"
    out.mkdir()
    with small_tmpfs(tmp_path / "fleece", "4m") as small:
        fleece = f"{small}/vda.fleece"
        xml = (  # vdb's fleecing image goes next to its disk, where there is room
            "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'><disks>"
            f"<disk name='vda' pvb:fleecing='{fleece}'><target file='{out}/vda.qcow2'/></disk>"
            f"<disk name='vdb'><target file='{out}/vdb.qcow2'/></disk>"
            "</disks></domainbackup>"
        )
        scene = await Scene.take(vm, [tmp_path])
        await driver.domainBackupBegin(dom, xml, tuning=THROTTLE)
        assert os.path.exists(fleece)
        await overwrite(guest)
        final = await wait_completed(driver, dom)
        row = await finish(
            "fleecing-full", "fleecing image full (push)", vm, dom, guest, scene, final
        )
    assert_ahead_of_the_copy(guest)
    check(row, JobType.FAILED, ["'vda'", fleece, "filesystem is full", GUEST_NOT_AFFECTED])


async def test_scratch_full_and_clients_read_nothing_after(vm_factory, driver, tmp_path):
    """vda's pull scratch (its fleecing image) fills up during an incremental pull:
    the snapshot breaks, every read of the export fails from then on (a client
    connected before and one connecting after), never serving data that is not the
    disk at begin; the job ends FAILED and its exported bitmap goes."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    await since_checkpoint(driver, dom, vm)
    guest = Guest(vm)
    sock = tmp_path / "nbd.sock"
    uri = unix_uri(str(sock), "vda")
    with small_tmpfs(tmp_path / "scratch", "4m") as small:
        scratch = small / "vda.scratch"
        scene = await Scene.take(vm, [tmp_path])
        scratches = {"vda": scratch, "vdb": tmp_path / "vdb.scratch"}
        await driver.domainBackupBegin(dom, pull_xml(sock, scratches, incremental="c0"))
        assert await temporary_bitmaps(vm), "the incremental exports a bitmap of its own"
        client = await HeldClient.open(uri)
        try:
            before = await client.command("read -P 0x12 0 1M")
            await overwrite(guest, push=False)
            reads = {
                "overwritten": await client.command(f"read -P 0x12 {HALF} 1M"),
                "untouched": await client.command("read -P 0x12 1M 1M"),
            }
        finally:
            await client.close()
        late = await nbdcopy(uri, "null:", check=False)
        final = await wait_completed(driver, dom, timeout=30)
        row = await finish(
            "scratch-full",
            "scratch full (incremental pull), clients read after the break",
            vm,
            dom,
            guest,
            scene,
            final,
            note=(
                "after the break, the connected client's reads of data "
                + " and of data ".join(
                    f"{k} {'failed' if 'read failed' in v else 'SUCCEEDED'}"
                    for k, v in reads.items()
                )
                + f"; a new client (nbdcopy) exited {late.returncode}"
            ),
        )
    assert "read 1048576/1048576" in before and "Pattern verification failed" not in before
    for what, out in reads.items():
        assert "Pattern verification failed" not in out, f"{what}: served data not of begin"
        assert "read failed" in out, f"{what}: a read after the break succeeded: {out}"
    assert late.returncode != 0, "a client reading after the break got data"
    check(row, JobType.FAILED, ["'vda'", str(scratch), "filesystem is full", GUEST_NOT_AFFECTED])


@pytest.mark.parametrize("seen", [False, True], ids=["unseen", "seen-by-stats"])
async def test_scratch_full_then_abort(vm_factory, driver, tmp_path, seen):
    """The scratch breaks and the pull is aborted before the periodic check of the
    views ran (``unseen``), or right after domainGetJobStats reported the break: the
    backup is incomplete either way, and its final stats must say so instead of
    COMPLETED with success."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    sock = tmp_path / "nbd.sock"
    with small_tmpfs(tmp_path / "scratch", "4m") as small:
        scratch = small / "vda.scratch"
        scene = await Scene.take(vm, [tmp_path])
        await driver.domainBackupBegin(dom, pull_xml(sock, {"vda": scratch}))
        await overwrite(guest, push=False)
        running = await driver.domainGetJobStats(dom) if seen else {}
        await driver.domainAbortJob(dom)
        final = await wait_completed(driver, dom)
        row = await finish(
            "scratch-full-abort-seen" if seen else "scratch-full-abort",
            "scratch full (pull), aborted "
            + ("after domainGetJobStats saw the break" if seen else "before the break was seen"),
            vm,
            dom,
            guest,
            scene,
            final,
        )
    if seen:
        assert "broke" in running.get("errmsg", ""), running
    check(row, JobType.FAILED, ["'vda'", str(scratch), "filesystem is full", GUEST_NOT_AFFECTED])
    assert final["success"] is False, final


# ----------------------------------------------------------------- a slow target


@pytest.mark.parametrize("fleecing", [True, False], ids=["fleecing", "direct"])
async def test_slow_target(vm_factory, driver, tmp_path, fleecing):
    """A push target whose every write takes 20 ms (nbdkit's delay filter behind
    nbdfuse, reused as a raw file). With fleecing the guest's writes wait only for
    the local fleecing image; the direct sequence makes them wait for the target.
    The latencies are reported, not asserted (tests never assert on time)."""
    size = 16 * MiB
    vm = await running_vm(vm_factory, [("vda", "qcow2", size, "scsi")])
    dom = await driver.attach("vm1", vm.qmp)
    idle = Guest(vm)  # the same writes with no backup running, for comparison
    await idle.overwrite("vda", 0, 16, 64 * 1024, stride=256 * 1024, first_pattern=0x20)
    ref = await vm.snapshot("vda", str(tmp_path / "ref.raw"))
    guest = Guest(vm)
    async with slow_nbd_file(tmp_path / "slow", size, "20ms") as target:
        xml = (
            "<domainbackup><disks><disk name='vda' type='file'><driver type='raw'/>"
            f"<target file='{target}'/></disk></disks></domainbackup>"
        )
        scene = await Scene.take(vm, [tmp_path])
        await driver.domainBackupBegin(
            dom,
            xml,
            None,
            BackupBeginFlags.REUSE_EXTERNAL,
            tuning={"speed": 8 * MiB},  # ahead of the guest's writes at half the disk
            fleecing=fleecing,
        )
        await guest.overwrite(
            "vda", size // 2, 16, 64 * 1024, stride=512 * 1024, job="pvb-backup-vda"
        )
        final = await wait_completed(driver, dom)
        same, msg = await imgtools.compare(ref, str(target), fmt_a="raw", fmt_b="raw")
        row = await finish(
            "slow-target" if fleecing else "slow-target-direct",
            "slow target, 20 ms a write (push)"
            if fleecing
            else "slow target, 20 ms a write (push, --no-fleecing)",
            vm,
            dom,
            guest,
            scene,
            final,
            keep=(target,),
            note=latency_note(idle.latencies(), guest.latencies()),
        )
        row.extra["latency_idle_ms"] = [round(x, 2) for x in idle.latencies()]
    assert_ahead_of_the_copy(guest)
    assert same, f"the target is not the disk at begin: {msg}"
    check(row, JobType.COMPLETED)
    assert not await idle.lost(), "the writes made before the backup are on the disk too"


# ---------------------------------------------------------------- stopped halfway


async def test_abort_mid_job(vm_factory, driver, tmp_path):
    """An incremental push (vda from checkpoint c0, vdb in full) aborted halfway:
    its temporary bitmap, the checkpoint made with it and its targets all go; c0 and
    the guest's writes stay."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    await since_checkpoint(driver, dom, vm)
    guest = Guest(vm)
    scene = await Scene.take(vm, [tmp_path])
    await driver.domainBackupBegin(dom, INCREMENTAL_PUSH, CHECKPOINT, tuning=THROTTLE)
    assert await temporary_bitmaps(vm), "the incremental runs on a bitmap of its own"
    await overwrite(guest)
    await driver.domainAbortJob(dom)
    final = await wait_completed(driver, dom)
    row = await finish(
        "abort",
        "abort mid-job (incremental push)",
        vm,
        dom,
        guest,
        scene,
        final,
        extra_left=stray_checkpoints(dom),
    )
    assert_ahead_of_the_copy(guest)
    check(row, JobType.CANCELLED)


async def kill_qemu(vm: VM) -> None:
    vm.proc.kill(signal.SIGKILL)
    await vm.proc.proc.wait()


async def test_qemu_killed_mid_push(vm_factory, driver, tmp_path):
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    scene = await Scene.take(vm, [tmp_path])
    await driver.domainBackupBegin(dom, None, tuning=THROTTLE)
    await overwrite(guest)
    for disk in vm.disks:
        await guest.flush(disk)  # what a guest does before it counts on its data
    await kill_qemu(vm)
    final = await wait_completed(driver, dom)
    row = await finish(
        "qemu-killed-push", "QEMU SIGKILL mid-push", vm, dom, guest, scene, final, qemu_alive=False
    )
    assert_ahead_of_the_copy(guest)
    check(row, JobType.FAILED, ["QEMU exited"])


async def test_qemu_killed_mid_pull(vm_factory, driver, tmp_path):
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    sock = tmp_path / "nbd.sock"
    scene = await Scene.take(vm, [tmp_path])
    await driver.domainBackupBegin(
        dom, pull_xml(sock, {d: tmp_path / f"{d}.scratch" for d in vm.disks})
    )
    await overwrite(guest, push=False)
    for disk in vm.disks:
        await guest.flush(disk)
    await kill_qemu(vm)
    final = await wait_completed(driver, dom)
    row = await finish(
        "qemu-killed-pull", "QEMU SIGKILL mid-pull", vm, dom, guest, scene, final, qemu_alive=False
    )
    check(row, JobType.FAILED, ["QEMU exited"])


_DRIVER_CHILD = r"""
import asyncio, os, sys
sys.path.insert(0, os.getcwd())
from pyvirtbackup import Driver

async def main():
    drv = Driver(state_dir=sys.argv[1])
    dom = await drv.attach("vm1", sys.argv[2])
    await drv.domainBackupBegin(dom, sys.argv[3], tuning={"speed": int(sys.argv[4])})
    print("begun", flush=True)
    await asyncio.Event().wait()  # killed here, mid-push

asyncio.run(main())
"""


async def test_driver_killed_mid_push_then_a_new_driver_finishes(vm_factory, tmp_path):
    """The orchestrator (a Driver in another process) is SIGKILLed while its push
    runs through the fleecing filters; a new Driver attaches, takes the job over,
    lets it finish, and takes the filters out of the guest's path."""
    vm = await running_vm(vm_factory)
    state = tmp_path / "state"
    out = tmp_path / "out"
    out.mkdir()
    targets = {d: str(out / f"{d}.qcow2") for d in vm.disks}
    refs = await snapshots(vm, tmp_path)
    guest = Guest(vm)
    scene = await Scene.take(vm, [tmp_path])
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DRIVER_CHILD,
        str(state),
        vm.qmp,
        push_xml(targets),
        str(THROTTLE["speed"]),
        stdout=asyncio.subprocess.PIPE,
        cwd=os.getcwd(),
    )
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line == b"begun\n", line
        await overwrite(guest)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert dom.recovery_problems == []
        await unthrottle(vm.mon)
        final = await wait_completed(second, dom)
        row = await finish(
            "driver-killed-push",
            "driver SIGKILL mid-push, a new Driver takes over",
            vm,
            dom,
            guest,
            scene,
            final,
            keep=(*targets.values(), state / "domains" / "vm1" / "domain.json"),
        )
    assert_ahead_of_the_copy(guest)
    check(row, JobType.COMPLETED)
    for disk, target in targets.items():
        same, msg = await imgtools.compare(refs[disk], target, fmt_a="raw")
        assert same, f"{disk}: the finished backup is not the disk at begin: {msg}"


async def test_client_vanishing_mid_read(vm_factory, driver, tmp_path):
    """A pull client drops its connection in the middle of a reply; the exports go
    on serving the disks at begin to the next client, and the end leaves nothing."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    refs = await snapshots(vm, tmp_path)
    guest = Guest(vm)
    sock = tmp_path / "nbd.sock"
    pulled = {d: tmp_path / f"pulled-{d}.raw" for d in vm.disks}
    scene = await Scene.take(vm, [tmp_path])
    await driver.domainBackupBegin(
        dom, pull_xml(sock, {d: tmp_path / f"{d}.scratch" for d in vm.disks})
    )
    await overwrite(guest, push=False)
    size = await read_then_drop(str(sock), "vda", length=8 * MiB, keep=64 * 1024)
    differ = []
    for disk, dest in pulled.items():
        await nbdcopy(unix_uri(str(sock), disk), str(dest))
        same, msg = await imgtools.compare(refs[disk], str(dest), fmt_a="raw", fmt_b="raw")
        if not same:
            differ.append(f"{disk}: {msg}")
    await driver.domainAbortJob(dom)  # how a pull ends: libvirt calls it COMPLETED
    final = await wait_completed(driver, dom)
    row = await finish(
        "client-vanishes",
        "NBD client vanishes mid-read (pull)",
        vm,
        dom,
        guest,
        scene,
        final,
        keep=tuple(pulled.values()),
    )
    assert size == DISK
    assert not differ, f"the next client did not get the disks at begin: {differ}"
    check(row, JobType.COMPLETED)


# ----------------------------------------------------- the guest shuts down mid-backup


async def shutdown_case(vm_factory, tmp_path: Path, preserve: bool) -> tuple[Row, dict]:
    """A guest that really powers off (tests/guestos.py) while its push runs, after
    overwriting data the backup had not copied yet."""
    name = "preserve" if preserve else "plain"
    workdir = tmp_path / name
    workdir.mkdir()
    vm = await vm_factory(
        [("vda", "qcow2", DISK, "scsi")],
        fill=[(0x11, 0, DISK)],
        subdir=name,
        paused=False,
        extra_args=power_off_disk_args(workdir),
    )
    async with Driver(state_dir=tmp_path / f"state-{name}") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        guest = Guest(vm)
        target = tmp_path / f"{name}.vda.bak"
        scene = await Scene.take(vm, [workdir, tmp_path / f"state-{name}"])
        flags = BackupBeginFlags.PRESERVE_SHUTDOWN_DOMAIN if preserve else 0
        xml = push_xml({"vda": str(target)})
        ref = await vm.snapshot("vda", str(tmp_path / f"{name}.at-begin.raw"))
        await drv.domainBackupBegin(dom, xml, None, flags, tuning={"speed": 256 * 1024})
        await overwrite(guest, disks=("vda",))
        assert vm.proc.proc is not None
        if preserve:  # the guest powers off; QEMU stays until the backup is done
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 90
            while (await vm.mon.execute("query-status"))["status"] != "shutdown":
                assert loop.time() < deadline, "the guest did not power off"
                await asyncio.sleep(0.2)
            assert vm.proc.proc.returncode is None
            running = await drv.domainGetJobStats(dom)
            assert running["type"] == JobType.UNBOUNDED
            await unthrottle(vm.mon)
        exit_status = await asyncio.wait_for(vm.proc.proc.wait(), 90)
        final = await wait_completed(drv, dom, timeout=90)
        facts = {
            "exit_status": exit_status,
            "record": drv.state.domain("vm1").read_job(),
            "target": target,
            "at_begin": ref,
        }
        row = await finish(
            "guest-shutdown-preserve" if preserve else "guest-shutdown",
            "guest powers off mid-push, PRESERVE_SHUTDOWN_DOMAIN"
            if preserve
            else "guest powers off mid-push",
            vm,
            dom,
            guest,
            scene,
            final,
            qemu_alive=False,
            keep=(target, ref) if preserve else (ref,),
        )
    return row, facts


async def test_a_guest_powering_off_during_its_backup(vm_factory, tmp_path):
    """With PRESERVE_SHUTDOWN_DOMAIN QEMU is kept (paused) until the backup completes,
    then quits as the guest asked; without it, libvirt's way: QEMU exits, the backup
    fails saying so, nothing of it is left. Both at once: each waits for SeaBIOS."""
    (kept, kept_facts), (plain, plain_facts) = await asyncio.gather(
        shutdown_case(vm_factory, tmp_path, preserve=True),
        shutdown_case(vm_factory, tmp_path, preserve=False),
    )
    check(kept, JobType.COMPLETED)
    assert kept_facts["exit_status"] == 0 and kept_facts["record"] is None
    same, msg = await imgtools.compare(kept_facts["at_begin"], str(kept_facts["target"]),
                                       fmt_a="raw", fmt_b="qcow2")  # fmt: skip
    assert same, f"the backup is not the disk at begin: {msg}"
    check(plain, JobType.FAILED, ["guest shut down", "PRESERVE_SHUTDOWN_DOMAIN"])
    assert plain_facts["record"] is None and not plain_facts["target"].exists()
