"""Debian's unchanged virsh against ``pyvirtbackup serve``: lookups, backups push and pull,
job info, abort, checkpoints, events, errors with libvirt's messages.

One QEMU and one daemon for the module; every command is a real ``virsh -c
'qemu:///system?socket=...'`` subprocess, and the bytes are checked with qemu-img and
NBD clients.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

from pyvirtbackup.qemu import imgtools

from .rpctools import MiB, RpcEnv, cli, env_fixture, run, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

env = env_fixture([("sda", "qcow2", 16 * MiB, "scsi"), ("vdb", "raw", 8 * MiB, "virtio")])


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"rc {result.returncode}: {result.stdout}{result.stderr}"
    return result.stdout


def fails(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, f"rc {result.returncode}: {result.stdout}{result.stderr}"
    return result.stderr


async def finished(env: RpcEnv) -> None:
    await wait_for(lambda: "Job type:         None" in ok(env.virsh("domjobinfo", "vm1")))


async def test_list_dominfo_domstate(env: RpcEnv) -> None:
    listing = ok(env.virsh("list", "--all"))
    rows = [line.split() for line in listing.splitlines()[2:] if line.strip()]
    assert rows == [["1", "vm1", "paused"]]  # QEMU was started with -S
    lines = ok(env.virsh("dominfo", "vm1")).splitlines()
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines) if v}
    record = json.loads((env.state_dir / "domains/vm1/domain.json").read_text())
    assert info["Name"] == "vm1"
    assert info["Id"] == "1"
    assert info["UUID"] == record["uuid"]
    assert info["State"] == "paused"
    assert info["Persistent"] == "yes"
    assert info["Max memory"] == "131072 KiB"
    assert ok(env.virsh("domstate", "vm1", "--reason")).strip() == "paused (user)"
    assert ok(env.virsh("domuuid", "vm1")).strip() == record["uuid"]
    assert ok(env.virsh("domname", record["uuid"])).strip() == "vm1"
    assert ok(env.virsh("domid", "vm1")).strip() == "1"
    stderr = fails(env.virsh("dominfo", "nosuchvm"))
    assert "failed to get domain 'nosuchvm'" in stderr  # virsh's words after its lookups


async def test_dumpxml_describes_the_disks(env: RpcEnv) -> None:
    root = etree.fromstring(ok(env.virsh("dumpxml", "vm1")).encode())
    assert root.tag == "domain" and root.get("id") == "1"
    assert root.findtext("name") == "vm1"
    disks = {
        d.find("target").get("dev"): (
            d.get("type"),
            d.get("device"),
            d.find("driver").get("type"),
            d.find("source").get("file"),
            d.find("target").get("bus"),
        )
        for d in root.iterfind("devices/disk")
    }
    assert disks == {
        "sda": ("file", "disk", "qcow2", env.disks["sda"][0], "scsi"),
        "vdb": ("file", "disk", "raw", env.disks["vdb"][0], "virtio"),
    }


async def test_attach_and_detach_while_serving(env: RpcEnv) -> None:
    """The CLI records a domain; the running daemon's clients see it at once."""
    attached = await asyncio.to_thread(
        cli, env.state_dir, "attach", "vm2", "--qmp", env.extra_qmp, "--disk", "sda=sda-fmt"
    )
    assert attached.returncode == 0, attached.stderr
    start = time.monotonic()
    listing = ok(env.virsh("list", "--all", "--name"))
    assert listing.split() == ["vm1", "vm2"]
    assert time.monotonic() - start < 1.0
    detached = await asyncio.to_thread(cli, env.state_dir, "detach", "vm2")
    assert detached.returncode == 0, detached.stderr
    assert ok(env.virsh("list", "--all", "--name")).split() == ["vm1"]
    assert "failed to get domain 'vm2'" in fails(env.virsh("dominfo", "vm2"))


async def test_push_with_checkpoint_then_jobinfo_completed(env: RpcEnv, tmp_path: Path) -> None:
    before = await env.snapshot("sda", tmp_path / "sda-before.raw")
    target = tmp_path / "sda.full.qcow2"
    backup_xml = tmp_path / "backup.xml"
    backup_xml.write_text(
        "<domainbackup><disks><disk name='sda' type='file'>"
        f"<target file='{target}'/><driver type='qcow2'/></disk></disks></domainbackup>"
    )
    chk_xml = tmp_path / "chk.xml"
    chk_xml.write_text(
        "<domaincheckpoint><name>p1</name><disks><disk name='sda'/></disks></domaincheckpoint>"
    )
    assert (
        ok(
            env.virsh(
                "backup-begin",
                "vm1",
                "--backupxml",
                str(backup_xml),
                "--checkpointxml",
                str(chk_xml),
            )
        ).strip()
        == "Backup started"
    )
    await finished(env)
    completed = ok(env.virsh("domjobinfo", "vm1", "--completed", "--keep-completed"))
    assert "Job type:         Completed" in completed
    assert "Operation:        Backup" in completed
    assert "File total:       16.000 MiB" in completed
    assert "File remaining:   0.000 B" in completed
    raw = ok(env.virsh("domjobinfo", "vm1", "--completed", "--rawstats"))
    assert "success: 1" in raw and "operation: 9" in raw
    same, message = await imgtools.compare(str(target), str(before))
    assert same, message
    assert ok(env.virsh("checkpoint-list", "vm1", "--name")).split() == ["p1"]
    # without KEEP_COMPLETED the completed job is read once
    ok(env.virsh("domjobinfo", "vm1", "--completed"))
    assert "Job type:         None" in ok(env.virsh("domjobinfo", "vm1", "--completed"))


async def test_push_without_xml_backs_up_every_disk(env: RpcEnv) -> None:
    assert ok(env.virsh("backup-begin", "vm1")).strip() == "Backup started"
    await finished(env)
    assert "Job type:         Completed" in ok(env.virsh("domjobinfo", "vm1", "--completed"))
    for name in ("sda", "vdb"):
        path = Path(env.disks[name][0])
        made = sorted(path.parent.glob(path.name + ".1*"))
        assert len(made) == 1, made
        same, message = await imgtools.compare(str(made[0]), str(path))
        assert same, message
        made[0].unlink()


async def test_push_reuse_external(env: RpcEnv, tmp_path: Path) -> None:
    """--reuse-external: the target the user made is written, not refused."""
    target = tmp_path / "made-by-user.qcow2"
    await imgtools.create(str(target), 16 * MiB, "qcow2")
    xml = tmp_path / "reuse.xml"
    xml.write_text(
        "<domainbackup><disks><disk name='sda' type='file'>"
        f"<target file='{target}'/></disk></disks></domainbackup>"
    )
    assert "exists" in fails(env.virsh("backup-begin", "vm1", "--backupxml", str(xml)))
    before = await env.snapshot("sda", tmp_path / "before.raw")
    ok(env.virsh("backup-begin", "vm1", "--backupxml", str(xml), "--reuse-external"))
    await finished(env)
    same, message = await imgtools.compare(str(target), str(before))
    assert same, message


async def test_pull_with_and_without_checkpoint(env: RpcEnv, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    scratch = tmp_path / "scratch.qcow2"
    pull = tmp_path / "pull.xml"
    pull.write_text(
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
        f"<disks><disk name='sda' type='file'><scratch file='{scratch}'/></disk></disks>"
        "</domainbackup>"
    )
    chk = tmp_path / "chk.xml"
    chk.write_text(  # a raw disk holds no bitmap: the qcow2 one only
        "<domaincheckpoint><name>q1</name><disks><disk name='sda'/></disks></domaincheckpoint>"
    )
    for checkpoint in (["--checkpointxml", str(chk)], []):
        before = await env.snapshot("sda", tmp_path / "before.raw")
        ok(env.virsh("backup-begin", "vm1", "--backupxml", str(pull), *checkpoint))
        live = etree.fromstring(ok(env.virsh("backup-dumpxml", "vm1")).encode())
        disk = live.find("disks/disk[@name='sda']")
        assert live.get("mode") == "pull"
        assert disk.get("exportname") == "sda"
        assert live.find("server").get("socket") == str(sock)
        assert "Job type:         Unbounded" in ok(env.virsh("domjobinfo", "vm1"))
        await env.write("sda", 0x77, 0, MiB)  # the guest goes on; the export does not change
        copy = tmp_path / "copy.raw"
        copied = run(["nbdcopy", f"nbd+unix:///sda?socket={sock}", str(copy)])
        assert copied.returncode == 0, copied.stderr
        same, message = await imgtools.compare(str(copy), str(before))
        assert same, message
        assert ok(env.virsh("domjobabort", "vm1")) is not None
        completed = ok(env.virsh("domjobinfo", "vm1", "--completed"))
        assert "Job type:         Completed" in completed
        assert "Error message:    Operation canceled" in completed
        assert not scratch.exists() and not sock.exists()
        copy.unlink()
    assert "q1" in ok(env.virsh("checkpoint-list", "vm1", "--name")).split()


async def test_checkpoints(env: RpcEnv, tmp_path: Path) -> None:
    assert ok(
        env.virsh("checkpoint-create-as", "vm1", "c1", "first", "--diskspec", "sda")
    ).strip() == ("Domain checkpoint c1 created")
    await env.write("sda", 0x31, 2 * MiB, MiB)
    ok(env.virsh("checkpoint-create-as", "vm1", "--name", "c2", "--diskspec", "sda"))
    names = ok(env.virsh("checkpoint-list", "vm1", "--name", "--topological")).split()
    assert names[-2:] == ["c1", "c2"]
    tree = ok(env.virsh("checkpoint-list", "vm1", "--tree"))
    assert "+- c2" in tree
    table = ok(env.virsh("checkpoint-list", "vm1", "--parent"))
    row = next(line.split() for line in table.splitlines() if line.split()[:1] == ["c2"])
    assert row[0] == "c2" and row[-1] == "c1"
    sized = etree.fromstring(ok(env.virsh("checkpoint-dumpxml", "vm1", "c1", "--size")).encode())
    assert sized.find("disks/disk[@name='sda']").get("size") == str(MiB)
    assert sized.find("domain") is not None
    bare = etree.fromstring(
        ok(env.virsh("checkpoint-dumpxml", "vm1", "c1", "--no-domain")).encode()
    )
    assert bare.find("domain") is None and bare.findtext("description") == "first"
    assert ok(env.virsh("checkpoint-parent", "vm1", "c2")).strip() == "c1"
    assert ok(env.virsh("checkpoint-delete", "vm1", "c1")).strip() == (
        "Domain checkpoint c1 deleted"
    )
    assert "c1" not in ok(env.virsh("checkpoint-list", "vm1", "--name")).split()
    stderr = fails(env.virsh("checkpoint-dumpxml", "vm1", "c1"))
    assert "Domain checkpoint not found" in stderr
    assert "checkpoint for disk vdb unsupported for storage type raw" in fails(
        env.virsh("checkpoint-create-as", "vm1", "c9")
    )
    redefined = tmp_path / "c1.xml"
    redefined.write_text(
        "<domaincheckpoint><name>c1</name><creationTime>1700000000</creationTime>"
        "<disks><disk name='sda' checkpoint='bitmap' bitmap='c1'/></disks></domaincheckpoint>"
    )
    created = ok(env.virsh("checkpoint-create", "vm1", str(redefined), "--redefine"))
    assert created.strip() == f"Domain checkpoint c1 created from '{redefined}'"
    assert "c1" in ok(env.virsh("checkpoint-list", "vm1", "--name")).split()
    ok(env.virsh("checkpoint-delete", "vm1", "c1", "--metadata"))
    ok(env.virsh("checkpoint-delete", "vm1", "c2", "--metadata"))


async def test_errors_carry_libvirt_messages(env: RpcEnv, tmp_path: Path) -> None:
    assert "Domain backup job id not found: no domain backup job present" in fails(
        env.virsh("backup-dumpxml", "vm1")
    )
    assert "Requested operation is not valid: no job is active" in fails(
        env.virsh("domjobabort", "vm1")
    )
    bad = tmp_path / "bad.xml"
    bad.write_text("<domainbackup><disks><disk name='nope'/></disks></domainbackup>")
    assert "unsupported configuration: no disk named 'nope'" in fails(
        env.virsh("backup-begin", "vm1", "--backupxml", str(bad))
    )
    # a read-only connection reads and is refused changes
    readonly = run(["virsh", "-r", "-c", env.uri, "domjobabort", "vm1"])
    assert readonly.returncode == 1
    assert "operation forbidden: read only access prevents" in readonly.stderr
    assert run(["virsh", "-r", "-c", env.uri, "domstate", "vm1"]).stdout.strip() == "paused"
    # a procedure not served: NO_SUPPORT, named, and the connection goes on serving
    stderr = fails(env.virsh("snapshot-list", "vm1"))
    assert "this function is not supported by the connection driver" in stderr
    assert "REMOTE_PROC_DOMAIN_" in stderr


async def test_domjobabort_push_and_event(env: RpcEnv, tmp_path: Path) -> None:
    """A throttled push aborted by domjobabort; ``virsh event`` sees its job-completed."""
    ok(env.virsh("domjobinfo", "vm1", "--completed"))  # forget earlier completed jobs
    await asyncio.to_thread(env.daemon.stop)
    env.daemon.extra = ["--speed", str(MiB)]  # 16 MiB at 1 MiB/s: time to abort
    await asyncio.to_thread(env.daemon.start)
    watcher = await asyncio.create_subprocess_exec(
        *["virsh", "-c", env.uri, "event", "vm1", "--event", "job-completed", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await asyncio.sleep(0.5)  # registered before the job ends
        target = tmp_path / "slow.qcow2"
        xml = tmp_path / "slow.xml"
        xml.write_text(
            "<domainbackup><disks><disk name='sda' type='file'>"
            f"<target file='{target}'/></disk></disks></domainbackup>"
        )
        ok(env.virsh("backup-begin", "vm1", "--backupxml", str(xml)))
        assert "Job type:         Unbounded" in ok(env.virsh("domjobinfo", "vm1"))
        ok(env.virsh("domjobabort", "vm1"))
        completed = ok(env.virsh("domjobinfo", "vm1", "--completed"))
        assert "Job type:         Cancelled" in completed
        assert not target.exists()  # a cancelled push removes the target it made
        raw_out, raw_err = await asyncio.wait_for(watcher.communicate(), 60)
        out, err = raw_out.decode(), raw_err.decode()
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
        await asyncio.to_thread(env.daemon.stop)
        env.daemon.extra = []
        await asyncio.to_thread(env.daemon.start)
    assert "event 'job-completed' for domain 'vm1'" in out, out + err
    assert "operation: 9" in out
    assert "success: 0" in out
    assert "events received: 1" in out
