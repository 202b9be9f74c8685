"""Push-mode full backups through the driver table, against a real QEMU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess

import pytest
from lxml import etree

from pyvirtbackup import (
    BackupBeginFlags,
    BlockJobStatus,
    BlockJobType,
    ErrorNumber,
    JobStatsFlags,
    JobType,
    VirError,
)
from pyvirtbackup.qemu import imgtools

from .conftest import MiB
from .drivertools import NOTHING_LEFT, EventLog, leftovers, node_names, unthrottle, wait_completed

pytestmark = pytest.mark.asyncio

SLOW = {"speed": 2 * MiB}  # keeps a 16 MiB disk's job running for seconds


def targets(xml: str) -> dict[str, str]:
    doc = etree.fromstring(xml.encode())
    return {
        d.get("name"): d.find("target").get("file")
        for d in doc.iter("disk")
        if d.find("target") is not None
    }


async def test_backup_is_the_disk_at_the_instant_of_begin(vm_factory, driver, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB), ("vdb", "raw", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    events = EventLog()
    await events.register(driver, dom)
    before = await node_names(vm.mon)
    # written before begin: must be in the backup
    await vm.write("vda", 0x21, 6 * MiB, 1 * MiB)
    await vm.write("vdb", 0x22, 13 * MiB, 1 * MiB)
    ref = {d: await vm.snapshot(d, str(tmp_path / f"ref-{d}.raw")) for d in ("vda", "vdb")}

    await driver.domainBackupBegin(dom, "<domainbackup/>", tuning=SLOW)
    # written right after begin returns: must not be in the backup
    for disk in ("vda", "vdb"):
        await vm.write(disk, 0x5A, 0, 64 * 1024)
        await vm.write(disk, 0x5B, 15 * MiB, 1 * MiB)
    xml = await driver.domainBackupGetXMLDesc(dom)
    running = await driver.domainGetJobStats(dom)
    assert running["type"] == JobType.UNBOUNDED
    assert running["operation"] == 9
    assert running["disk_total"] == 32 * MiB
    assert 0 <= running["disk_processed"] < 32 * MiB
    assert running["disk_remaining"] == running["disk_total"] - running["disk_processed"]
    await unthrottle(vm.mon)

    final = await events.wait()
    assert final["type"] == JobType.COMPLETED and final["success"] is True
    assert final["disk_total"] == final["disk_processed"] == 32 * MiB
    assert "errmsg" not in final
    assert sorted(events.block_jobs) == [
        ("vda", BlockJobType.BACKUP, BlockJobStatus.COMPLETED),
        ("vdb", BlockJobType.BACKUP, BlockJobStatus.COMPLETED),
    ]
    assert sorted(p for p, _, _ in events.block_jobs_by_path) == sorted(
        [vm.disks["vda"].path, vm.disks["vdb"].path]
    )
    assert await leftovers(vm.mon, before) == NOTHING_LEFT

    paths = targets(xml)
    for disk in ("vda", "vdb"):
        assert (await imgtools.info(paths[disk]))["format"] == "qcow2"
        same, msg = await imgtools.compare(ref[disk], paths[disk], fmt_a="raw", fmt_b="qcow2")
        assert same, f"{disk}: {msg}"
    await vm.quit()
    for disk in ("vda", "vdb"):
        same, _ = await imgtools.compare(vm.disks[disk].path, paths[disk])
        assert not same, f"{disk}: the writes after begin reached the backup"


async def test_getxmldesc_of_default_backup(vm_factory, driver):
    vm = await vm_factory(
        [
            ("vda", "qcow2", 16 * MiB),
            ("vdb", "raw", 16 * MiB),
            ("vdc", "raw", 16 * MiB, "scsi", True),
        ]
    )
    dom = await driver.attach("vm1", vm.qmp)
    await driver.domainBackupBegin(dom, None, tuning=SLOW)
    xml = await driver.domainBackupGetXMLDesc(dom)
    suffix = targets(xml)["vda"].rsplit(".", 1)[1]
    assert suffix.isdigit()
    a, b = vm.disks["vda"].path, vm.disks["vdb"].path
    assert xml == (
        "<domainbackup mode='push'>\n"
        "  <disks>\n"
        "    <disk name='vda' backup='yes' type='file' backupmode='full' index='1'>\n"
        "      <driver type='qcow2'/>\n"
        f"      <target file='{a}.{suffix}'/>\n"
        "    </disk>\n"
        "    <disk name='vdb' backup='yes' type='file' backupmode='full' index='2'>\n"
        "      <driver type='qcow2'/>\n"
        f"      <target file='{b}.{suffix}'/>\n"
        "    </disk>\n"
        "    <disk name='vdc' backup='no'/>\n"
        "  </disks>\n"
        "</domainbackup>\n"
    )
    await unthrottle(vm.mon)
    assert (await wait_completed(driver, dom))["success"] is True


async def test_fully_specified_push_with_raw_target(vm_factory, driver, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB), ("vdb", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    ref = await vm.snapshot("vdb", str(tmp_path / "ref-vdb.raw"))
    out = tmp_path / "out"
    out.mkdir()
    xml_in = (
        "<domainbackup mode='push'><disks>"
        f"<disk name='vdb' type='file'><driver type='raw'/><target file='{out}/vdb.img'/></disk>"
        "<disk name='vda' backup='no'/>"
        "</disks></domainbackup>"
    )
    await driver.domainBackupBegin(dom, xml_in, tuning=SLOW)
    assert await driver.domainBackupGetXMLDesc(dom) == (
        "<domainbackup mode='push'>\n"
        "  <disks>\n"
        "    <disk name='vdb' backup='yes' type='file' backupmode='full' index='1'>\n"
        "      <driver type='raw'/>\n"
        f"      <target file='{out}/vdb.img'/>\n"
        "    </disk>\n"
        "    <disk name='vda' backup='no'/>\n"
        "  </disks>\n"
        "</domainbackup>\n"
    )
    await unthrottle(vm.mon)
    assert (await wait_completed(driver, dom))["success"] is True
    assert (await imgtools.info(f"{out}/vdb.img"))["format"] == "raw"
    assert os.path.getsize(f"{out}/vdb.img") == 16 * MiB
    same, msg = await imgtools.compare(ref, f"{out}/vdb.img", fmt_a="raw", fmt_b="raw")
    assert same, msg
    assert sorted(os.listdir(out)) == ["vdb.img"]


async def test_existing_target_is_refused_and_untouched(vm_factory, driver, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB), ("vdb", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    before = await node_names(vm.mon)
    existing = tmp_path / "vdb.bak"
    existing.write_bytes(b"precious data, not a backup\n")
    stat = existing.stat()
    xml = (
        "<domainbackup><disks>"
        f"<disk name='vda'><target file='{tmp_path}/vda.bak'/></disk>"
        f"<disk name='vdb'><target file='{existing}'/></disk>"
        "</disks></domainbackup>"
    )
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(dom, xml)
    assert exc.value.code == ErrorNumber.INVALID_ARG
    assert str(existing) in str(exc.value) and "vdb" in str(exc.value)
    assert existing.read_bytes() == b"precious data, not a backup\n"
    assert existing.stat().st_mtime_ns == stat.st_mtime_ns
    assert not (tmp_path / "vda.bak").exists(), "a target was created although begin failed"
    assert dom.job is None
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    with pytest.raises(VirError) as exc:
        await driver.domainBackupGetXMLDesc(dom)
    assert exc.value.code == ErrorNumber.NO_DOMAIN_BACKUP


async def test_reuse_external_writes_into_the_given_target(vm_factory, driver, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    ref = await vm.snapshot("vda", str(tmp_path / "ref.raw"))
    target = str(tmp_path / "prepared.qcow2")
    await imgtools.create(target, 16 * MiB)
    await imgtools.write_pattern(target, "qcow2", [(0x77, 14 * MiB, 2 * MiB)])  # stale content
    xml = (
        "<domainbackup><disks>"
        f"<disk name='vda'><target file='{target}'/></disk>"
        "</disks></domainbackup>"
    )
    await driver.domainBackupBegin(dom, xml, None, BackupBeginFlags.REUSE_EXTERNAL, tuning=SLOW)
    desc = await driver.domainBackupGetXMLDesc(dom)
    assert f"<target file='{target}'/>" in desc
    assert "<driver type='qcow2'/>" in desc
    await unthrottle(vm.mon)
    assert (await wait_completed(driver, dom))["success"] is True
    same, msg = await imgtools.compare(ref, target, fmt_a="raw", fmt_b="qcow2")
    assert same, msg
    assert os.path.exists(target)


async def test_abort_cancels_and_removes_partial_targets(vm_factory, driver, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB), ("vdb", "raw", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    events = EventLog()
    await events.register(driver, dom)
    before = await node_names(vm.mon)
    await driver.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    paths = targets(await driver.domainBackupGetXMLDesc(dom))
    assert all(os.path.exists(p) for p in paths.values())
    await driver.domainAbortJob(dom)
    final = await events.wait()
    assert final["type"] == JobType.CANCELLED
    assert final["success"] is False
    assert sorted(events.block_jobs) == [
        ("vda", BlockJobType.BACKUP, BlockJobStatus.CANCELED),
        ("vdb", BlockJobType.BACKUP, BlockJobStatus.CANCELED),
    ]
    stats = await driver.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
    assert stats["type"] == JobType.CANCELLED
    assert stats["disk_processed"] < stats["disk_total"] == 32 * MiB
    # read without KEEP_COMPLETED: gone, as in libvirt
    assert await driver.domainGetJobStats(dom, JobStatsFlags.COMPLETED) == {"type": JobType.NONE}
    assert not any(os.path.exists(p) for p in paths.values()), "partial target left behind"
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    with pytest.raises(VirError) as exc:
        await driver.domainAbortJob(dom)
    assert exc.value.code == ErrorNumber.OPERATION_INVALID


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_full_target_filesystem_fails_the_backup(vm_factory, driver, tmp_path):
    vm = await vm_factory(
        [("vda", "qcow2", 32 * MiB), ("vdb", "qcow2", 16 * MiB)], fill=[(0x31, 0, 24 * MiB)]
    )
    dom = await driver.attach("vm1", vm.qmp)
    events = EventLog()
    await events.register(driver, dom)
    before = await node_names(vm.mon)
    ref = {d: await vm.snapshot(d, str(tmp_path / f"ref-{d}.raw")) for d in ("vda", "vdb")}
    with small_tmpfs(tmp_path / "full", "8m") as full:
        xml = (
            "<domainbackup><disks>"
            f"<disk name='vda'><target file='{full}/vda.qcow2'/></disk>"
            f"<disk name='vdb'><target file='{tmp_path}/vdb.qcow2'/></disk>"
            "</disks></domainbackup>"
        )
        await driver.domainBackupBegin(dom, xml, tuning={"speed": 16 * MiB})
        final = await events.wait()
        assert final["type"] == JobType.FAILED
        assert final["success"] is False
        assert "No space left on device" in final["errmsg"]
        assert ("vda", BlockJobType.BACKUP, BlockJobStatus.FAILED) in events.block_jobs
        assert os.listdir(full) == []
    assert not os.path.exists(tmp_path / "vdb.qcow2"), "the other disk's target must go too"
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    for d in ("vda", "vdb"):
        await vm.mon.qemu_io(d, "flush")
        same, msg = await imgtools.compare(ref[d], vm.disks[d].path, fmt_a="raw")
        assert same, f"source {d} changed: {msg}"


async def test_block_device_target(vm_factory, driver, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    ref = await vm.snapshot("vda", str(tmp_path / "ref.raw"))
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\0" * (16 * MiB))
    dev = (await imgtools.run(["losetup", "--find", "--show", str(backing)])).stdout.strip()
    try:
        xml = (
            "<domainbackup><disks><disk name='vda' type='block'>"
            f"<driver type='raw'/><target dev='{dev}'/></disk></disks></domainbackup>"
        )
        await driver.domainBackupBegin(dom, xml)
        assert (await wait_completed(driver, dom))["success"] is True
        assert os.path.exists(dev)
        same, msg = await imgtools.compare(ref, dev, fmt_a="raw", fmt_b="raw")
        assert same, msg
    finally:
        await imgtools.run(["losetup", "-d", dev], check=False)


async def test_second_begin_is_refused_at_once(vm_factory, driver):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    await driver.domainBackupBegin(dom, None, tuning=SLOW)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(dom, None)
    assert exc.value.code == ErrorNumber.OPERATION_INVALID
    assert loop.time() - t0 < 5  # refused, not queued behind the running job
    jobs = await vm.mon.execute("query-jobs")
    assert len(jobs) == 1
    await driver.domainAbortJob(dom)


@pytest.mark.parametrize(
    ("xml", "code"),
    [
        ("<domainbackup", ErrorNumber.XML_DETAIL),
        ("<domaincheckpoint/>", ErrorNumber.XML_ERROR),
        ("<domainbackup mode='sideways'/>", ErrorNumber.XML_INVALID_SCHEMA),
        (
            "<domainbackup><disks><disk name='vdz'/></disks></domainbackup>",
            ErrorNumber.CONFIG_UNSUPPORTED,
        ),
        (
            "<domainbackup><disks><disk name='vda' backup='no'/></disks></domainbackup>",
            ErrorNumber.CONFIG_UNSUPPORTED,
        ),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_touched(vm_factory, driver, tmp_path, xml, code):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    before = await node_names(vm.mon)
    listing = sorted(os.listdir(vm.workdir))
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(dom, xml)
    assert exc.value.code == code
    if code == ErrorNumber.CONFIG_UNSUPPORTED:
        assert "vd" in str(exc.value) or "no disks" in str(exc.value)
    assert sorted(os.listdir(vm.workdir)) == listing
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    assert dom.job is None


async def test_bad_flags_detached_and_dead_domains(vm_factory, driver):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(dom, None, None, 0x80)
    assert exc.value.code == ErrorNumber.INVALID_ARG
    assert "0x80" in str(exc.value)
    with pytest.raises(VirError) as exc:
        await driver.domainBackupGetXMLDesc(dom, 1)
    assert exc.value.code == ErrorNumber.INVALID_ARG

    await driver.detach(dom)
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(dom, None)
    assert exc.value.code == ErrorNumber.NO_DOMAIN

    dom = await driver.attach("vm1", vm.qmp)
    vm.proc.kill()
    await vm.proc.proc.wait()
    await dom.monitor.disconnected.wait()
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(dom, None)
    assert exc.value.code == ErrorNumber.OPERATION_UNSUPPORTED
    assert "vm1" in str(exc.value)


async def test_attach_to_nothing_is_a_clear_error(driver, tmp_path):
    with pytest.raises(VirError) as exc:
        await driver.attach("vm1", str(tmp_path / "no.sock"))
    assert exc.value.code == ErrorNumber.OPERATION_FAILED
    assert "no.sock" in str(exc.value)
    with pytest.raises(VirError) as exc:
        await driver.attach("../evil", str(tmp_path / "no.sock"))
    assert exc.value.code == ErrorNumber.INVALID_ARG


async def test_attach_discovers_disks(vm_factory, driver):
    vm = await vm_factory(
        [
            ("vda", "qcow2", 16 * MiB, "virtio"),
            ("sdb", "raw", 8 * MiB, "scsi", True),
            ("hdc", "qcow2", 4 * MiB, "ide"),
        ]
    )
    dom = await driver.attach("vm1", vm.qmp)
    got = {d.name: (d.path, d.format, d.size, d.readonly, d.empty) for d in dom.disks}
    assert got == {
        "vda": (vm.disks["vda"].path, "qcow2", 16 * MiB, False, False),
        "sdb": (vm.disks["sdb"].path, "raw", 8 * MiB, True, False),
        "hdc": (vm.disks["hdc"].path, "qcow2", 4 * MiB, False, False),
    }
    assert [d.node for d in dom.disks] == ["vda-fmt", "sdb-fmt", "hdc-fmt"]


async def test_qemu_dying_mid_backup_fails_the_job_and_removes_targets(vm_factory, driver):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    events = EventLog()
    await events.register(driver, dom)
    await driver.domainBackupBegin(dom, None, tuning=SLOW)
    target = targets(await driver.domainBackupGetXMLDesc(dom))["vda"]
    assert os.path.exists(target)
    vm.proc.kill()
    final = await events.wait()
    assert final["type"] == JobType.FAILED
    assert "QEMU exited" in final["errmsg"]
    assert not os.path.exists(target)
    assert dom.job is None


async def test_failure_while_preparing_rolls_back_the_other_disks(vm_factory, driver, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB), ("vdb", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    before = await node_names(vm.mon)
    xml = (
        "<domainbackup><disks>"
        f"<disk name='vda'><target file='{tmp_path}/vda.bak'/></disk>"
        f"<disk name='vdb'><target file='{tmp_path}/no/such/dir/vdb.bak'/></disk>"
        "</disks></domainbackup>"
    )
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(dom, xml)
    assert "no/such/dir/vdb.bak" in str(exc.value)
    assert not (tmp_path / "vda.bak").exists()
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    assert dom.job is None


async def test_refused_transaction_rolls_back_and_keeps_the_callers_file(
    vm_factory, driver, tmp_path
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    before = await node_names(vm.mon)
    target = tmp_path / "small.qcow2"
    await imgtools.create(str(target), 8 * MiB)  # the wrong size: QEMU refuses the job
    content = target.read_bytes()
    xml = (
        "<domainbackup><disks>"
        f"<disk name='vda'><target file='{target}'/></disk>"
        "</disks></domainbackup>"
    )
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(dom, xml, None, BackupBeginFlags.REUSE_EXTERNAL)
    assert "different sizes" in str(exc.value)
    assert target.read_bytes() == content, "a file we did not create must not change"
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    assert dom.job is None


async def test_sparse_disk_backup_follows_the_data(vm_factory, driver, tmp_path):
    # 8 GiB virtual, 3 MiB written: the target holds the data, not L2 tables for 8 GiB
    vm = await vm_factory(
        [("vda", "qcow2", 8192 * MiB)], fill=[(0x21, 0, MiB), (0x22, 5000 * MiB, 2 * MiB)]
    )
    dom = await driver.attach("vm1", vm.qmp)
    target = tmp_path / "sparse.qcow2"
    xml = (
        "<domainbackup><disks>"
        f"<disk name='vda'><target file='{target}'/></disk>"
        "</disks></domainbackup>"
    )
    events = EventLog()
    await events.register(driver, dom)
    await driver.domainBackupBegin(dom, xml)
    final = await events.wait()
    assert final["success"] is True
    assert final["disk_total"] == final["disk_processed"] == 8192 * MiB
    allocated = target.stat().st_blocks * 512
    assert allocated < 8 * MiB, f"target allocates {allocated} bytes for 3 MiB of data"
    await vm.quit()
    same, msg = await imgtools.compare(vm.disks["vda"].path, str(target))
    assert same, msg


async def test_target_that_cannot_be_formatted_is_reported_and_removed(
    vm_factory, driver, tmp_path
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    before = await node_names(vm.mon)
    with small_tmpfs(tmp_path / "full", "64k") as full:
        (full / "filler").write_bytes(b"x" * 64 * 1024)
        xml = (
            "<domainbackup><disks>"
            f"<disk name='vda'><target file='{full}/vda.qcow2'/></disk>"
            "</disks></domainbackup>"
        )
        with pytest.raises(VirError) as exc:
            await driver.domainBackupBegin(dom, xml)
        assert exc.value.code == ErrorNumber.OPERATION_FAILED
        assert "failed to format image" in str(exc.value)
        assert "No space left on device" in str(exc.value)
        assert os.listdir(full) == ["filler"]
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
