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
    assert commands == [
        "create",  # the target file, exclusively
        "blockdev-add",  # a no-flush node to format it through
        "blockdev-create",
        "blockdev-del",
        "blockdev-add",  # the target's storage node
        "blockdev-add",  # its format node
        "transaction",
    ]
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
