"""The pyvirtbackup command, each call a new process, against a real QEMU."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from pyvirtbackup.qemu import imgtools

from .clitools import CLI
from .conftest import MiB
from .drivertools import NOTHING_LEFT, leftovers, node_names, unthrottle

pytestmark = pytest.mark.asyncio


@pytest.fixture
def cli(tmp_path):
    return CLI(tmp_path / "state")


async def test_attach_list_detach(vm_factory, cli):
    vm = await vm_factory([("vda", "qcow2", 8 * MiB), ("vdb", "raw", 8 * MiB)])
    res = await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    assert "vda (qcow2" in res.out and "vdb (raw" in res.out
    listing = await cli.ok("list")
    assert listing.out.splitlines()[0].split() == ["Name", "State", "Backup", "job", "Checkpoints"]
    assert "vm1" in listing.out and "prelaunch" in listing.out
    rows = (await cli.ok("list", "--json")).json()
    assert rows == [{"name": "vm1", "state": "prelaunch", "backup": None, "checkpoints": 0}]
    assert (await cli.ok("list", "--with-checkpoint", "--json")).json() == []
    assert len((await cli.ok("list", "--without-checkpoint", "--json")).json()) == 1
    await cli.ok("detach", "vm1")
    assert (await cli.ok("list", "--json")).json() == []
    res = await cli("domjobinfo", "vm1")
    assert res.rc == 1
    assert "no domain with matching name 'vm1'" in res.err and "code 42" in res.err


async def test_usage_errors_exit_2(cli):
    for args in (["no-such-command"], ["attach", "vm1"], ["domjobinfo", "vm1", "--keep-completed"]):
        res = await cli(*args)
        assert res.rc == 2, (args, res)


async def test_backup_in_one_process_followed_and_finished_by_others(vm_factory, cli, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    before = await node_names(vm.mon)
    ref = await vm.snapshot("vda", str(tmp_path / "ref"))
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    res = await cli.ok("backup-begin", "vm1", "--speed", str(1 * MiB))
    assert res.out.strip() == "Backup started"
    xml = (await cli.ok("backup-dumpxml", "vm1")).out
    target = xml.split("<target file='")[1].split("'")[0]
    info = (await cli.ok("domjobinfo", "vm1", "--json")).json()
    assert info["type"] == 2 and info["operation"] == 9 and info["disk_total"] == 16 * MiB
    text = (await cli.ok("domjobinfo", "vm1")).out
    assert text.startswith("Job type:         Unbounded\nOperation:        Backup\n")
    listing = (await cli.ok("list", "--json")).json()
    assert listing[0]["backup"]["mode"] == "push"
    res = await cli("backup-begin", "vm1")
    assert res.rc == 1 and "code 55" in res.err
    await unthrottle(vm.mon)
    for _ in range(200):
        if (await vm.mon.execute("query-jobs"))[0]["status"] == "concluded":
            break
        await asyncio.sleep(0.05)
    done = (await cli.ok("domjobinfo", "vm1", "--completed", "--keep-completed", "--json")).json()
    assert done["type"] == 3 and done["success"] is True
    assert "Success:          yes" in (await cli.ok("domjobinfo", "vm1", "--completed")).out
    assert (await cli.ok("domjobinfo", "vm1", "--completed", "--json")).json() == {"type": 0}
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    same, msg = await imgtools.compare(ref, target, fmt_a="raw")
    assert same, msg


async def test_abort_from_another_process(vm_factory, cli):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    before = await node_names(vm.mon)
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    await cli.ok("backup-begin", "vm1", "--speed", str(1 * MiB))
    xml = (await cli.ok("backup-dumpxml", "vm1")).out
    target = xml.split("<target file='")[1].split("'")[0]
    await cli.ok("domjobabort", "vm1")
    done = (await cli.ok("domjobinfo", "vm1", "--completed", "--json")).json()
    assert done["type"] == 5 and done["success"] is False
    assert not os.path.exists(target)
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    res = await cli("domjobabort", "vm1")
    assert res.rc == 1 and "code 55" in res.err


async def test_dry_run_prints_the_plan_and_touches_nothing(vm_factory, cli, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB), ("vdb", "raw", 16 * MiB)])
    before = await node_names(vm.mon)
    listing = sorted(os.listdir(vm.workdir))
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    xml = tmp_path / "b.xml"
    xml.write_text(
        f"<domainbackup><disks><disk name='vdb'><target file='{tmp_path}/vdb.bak'/></disk>"
        "</disks></domainbackup>"
    )
    res = await cli.ok(
        "backup-begin", "vm1", "--backupxml", str(xml), "--dry-run", "--max-workers", "8"
    )
    steps = [json.loads(line) for line in res.out.splitlines()]
    commands = [s.get("execute") or s.get("local") for s in steps]
    # QEMU 9.1+ takes our descriptor of each image whatever the guest does; 7.2 only
    # while the guest runs (this one is paused), and then QEMU opens it by name
    version = (await vm.mon.execute("query-version"))["qemu"]
    by_fd = (version["major"], version["minor"]) >= (9, 1)
    image = [
        "create",  # the file, exclusively (and, by fd, handed to QEMU with add-fd)
        "blockdev-add",  # its storage node, not flushing while it is formatted
        "blockdev-create",
        "blockdev-reopen",  # flushing again
        "blockdev-add",  # its format node
        *(["remove-fd"] if by_fd else []),  # the nodes hold their own descriptors
    ]
    fleecing_image = [
        "create",  # a sparse raw file: its file node is the image
        "blockdev-add",
        *(["remove-fd"] if by_fd else []),
    ]
    assert commands == [
        *image,  # the target
        *fleecing_image,
        "blockdev-add",  # the copy-before-write filter
        "stop",  # only if the guest runs
        "transaction",  # the instant: checkpoint and temporary bitmaps
        "qom-set",  # the device onto the filter
        "cont",
        "blockdev-add",  # the snapshot-access view
        "transaction",  # the job, from the view into the target
    ]
    fleece = steps[len(image)]["path"]
    assert fleece.startswith(vm.disks["vdb"].path + ".fleece.")
    opened = [s for s in steps if s.get("execute") in ("blockdev-add", "blockdev-reopen")]
    named = [s for s in opened if s.get("fdset-of")]
    if by_fd:  # the storage nodes and their reopen name /dev/fdset/N, never the path
        assert [s["fdset-of"] for s in named] == [f"{tmp_path}/vdb.bak"] * 2 + [fleece]
        assert f"{tmp_path}/vdb.bak" not in json.dumps([s["arguments"] for s in opened])
    else:
        assert named == []
    assert steps[-1]["arguments"]["actions"][0]["data"]["device"] == steps[-2]["arguments"][
        "node-name"
    ]
    res = await cli.ok(
        "backup-begin", "vm1", "--backupxml", str(xml), "--dry-run", "--max-workers", "8",
        "--no-fleecing",
    )  # fmt: skip
    steps = [json.loads(line) for line in res.out.splitlines()]
    assert [s.get("execute") or s.get("local") for s in steps] == [*image, "transaction"]
    action = steps[-1]["arguments"]["actions"][0]
    assert action["type"] == "blockdev-backup"
    assert action["data"]["device"] == "vdb-fmt" and action["data"]["sync"] == "full"
    assert action["data"]["x-perf"] == {"max-workers": 8}
    assert not (tmp_path / "vdb.bak").exists()
    assert sorted(os.listdir(vm.workdir)) == listing
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    assert (await cli.ok("domjobinfo", "vm1", "--json")).json() == {"type": 0}


async def test_wait_shows_progress_and_finishes(vm_factory, cli):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    res = await cli.ok("backup-begin", "vm1", "--wait", "--speed", str(8 * MiB))
    lines = res.out.splitlines()
    assert lines[0] == "Backup started"
    assert any(line.startswith("[") and "MiB" in line for line in lines), res.out
    assert "Job type:         Completed" in res.out


async def test_killed_cli_process_leaves_a_job_the_next_one_takes_over(vm_factory, cli, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB), ("vdb", "raw", 16 * MiB)])
    before = await node_names(vm.mon)
    refs = {d: await vm.snapshot(d, str(tmp_path / f"{d}.ref")) for d in ("vda", "vdb")}
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    proc = await cli.start("backup-begin", "vm1", "--wait", "--speed", str(1 * MiB))
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert first.decode().strip() == "Backup started"
    await asyncio.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()

    info = (await cli.ok("domjobinfo", "vm1", "--json")).json()
    assert info["type"] == 2 and 0 < info["disk_processed"] < info["disk_total"]
    xml = (await cli.ok("backup-dumpxml", "vm1")).out
    await unthrottle(vm.mon)
    for _ in range(200):
        if all(j["status"] == "concluded" for j in await vm.mon.execute("query-jobs")):
            break
        await asyncio.sleep(0.05)
    done = (await cli.ok("domjobinfo", "vm1", "--completed", "--json")).json()
    assert done["type"] == 3 and done["success"] is True
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
    for disk in ("vda", "vdb"):
        target = xml.split(f"<disk name='{disk}'")[1].split("<target file='")[1].split("'")[0]
        same, msg = await imgtools.compare(refs[disk], target, fmt_a="raw")
        assert same, msg


async def test_checkpoint_commands_across_processes(vm_factory, cli):
    vm = await vm_factory([("vda", "qcow2", 8 * MiB), ("vdb", "qcow2", 8 * MiB)])
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    res = await cli.ok("checkpoint-create-as", "vm1", "--name", "c1")
    assert res.out.strip() == "Domain checkpoint c1 created"
    await cli.ok("checkpoint-create-as", "vm1", "--name", "c2", "--diskspec", "vda")
    await vm.write("vda", 0x5A, 0, 100 * 1024)
    listing = (await cli.ok("checkpoint-list", "vm1", "--json")).json()
    assert [(c["name"], c["parent"]) for c in listing] == [("c1", None), ("c2", "c1")]
    info = (await cli.ok("checkpoint-info", "vm1", "c1", "--json")).json()
    assert (info["children"], info["descendants"]) == (1, 1)
    xml = (await cli.ok("checkpoint-dumpxml", "vm1", "c2", "--size", "--no-domain")).out
    assert "<disk name='vda' checkpoint='bitmap' bitmap='c2' size='131072'/>" in xml
    assert "<disk name='vdb' checkpoint='no'/>" in xml
    res = await cli.ok("checkpoint-delete", "vm1", "c1")
    assert res.out.strip() == "Domain checkpoint c1 deleted"
    res = await cli("checkpoint-parent", "vm1", "c2")
    assert res.rc == 1 and "code 103" in res.err and "does not have a parent" in res.err
    res = await cli("checkpoint-create-as", "vm1", "--name", "c2")
    assert res.rc == 1 and "domain moment c2 already exists" in res.err


async def test_checkpoint_listing_options_and_deletes(vm_factory, cli, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 8 * MiB)])
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    xml = await cli.ok(
        "checkpoint-create-as",
        "vm1",
        "--name",
        "c1",
        "--description",
        "first & <best>",
        "--diskspec",
        "vda,checkpoint=bitmap",
        "--print-xml",
    )
    assert xml.out == (
        "<domaincheckpoint>\n"
        "  <name>c1</name>\n"
        "  <description>first &amp; &lt;best&gt;</description>\n"
        "  <disks>\n"
        "    <disk name='vda' checkpoint='bitmap'/>\n"
        "  </disks>\n"
        "</domaincheckpoint>\n"
    )
    assert (await cli.ok("checkpoint-list", "vm1", "--name")).out == ""  # print-xml made nothing
    path = tmp_path / "c1.xml"
    path.write_text(xml.out)
    res = await cli.ok("checkpoint-create", "vm1", "--xmlfile", str(path))
    assert res.out.strip() == f"Domain checkpoint c1 created from '{path}'"
    for name in ("c2", "c3"):
        await cli.ok("checkpoint-create-as", "vm1", "--name", name)
    # c2 and c3 are a chain below c1; make a second branch c4 below c1
    saved = (await cli.ok("checkpoint-dumpxml", "vm1", "c3", "--security-info")).out
    assert "<domain" in saved and "<parent>" in saved
    (tmp_path / "c3.xml").write_text(saved)
    await cli.ok("checkpoint-delete", "vm1", "c3", "--metadata")
    await cli.ok(
        "checkpoint-create",
        "vm1",
        "--xmlfile",
        str(tmp_path / "c3.xml"),
        "--redefine",
        "--redefine-validate",
    )
    assert (await cli.ok("checkpoint-parent", "vm1", "c3")).out.strip() == "c2"

    tree = (await cli.ok("checkpoint-list", "vm1", "--tree")).out
    assert tree == "c1\n  |\n  +- c2\n      |\n      +- c3\n"
    assert (await cli.ok("checkpoint-list", "vm1", "--roots", "--name")).out == "c1\n"
    assert (await cli.ok("checkpoint-list", "vm1", "--leaves", "--name")).out == "c3\n"
    assert (await cli.ok("checkpoint-list", "vm1", "--topological", "--name")).out == "c1\nc2\nc3\n"
    desc = await cli.ok("checkpoint-list", "vm1", "--from", "c1", "--descendants", "--name")
    assert desc.out == "c2\nc3\n"
    table = (await cli.ok("checkpoint-list", "vm1", "--parent")).out.splitlines()
    assert table[0].split() == ["Name", "Creation", "Time", "Parent"]
    assert table[2].split()[0] == "c1" and table[3].split()[-1] == "c1"
    res = await cli("checkpoint-list", "vm1", "--tree", "--name")
    assert res.rc == 2
    info = (await cli.ok("checkpoint-info", "vm1", "c2")).out
    assert "Parent:         c1" in info and "Children:       1" in info

    res = await cli.ok("checkpoint-delete", "vm1", "c1", "--children-only")
    assert res.out.strip() == "Domain checkpoint c1 children deleted"
    assert (await cli.ok("checkpoint-list", "vm1", "--name")).out == "c1\n"
    await cli.ok("checkpoint-create-as", "vm1", "--name", "c5")
    await cli.ok("checkpoint-delete", "vm1", "c1", "--children")
    assert (await cli.ok("checkpoint-list", "vm1", "--name")).out == ""
    nodes = await vm.mon.execute("query-named-block-nodes", {"flat": True})
    assert [b["name"] for n in nodes for b in n.get("dirty-bitmaps", [])] == []


async def test_full_and_incremental_backup_with_the_cli(vm_factory, cli, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    full = tmp_path / "full.qcow2"
    (tmp_path / "full.xml").write_text(
        f"<domainbackup><disks><disk name='vda'><target file='{full}'/></disk></disks>"
        "</domainbackup>"
    )
    (tmp_path / "c1.xml").write_text("<domaincheckpoint><name>c1</name></domaincheckpoint>")
    ref1 = await vm.snapshot("vda", str(tmp_path / "ref1"))
    await cli.ok(
        "backup-begin",
        "vm1",
        "--backupxml",
        str(tmp_path / "full.xml"),
        "--checkpointxml",
        str(tmp_path / "c1.xml"),
        "--wait",
    )
    assert (await cli.ok("checkpoint-list", "vm1", "--name")).out == "c1\n"
    await vm.write("vda", 0x42, 3 * MiB, 256 * 1024)
    inc = tmp_path / "inc.qcow2"
    (tmp_path / "inc.xml").write_text(
        "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'><incremental>c1</incremental>"
        f"<disks><disk name='vda'><target file='{inc}' pvb:backing='{full}'/></disk></disks>"
        "</domainbackup>"
    )
    (tmp_path / "c2.xml").write_text("<domaincheckpoint><name>c2</name></domaincheckpoint>")
    ref2 = await vm.snapshot("vda", str(tmp_path / "ref2"))
    res = await cli.ok(
        "backup-begin",
        "vm1",
        "--backupxml",
        str(tmp_path / "inc.xml"),
        "--checkpointxml",
        str(tmp_path / "c2.xml"),
        "--wait",
    )
    assert "Job type:         Completed" in res.out
    assert (await cli.ok("checkpoint-list", "vm1", "--name")).out == "c1\nc2\n"
    for ref, img in ((ref1, full), (ref2, inc)):
        same, msg = await imgtools.compare(ref, str(img), fmt_a="raw")
        assert same, msg


async def test_killed_cli_during_a_pull_then_abort_from_another(vm_factory, cli, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    before = await node_names(vm.mon)
    sock = tmp_path / "nbd.sock"
    scratch = tmp_path / "vda.scratch"
    (tmp_path / "pull.xml").write_text(
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
        f"<disks><disk name='vda'><scratch file='{scratch}'/></disk></disks></domainbackup>"
    )
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    proc = await cli.start(
        "backup-begin", "vm1", "--backupxml", str(tmp_path / "pull.xml"), "--wait"
    )
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert first.decode().strip() == "Backup started"
    await vm.write("vda", 0x55, 0, 1 * MiB)  # copied to the scratch before it lands
    proc.send_signal(signal.SIGKILL)
    await proc.wait()

    info = (await cli.ok("domjobinfo", "vm1", "--json")).json()
    assert info["type"] == 2 and info["disk_temp_used"] >= 1 * MiB
    assert sock.exists() and scratch.exists()
    await cli.ok("domjobabort", "vm1")
    done = (await cli.ok("domjobinfo", "vm1", "--completed", "--json")).json()
    assert done["type"] == 3 and done["success"] is True
    assert not sock.exists() and not scratch.exists()
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
