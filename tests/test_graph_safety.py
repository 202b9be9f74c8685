"""A backing chain we cannot read whole must never be taken for the whole chain.

The chain walk matches each backing layer to a format node by file name (QMP has no
edges). A layer it cannot match (a bare protocol node, as libvirt opens a plain raw
base; a filter between layers; a json: filename) used to end the chain silently:
a full push then chose ``sync=top`` and left the backing's data out of the backup,
and an incremental merged only the bitmaps of the layers it had seen.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pyvirtbackup import Driver, ErrorNumber, VirError
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.bitmaps import check_chain
from pyvirtbackup.qemu.blockgraph import Bitmap, BlockNode, Disk, disks_from_mapping, parse_disks
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.plan import PlanDisk, Tuning, plan_backup
from pyvirtbackup.qemu.process import QemuProcess

from .conftest import MiB
from .drivertools import checkpoint_xml, push_xml, wait_completed

# ------------------------------------------------------------------ unit: the graph


def _node(name: str, drv: str, file: str, **extra: Any) -> dict[str, Any]:
    return {
        "node-name": name,
        "drv": drv,
        "file": file,
        "ro": extra.pop("ro", False),
        "image": {"filename": file, "format": drv, "virtual-size": 16 * MiB},
        "dirty-bitmaps": extra.pop("bitmaps", []),
        **extra,
    }


# query-block and query-named-block-nodes(flat) of QEMU 7.2 for a qcow2 overlay whose
# backing is a raw base opened as a bare 'file' node (trimmed to what is read)
BARE_BACKING_BLOCK = [
    {
        "qdev": "vda",
        "inserted": {
            "node-name": "top-fmt",
            "drv": "qcow2",
            "ro": False,
            "file": "/img/top.qcow2",
            "backing_file": "/img/base.raw",
            "backing_file_depth": 1,
            "image": {
                "filename": "/img/top.qcow2",
                "format": "qcow2",
                "virtual-size": 16 * MiB,
                "cluster-size": 65536,
                "backing-filename": "/img/base.raw",
                "backing-image": {
                    "filename": "/img/base.raw",
                    "format": "file",
                    "virtual-size": 16 * MiB,
                },
            },
        },
    }
]
BARE_BACKING_NODES = [
    _node("top-fmt", "qcow2", "/img/top.qcow2", backing_file="/img/base.raw"),
    _node("top-file", "file", "/img/top.qcow2"),
    _node("base-file", "file", "/img/base.raw", ro=True),
]


def test_an_overlay_on_a_bare_protocol_node_has_a_backing_and_an_incomplete_chain():
    (disk,) = parse_disks(BARE_BACKING_BLOCK, BARE_BACKING_NODES)
    assert disk.node == "top-fmt" and disk.chain == ["top-fmt"]
    assert disk.has_backing, "QEMU says there is a backing"
    assert not disk.chain_complete
    assert disk.unread_layers == [("/img/base.raw", "file")]
    assert "bare 'file' protocol node" in disk.unread_description()
    # a bare file node stores no bitmaps: the checkpoints of the top are all there is
    assert not disk.unread_may_hold_bitmaps()


def test_a_node_named_by_mapping_gets_the_same_answer():
    """disks_from_mapping walks backing_file names: the same unread layer, the same
    backing, whether or not a device showed the node."""
    (disk,) = disks_from_mapping({"data": "top-fmt"}, [], BARE_BACKING_NODES)
    assert disk.chain == ["top-fmt"] and disk.has_backing
    assert disk.unread_layers == [("/img/base.raw", "file")]
    (seen,) = disks_from_mapping(
        {"data": "top-fmt"}, parse_disks(BARE_BACKING_BLOCK, BARE_BACKING_NODES), []
    )
    assert seen.has_backing and seen.unread_layers == [("/img/base.raw", "file")]


def test_backing_seen_only_in_the_top_nodes_backing_file_still_counts():
    """QEMU's other answers count too: a query-block without backing-image."""
    block = json.loads(json.dumps(BARE_BACKING_BLOCK))
    del block[0]["inserted"]["image"]["backing-image"]
    del block[0]["inserted"]["backing_file"]
    block[0]["inserted"]["backing_file_depth"] = 0
    (disk,) = parse_disks(block, BARE_BACKING_NODES)
    assert disk.has_backing


def test_a_standalone_qcow2_has_no_backing_and_a_complete_chain():
    block = json.loads(json.dumps(BARE_BACKING_BLOCK))
    ins = block[0]["inserted"]
    del ins["image"]["backing-image"], ins["image"]["backing-filename"], ins["backing_file"]
    ins["backing_file_depth"] = 0
    nodes = [
        _node("top-fmt", "qcow2", "/img/top.qcow2"),
        _node("top-file", "file", "/img/top.qcow2"),
    ]
    (disk,) = parse_disks(block, nodes)
    assert disk.chain == ["top-fmt"] and not disk.has_backing and disk.chain_complete


def _chain_block(top_layer: dict[str, Any], node_name: str, depth: int) -> list[dict[str, Any]]:
    return [
        {
            "qdev": "vda",
            "inserted": {
                "node-name": node_name,
                "drv": top_layer["format"],
                "file": top_layer["filename"],
                "backing_file_depth": depth,
                "image": top_layer,
            },
        }
    ]


def _layer(filename: str, fmt: str, below: dict[str, Any] | None = None) -> dict[str, Any]:
    layer: dict[str, Any] = {"filename": filename, "format": fmt, "virtual-size": 16 * MiB}
    if below is not None:
        layer["backing-image"] = below
    return layer


CHAIN_NODES = [
    _node("t-fmt", "qcow2", "/img/t.qcow2", backing_file="/img/b.qcow2"),
    _node("t-file", "file", "/img/t.qcow2"),
    _node("b-fmt", "qcow2", "/img/b.qcow2", ro=True),
    _node("b-file", "file", "/img/b.qcow2", ro=True),
]


def test_a_running_backups_filter_on_top_is_looked_through_to_the_whole_chain():
    """With a copy-before-write filter above the top (a running backup), QEMU lists
    the filter as one more level: the chain must still reach the base."""
    image = _layer(
        "/img/t.qcow2",
        "copy-before-write",
        _layer("/img/t.qcow2", "qcow2", _layer("/img/b.qcow2", "qcow2")),
    )
    nodes = [_node("#block088", "copy-before-write", "/img/t.qcow2"), *CHAIN_NODES]
    (disk,) = parse_disks(_chain_block(image, "#block088", 2), nodes)
    assert disk.node == "t-fmt" and disk.format == "qcow2"
    assert disk.chain == ["t-fmt", "b-fmt"] and disk.chain_complete and disk.has_backing


def test_a_filter_between_layers_ends_the_chain_as_unread_and_may_hide_bitmaps():
    thr = 'json:{"driver": "throttle", "file": {"driver": "qcow2"}}'
    image = _layer(
        "/img/t.qcow2", "qcow2", _layer(thr, "throttle", _layer("/img/b.qcow2", "qcow2"))
    )
    nodes = [*CHAIN_NODES, _node("bthr", "throttle", thr, ro=True)]
    (disk,) = parse_disks(_chain_block(image, "t-fmt", 2), nodes)
    assert disk.chain == ["t-fmt"] and disk.has_backing
    assert disk.unread_layers == [(thr, "throttle"), ("/img/b.qcow2", "qcow2")]
    assert disk.unread_may_hold_bitmaps()
    assert "'throttle' filter between two layers" in disk.unread_description()


# ------------------------------------------------------------- unit: plan and bitmaps


def _disk(**fields: Any) -> Disk:
    base: dict[str, Any] = {
        "name": "vda",
        "node": "vda-fmt",
        "path": "/img/vda.qcow2",
        "format": "qcow2",
        "type": "file",
        "size": 16 * MiB,
        "readonly": False,
        "cluster_size": 65536,
        "chain": ["vda-fmt"],
    }
    return Disk(**{**base, **fields})


def _full_push_sync(src: Disk) -> str:
    plan = plan_backup(
        "push",
        [PlanDisk("vda", "/bk/vda.qcow2", "file", "qcow2", "full")],
        {"vda": src},
        {},
        first_store_id=1,
        reuse_external=False,
        tuning=Tuning(),
    )
    return plan.transaction[-1]["data"]["sync"]


def test_sync_top_only_when_qemu_reports_no_backing():
    assert _full_push_sync(_disk()) == "top"
    assert _full_push_sync(_disk(has_backing=True)) == "full"
    unread = [("/img/base.raw", "file")]
    assert _full_push_sync(_disk(has_backing=True, unread_layers=unread)) == "full"


def _nodes_with_bitmap(name: str) -> dict[str, BlockNode]:
    node = BlockNode("vda-fmt", "qcow2", "/img/vda.qcow2", False, 16 * MiB, 65536)
    node.bitmaps[name] = Bitmap(name, "vda-fmt", True, True, False, False, 65536, 0)
    return {"vda-fmt": node}


def test_bitmap_check_refuses_a_chain_whose_unread_layers_may_hold_the_bitmap():
    nodes = _nodes_with_bitmap("c1")
    hidden = _disk(has_backing=True, unread_layers=[("json:{...}", "qcow2")])
    check = check_chain(hidden, nodes, "c1")
    assert not check.valid and check.incomplete
    assert "the disk's backing chain could not be read completely" in (check.problem or "")
    unknown = _disk(has_backing=True, unread_layers=[("/img/b.qcow2", None)])
    assert not check_chain(unknown, nodes, "c1").valid
    # a bare raw base holds no bitmap: nothing is missed
    bare = _disk(has_backing=True, unread_layers=[("/img/base.raw", "file")])
    assert check_chain(bare, nodes, "c1").valid


def test_incremental_plan_over_a_chain_it_cannot_read_says_why_and_what_to_do():
    src = _disk(has_backing=True, unread_layers=[("json:{...}", "qcow2")])
    with pytest.raises(VirError) as exc:
        plan_backup(
            "push",
            [PlanDisk("vda", "/bk/vda.qcow2", "file", "qcow2", "incremental", "c1")],
            {"vda": src},
            _nodes_with_bitmap("c1"),
            first_store_id=1,
            reuse_external=False,
            tuning=Tuning(),
        )
    assert exc.value.code == ErrorNumber.CHECKPOINT_INCONSISTENT
    assert "could not be read completely" in exc.value.message
    assert "named format node" in exc.value.message


# ------------------------------------------------------------------- real QEMU


@contextlib.asynccontextmanager
async def _qemu(blockdevs: list[dict[str, Any]], drive: str) -> AsyncIterator[QemuProcess]:
    """A QEMU with the given -blockdev graph and one scsi disk 'vda' on ``drive``."""
    args = ["-object", "throttle-group,id=tg0", "-device", "virtio-scsi-pci,id=scsi0"]
    for b in blockdevs:
        args += ["-blockdev", json.dumps(b)]
    args += ["-device", f"scsi-hd,bus=scsi0.0,id=vda,drive={drive}"]
    proc = QemuProcess([], extra_args=args)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


async def _overlay_on_bare_raw(tmp_path: Any) -> tuple[str, str, list[dict[str, Any]]]:
    base, top = str(tmp_path / "base.raw"), str(tmp_path / "top.qcow2")
    await imgtools.run(["qemu-img", "create", "-f", "raw", base, "16M"])
    await imgtools.run(["qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 4M", base])
    await imgtools.run(["qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "raw", top])
    await imgtools.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 8M 1M", top])
    return (
        base,
        top,
        [
            {"driver": "file", "filename": base, "node-name": "base-file", "read-only": True},
            {"driver": "file", "filename": top, "node-name": "top-file"},
            {"driver": "qcow2", "file": "top-file", "node-name": "top-fmt", "backing": "base-file"},
        ],
    )


@pytest.mark.asyncio
async def test_full_push_of_overlay_on_bare_protocol_backing_has_the_backing_data(tmp_path):
    """The review's case: sync=top was chosen and the base's 4 MiB were not backed up."""
    _, top, blockdevs = await _overlay_on_bare_raw(tmp_path)
    out = str(tmp_path / "backup.qcow2")
    async with _qemu(blockdevs, "top-fmt") as proc:
        async with Driver(state_dir=tmp_path / "state") as drv:
            dom = await drv.attach("vm1", proc.backup_qmp_path)
            await drv.domainBackupBegin(dom, push_xml({"vda": out}))
            assert (await wait_completed(drv, dom))["success"] is True
        await proc.quit()
    same, msg = await imgtools.compare(top, out, fmt_a="qcow2", fmt_b="qcow2")
    assert same, f"the backup is not the disk: {msg}"


@pytest.mark.asyncio
async def test_incremental_over_a_bare_raw_base_still_works(tmp_path):
    """The raw base holds no bitmap, so the unread layer does not block incrementals
    (libvirt opens plain raw bases exactly like this)."""
    _, _, blockdevs = await _overlay_on_bare_raw(tmp_path)
    out = str(tmp_path / "inc.qcow2")
    async with _qemu(blockdevs, "top-fmt") as proc:
        mon = Monitor("test-orchestrator")
        await mon.connect(proc.qmp_path)
        try:
            async with Driver(state_dir=tmp_path / "state") as drv:
                dom = await drv.attach("vm1", proc.backup_qmp_path)
                await drv.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
                await mon.qemu_io("vda", "write -P 0xcc 12M 1M")
                await drv.domainBackupBegin(dom, push_xml({"vda": out}, incremental="c1"))
                assert (await wait_completed(drv, dom))["success"] is True
        finally:
            await mon.close()
        await proc.quit()
    mapped = json.loads(
        (await imgtools.run(["qemu-img", "map", "-U", "--output=json", out])).stdout
    )
    own = [(m["start"], m["length"]) for m in mapped if m["depth"] == 0 and m["data"]]
    assert own == [(12 * MiB, 1 * MiB)], mapped


@pytest.mark.asyncio
async def test_incremental_is_refused_when_a_filter_hides_lower_layers(tmp_path):
    """qcow2 -> throttle filter -> qcow2: the base might hold a copy of c1 (an external
    snapshot copies bitmaps); merging only the top's would silently lose writes."""
    base, top = str(tmp_path / "b.qcow2"), str(tmp_path / "t.qcow2")
    await imgtools.create(base, 16 * MiB)
    await imgtools.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
    blockdevs = [
        {"driver": "file", "filename": base, "node-name": "b-file", "read-only": True},
        {"driver": "qcow2", "file": "b-file", "node-name": "b-fmt", "read-only": True},
        {
            "driver": "throttle",
            "throttle-group": "tg0",
            "file": "b-fmt",
            "node-name": "bthr",
            "read-only": True,
        },
        {"driver": "file", "filename": top, "node-name": "t-file"},
        {"driver": "qcow2", "file": "t-file", "node-name": "t-fmt", "backing": "bthr"},
    ]
    async with _qemu(blockdevs, "t-fmt") as proc:
        async with Driver(state_dir=tmp_path / "state") as drv:
            dom = await drv.attach("vm1", proc.backup_qmp_path)
            await drv.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
            xml = push_xml({"vda": str(tmp_path / "inc.qcow2")}, incremental="c1")
            with pytest.raises(VirError) as exc:
                await drv.domainBackupBegin(dom, xml)
            assert exc.value.code == ErrorNumber.CHECKPOINT_INCONSISTENT
            assert "backing chain could not be read completely" in exc.value.message
            assert "'throttle' filter" in exc.value.message
            # and a full push is a full copy (the base shows through)
            full = str(tmp_path / "full.qcow2")
            await drv.domainBackupBegin(dom, push_xml({"vda": full}))
            final = await wait_completed(drv, dom)
            assert final["success"] is True
        await proc.quit()
