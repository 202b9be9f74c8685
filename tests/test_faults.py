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
from .drivertools import checkpoint_xml, push_xml, unthrottle, wait_completed
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
from .nbd_clients import HeldClient, nbdcopy, read_then_drop, unix_uri
from .test_push import small_tmpfs

pytestmark = pytest.mark.asyncio

DISK = 32 * MiB
FULL = [(0x11, 0, DISK)]  # every cluster holds data the backup must copy
JOB = "pvb-backup-vda"
# the guest overwrites the second half, 1 MiB at a time, while the job (throttled)
# is still copying the first: every write lands on data not copied yet
OVERWRITE = {"start": DISK // 2, "count": 16, "length": MiB}
THROTTLE = {"speed": 4 * MiB}
GUEST_NOT_AFFECTED = "the guest's writes were not affected"


async def running_vm(vm_factory, size: int = DISK) -> VM:
    return await vm_factory([("vda", "qcow2", size)], fill=[(0x11, 0, size)], paused=False)


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
        extra={
            "failed_writes": [w.offset for w in guest.writes if w.failed],
            "lost_writes": [w.offset for w in lost],
            "latency_ms": [round(w.latency_ms, 2) for w in guest.writes],
            "copied_before": [w.copied_before for w in guest.writes],
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
        w.offset for w in guest.writes if w.copied_before is not None and w.copied_before > w.offset
    ]
    assert not behind, f"writes at {behind} came after the copy had passed them"


def pull_xml(sock: Path, scratch: Path) -> str:
    return (
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
        f"<disks><disk name='vda'><scratch file='{scratch}'/></disk></disks></domainbackup>"
    )


# ------------------------------------------------------------ storage that fills up


@pytest.mark.parametrize("fleecing", [True, False], ids=["fleecing", "direct"])
async def test_target_full(vm_factory, driver, tmp_path, fleecing):
    """The push target's filesystem fills up mid-backup. With fleecing the backup
    fails and the guest never notices; libvirt's direct sequence (the contrast row)
    copies old data inside the guest's writes, and on a QEMU without
    ``on-cbw-error`` those writes fail and are lost."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    with small_tmpfs(tmp_path / "full", "8m") as full:
        target = f"{full}/vda.qcow2"
        scene = await Scene.take(vm, [tmp_path])
        await driver.domainBackupBegin(
            dom, push_xml({"vda": target}), checkpoint_xml("c1"), tuning=THROTTLE, fleecing=fleecing
        )
        await guest.overwrite("vda", **OVERWRITE, job=JOB)
        final = await wait_completed(driver, dom)
        row = await finish(
            "target-full" if fleecing else "target-full-direct",
            "target full (push)" if fleecing else "target full (push, --no-fleecing)",
            vm,
            dom,
            guest,
            scene,
            final,
            extra_left=("checkpoint c1 of the failed push",) if "c1" in dom.checkpoints else (),
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


async def test_fleecing_image_full(vm_factory, driver, tmp_path):
    """The push's fleecing image (pvb:fleecing on a small filesystem) cannot take the
    old data the guest overwrites: the snapshot breaks, the backup fails naming the
    image and why, the guest's writes all land."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    target = tmp_path / "out" / "vda.qcow2"
    target.parent.mkdir()
    with small_tmpfs(tmp_path / "fleece", "4m") as small:
        fleece = f"{small}/vda.fleece"
        xml = (
            "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'><disks>"
            f"<disk name='vda' pvb:fleecing='{fleece}'><target file='{target}'/></disk>"
            "</disks></domainbackup>"
        )
        scene = await Scene.take(vm, [tmp_path])
        await driver.domainBackupBegin(dom, xml, tuning=THROTTLE)
        assert os.path.exists(fleece)
        await guest.overwrite("vda", **OVERWRITE, job=JOB)
        final = await wait_completed(driver, dom)
        row = await finish(
            "fleecing-full", "fleecing image full (push)", vm, dom, guest, scene, final
        )
    assert_ahead_of_the_copy(guest)
    check(row, JobType.FAILED, ["'vda'", fleece, "filesystem is full", GUEST_NOT_AFFECTED])


async def test_scratch_full_and_clients_read_nothing_after(vm_factory, driver, tmp_path):
    """A pull's scratch (its fleecing image) fills up: the snapshot breaks, every read
    of the export fails from then on (a client connected before and one connecting
    after), never serving data that is not the disk at begin; the job ends FAILED."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    sock = tmp_path / "nbd.sock"
    uri = unix_uri(str(sock), "vda")
    with small_tmpfs(tmp_path / "scratch", "4m") as small:
        scratch = small / "vda.scratch"
        scene = await Scene.take(vm, [tmp_path])
        await driver.domainBackupBegin(dom, pull_xml(sock, scratch))
        client = await HeldClient.open(uri)
        try:
            before = await client.command("read -P 0x11 0 1M")
            await guest.overwrite("vda", **OVERWRITE)
            reads = {
                "overwritten": await client.command(f"read -P 0x11 {DISK // 2} 1M"),
                "untouched": await client.command("read -P 0x11 1M 1M"),
            }
        finally:
            await client.close()
        late = await nbdcopy(uri, "null:", check=False)
        final = await wait_completed(driver, dom, timeout=30)
        row = await finish(
            "scratch-full",
            "scratch full (pull), clients read after the break",
            vm,
            dom,
            guest,
            scene,
            final,
            note=(
                "after the break: the connected client's reads "
                + ", ".join(
                    f"{k} {'failed' if 'read failed' in v else 'SUCCEEDED'}"
                    for k, v in reads.items()
                )
                + f"; a new nbdcopy exited {late.returncode}"
            ),
        )
    assert "read 1048576/1048576" in before and "Pattern verification failed" not in before
    for what, out in reads.items():
        assert "Pattern verification failed" not in out, f"{what}: served data not of begin"
        assert "read failed" in out, f"{what}: a read after the break succeeded: {out}"
    assert late.returncode != 0, "a client reading after the break got data"
    check(row, JobType.FAILED, ["'vda'", str(scratch), "filesystem is full", GUEST_NOT_AFFECTED])


# ----------------------------------------------------------------- a slow target


@pytest.mark.parametrize("fleecing", [True, False], ids=["fleecing", "direct"])
async def test_slow_target(vm_factory, driver, tmp_path, fleecing):
    """A push target whose every write takes 20 ms (nbdkit's delay filter behind
    nbdfuse, reused as a raw file). With fleecing the guest's writes wait only for
    the local fleecing image; the direct sequence makes them wait for the target.
    The latencies are reported, not asserted (tests never assert on time)."""
    size = 16 * MiB
    vm = await running_vm(vm_factory, size)
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
        await guest.overwrite("vda", size // 2, 16, 64 * 1024, stride=512 * 1024, job=JOB)
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
    # the before-writes are on the disk too
    assert not await idle.lost()


# ---------------------------------------------------------------- stopped halfway


async def test_abort_mid_job(vm_factory, driver, tmp_path):
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    guest = Guest(vm)
    scene = await Scene.take(vm, [tmp_path])
    await driver.domainBackupBegin(dom, None, tuning=THROTTLE)
    await guest.overwrite("vda", **OVERWRITE, job=JOB)
    await driver.domainAbortJob(dom)
    final = await wait_completed(driver, dom)
    row = await finish("abort", "abort mid-job (push)", vm, dom, guest, scene, final)
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
    await guest.overwrite("vda", **OVERWRITE, job=JOB)
    await guest.flush("vda")  # what a guest does before it counts on its data
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
    sock, scratch = tmp_path / "nbd.sock", tmp_path / "vda.scratch"
    scene = await Scene.take(vm, [tmp_path])
    await driver.domainBackupBegin(dom, pull_xml(sock, scratch))
    await guest.overwrite("vda", **OVERWRITE)
    await guest.flush("vda")
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
    runs through the fleecing filter; a new Driver attaches, takes the job over,
    lets it finish, and takes the filter out of the guest's path."""
    vm = await running_vm(vm_factory)
    state = tmp_path / "state"
    target = tmp_path / "out" / "vda.qcow2"
    target.parent.mkdir()
    ref = await vm.snapshot("vda", str(tmp_path / "ref.raw"))
    guest = Guest(vm)
    scene = await Scene.take(vm, [tmp_path])
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DRIVER_CHILD,
        str(state),
        vm.qmp,
        push_xml({"vda": str(target)}),
        str(2 * MiB),
        stdout=asyncio.subprocess.PIPE,
        cwd=os.getcwd(),
    )
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line == b"begun\n", line
        await guest.overwrite("vda", **OVERWRITE, job=JOB)
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
            keep=(target, state / "domains" / "vm1" / "domain.json"),
        )
    assert_ahead_of_the_copy(guest)
    check(row, JobType.COMPLETED)
    same, msg = await imgtools.compare(ref, str(target), fmt_a="raw")
    assert same, f"the finished backup is not the disk at begin: {msg}"


async def test_client_vanishing_mid_read(vm_factory, driver, tmp_path):
    """A pull client drops its connection in the middle of a reply; the export goes
    on serving the disk at begin to the next client, and the end leaves nothing."""
    vm = await running_vm(vm_factory)
    dom = await driver.attach("vm1", vm.qmp)
    ref = await vm.snapshot("vda", str(tmp_path / "ref.raw"))
    guest = Guest(vm)
    sock, scratch = tmp_path / "nbd.sock", tmp_path / "vda.scratch"
    pulled = tmp_path / "pulled.raw"
    scene = await Scene.take(vm, [tmp_path])
    await driver.domainBackupBegin(dom, pull_xml(sock, scratch))
    await guest.overwrite("vda", **OVERWRITE)
    size = await read_then_drop(str(sock), "vda", length=8 * MiB, keep=64 * 1024)
    await nbdcopy(unix_uri(str(sock), "vda"), str(pulled))
    same, msg = await imgtools.compare(ref, str(pulled), fmt_a="raw", fmt_b="raw")
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
        keep=(pulled,),
    )
    assert size == DISK
    assert same, f"the next client did not get the disk at begin: {msg}"
    check(row, JobType.COMPLETED)


# ----------------------------------------------------- the guest shuts down mid-backup
#
# Two more rows, written with VIR_DOMAIN_BACKUP_BEGIN_PRESERVE_SHUTDOWN_DOMAIN (a
# guest that really powers off, qemu-7.2-notes §3g): "guest-shutdown" (QEMU exits,
# the job FAILED, nothing left) and "guest-shutdown-preserve" (QEMU kept until the
# backup completes, then quit). They use finish() and check() like the cases above,
# with the case names faulttools.ORDER already lists.
