"""Incremental push backups against a real QEMU, checked byte for byte with qemu-img.

Every backup's chain, opened as it is (or, for libvirt's layout, after the rebase
libvirt's users have to do), must equal the disk at the backup's instant.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from pyvirtbackup import (
    CheckpointCreateFlags,
    CheckpointDeleteFlags,
    CheckpointXMLFlags,
    Driver,
    ErrorNumber,
    Tuning,
    VirError,
)
from pyvirtbackup.qemu import imgtools

from .conftest import MiB, TestDisk
from .drivertools import (
    NOTHING_LEFT,
    bitmaps,
    checkpoint_xml,
    leftovers,
    node_names,
    push_xml,
    run_backup,
)
from .nbd_clients import dirty_extents, nbdcopy, unix_uri

pytestmark = pytest.mark.asyncio

DISKS = ("vda", "vdb")
TWO_QCOW2 = tuple((d, "qcow2", 16 * MiB) for d in DISKS)
GRANULE = 64 * 1024

# Guest writes before each backup: (disk, pattern, offset, length). Offsets and
# lengths are chosen so the dirty 64 KiB granules can be counted by hand.
WRITES = [
    [],  # before the full backup
    [("vda", 0x21, 1 * MiB, 64 * 1024), ("vda", 0x22, 6 * MiB, MiB), ("vdb", 0x23, 0, 100 * 1024)],
    [("vda", 0x31, 1 * MiB + 32 * 1024, 64 * 1024), ("vdb", 0x32, 15 * MiB, MiB)],
    [("vda", 0x41, 12 * MiB, 64 * 1024), ("vdb", 0x42, 8 * MiB, 64 * 1024)],
]
# (label, incremental from, previous backup in the chain, granules the job copies)
STEPS = [
    ("full", None, None, None),
    ("inc1", "c1", "full", 1 + 16 + 2),
    ("inc2", "c2", "inc1", 2 + 16),
    # from c1 again: everything since the full backup, overlaps counted once
    ("inc3", "c1", "full", (2 + 16 + 1) + (2 + 16 + 1)),
]


def _targets(bdir, label: str) -> dict[str, str]:
    return {d: str(bdir / f"{d}.{label}.qcow2") for d in DISKS}


async def _assert_equal(image: str, reference: str) -> None:
    same, message = await imgtools.compare(image, reference, fmt_b="raw")
    assert same, f"{image} differs from {reference}: {message}"


async def _assert_backups_are_the_disks(vm, bdir, label: str) -> None:
    """Each disk's backup ``label``, opened with its chain, equals the disk now."""
    for d in DISKS:
        ref = await vm.snapshot(d, str(bdir / f"{d}.{label}.ref"))
        await _assert_equal(str(bdir / f"{d}.{label}.qcow2"), ref)


async def _full_backup_then_quit(vm_factory, tmp_path, writes=()):
    """A VM whose full backup made c1, then ``writes``, then a clean quit (which stores
    c1's bitmaps, with what they recorded, in the images)."""
    vm = await vm_factory(TWO_QCOW2)
    bdir = tmp_path / "backups"
    bdir.mkdir()
    state = tmp_path / "state"
    async with Driver(state_dir=state) as driver:
        dom = await driver.attach("vm1", vm.qmp)
        await run_backup(driver, dom, push_xml(_targets(bdir, "full")), checkpoint_xml("c1"))
    for write in writes:
        await vm.write(*write)
    await vm.quit()
    return vm, bdir, state


@pytest.mark.parametrize("layout", ["pvb-backing", "libvirt-then-rebase"])
async def test_chain_of_incrementals_equals_the_disk_at_each_instant(vm_factory, tmp_path, layout):
    vm = await vm_factory(TWO_QCOW2)
    bdir = tmp_path / "backups"
    bdir.mkdir()
    async with Driver(state_dir=tmp_path / "state") as driver:
        dom = await driver.attach("vm1", vm.qmp)
        for i, (label, since, prev, granules) in enumerate(STEPS):
            for disk, pattern, offset, length in WRITES[i]:
                await vm.write(disk, pattern, offset, length)
            backing = None
            if prev and layout == "pvb-backing":
                backing = {d: f"{d}.{prev}.qcow2" for d in DISKS}
            xml = push_xml(_targets(bdir, label), incremental=since, backing=backing)
            stats = await run_backup(driver, dom, xml, checkpoint_xml(f"c{i + 1}"))
            assert stats["success"], stats
            if granules is not None:  # only the dirty granules were copied
                assert stats["disk_total"] == granules * GRANULE
            for d in DISKS:
                await vm.snapshot(d, str(bdir / f"{d}.{label}.ref"))
            for node in ("vda-fmt", "vdb-fmt"):  # the temporary bitmaps are gone
                assert not [b for b in (await bitmaps(vm.mon))[node] if b.startswith("backup-")]
        assert [c.name for c in await driver.domainListAllCheckpoints(dom)] == [
            "c1",
            "c2",
            "c3",
            "c4",
        ]

    for label, _since, prev, _ in STEPS:
        for d in DISKS:
            target = str(bdir / f"{d}.{label}.qcow2")
            header = await imgtools.info(target)
            if prev is None:
                assert "backing-filename" not in header
            elif layout == "pvb-backing":
                assert header["backing-filename"] == f"{d}.{prev}.qcow2"
            else:  # libvirt records the live disk; its users rebase by hand
                assert header["backing-filename"] == vm.disks[d].path
                await imgtools.rebase_unsafe(target, f"{d}.{prev}.qcow2")
            await _assert_equal(target, str(bdir / f"{d}.{label}.ref"))


async def test_refused_incrementals_touch_nothing_and_new_disks_go_full(vm_factory, tmp_path):
    vm = await vm_factory(TWO_QCOW2)
    bdir = tmp_path / "backups"
    bdir.mkdir()
    async with Driver(state_dir=tmp_path / "state") as driver:
        dom = await driver.attach("vm1", vm.qmp)
        # c1 covers vda only, as if vdb had been plugged in later
        full = {"vda": str(bdir / "vda.full.qcow2")}
        await run_backup(driver, dom, push_xml(full), checkpoint_xml("c1", ["vda"]))
        await vm.write("vda", 0x51, 2 * MiB, 3 * 64 * 1024)
        await vm.write("vdb", 0x52, 5 * MiB, MiB)

        before = (await node_names(vm.mon), await bitmaps(vm.mon), sorted(os.listdir(bdir)))
        inc = _targets(bdir, "inc")

        async def refused(code: int, xml: str, *parts: str) -> None:
            with pytest.raises(VirError) as exc:
                await driver.domainBackupBegin(dom, xml)
            assert exc.value.code == code, exc.value.message
            for part in parts:
                assert part in exc.value.message, exc.value.message
            after = (await node_names(vm.mon), await bitmaps(vm.mon), sorted(os.listdir(bdir)))
            assert after == before
            assert dom.job is None

        await refused(
            ErrorNumber.CHECKPOINT_INCONSISTENT,
            push_xml(inc, incremental="c1"),
            "missing or broken bitmap 'c1' for disk 'vdb'",
            "does not cover disk 'vdb'",
            "backupmode='full'",
        )
        await refused(
            ErrorNumber.NO_DOMAIN_CHECKPOINT,
            push_xml(inc, incremental="nope"),
            "Checkpoint 'nope' for incremental backup of disk 'vda' not found",
        )
        await refused(
            ErrorNumber.INVALID_ARG,
            push_xml(
                inc, incremental="c1", backing={"vda": "nothere.qcow2"}, modes={"vdb": "full"}
            ),
            "backing file 'nothere.qcow2' for the backup of disk 'vda' does not exist",
        )
        await refused(
            ErrorNumber.CONFIG_UNSUPPORTED,
            push_xml(
                inc, incremental="c1", backing={"vdb": "vda.full.qcow2"}, modes={"vdb": "full"}
            ),
            "a backing file for the target of disk 'vdb' needs an incremental backup",
        )

        # the way libvirt's per-disk backupmode is meant for: the new disk in full
        # (and the checkpoint named per disk this time, not for the whole backup)
        xml = (
            "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'><disks>"
            f"<disk name='vda' incremental='c1'><target file='{inc['vda']}'"
            " pvb:backing='vda.full.qcow2'/></disk>"
            f"<disk name='vdb' backupmode='full'><target file='{inc['vdb']}'/></disk>"
            "</disks></domainbackup>"
        )
        stats = await run_backup(driver, dom, xml)
        assert stats["success"]
        assert stats["disk_total"] == 3 * GRANULE + 16 * MiB  # vda's dirty part, all of vdb
        await _assert_backups_are_the_disks(vm, bdir, "inc")


@pytest.mark.parametrize("keep", [False, True], ids=["drop-checkpoint", "libvirt-keeps-it"])
async def test_temporary_bitmap_goes_when_the_backup_is_aborted(vm_factory, tmp_path, keep):
    vm = await vm_factory(TWO_QCOW2)
    bdir = tmp_path / "backups"
    bdir.mkdir()
    async with Driver(state_dir=tmp_path / "state", keep_failed_checkpoints=keep) as driver:
        dom = await driver.attach("vm1", vm.qmp)
        await run_backup(driver, dom, push_xml(_targets(bdir, "full")), checkpoint_xml("c1"))
        await vm.write("vda", 0x61, 0, 4 * MiB)
        await driver.domainBackupBegin(
            dom,
            push_xml(_targets(bdir, "inc"), incremental="c1"),
            checkpoint_xml("c2"),
            tuning=Tuning(speed=64 * 1024),
        )
        # the job's temporary bitmap (on the fleecing view the job reads)
        assert any("backup-vda" in found for found in (await bitmaps(vm.mon)).values())
        await driver.domainAbortJob(dom)
        found = await bitmaps(vm.mon)
        # libvirt keeps the checkpoint of a cancelled push; by default we drop it, so
        # that no incremental is ever based on an instant nothing was saved at
        expected = ["c1", "c2"] if keep else ["c1"]
        assert sorted(found["vda-fmt"]) == expected
        assert sorted(found["vdb-fmt"]) == expected
        names = [c.name for c in await driver.domainListAllCheckpoints(dom)]
        assert sorted(names) == expected
        current = "c2" if keep else "c1"
        assert dom.checkpoints.current == current
        assert not any(p.name.startswith("vda.inc") for p in bdir.iterdir())


async def test_generated_targets_are_named_after_the_checkpoint(vm_factory, tmp_path):
    vm = await vm_factory(TWO_QCOW2)
    async with Driver(state_dir=tmp_path / "state") as driver:
        dom = await driver.attach("vm1", vm.qmp)
        await run_backup(driver, dom, None, checkpoint_xml("c1"))
        for d in DISKS:
            assert os.path.exists(f"{vm.disks[d].path}.c1")


async def test_sigkilled_qemu_is_refused_until_the_way_out_is_taken(vm_factory, tmp_path, caplog):
    vm, bdir, state = await _full_backup_then_quit(vm_factory, tmp_path)
    vm = await vm_factory(existing=vm.disks)
    async with Driver(state_dir=state) as driver:
        dom = await driver.attach("vm1", vm.qmp)
        await vm.write("vda", 0x71, 0, MiB)
        await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c2"))  # never stored
        await vm.write("vdb", 0x72, MiB, MiB)
        vm.proc.kill()
        await vm.proc.proc.wait()
    await vm.mon.close()

    vm = await vm_factory(existing=vm.disks)
    async with Driver(state_dir=state) as driver:
        dom = await driver.attach("vm1", vm.qmp)
        assert [c.name for c in await driver.domainListAllCheckpoints(dom)] == ["c1", "c2"]
        before = (await node_names(vm.mon), await bitmaps(vm.mon), sorted(os.listdir(bdir)))
        assert sorted(before[1]["vda-fmt"]) == ["c1"]
        assert before[1]["vda-fmt"]["c1"]["inconsistent"]
        problems = {"c1": "marked inconsistent", "c2": "missing from the disk's top image"}
        for since, problem in problems.items():
            with pytest.raises(VirError) as exc:
                await driver.domainBackupBegin(
                    dom, push_xml(_targets(bdir, "inc"), incremental=since), checkpoint_xml("c3")
                )
            err = exc.value
            assert err.code == ErrorNumber.CHECKPOINT_INCONSISTENT
            assert f"missing or broken bitmap '{since}' for disk 'vda'" in err.message
            assert problem in err.message and "Way out" in err.message
            assert "METADATA_ONLY" in err.message and "full backup" in err.message
        after = (await node_names(vm.mon), await bitmaps(vm.mon), sorted(os.listdir(bdir)))
        assert after == before
        assert "c3" not in dom.checkpoints
        # SIZE cannot be measured on a broken chain: no size, no error
        c1 = await driver.domainCheckpointLookupByName(dom, "c1")
        assert "size=" not in await driver.domainCheckpointGetXMLDesc(c1, CheckpointXMLFlags.SIZE)

        # way out 1: METADATA_ONLY, then the broken bitmaps by hand, as the message says
        await driver.domainCheckpointDelete(c1, CheckpointDeleteFlags.METADATA_ONLY)
        for node in ("vda-fmt", "vdb-fmt"):
            await vm.mon.execute("block-dirty-bitmap-remove", {"node": node, "name": "c1"})
        # way out 2: a plain delete, which shrugs off bitmaps that are gone
        c2 = await driver.domainCheckpointLookupByName(dom, "c2")
        with caplog.at_level(logging.WARNING, logger="pyvirtbackup"):
            await driver.domainCheckpointDelete(c2)
        assert "bitmap 'c2' was already missing from disk 'vda'" in caplog.text
        assert await bitmaps(vm.mon) == {}
        assert await driver.domainListAllCheckpoints(dom) == []

        # then a full backup with a new checkpoint, and incrementals work again
        await run_backup(driver, dom, push_xml(_targets(bdir, "full2")), checkpoint_xml("c3"))
        await vm.write("vda", 0x73, 7 * MiB, 64 * 1024)
        xml = push_xml(
            _targets(bdir, "inc"),
            incremental="c3",
            backing={d: f"{d}.full2.qcow2" for d in DISKS},
        )
        stats = await run_backup(driver, dom, xml, checkpoint_xml("c4"))
        assert stats["success"] and stats["disk_total"] == GRANULE
        await _assert_backups_are_the_disks(vm, bdir, "inc")


async def test_clean_restart_keeps_bitmaps_recording_for_the_next_incremental(vm_factory, tmp_path):
    vm, bdir, state = await _full_backup_then_quit(
        vm_factory, tmp_path, [("vda", 0x81, 3 * MiB, MiB)]
    )
    vm2 = await vm_factory(existing=vm.disks)
    await vm2.write("vdb", 0x82, 13 * MiB, 64 * 1024)  # while no driver is attached
    async with Driver(state_dir=state) as driver:
        dom = await driver.attach("vm1", vm2.qmp)
        xml = push_xml(
            _targets(bdir, "inc"),
            incremental="c1",
            backing={d: f"{d}.full.qcow2" for d in DISKS},
        )
        stats = await run_backup(driver, dom, xml, checkpoint_xml("c2"))
        assert stats["disk_total"] == 16 * GRANULE + GRANULE
        await _assert_backups_are_the_disks(vm2, bdir, "inc")


async def _qemu_img(*args: str) -> None:
    await imgtools.run(["qemu-img", *args])


async def test_bitmaps_in_backing_layers_are_merged_measured_and_deleted(
    vm_factory, tmp_path, caplog
):
    """A checkpoint whose bitmap lives in the top image and its backing image."""
    work = tmp_path / "chain"
    work.mkdir()
    base, top = str(work / "base.qcow2"), str(work / "top.qcow2")
    await imgtools.create(base, 16 * MiB)
    await imgtools.write_pattern(base, "qcow2", [(0x11, 0, 2 * MiB)])
    # the full backup at c1's instant, then writes recorded by c1 in each layer
    full = str(work / "full.qcow2")
    await imgtools.convert(base, full, src_fmt="qcow2")
    await _qemu_img("bitmap", "--add", base, "c1")
    await imgtools.write_pattern(base, "qcow2", [(0x12, 4 * MiB, 64 * 1024)])
    await _qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    await _qemu_img("bitmap", "--add", top, "c1")
    await imgtools.write_pattern(top, "qcow2", [(0x13, 8 * MiB, 128 * 1024)])

    disk = TestDisk("vda", top, "qcow2", 16 * MiB, backing=((base, "qcow2"),))
    vm = await vm_factory(existing={"vda": disk})
    async with Driver(state_dir=tmp_path / "state") as driver:
        dom = await driver.attach("vm1", vm.qmp)
        assert dom.disks[0].chain == ["vda-fmt", "vda-b1-fmt"]
        chk = await driver.domainCheckpointCreateXML(
            dom,
            "<domaincheckpoint><name>c1</name><creationTime>1</creationTime>"
            "<disks><disk name='vda'/></disks></domaincheckpoint>",
            CheckpointCreateFlags.REDEFINE | CheckpointCreateFlags.REDEFINE_VALIDATE,
        )
        xml = await driver.domainCheckpointGetXMLDesc(chk, CheckpointXMLFlags.SIZE)
        assert f"size='{3 * GRANULE}'" in xml  # one granule in base, two in top

        inc = str(work / "inc.qcow2")
        xml = push_xml({"vda": inc}, incremental="c1", backing={"vda": "full.qcow2"})
        stats = await run_backup(driver, dom, xml)
        assert stats["disk_total"] == 3 * GRANULE
        await vm.snapshot("vda", str(work / "ref"))
        await _assert_equal(inc, str(work / "ref"))

        await driver.domainCheckpointDelete(chk)
        assert await bitmaps(vm.mon) == {}
        ro = {n["node-name"]: n["ro"] for n in await vm.mon.execute("query-named-block-nodes")}
        assert ro["vda-b1-fmt"] and ro["vda-b1-file"] and not ro["vda-fmt"]
        await vm.write("vda", 0x14, 0, 64 * 1024)  # the disk still works
    await vm.quit()
    for image in (top, base):
        info = await imgtools.info(image)
        assert "bitmaps" not in info["format-specific"]["data"], image

    # a backing image QEMU opened by itself (from the header) cannot be reopened:
    # the delete removes what it can and says what stays
    for image in (top, base):
        await _qemu_img("bitmap", "--add", image, "c2")
    vm = await vm_factory(existing={"vda": dataclasses.replace(disk, backing=())})
    async with Driver(state_dir=tmp_path / "state2") as driver:
        dom = await driver.attach("vm1", vm.qmp)
        chk = await driver.domainCheckpointCreateXML(
            dom,
            "<domaincheckpoint><name>c2</name><creationTime>1</creationTime>"
            "<disks><disk name='vda'/></disks></domaincheckpoint>",
            CheckpointCreateFlags.REDEFINE,
        )
        with caplog.at_level(logging.WARNING, logger="pyvirtbackup"):
            await driver.domainCheckpointDelete(chk)
        assert f"bitmap 'c2' stays in backing image {base}" in caplog.text
        assert f"qemu-img bitmap --remove {base} c2" in caplog.text
        left = await bitmaps(vm.mon)
        assert "vda-fmt" not in left and [list(b) for b in left.values()] == [["c2"]]


async def test_pull_incremental_exports_the_writes_since_the_checkpoint(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    original = await node_names(vm.mon)
    async with Driver(state_dir=tmp_path / "state") as driver:
        dom = await driver.attach("vm1", vm.qmp)
        full = str(tmp_path / "vda.full.qcow2")
        await run_backup(driver, dom, push_xml({"vda": full}), checkpoint_xml("c1"))
        await vm.write("vda", 0x91, 2 * MiB, 64 * 1024)
        await vm.write("vda", 0x92, 9 * MiB + 4096, 8192)

        sock = str(tmp_path / "nbd.sock")
        xml = (
            "<domainbackup mode='pull'><incremental>c1</incremental>"
            f"<server transport='unix' socket='{sock}'/><disks><disk name='vda'>"
            f"<scratch file='{tmp_path / 'scratch.qcow2'}'/></disk></disks></domainbackup>"
        )
        await driver.domainBackupBegin(dom, xml, checkpoint_xml("c2"))
        await vm.snapshot("vda", str(tmp_path / "ref"))
        await vm.write("vda", 0x93, 0, 64 * 1024)  # after the instant: c2's, not c1's
        desc = await driver.domainBackupGetXMLDesc(dom)
        assert "incremental='c1'" in desc and "exportbitmap='backup-vda'" in desc

        uri = unix_uri(sock, "vda")
        extents = await dirty_extents(uri, "qemu:dirty-bitmap:backup-vda")
        assert extents == [(2 * MiB, 64 * 1024), (9 * MiB, 64 * 1024)]
        await nbdcopy(uri, str(tmp_path / "export.raw"))
        c2 = await driver.domainCheckpointLookupByName(dom, "c2")
        assert "size='65536'" in await driver.domainCheckpointGetXMLDesc(
            c2, CheckpointXMLFlags.SIZE
        )
        await driver.domainAbortJob(dom)
        assert await leftovers(vm.mon, original) == NOTHING_LEFT
    await _assert_equal(str(tmp_path / "export.raw"), str(tmp_path / "ref"))
