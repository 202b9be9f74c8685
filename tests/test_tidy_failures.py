"""Failures stay tidy: damaged records are reported and set aside (never a traceback,
never a leaked monitor), another VM on a domain's socket is refused, and QEMU's death
ends a push the way any other failure does (issue 12, items 10, 11, 13).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal

import pytest

from pyvirtbackup import Driver, ErrorNumber, JobType, VirError
from pyvirtbackup.qemu.monitor import Monitor

from .clitools import CLI
from .conftest import MiB
from .drivertools import EventLog, checkpoint_xml

pytestmark = pytest.mark.asyncio

UUID_A = "0f8e2c1a-5b6d-4e7f-8a9b-1c2d3e4f5a6b"
UUID_B = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


def qmp_on(path: str) -> list[str]:
    return ["-qmp", f"unix:{path},server=on,wait=off"]


async def can_connect(path: str) -> bool:
    """QEMU serves one client per monitor socket: a connection we leaked blocks this."""
    mon = Monitor("test-probe")
    try:
        await mon.connect(path, timeout=3)
        await mon.execute("query-status", timeout=3)
        return True
    except VirError:
        return False
    finally:
        await mon.close()


# ----------------------------------------------------------------- item 11: identity


async def test_another_vm_on_the_recorded_socket_is_refused(vm_factory, tmp_path):
    sock = str(tmp_path / "vm1.qmp")
    state = tmp_path / "state"
    vm_a = await vm_factory(
        [("vda", "qcow2", 16 * MiB)], extra_args=["-uuid", UUID_A, *qmp_on(sock)]
    )
    async with Driver(state_dir=state) as drv:
        dom = await drv.attach("vm1", sock)
        assert dom.UUIDString() == UUID_A
        await drv.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
    await vm_a.quit()

    vm_b = await vm_factory(
        [("vda", "qcow2", 16 * MiB)], subdir="b", extra_args=["-uuid", UUID_B, *qmp_on(sock)]
    )
    async with Driver(state_dir=state) as drv:
        with pytest.raises(VirError) as exc:
            await drv.attach("vm1", sock)
        assert exc.value.code == ErrorNumber.OPERATION_FAILED
        assert UUID_A in exc.value.message and UUID_B in exc.value.message
        assert await can_connect(sock), "the refused attach left its monitor connected"
    res = await CLI(state)("checkpoint-list", "vm1", "--name")
    assert res.rc == 1 and "code 9" in res.err and "c1" not in res.out
    listing = (await CLI(state).ok("list", "--json")).json()
    assert listing[0]["state"] == "shut off"  # not vm_b's state under vm1's name
    await vm_b.quit()

    # the same VM back (same uuid) is vm1 again, with its checkpoints
    await vm_factory(
        [("vda", "qcow2", 16 * MiB)],
        existing=vm_a.disks,
        subdir="a2",
        extra_args=["-uuid", UUID_A, *qmp_on(sock)],
    )
    assert (await CLI(state).ok("checkpoint-list", "vm1", "--name")).out == "c1\n"


async def test_another_vm_behind_a_dropped_monitor_is_not_followed(vm_factory, tmp_path):
    """The monitor drops mid-backup and another VM now answers on the socket's path:
    the backup is not followed into that VM (its node that bears one of our names is
    left alone), the backup fails."""
    link, sock_a, sock_b = (str(tmp_path / n) for n in ("vm1.qmp", "a.qmp", "b.qmp"))
    vm_a = await vm_factory(
        [("vda", "qcow2", 16 * MiB)], extra_args=["-uuid", UUID_A, *qmp_on(sock_a)]
    )
    vm_b = await vm_factory(
        [("vda", "qcow2", 16 * MiB)], subdir="b", extra_args=["-uuid", UUID_B, *qmp_on(sock_b)]
    )
    # B's own node, which happens to bear a name of the backup below
    await vm_b.mon.execute("blockdev-add", {"driver": "null-co", "node-name": "pvb-1-format"})
    before = {n["node-name"] for n in await vm_b.mon.execute("query-named-block-nodes")}
    os.symlink(sock_a, link)
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", link)
        events = EventLog()
        await events.register(drv, dom)
        await drv.domainBackupBegin(dom, None, tuning={"speed": 1 * MiB})
        os.unlink(link)
        os.symlink(sock_b, link)  # the path now leads to B
        vm_a.proc.kill(signal.SIGKILL)
        final = await events.wait()
        assert final["type"] == JobType.FAILED
        after = {n["node-name"] for n in await vm_b.mon.execute("query-named-block-nodes")}
        assert after == before and await vm_b.mon.execute("query-jobs") == []


async def test_a_vm_without_uuid_keeps_its_made_up_one_and_refuses_one_with_a_uuid(
    vm_factory, tmp_path
):
    sock = str(tmp_path / "vm1.qmp")
    state = tmp_path / "state"
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], extra_args=qmp_on(sock))
    async with Driver(state_dir=state) as drv:
        made_up = (await drv.attach("vm1", sock)).UUIDString()
    await vm.quit()
    vm = await vm_factory(existing=vm.disks, subdir="again", extra_args=qmp_on(sock))
    async with Driver(state_dir=state) as drv:
        assert (await drv.attach("vm1", sock)).UUIDString() == made_up
    await vm.quit()
    await vm_factory(existing=vm.disks, subdir="b", extra_args=["-uuid", UUID_B, *qmp_on(sock)])
    async with Driver(state_dir=state) as drv:
        with pytest.raises(VirError, match=UUID_B):
            await drv.attach("vm1", sock)


# ------------------------------------------------------------ item 10: damaged records


def _state_file(state, name: str):
    return state / "domains" / "vm1" / name


@pytest.mark.parametrize(
    "damage", ["{not json", "[1, 2]", '{"type": "x"}', '{"type": 3, "errmsg": 5}', "\xff\xfe"]
)
async def test_a_damaged_completed_record_is_set_aside(vm_factory, tmp_path, damage):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    cli = CLI(tmp_path / "state")
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    _state_file(cli.state_dir, "completed-job.json").write_bytes(damage.encode("latin-1"))

    res = await cli("domjobabort", "vm1")
    assert res.rc == 1 and "code 55" in res.err and "Traceback" not in res.err, res
    assert "completed-job.json is damaged" in res.err  # said once, as a warning
    assert (await cli.ok("domjobinfo", "vm1", "--completed", "--json")).json() == {"type": 0}
    assert not _state_file(cli.state_dir, "completed-job.json").exists()
    assert list(_state_file(cli.state_dir, "").glob("completed-job.json.unreadable-*"))


async def test_a_damaged_completed_record_does_not_leak_the_monitor(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    async with Driver(state_dir=state, connect_timeout=3) as drv:
        await drv.attach("vm1", vm.qmp)
    _state_file(state, "completed-job.json").write_text("{not json")
    async with Driver(state_dir=state, connect_timeout=3) as drv:
        dom = await drv.attach("vm1", vm.qmp)
        assert any("damaged" in p for p in dom.recovery_problems)
        await drv.detach(dom)
        await drv.attach("vm1", vm.qmp)  # within the timeout: nothing held the socket
    assert await can_connect(vm.qmp)


@pytest.mark.parametrize(
    ("record", "named"),
    [
        ({"name": "vm1", "uuid": "u", "qmp": 5}, "'qmp'"),
        ({"name": "vm1", "uuid": 7, "qmp": "/run/x.qmp"}, "'uuid'"),
        ({"name": "vm1", "uuid": "u", "qmp": "/x", "disks": ["vda"]}, "'disks'"),
        ([], "not a JSON object"),
    ],
)
async def test_a_damaged_domain_record_is_an_error_not_a_traceback(
    vm_factory, tmp_path, record, named
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    cli = CLI(tmp_path / "state")
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    _state_file(cli.state_dir, "domain.json").write_text(json.dumps(record))
    commands = [["domjobabort", "vm1"], ["domjobinfo", "vm1"], ["checkpoint-list", "vm1"]]
    for command in commands if named == "'qmp'" else commands[:1]:
        res = await cli(*command)
        assert res.rc == 1 and "Traceback" not in res.err, res
        assert "domain.json is damaged" in res.err and named in res.err and "code 1 " in res.err
    listing = await cli.ok("list", "--json")  # still lists the others (and this one, off)
    assert listing.json()[0]["state"] == "shut off"
    await cli.ok("detach", "vm1")  # and the way out works
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)


async def test_a_wrongly_typed_job_record_is_set_aside(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    cli = CLI(tmp_path / "state")
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    _state_file(cli.state_dir, "backup.json").write_text(
        json.dumps({"mode": "push", "disks": "vda", "status_xml": "<domainbackup/>"})
    )
    res = await cli("domjobabort", "vm1")
    assert res.rc == 1 and "code 55" in res.err and "Traceback" not in res.err, res
    assert "set aside" in res.err
    assert list(_state_file(cli.state_dir, "").glob("backup.json.unreadable-*"))
    assert (await cli.ok("domjobinfo", "vm1", "--json")).json() == {"type": 0}


# ------------------------------------------------------------------ item 13: QEMU dies


async def test_a_push_that_failed_because_qemu_died_drops_its_checkpoint(
    vm_factory, tmp_path, caplog
):
    """Like every other failed push: the checkpoint taken with it goes, the previous
    one is current again, and nothing complains about futures nobody awaited."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    caplog.set_level(logging.WARNING)
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        await drv.domainCheckpointCreateXML(dom, checkpoint_xml("c0"))
        events = EventLog()
        await events.register(drv, dom)
        await drv.domainBackupBegin(dom, None, checkpoint_xml("c1"), tuning={"speed": 1 * MiB})
        assert dom.checkpoints.current == "c1"
        vm.proc.kill(signal.SIGKILL)
        await vm.proc.proc.wait()
        final = await events.wait()
        assert final["type"] == JobType.FAILED and "QEMU exited" in final["errmsg"]
        assert [c.getName() for c in await drv.domainListAllCheckpoints(dom)] == ["c0"]
        assert dom.checkpoints.current == "c0"
    state_chk = tmp_path / "state" / "domains" / "vm1" / "checkpoints"
    assert sorted(os.listdir(state_chk)) == ["c0.xml"]
    gc.collect()
    await asyncio.sleep(0.05)
    noise = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert noise == []
    assert any("checkpoint 'c1' removed" in r.getMessage() for r in caplog.records)


async def test_the_cli_says_qemu_died_and_nothing_else(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    cli = CLI(tmp_path / "state")
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    chk = tmp_path / "c1.xml"
    chk.write_text(checkpoint_xml("c1"))
    proc = await cli.start(
        "backup-begin", "vm1", "--checkpointxml", str(chk), "--wait", "--speed", str(1 * MiB)
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"Backup started"
    vm.proc.kill(signal.SIGKILL)
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1
    assert "error: backup failed: QEMU exited while the backup was running" in text
    for noise in ("never retrieved", "Traceback", "EOFError", "ConnectionResetError"):
        assert noise not in text, text
    async with Driver(state_dir=cli.state_dir) as drv:
        (dom,) = await drv.connectListAllDomains()
        assert await drv.domainListAllCheckpoints(dom) == []
