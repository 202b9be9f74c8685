"""A new Driver (a restarted orchestrator) takes over a backup an earlier one started."""

from __future__ import annotations

import asyncio
import os

import pytest

from pyvirtbackup import Driver, JobStatsFlags, JobType
from pyvirtbackup.qemu import imgtools

from .conftest import MiB
from .drivertools import NOTHING_LEFT, EventLog, leftovers, node_names, unthrottle, wait_completed
from .nbd_clients import nbdcopy, unix_uri
from .test_push import targets

pytestmark = pytest.mark.asyncio


async def test_new_driver_takes_over_a_running_push(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB), ("vdb", "raw", 16 * MiB)])
    state = tmp_path / "state"
    before = await node_names(vm.mon)
    refs = {d: await vm.snapshot(d, str(tmp_path / f"{d}.ref")) for d in ("vda", "vdb")}
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    xml = await first.domainBackupGetXMLDesc(dom)
    await first.close()  # the orchestrator goes away; QEMU's jobs keep running
    assert len(await vm.mon.execute("query-jobs")) == 2

    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert dom.recovery_problems == []
        assert await second.domainBackupGetXMLDesc(dom) == xml
        stats = await second.domainGetJobStats(dom)
        assert stats["type"] == JobType.UNBOUNDED and stats["disk_total"] == 32 * MiB
        events = EventLog()
        await events.register(second, dom)
        await unthrottle(vm.mon)
        final = await events.wait()
        assert final["type"] == JobType.COMPLETED
        assert final["time_elapsed"] >= stats["time_elapsed"]
        assert await leftovers(vm.mon, before) == NOTHING_LEFT
    for disk, path in targets(xml).items():
        same, msg = await imgtools.compare(refs[disk], path, fmt_a="raw")
        assert same, msg


async def test_new_driver_can_abort_the_taken_over_job(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    before = await node_names(vm.mon)
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    path = targets(await first.domainBackupGetXMLDesc(dom))["vda"]
    await first.close()

    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        await second.domainAbortJob(dom)
        stats = await second.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
        assert stats["type"] == JobType.CANCELLED
    assert not os.path.exists(path)
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_job_that_ended_unwatched_is_finalized_on_attach(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    before = await node_names(vm.mon)
    ref = await vm.snapshot("vda", str(tmp_path / "ref"))
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    path = targets(await first.domainBackupGetXMLDesc(dom))["vda"]
    await first.close()
    await unthrottle(vm.mon)
    for _ in range(500):
        jobs = await vm.mon.execute("query-jobs")
        if jobs and jobs[0]["status"] == "concluded":
            break
        await asyncio.sleep(0.02)
    assert jobs[0]["status"] == "concluded"

    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        stats = await wait_completed(second, dom)
        assert stats["type"] == JobType.COMPLETED and stats["success"] is True
        assert await leftovers(vm.mon, before) == NOTHING_LEFT
    same, msg = await imgtools.compare(ref, path, fmt_a="raw")
    assert same, msg


async def test_job_gone_with_a_restarted_qemu_is_reported_and_cleaned(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    path = targets(await first.domainBackupGetXMLDesc(dom))["vda"]
    await first.close()
    await vm.quit()
    assert os.path.exists(path)

    vm2 = await vm_factory(existing=vm.disks)
    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm2.qmp)
        assert len(dom.recovery_problems) == 1
        assert "vda" in dom.recovery_problems[0] and "gone" in dom.recovery_problems[0]
        stats = await wait_completed(second, dom)
        assert stats["type"] == JobType.FAILED
        assert "vanished" in stats["errmsg"]
        assert dom.job is None
    assert not os.path.exists(path), "the partial target of the lost job must be removed"
    assert not (state / "domains" / "vm1" / "backup.json").exists()


async def test_new_driver_takes_over_a_pull_and_cleans_up_at_abort(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    before = await node_names(vm.mon)
    ref = await vm.snapshot("vda", str(tmp_path / "ref"))
    sock = str(tmp_path / "nbd.sock")
    scratch = str(tmp_path / "vda.scratch")
    xml = (
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
        f"<disks><disk name='vda'><scratch file='{scratch}'/></disk></disks></domainbackup>"
    )
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, xml)
    await first.close()
    await vm.write("vda", 0x66, 0, 1 * MiB)  # after begin: not in the export

    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert dom.recovery_problems == []
        assert "exportname='vda'" in await second.domainBackupGetXMLDesc(dom)
        copy = str(tmp_path / "copy.raw")
        await nbdcopy(unix_uri(sock, "vda"), copy)
        same, msg = await imgtools.compare(ref, copy, fmt_a="raw", fmt_b="raw")
        assert same, msg
        await second.domainAbortJob(dom)
        done = await second.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
        assert done["type"] == JobType.COMPLETED
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    assert not os.path.exists(sock) and not os.path.exists(scratch)
