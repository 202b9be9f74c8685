"""The state directory's records decide what gets deleted: only records nobody else
could have written are acted on, only what we made is removed, and a listing acts on
nothing (issue 12, item 1).

The attacker is a real second user (nobody) and the victim files are root's.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from pyvirtbackup import Driver, ErrorNumber, JobType, VirError
from pyvirtbackup.qemu import imgtools

from . import otheruser
from .clitools import CLI
from .conftest import MiB
from .drivertools import NOTHING_LEFT, bitmaps, leftovers, node_names, unthrottle, wait_completed
from .test_push import targets

pytestmark = pytest.mark.asyncio


def planted_job(victim: str) -> dict:
    """A push job record whose only disk 'created' ``victim``, as an attacker writes it.

    Its QEMU job does not exist, so whoever takes it over finds the job vanished,
    fails it and deletes the files the record says the backup created.
    """
    st = os.stat(victim)
    plan = {
        "disk": "vda",
        "source_node": "vda-fmt",
        "source_path": "/dev/null",
        "job_id": "pvb-backup-vda",
        "store_id": 1,
        "storage_node": "pvb-1-storage",
        "format_node": "pvb-1-format",
        "path": victim,
        "store_type": "file",
        "fmt": "qcow2",
        "size": 16 * MiB,
        "create_file": True,
        "create_format": True,
        "cluster_size": None,
        "sync": "full",
    }
    return {
        "version": 2,
        "phase": "started",
        "mode": "push",
        "started": 1700000000.0,
        "disks": [{"plan": plan, "state": "running", "current": 0, "total": 0}],
        "created_files": [victim],
        # the strongest attacker: one who even knows the victim's inode
        "created_ids": {victim: [st.st_dev, st.st_ino]},
        "status_xml": (
            "<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file' "
            f"backupmode='full' state='running'><target file='{victim}'/></disk></disks>"
            "</domainbackup>"
        ),
    }


PLANT = r"""
import json, os, sys
domdir, qmp, job = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(domdir, exist_ok=True)
with open(os.path.join(domdir, "domain.json"), "w") as f:
    json.dump({"name": "vm1", "uuid": "6f8a0e5c-0c8a-4b8e-9a43-3c3c1d1e9f00",
               "qmp": qmp, "disks": None}, f)
with open(os.path.join(domdir, "backup.json"), "w") as f:
    f.write(job)
print("planted")
"""


@pytest.mark.parametrize("loose", ["state-dir-0777", "owned-by-nobody", "domain-dir-0777"])
async def test_a_record_planted_by_another_user_deletes_nothing(
    vm_factory, shared, tmp_path, loose
):
    """A state dir someone else can write: nobody plants a domain pointing at root's
    QEMU and a job record listing a root-only file; root's `list` (and attach) must
    refuse the directory instead of deleting the file."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    victim = tmp_path / "root-only.conf"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    state = shared / "state"
    if loose == "owned-by-nobody":
        os.mkdir(state, 0o755)
        os.chown(state, otheruser.NOBODY_UID, otheruser.NOBODY_GID)
    else:
        os.mkdir(state)
        os.chmod(state, 0o777 if loose == "state-dir-0777" else 0o755)
    domdir = state / "domains" / "vm1"
    if loose == "domain-dir-0777":
        os.mkdir(state / "domains", 0o755)
        os.mkdir(domdir)
        os.chmod(domdir, 0o777)

    res = await otheruser.run(PLANT, str(domdir), vm.qmp, json.dumps(planted_job(str(victim))))
    assert res.rc == 0 and "planted" in res.out, res.err

    cli = CLI(state)
    listing = await cli("list")
    assert listing.rc == 1 and "code 29" in listing.err, listing
    assert "refusing" in listing.err and str(state) in listing.err
    async with Driver(state_dir=state) as drv:
        with pytest.raises(VirError) as exc:
            await drv.attach("vm1", vm.qmp)
        assert exc.value.code == ErrorNumber.OPERATION_DENIED
    assert victim.read_text() == "precious\n"
    assert await vm.mon.execute("query-jobs") == []


async def test_a_file_of_someone_else_in_our_directory_is_not_read(vm_factory, tmp_path):
    """Our directories are fine but a record in them is not ours (left by another user
    while the directory was loose, say): it is refused, not read."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    async with Driver(state_dir=state) as drv:
        await drv.attach("vm1", vm.qmp)
    record = state / "domains" / "vm1" / "domain.json"
    os.chown(record, otheruser.NOBODY_UID, otheruser.NOBODY_GID)
    async with Driver(state_dir=state) as drv:
        with pytest.raises(VirError, match="owned by uid") as exc:
            await drv.attach("vm1", vm.qmp)
        assert exc.value.code == ErrorNumber.OPERATION_DENIED
    os.chown(record, 0, 0)
    os.chmod(record, 0o666)
    async with Driver(state_dir=state) as drv:
        with pytest.raises(VirError, match="writable by group or others"):
            await drv.attach("vm1", vm.qmp)
    record.unlink()
    record.symlink_to(tmp_path / "elsewhere.json")
    async with Driver(state_dir=state) as drv:
        with pytest.raises(VirError, match="symbolic link"):
            await drv.attach("vm1", vm.qmp)


async def test_every_level_is_made_0700_whatever_the_umask(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "deep" / "state"
    old = os.umask(0)
    try:
        async with Driver(state_dir=state) as drv:
            dom = await drv.attach("vm1", vm.qmp)
            await drv.domainCheckpointCreateXML(dom, "<domaincheckpoint><name>c1</name>"
                                                "</domaincheckpoint>")  # fmt: skip
    finally:
        os.umask(old)
    for level in (tmp_path / "deep", state, state / "domains", state / "domains" / "vm1",
                  state / "domains" / "vm1" / "checkpoints"):  # fmt: skip
        assert stat.S_IMODE(os.stat(level).st_mode) == 0o700, level
    for path in (state / "domains" / "vm1").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


async def test_a_target_replaced_by_another_file_is_not_deleted(vm_factory, shared, tmp_path):
    """Targets in a directory anyone may rename in: after begin, nobody renames root's
    previous backup over the new target's name; the abort that deletes our partial
    target must not delete that file."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], paused=False)  # fd passing on 7.2 too
    before = await node_names(vm.mon)
    backups = shared / "backups"
    os.mkdir(backups)
    os.chmod(backups, 0o777)  # loose: anyone may rename in it
    previous = backups / "vda.full.qcow2"
    await imgtools.create(str(previous), 16 * MiB)
    await imgtools.write_pattern(str(previous), "qcow2", [(0x77, 0, 1 * MiB)])
    target = backups / "vda.inc.qcow2"
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        await drv.domainBackupBegin(
            dom,
            f"<domainbackup><disks><disk name='vda'><target file='{target}'/></disk></disks>"
            "</domainbackup>",
            tuning={"speed": 1 * MiB},
        )
        res = await otheruser.run(
            "import os, sys; os.replace(sys.argv[1], sys.argv[2]); print('swapped')",
            str(previous),
            str(target),
        )
        assert res.rc == 0, res.err
        await drv.domainAbortJob(dom)
        stats = await wait_completed(drv, dom)
        assert stats["type"] == JobType.CANCELLED
    assert target.exists(), "root's previous backup, renamed over the target, was deleted"
    out = await imgtools.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x77 0 1M", str(target)])
    assert "read 1048576/1048576" in out.stdout
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


def _edit_job(state: Path, change) -> None:
    path = state / "domains" / "vm1" / "backup.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


async def test_a_record_naming_a_node_not_ours_is_set_aside(vm_factory, tmp_path):
    """Whatever a record says, reattach deletes only nodes named as our stores'."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    await first.close()

    def disk_node(record: dict) -> None:
        record["disks"][0]["plan"]["format_node"] = "vda-fmt"  # the disk's own node

    _edit_job(state, disk_node)
    await vm.mon.execute("block-job-cancel", {"device": "pvb-backup-vda", "force": True})
    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert any("not our store's" in p for p in dom.recovery_problems), dom.recovery_problems
        assert dom.job is None
        assert list((state / "domains" / "vm1").glob("backup.json.unreadable-*"))
    assert "vda-fmt" in await node_names(vm.mon)
    await vm.write("vda", 0x31, 0, 64 * 1024)  # the disk still works


async def test_a_persistent_bitmap_named_like_ours_is_left_alone(vm_factory, tmp_path):
    """Another tool's persistent bitmap 'backup-vda', named in a record as our
    temporary bitmap: taking the job over and ending it must not remove it."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    before = await node_names(vm.mon)
    state = tmp_path / "state"
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    await first.close()
    await vm.mon.execute(
        "block-dirty-bitmap-add", {"node": "vda-fmt", "name": "backup-vda", "persistent": True}
    )

    def names_their_bitmap(record: dict) -> None:
        plan = record["disks"][0]["plan"]
        plan["bitmap"], plan["bitmap_node"] = "backup-vda", "vda-fmt"

    _edit_job(state, names_their_bitmap)
    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert any("persistent" in p for p in dom.recovery_problems), dom.recovery_problems
        await second.domainAbortJob(dom)
    theirs = (await bitmaps(vm.mon))["vda-fmt"]["backup-vda"]
    assert theirs["persistent"] is True
    await vm.mon.execute("block-dirty-bitmap-remove", {"node": "vda-fmt", "name": "backup-vda"})
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def test_list_acts_on_nothing(vm_factory, tmp_path):
    """A backup that ended while no driver watched: `list` shows it and leaves the
    record, QEMU's concluded job and the target as they are; the next command that
    needs the job takes it over and finishes it."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    before = await node_names(vm.mon)
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    target = targets(await first.domainBackupGetXMLDesc(dom))["vda"]
    await first.close()
    await unthrottle(vm.mon)
    for _ in range(500):
        jobs = await vm.mon.execute("query-jobs")
        if jobs and jobs[0]["status"] == "concluded":
            break
        await asyncio.sleep(0.02)
    files = _tree(state)

    cli = CLI(state)
    rows = (await cli.ok("list", "--json")).json()
    assert rows[0]["name"] == "vm1" and rows[0]["backup"]["mode"] == "push"
    await cli.ok("list")
    async with Driver(state_dir=state) as drv:
        (listed,) = await drv.connectListAllDomains()
        assert listed.job is None and listed.takeover_pending
    assert _tree(state) == files
    assert [j["status"] for j in await vm.mon.execute("query-jobs")] == ["concluded"]
    assert os.path.exists(target)

    done = (await cli.ok("domjobinfo", "vm1", "--completed", "--json")).json()
    assert done["type"] == JobType.COMPLETED
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_a_listed_domain_is_taken_over_by_the_first_call_that_needs_its_job(
    vm_factory, tmp_path
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    before = await node_names(vm.mon)
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    await first.close()
    async with Driver(state_dir=state) as drv:
        (dom,) = await drv.connectListAllDomains()
        assert (await drv.peek_job(dom))["type"] == JobType.UNBOUNDED
        assert dom.job is None
        stats = await drv.domainGetJobStats(dom)  # needs the job: takes it over
        assert stats["type"] == JobType.UNBOUNDED and dom.job is not None
        await drv.domainAbortJob(dom)
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


def _incremental_xml(mode: str, tmp_path: Path) -> str:
    if mode == "push":
        return (
            "<domainbackup><incremental>c1</incremental><disks><disk name='vda'>"
            f"<target file='{tmp_path / 'vda.inc'}'/></disk></disks></domainbackup>"
        )
    return (
        f"<domainbackup mode='pull'><incremental>c1</incremental>"
        f"<server transport='unix' socket='{tmp_path / 'nbd.sock'}'/><disks><disk name='vda'>"
        f"<scratch file='{tmp_path / 'vda.scratch'}'/></disk></disks></domainbackup>"
    )


@pytest.mark.parametrize("fleecing", [True, False], ids=["fleecing", "direct"])
@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_every_kind_of_record_we_write_is_taken_over(vm_factory, tmp_path, mode, fleecing):
    """The record check accepts every record we write: fleecing (filter, view, image,
    a push's bitmap moved from the disk's node to the view, a pull's on the disk's
    node) and the direct sequence, push and pull, incremental; the next driver takes
    the job over and its abort leaves nothing, the fleecing image included."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    before = await node_names(vm.mon)
    state = tmp_path / "state"
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainCheckpointCreateXML(
        dom, "<domaincheckpoint><name>c1</name></domaincheckpoint>"
    )
    await vm.write("vda", 0x42, 0, 4 * MiB)
    await first.domainBackupBegin(
        dom, _incremental_xml(mode, tmp_path), tuning={"speed": 1 * MiB}, fleecing=fleecing
    )
    await first.close()
    record = json.loads((state / "domains" / "vm1" / "backup.json").read_text())
    plan = record["disks"][0]["plan"]
    assert plan["fleecing"] is fleecing and plan["bitmap"], plan
    if fleecing:
        assert plan["cbw_node"] == "pvb-1-cbw" and plan["access_node"] == "pvb-1-access"
        if mode == "push":  # made on the disk's node at the instant, then on the view
            assert (plan["instant_bitmap_node"], plan["bitmap_node"]) == ("vda-fmt", "pvb-1-access")
            fleece = plan["fleece_path"]
            assert fleece in record["created_files"] and fleece in record["created_ids"]
            assert os.path.exists(fleece)
        else:  # the view exports the disk's own node's bitmap
            assert plan["bitmap_node"] == "vda-fmt"
    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert dom.recovery_problems == []
        assert dom.job is not None
        await second.domainAbortJob(dom)
        await wait_completed(second, dom)
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    assert set((await bitmaps(vm.mon))["vda-fmt"]) == {"c1"}
    assert await vm.mon.execute("qom-get", {"path": "vda", "property": "drive"}) == "vda-fmt"
    assert not [p for p in os.listdir(vm.workdir) if ".fleece." in p]
    for made in ("vda.inc", "vda.scratch", "nbd.sock"):  # an aborted target is no backup
        assert not (tmp_path / made).exists(), made


async def test_a_record_naming_the_disk_as_our_filter_is_set_aside(vm_factory, tmp_path):
    """A fleecing record whose filter or view is the disk's own node would have
    teardown delete the disk, or switch the device to something else: refused."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    first = Driver(state_dir=state)
    dom = await first.attach("vm1", vm.qmp)
    await first.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
    await first.close()

    def disk_is_filter(record: dict) -> None:
        record["disks"][0]["plan"]["access_node"] = "vda-fmt"

    _edit_job(state, disk_is_filter)
    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert any("access_node" in p for p in dom.recovery_problems), dom.recovery_problems
        assert dom.job is None
    assert "vda-fmt" in await node_names(vm.mon)
    await vm.write("vda", 0x31, 0, 64 * 1024)  # the disk still works


async def test_a_fleecing_image_replaced_by_another_file_is_not_deleted(
    vm_factory, shared, tmp_path
):
    """The fleecing image in a directory others can rename in: nobody renames root's
    file over its name while the backup runs; the end of the backup, which deletes
    the fleecing image, must leave that file alone."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], paused=False)
    before = await node_names(vm.mon)
    images = shared / "fleece"
    os.mkdir(images)
    os.chmod(images, 0o777)
    precious = images / "root-only.conf"
    precious.write_text("precious\n")
    precious.chmod(0o600)
    fleece = images / "vda.fleece"
    target = tmp_path / "vda.bak"
    xml = (
        "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'><disks>"
        f"<disk name='vda' pvb:fleecing='{fleece}'><target file='{target}'/></disk>"
        "</disks></domainbackup>"
    )
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        await drv.domainBackupBegin(dom, xml, tuning={"speed": 1 * MiB})
        assert fleece.exists()
        res = await otheruser.run(
            "import os, sys; os.replace(sys.argv[1], sys.argv[2]); print('swapped')",
            str(precious),
            str(fleece),
        )
        assert res.rc == 0, res.err
        await unthrottle(vm.mon)
        stats = await wait_completed(drv, dom)
        assert stats["type"] == JobType.COMPLETED, stats
    assert fleece.read_text() == "precious\n", "root's file, renamed over the image, was deleted"
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_a_push_whose_target_was_replaced_fails(vm_factory, shared, tmp_path):
    """nobody renames a file of theirs over the target while the push runs: the push
    must not report success for a path that no longer holds the file QEMU wrote."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], paused=False)
    before = await node_names(vm.mon)
    backups = shared / "backups"
    os.mkdir(backups)
    os.chmod(backups, 0o777)
    target = backups / "vda.bak"
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        await drv.domainBackupBegin(
            dom,
            f"<domainbackup><disks><disk name='vda'><target file='{target}'/></disk></disks>"
            "</domainbackup>",
            tuning={"speed": 1 * MiB},
        )
        res = await otheruser.run(
            "import os, sys\n"
            "open(sys.argv[1] + '.x', 'w').write('not a backup')\n"
            "os.replace(sys.argv[1] + '.x', sys.argv[1]); print('replaced')",
            str(target),
        )
        assert res.rc == 0, res.err
        await unthrottle(vm.mon)
        stats = await wait_completed(drv, dom)
    assert stats["type"] == JobType.FAILED, stats
    assert "was replaced" in stats["errmsg"] and str(target) in stats["errmsg"]
    assert target.read_text() == "not a backup"  # theirs: neither kept as ours nor deleted
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
