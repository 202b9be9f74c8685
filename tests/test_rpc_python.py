"""Debian's libvirt-python (a C extension of /usr/bin/python3) against ``pyvirtbackup serve``:
the default event loop, a backup, the JOB_COMPLETED and BLOCK_JOB_2 callbacks, job
stats, checkpoints, error numbers, many clients at once, and a pull backup whose NBD
server listens on a socket the client passed (virDomainFDAssociate, transport='fd').
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest

from pyvirtbackup.qemu import imgtools

from .rpctools import SYSTEM_PYTHON, MiB, RpcEnv, env_fixture, run

pytestmark = pytest.mark.asyncio(loop_scope="module")

env = env_fixture([("vda", "qcow2", 16 * MiB, "virtio")])

PRELUDE = """
import json, sys, threading, time
import libvirt
libvirt.registerErrorHandler(lambda ctx, err: None, None)
uri = sys.argv[1]
"""


def python(script: str, *args: str, timeout: float = 120.0) -> dict:
    """Run ``script`` with the system python; it prints one JSON object last."""
    result = run([SYSTEM_PYTHON, "-c", PRELUDE + textwrap.dedent(script), *args], timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


async def test_backup_with_event_loop_callbacks_and_stats(env: RpcEnv, tmp_path: Path) -> None:
    target = tmp_path / "vda.full.qcow2"
    before = await env.snapshot("vda", tmp_path / "before.raw")
    out = await asyncio.to_thread(
        python,
        """
        libvirt.virEventRegisterDefaultImpl()
        conn = libvirt.open(uri)
        dom = conn.lookupByName("vm1")
        done = threading.Event()
        seen = {"job": None, "blocks": []}
        def job_done(conn, dom, params, opaque):
            seen["job"] = params
            done.set()
        def block(conn, dom, disk, kind, status, opaque):
            seen["blocks"].append([disk, kind, status])
        conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job_done, None)
        conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, block, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                    lambda *a: None, None)
        xml = ("<domainbackup><disks><disk name='vda' type='file'>"
               f"<target file='{sys.argv[2]}'/></disk></disks></domainbackup>")
        chk = "<domaincheckpoint><name>py1</name></domaincheckpoint>"
        dom.backupBegin(xml, chk, 0)
        deadline = time.monotonic() + 60
        # libvirt sends JOB_COMPLETED before the last disk's BLOCK_JOB_2
        while not (done.is_set() and seen["blocks"]) and time.monotonic() < deadline:
            libvirt.virEventRunDefaultImpl()
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        try:
            dom.backupGetXMLDesc(0)
            code = 0
        except libvirt.libvirtError as e:
            code = e.get_error_code()
        chks = [c.getName() for c in dom.listAllCheckpoints()]
        print(json.dumps({"event": seen["job"], "blocks": seen["blocks"], "stats": stats,
                          "no_job_code": code, "checkpoints": chks,
                          "active": dom.isActive(), "lib": conn.getLibVersion()}))
        """,
        env.uri,
        str(target),
    )
    event = out["event"]
    assert event is not None, "no JOB_COMPLETED callback"
    assert event["operation"] == 9
    assert event["success"] is True  # a boolean, as from libvirt's daemon
    assert event["disk_total"] == event["disk_processed"] == 16 * MiB
    assert out["blocks"] == [["vda", 5, 0]]  # BACKUP, COMPLETED
    assert out["stats"]["type"] == 3 and out["stats"]["success"] is True
    assert out["no_job_code"] == 104  # VIR_ERR_NO_DOMAIN_BACKUP
    assert out["checkpoints"] == ["py1"]
    assert out["active"] == 1 and out["lib"] == 9000000
    same, message = await imgtools.compare(str(target), str(before))
    assert same, message


async def test_checkpoint_api_and_error_numbers(env: RpcEnv) -> None:
    out = await asyncio.to_thread(
        python,
        """
        conn = libvirt.open(uri)
        dom = conn.lookupByName("vm1")
        a = dom.checkpointCreateXML("<domaincheckpoint><name>pa</name></domaincheckpoint>", 0)
        b = dom.checkpointCreateXML("<domaincheckpoint><name>pb</name></domaincheckpoint>", 0)
        parent = b.getParent().getName()
        children = [c.getName() for c in a.listAllChildren(0)]
        codes = {}
        for what, call in (
            ("lookup", lambda: dom.checkpointLookupByName("nope")),
            ("again", lambda: dom.checkpointCreateXML(
                "<domaincheckpoint><name>pa</name></domaincheckpoint>", 0)),
            ("flags", lambda: dom.jobStats(0x80)),
            ("domain", lambda: conn.lookupByName("nosuchvm")),
            ("freeze", lambda: dom.fsFreeze()),
            ("abort", lambda: dom.abortJob()),
        ):
            try:
                call()
                codes[what] = 0
            except libvirt.libvirtError as e:
                codes[what] = [e.get_error_code(), e.get_error_message()]
        b.delete(0)
        a.delete(0)
        print(json.dumps({"parent": parent, "children": children, "codes": codes,
                          "left": [c.getName() for c in dom.listAllCheckpoints()]}))
        """,
        env.uri,
    )
    assert out["parent"] == "pa" and out["children"] == ["pb"]
    codes = out["codes"]
    assert codes["lookup"][0] == 103  # NO_DOMAIN_CHECKPOINT
    assert codes["again"][0] == 9 and "already exists" in codes["again"][1]
    assert codes["flags"][0] == 8  # INVALID_ARG
    assert codes["domain"][0] == 42  # NO_DOMAIN
    # virtnbdbackup's fsFreeze on a domain attached without --agent: libvirt's error
    assert codes["freeze"] == [74, "argument unsupported: QEMU guest agent is not configured"]
    assert codes["abort"][0] == 55
    assert "pa" not in out["left"] and "pb" not in out["left"]


async def test_many_clients_at_once(env: RpcEnv) -> None:
    """Twenty clients, each with its own connection, all answered."""
    script = """
        conn = libvirt.open(uri)
        dom = conn.lookupByName("vm1")
        print(json.dumps({"xml": len(dom.XMLDesc(0)), "state": dom.state()}))
    """
    results = await asyncio.gather(*(asyncio.to_thread(python, script, env.uri) for _ in range(20)))
    assert all(r["xml"] > 100 and r["state"][0] == 3 for r in results)


async def test_pull_on_a_passed_listening_socket(env: RpcEnv, tmp_path: Path) -> None:
    """The client binds the NBD socket, passes it with FDAssociate; QEMU serves on it."""
    before = await env.snapshot("vda", tmp_path / "before.raw")
    nbd_sock = tmp_path / "client-nbd.sock"
    copy = tmp_path / "copy.raw"
    out = await asyncio.to_thread(
        python,
        """
        import socket, subprocess
        conn = libvirt.open(uri)
        dom = conn.lookupByName("vm1")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sys.argv[2])
        listener.listen(4)
        dom.FDAssociate("nbdgroup", [listener.fileno()], 0)
        xml = ("<domainbackup mode='pull'><server transport='fd' fdgroup='nbdgroup'/>"
               "<disks><disk name='vda' type='file'>"
               f"<scratch file='{sys.argv[2]}.scratch'/></disk></disks></domainbackup>")
        before = dom.blockJobInfo("vda", 0)
        dom.backupBegin(xml, None, 0)
        live = dom.backupGetXMLDesc(0)
        during = dom.blockJobInfo("vda", 0)
        copied = subprocess.run(["nbdcopy", f"nbd+unix:///vda?socket={sys.argv[2]}",
                                 sys.argv[3]], capture_output=True, text=True)
        try:
            dom.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
            postcopy = 0
        except libvirt.libvirtError as e:
            postcopy = [e.get_error_code(), e.get_error_message()]
        dom.abortJobFlags(0)
        try:
            dom.backupBegin(xml.replace("nbdgroup", "other"), None, 0)
            missing = 0
        except libvirt.libvirtError as e:
            missing = e.get_error_code()
        print(json.dumps({"live": live, "copied": copied.returncode, "err": copied.stderr,
                          "missing": missing, "before": before, "during": during,
                          "postcopy": postcopy, "after": dom.blockJobInfo("vda", 0)}))
        """,
        env.uri,
        str(nbd_sock),
        str(copy),
    )
    assert "transport='fd'" in out["live"] and "fdgroup='nbdgroup'" in out["live"]
    assert out["copied"] == 0, out["err"]
    assert out["missing"] == 8  # an fd group nobody associated: INVALID_ARG
    # virtnbdbackup's question before a backup, and the disk's block job during one
    assert out["before"] == {} and out["after"] == {}
    assert out["during"]["type"] == 5  # VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP
    # a pull's progress is what copy-before-write has saved so far (none: no writes)
    assert 0 <= out["during"]["cur"] <= out["during"]["end"] <= 16 * MiB
    assert out["postcopy"] == [
        55,
        "Requested operation is not valid: current job is not outgoing migration in post-copy mode",
    ]
    same, message = await imgtools.compare(str(copy), str(before))
    assert same, message


async def test_begin_flags_pass_through(env: RpcEnv, tmp_path: Path) -> None:
    """Flags reach the driver unchanged: PRESERVE_SHUTDOWN_DOMAIN (2, newer than this
    libvirt-python) is accepted, an unknown bit refused with libvirt's INVALID_ARG."""
    out = await asyncio.to_thread(
        python,
        """
        conn = libvirt.open(uri)
        dom = conn.lookupByName("vm1")
        xml = ("<domainbackup><disks><disk name='vda' type='file'>"
               f"<target file='{sys.argv[2]}'/></disk></disks></domainbackup>")
        try:
            dom.backupBegin(xml, None, 0x80)
            unknown = 0
        except libvirt.libvirtError as e:
            unknown = e.get_error_code()
        dom.backupBegin(xml, None, 2)
        deadline = time.monotonic() + 60
        while dom.jobStats(0)["type"] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        print(json.dumps({"unknown": unknown, "stats": stats}))
        """,
        env.uri,
        str(tmp_path / "preserve.qcow2"),
    )
    assert out["unknown"] == 8
    assert out["stats"]["type"] == 3 and out["stats"]["success"] is True
