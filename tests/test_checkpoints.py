"""The checkpoint API against a real QEMU: bitmaps, tree, metadata, errors, redefine."""

from __future__ import annotations

import logging

import pytest
import pytest_asyncio
from lxml import etree

from pyvirtbackup import (
    CheckpointCreateFlags,
    CheckpointDeleteFlags,
    CheckpointListFlags,
    CheckpointXMLFlags,
    Driver,
    ErrorDomain,
    ErrorNumber,
    VirError,
)
from pyvirtbackup.checkpoints import Checkpoint
from pyvirtbackup.qemu import imgtools

from .conftest import MiB
from .drivertools import bitmaps, checkpoint_xml

pytestmark = pytest.mark.asyncio

TWO_QCOW2 = (("vda", "qcow2", 16 * MiB), ("vdb", "qcow2", 16 * MiB))


@pytest_asyncio.fixture
async def env(vm_factory, tmp_path):
    vm = await vm_factory(TWO_QCOW2)
    driver = Driver(state_dir=tmp_path / "state")
    dom = await driver.attach("vm1", vm.qmp)
    yield vm, driver, dom
    await driver.close()


async def _names(driver, dom, flags=0):
    return [c.name for c in await driver.domainListAllCheckpoints(dom, flags)]


async def _raises(code, coro, *parts):
    with pytest.raises(VirError) as exc:
        await coro
    assert exc.value.code == code, exc.value.message
    for part in parts:
        assert part in exc.value.message, exc.value.message
    return exc.value


async def test_create_builds_a_tree_of_recording_persistent_bitmaps(env, tmp_path):
    vm, driver, dom = env
    c1 = await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
    assert isinstance(c1, Checkpoint) and c1.name == "c1" and c1.domain is dom
    await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c2"))
    c3 = await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c3"))

    found = await bitmaps(vm.mon)
    for node in ("vda-fmt", "vdb-fmt"):
        assert sorted(found[node]) == ["c1", "c2", "c3"]
        for bm in found[node].values():
            assert bm["recording"] and bm["persistent"] and not bm.get("inconsistent")

    assert await _names(driver, dom) == ["c1", "c2", "c3"]
    assert await _names(driver, dom, CheckpointListFlags.ROOTS) == ["c1"]
    assert await _names(driver, dom, CheckpointListFlags.LEAVES) == ["c3"]
    assert await driver.domainCheckpointLookupByName(dom, "c3") == c3
    assert (await driver.domainCheckpointGetParent(c3)).name == "c2"
    children = await driver.domainCheckpointListAllChildren(c1, CheckpointListFlags.DESCENDANTS)
    assert [c.name for c in children] == ["c2", "c3"]
    await _raises(
        ErrorNumber.NO_DOMAIN_CHECKPOINT,
        driver.domainCheckpointGetParent(c1),
        "checkpoint 'c1' does not have a parent",
    )
    await _raises(
        ErrorNumber.NO_DOMAIN_CHECKPOINT,
        driver.domainCheckpointLookupByName(dom, "nope"),
        "no domain checkpoint with matching name 'nope'",
    )

    xml = etree.fromstring((await driver.domainCheckpointGetXMLDesc(c3)).encode())
    assert xml.findtext("parent/name") == "c2"
    assert [(d.get("name"), d.get("checkpoint"), d.get("bitmap")) for d in xml.iter("disk")][
        :2
    ] == [("vda", "bitmap", "c3"), ("vdb", "bitmap", "c3")]
    assert xml.find("domain/uuid").text == dom.uuid
    no_domain = await driver.domainCheckpointGetXMLDesc(c3, CheckpointXMLFlags.NO_DOMAIN)
    assert "<domain " not in no_domain and "<disks>" in no_domain
    stored = tmp_path / "state" / "domains" / "vm1" / "checkpoints" / "c3.xml"
    assert stored.read_text() == await driver.domainCheckpointGetXMLDesc(
        c3, CheckpointXMLFlags.SECURE
    )


async def test_refusals_leave_nothing_behind(vm_factory, tmp_path):
    vm = await vm_factory(
        (("vda", "qcow2", 16 * MiB), ("vdb", "qcow2", 16 * MiB), ("vdc", "raw", 16 * MiB))
    )
    async with Driver(state_dir=tmp_path / "state") as driver:
        dom = await driver.attach("vm1", vm.qmp)
        create = driver.domainCheckpointCreateXML
        await _raises(
            ErrorNumber.CONFIG_UNSUPPORTED,
            create(dom, checkpoint_xml("c1")),
            "checkpoint for disk vdc unsupported for storage type raw",
        )
        await _raises(ErrorNumber.XML_INVALID_SCHEMA, create(dom, checkpoint_xml("../x")), "'../x'")
        await _raises(
            ErrorNumber.CONFIG_UNSUPPORTED,
            create(dom, checkpoint_xml("c1", ["vda", "vdz"])),
            "no disk named 'vdz'",
        )
        await _raises(
            ErrorNumber.CONFIG_UNSUPPORTED,
            create(
                dom,
                "<domaincheckpoint><name>c1</name><disks>"
                "<disk name='vda' bitmap='other'/></disks></domaincheckpoint>",
            ),
            "bitmap for disk 'vda' must match checkpoint name 'c1'",
        )
        await _raises(
            ErrorNumber.INVALID_ARG,
            create(dom, checkpoint_xml("c1", ["vda"]), CheckpointCreateFlags.QUIESCE),
            "unsupported flags (0x2)",
        )
        await _raises(
            ErrorNumber.INVALID_ARG,
            create(
                dom,
                checkpoint_xml("c1"),
                CheckpointCreateFlags.REDEFINE | CheckpointCreateFlags.QUIESCE,
            ),
            "mutually exclusive",
        )
        await _raises(
            ErrorNumber.INVALID_ARG,
            create(dom, checkpoint_xml("c1"), CheckpointCreateFlags.REDEFINE_VALIDATE),
            "is required by flag",
        )
        assert await bitmaps(vm.mon) == {}
        assert await _names(driver, dom) == []
        assert not (tmp_path / "state" / "domains" / "vm1" / "checkpoints").exists()

        # the raw disk left out, it works; the name is then taken
        ok = await create(dom, checkpoint_xml("c1", ["vda", "vdb"]))
        await _raises(
            ErrorNumber.OPERATION_FAILED,
            create(dom, checkpoint_xml("c1", ["vda"])),
            "domain moment c1 already exists",
        )
        assert sorted(await bitmaps(vm.mon)) == ["vda-fmt", "vdb-fmt"]
        xml = await driver.domainCheckpointGetXMLDesc(ok, CheckpointXMLFlags.NO_DOMAIN)
        assert "<disk name='vdc' checkpoint='no'/>" in xml

        # a stray bitmap of the same name (left by someone else) is named, not tripped on
        await vm.mon.execute(
            "block-dirty-bitmap-add", {"node": "vdb-fmt", "name": "c2", "persistent": True}
        )
        err = await _raises(
            ErrorNumber.OPERATION_FAILED,
            create(dom, checkpoint_xml("c2", ["vda", "vdb"])),
            "disk 'vdb' already has a bitmap named 'c2'",
            "block-dirty-bitmap-remove",
        )
        assert "belongs to no checkpoint" in err.message
        assert "c2" not in (await bitmaps(vm.mon))["vda-fmt"]

        await vm.quit()
        await _raises(
            ErrorNumber.OPERATION_UNSUPPORTED,
            create(dom, checkpoint_xml("c3", ["vda"])),
            "cannot create checkpoint for inactive domain",
        )


async def test_size_counts_bytes_written_since_the_checkpoint(env):
    vm, driver, dom = env
    await vm.write("vda", 0x21, 1 * MiB, 64 * 1024)  # before: not counted
    c1 = await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
    await vm.write("vda", 0x22, 4 * MiB, 1 * MiB)
    await vm.write("vda", 0x33, 10 * MiB, 100 * 1024)  # two 64 KiB granules
    await vm.write("vda", 0x34, 4 * MiB + 4096, 4096)  # inside an already dirty granule
    await vm.write("vdb", 0x44, 3 * 64 * 1024 - 512, 1024)  # straddles two granules

    xml = await driver.domainCheckpointGetXMLDesc(
        c1, CheckpointXMLFlags.SIZE | CheckpointXMLFlags.NO_DOMAIN
    )
    sizes = {d.get("name"): int(d.get("size")) for d in etree.fromstring(xml.encode()).iter("disk")}
    assert sizes == {"vda": 1 * MiB + 128 * 1024, "vdb": 128 * 1024}
    plain = await driver.domainCheckpointGetXMLDesc(c1, CheckpointXMLFlags.NO_DOMAIN)
    assert "size=" not in plain
    assert sorted((await bitmaps(vm.mon))["vda-fmt"]) == ["c1"]  # the temporary one is gone

    # a temporary bitmap left by a crash in the middle is cleared first
    await vm.mon.execute(
        "block-dirty-bitmap-add", {"node": "vda-fmt", "name": "pvb-tmp-size", "disabled": True}
    )
    xml = await driver.domainCheckpointGetXMLDesc(c1, CheckpointXMLFlags.SIZE)
    assert f"size='{1 * MiB + 128 * 1024}'" in xml
    assert sorted((await bitmaps(vm.mon))["vda-fmt"]) == ["c1"]


async def test_delete_reparents_moves_current_and_removes_bitmaps(env):
    vm, driver, dom = env
    create = driver.domainCheckpointCreateXML
    c1 = await create(dom, checkpoint_xml("c1"))
    c2 = await create(dom, checkpoint_xml("c2"))
    c3 = await create(dom, checkpoint_xml("c3"))
    assert dom.checkpoints.current == "c3"

    assert await driver.domainCheckpointDelete(c2) == 0
    assert (await driver.domainCheckpointGetParent(c3)) == c1
    assert dom.checkpoints.current == "c3"
    for node in ("vda-fmt", "vdb-fmt"):
        assert sorted((await bitmaps(vm.mon))[node]) == ["c1", "c3"]
    await _raises(ErrorNumber.NO_DOMAIN_CHECKPOINT, driver.domainCheckpointGetXMLDesc(c2), "c2")

    await driver.domainCheckpointDelete(c3)  # current: its parent takes over
    assert dom.checkpoints.current == "c1"
    c4 = await create(dom, checkpoint_xml("c4"))
    assert (await driver.domainCheckpointGetParent(c4)) == c1

    # METADATA_ONLY leaves the bitmaps alone
    await driver.domainCheckpointDelete(c4, CheckpointDeleteFlags.METADATA_ONLY)
    assert sorted((await bitmaps(vm.mon))["vda-fmt"]) == ["c1", "c4"]
    assert await _names(driver, dom) == ["c1"]

    # CHILDREN_ONLY keeps the checkpoint and makes it current; CHILDREN takes all
    for name in ("c5", "c6"):
        await create(dom, checkpoint_xml(name))
    await driver.domainCheckpointDelete(c1, CheckpointDeleteFlags.CHILDREN_ONLY)
    assert await _names(driver, dom) == ["c1"]
    assert dom.checkpoints.current == "c1"
    await create(dom, checkpoint_xml("c7"))
    await driver.domainCheckpointDelete(c1, CheckpointDeleteFlags.CHILDREN)
    assert await _names(driver, dom) == []
    assert dom.checkpoints.current is None
    assert sorted((await bitmaps(vm.mon))["vda-fmt"]) == ["c4"]  # only the one we kept
    await _raises(
        ErrorNumber.INVALID_ARG,
        driver.domainCheckpointDelete(
            c1, CheckpointDeleteFlags.CHILDREN | CheckpointDeleteFlags.CHILDREN_ONLY
        ),
        "mutually exclusive",
    )


async def test_delete_with_a_bitmap_already_gone_says_so_and_finishes(env, caplog):
    vm, driver, dom = env
    c1 = await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
    await vm.mon.execute("block-dirty-bitmap-remove", {"node": "vdb-fmt", "name": "c1"})
    with caplog.at_level(logging.WARNING, logger="pyvirtbackup"):
        await driver.domainCheckpointDelete(c1)
    assert "bitmap 'c1' was already missing from disk 'vdb'" in caplog.text
    assert await bitmaps(vm.mon) == {}
    assert await _names(driver, dom) == []


async def test_redefine_restores_the_tree_and_validate_checks_bitmaps(env):
    vm, driver, dom = env
    create = driver.domainCheckpointCreateXML
    saved = {}
    for name in ("c1", "c2", "c3"):
        chk = await create(dom, checkpoint_xml(name))
        saved[name] = await driver.domainCheckpointGetXMLDesc(chk, CheckpointXMLFlags.SECURE)
    for name in ("c3", "c2", "c1"):
        await driver.domainCheckpointDelete(
            await driver.domainCheckpointLookupByName(dom, name),
            CheckpointDeleteFlags.METADATA_ONLY,
        )
    assert await _names(driver, dom) == [] and dom.checkpoints.current is None

    redefine = CheckpointCreateFlags.REDEFINE
    validate = redefine | CheckpointCreateFlags.REDEFINE_VALIDATE
    await create(dom, saved["c1"], validate)
    await create(dom, saved["c2"], redefine)
    c3 = await create(dom, saved["c3"], validate)
    assert await _names(driver, dom) == ["c1", "c2", "c3"]
    assert dom.checkpoints.current == "c3"
    assert (await driver.domainCheckpointGetParent(c3)).name == "c2"
    assert await driver.domainCheckpointGetXMLDesc(c3, CheckpointXMLFlags.SECURE) == saved["c3"]
    # redefining a known one replaces its definition and keeps its children
    await create(
        dom,
        saved["c2"]
        .replace("</domaincheckpoint>", "")
        .replace("<creationTime>", "<description>edited</description><creationTime>")
        + "</domaincheckpoint>",
        redefine,
    )
    assert await _names(driver, dom) == ["c1", "c2", "c3"]
    assert "edited" in await driver.domainCheckpointGetXMLDesc(
        await driver.domainCheckpointLookupByName(dom, "c2")
    )

    await driver.domainCheckpointDelete(c3, CheckpointDeleteFlags.METADATA_ONLY)
    await vm.mon.execute("block-dirty-bitmap-remove", {"node": "vdb-fmt", "name": "c3"})
    await _raises(
        ErrorNumber.CHECKPOINT_INCONSISTENT,
        create(dom, saved["c3"], validate),
        "missing or broken bitmap 'c3' for disk 'vdb'",
        "was not redefined",
    )
    assert await _names(driver, dom) == ["c1", "c2"]
    await _raises(
        ErrorNumber.INVALID_ARG,
        create(
            dom, saved["c3"].replace(dom.uuid, "00000000-0000-0000-0000-000000000001"), redefine
        ),
        f"must use uuid {dom.uuid}",
    )
    await _raises(
        ErrorNumber.XML_ERROR,
        create(
            dom, "<domaincheckpoint><creationTime>1</creationTime></domaincheckpoint>", redefine
        ),
        "a redefined checkpoint must have a name",
    )
    await _raises(
        ErrorNumber.INTERNAL_ERROR,
        create(dom, "<domaincheckpoint><name>x</name></domaincheckpoint>", redefine),
        "missing creationTime",
    )


async def test_checkpoints_survive_qemu_restart_and_a_new_driver(vm_factory, tmp_path):
    vm = await vm_factory(TWO_QCOW2)
    state = tmp_path / "state"
    async with Driver(state_dir=state) as driver:
        dom = await driver.attach("vm1", vm.qmp)
        for name in ("c1", "c2", "c3"):
            await driver.domainCheckpointCreateXML(dom, checkpoint_xml(name))
        await driver.domainCheckpointDelete(await driver.domainCheckpointLookupByName(dom, "c3"))
        uuid = dom.uuid
    await vm.quit()
    for disk in vm.disks.values():
        info = await imgtools.info(disk.path)
        names = [b["name"] for b in info["format-specific"]["data"]["bitmaps"]]
        assert sorted(names) == ["c1", "c2"]

    vm2 = await vm_factory(existing=vm.disks)
    async with Driver(state_dir=state) as driver:
        dom = await driver.attach("vm1", vm2.qmp)
        assert dom.uuid == uuid
        assert await _names(driver, dom) == ["c1", "c2"]
        assert dom.checkpoints.current == "c2"
        c4 = await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c4"))
        assert (await driver.domainCheckpointGetParent(c4)).name == "c2"
        found = await bitmaps(vm2.mon)
        for bm in found["vda-fmt"].values():
            assert bm["recording"] and not bm.get("inconsistent")
        assert sorted(found["vda-fmt"]) == ["c1", "c2", "c4"]


async def test_names_of_our_temporary_bitmaps_are_refused(env, tmp_path):
    """'pvb-tmp-size' (SIZE's) and 'backup-<disk>' (a push incremental's) are valid
    libvirt names; as checkpoints, SIZE removed the first's bitmap as a leftover of
    its own and the second broke push incrementals of that disk."""
    vm, driver, dom = env
    create = driver.domainCheckpointCreateXML
    for name in ("pvb-tmp-size", "backup-vda", "pvb-anything"):
        await _raises(
            ErrorNumber.CONFIG_UNSUPPORTED,
            create(dom, checkpoint_xml(name)),
            f"checkpoint name '{name}' is reserved",
            "pyvirtbackup's temporary bitmaps",
        )
    # REDEFINE too: a redefined checkpoint's bitmap is merged and deleted by name
    c1 = await create(dom, checkpoint_xml("c1"))
    saved = await driver.domainCheckpointGetXMLDesc(c1, CheckpointXMLFlags.SECURE)
    redefine = CheckpointCreateFlags.REDEFINE
    await _raises(
        ErrorNumber.CONFIG_UNSUPPORTED,
        create(dom, saved.replace("<name>c1</name>", "<name>pvb-tmp-size</name>"), redefine),
        "checkpoint name 'pvb-tmp-size' is reserved",
    )
    await _raises(
        ErrorNumber.CONFIG_UNSUPPORTED,
        create(dom, saved.replace("bitmap='c1'", "bitmap='backup-vda'", 1), redefine),
        "bitmap name 'backup-vda' is reserved",
    )
    # and the checkpoint of a backup begin
    target = tmp_path / "vda.bak"
    await _raises(
        ErrorNumber.CONFIG_UNSUPPORTED,
        driver.domainBackupBegin(
            dom,
            f"<domainbackup><disks><disk name='vda'><target file='{target}'/></disk>"
            "<disk name='vdb' backup='no'/></disks></domainbackup>",
            checkpoint_xml("backup-vdb"),
        ),
        "checkpoint name 'backup-vdb' is reserved",
    )
    assert dom.job is None and not target.exists()
    assert await _names(driver, dom) == ["c1"]
    assert {n: sorted(b) for n, b in (await bitmaps(vm.mon)).items()} == {
        "vda-fmt": ["c1"],
        "vdb-fmt": ["c1"],
    }


async def test_size_keeps_a_bitmap_named_like_its_temporary_one_that_is_not_ours(env, caplog):
    """A persistent 'pvb-tmp-size' (made by hand, or by a checkpoint from before the
    names were reserved) is someone's data: SIZE leaves it and gives no size there."""
    vm, driver, dom = env
    c1 = await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
    await vm.mon.execute(
        "block-dirty-bitmap-add", {"node": "vda-fmt", "name": "pvb-tmp-size", "persistent": True}
    )
    await vm.write("vda", 0x22, 4 * MiB, 1 * MiB)
    await vm.write("vdb", 0x23, 4 * MiB, 1 * MiB)
    with caplog.at_level(logging.WARNING):
        xml = await driver.domainCheckpointGetXMLDesc(
            c1, CheckpointXMLFlags.SIZE | CheckpointXMLFlags.NO_DOMAIN
        )
    sizes = {d.get("name"): d.get("size") for d in etree.fromstring(xml.encode()).iter("disk")}
    assert sizes == {"vda": None, "vdb": str(1 * MiB)}
    found = (await bitmaps(vm.mon))["vda-fmt"]
    assert sorted(found) == ["c1", "pvb-tmp-size"] and found["pvb-tmp-size"]["persistent"]
    assert "that pyvirtbackup did not make" in caplog.text
    assert sorted((await bitmaps(vm.mon))["vdb-fmt"]) == ["c1"]  # ours, removed again


async def test_a_failed_create_transaction_leaves_a_bitmap_that_appeared_meanwhile(env):
    """The bitmap appears between our check and our transaction (another tool): the
    transaction fails and adds nothing; the undo must not remove the other's bitmap."""
    vm, driver, dom = env
    real = dom.monitor.transaction

    async def transaction(actions, properties=None):
        await vm.mon.execute(
            "block-dirty-bitmap-add", {"node": "vdb-fmt", "name": "c1", "persistent": True}
        )
        return await real(actions, properties)

    dom.monitor.transaction = transaction
    with pytest.raises(VirError, match="already exists"):
        await driver.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
    dom.monitor.transaction = real
    assert {n: sorted(b) for n, b in (await bitmaps(vm.mon)).items()} == {"vdb-fmt": ["c1"]}
    assert await _names(driver, dom) == []


async def test_metadata_failure_after_create_removes_only_what_the_transaction_made(
    env, monkeypatch
):
    vm, driver, dom = env

    def add(*args, **kwargs):
        raise VirError(ErrorNumber.SYSTEM_ERROR, ErrorDomain.NONE, "disk full")

    monkeypatch.setattr(dom.checkpoints, "add", add)
    await _raises(
        ErrorNumber.INTERNAL_ERROR,
        driver.domainCheckpointCreateXML(dom, checkpoint_xml("c1")),
        "unable to save metadata for checkpoint c1: disk full",
    )
    assert await bitmaps(vm.mon) == {}


async def test_remove_new_removes_only_when_told_our_transaction_created_the_bitmaps(env, caplog):
    from pyvirtbackup.qemu import checkpoint_ops

    vm, driver, dom = env
    await driver.refresh_disks(dom)
    targets = [(d, "c9") for d in dom.disks]
    for node in ("vda-fmt", "vdb-fmt"):
        await vm.mon.execute(
            "block-dirty-bitmap-add", {"node": node, "name": "c9", "persistent": True}
        )
    await checkpoint_ops.remove_new(dom.monitor, "c9", targets, created=False)
    with caplog.at_level(logging.WARNING):
        await checkpoint_ops.remove_new(dom.monitor, "c9", targets)  # not said: kept
    assert "did not say whether pyvirtbackup's transaction created it" in caplog.text
    assert sorted(await bitmaps(vm.mon)) == ["vda-fmt", "vdb-fmt"]
    await checkpoint_ops.remove_new(dom.monitor, "c9", targets, created=True)
    assert await bitmaps(vm.mon) == {}


async def test_a_begin_whose_transaction_fails_keeps_a_bitmap_that_appeared_meanwhile(
    env, tmp_path
):
    """Begin's undo used to remove the checkpoint's bitmap name from every disk even
    when its transaction had failed, for instance because another tool added that
    very bitmap between our check and our transaction: its bitmap was deleted."""
    vm, driver, dom = env
    real = dom.monitor.transaction

    async def transaction(actions, properties=None):
        if any(a["data"].get("name") == "c1" for a in actions):  # the instant's
            await vm.mon.execute(
                "block-dirty-bitmap-add", {"node": "vda-fmt", "name": "c1", "persistent": True}
            )
        return await real(actions, properties)

    dom.monitor.transaction = transaction
    target = tmp_path / "vda.bak"
    xml = (
        f"<domainbackup><disks><disk name='vda'><target file='{target}'/></disk>"
        "<disk name='vdb' backup='no'/></disks></domainbackup>"
    )
    with pytest.raises(VirError, match="already exists"):
        await driver.domainBackupBegin(dom, xml, checkpoint_xml("c1"))
    dom.monitor.transaction = real
    found = await bitmaps(vm.mon)
    assert sorted(found) == ["vda-fmt"] and found["vda-fmt"]["c1"]["persistent"]
    assert await _names(driver, dom) == [] and dom.job is None
