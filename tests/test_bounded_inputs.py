"""Every input bounded and every output safe (issue 12, items 6-9): documents are
capped before they are parsed and checked in linear time, stored checkpoints are read
lazily, paths are absolute, names and what we print carry no terminal controls, and
errors quote a short excerpt of a document, never all of it.
"""

from __future__ import annotations

import os

import pytest

from pyvirtbackup import CheckpointCreateFlags, Driver, ErrorNumber, VirError
from pyvirtbackup import checkpoints as checkpoints_mod

from .clitools import CLI
from .conftest import MiB
from .drivertools import NOTHING_LEFT, checkpoint_xml, leftovers, node_names

pytestmark = pytest.mark.asyncio
REDEFINE = CheckpointCreateFlags.REDEFINE
CONTROLS = ("\x1b", "\x07", "\r", "\t", "\x9b", "\u202e")


def redefine_xml(name: str, uuid: str, body: str, parent: str | None = None) -> str:
    """A checkpoint to REDEFINE whose <domain> carries ``body`` beside its one disk."""
    up = f"<parent><name>{parent}</name></parent>" if parent else ""
    return (
        f"<domaincheckpoint><name>{name}</name>{up}<creationTime>1700000000</creationTime>"
        f"<domain type='kvm'><name>vm1</name><uuid>{uuid}</uuid><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/images/vda.qcow2'/><target dev='vda'/></disk></devices>"
        f"{body}</domain></domaincheckpoint>"
    )


# ------------------------------------------------------------ item 6: bounded XML


async def test_documents_too_big_are_refused_before_validation(vm_factory, driver):
    """A 1 MB REDEFINE of 250,000 sibling elements took minutes to validate and then
    every attach took as long again; now it is refused at once and nothing is kept."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    uuid = dom.UUIDString()
    cases = {
        "elements": redefine_xml("c1", uuid, "<x/>" * 250_000),
        "bytes": redefine_xml("c1", uuid, f"<description>{'d' * (5 * MiB)}</description>"),
        "depth": redefine_xml("c1", uuid, "<m>" * 100 + "</m>" * 100),
    }
    for what, xml in cases.items():
        with pytest.raises(VirError) as exc:
            await driver.domainCheckpointCreateXML(dom, xml, REDEFINE)
        assert exc.value.code == ErrorNumber.XML_ERROR, what
        assert "document refused" in exc.value.message, what
        assert len(exc.value.message) < 200
    assert await driver.domainListAllCheckpoints(dom) == []
    assert driver.state.domain("vm1").checkpoint_names() == []
    # backups are bounded the same way
    many_disks = "".join(f"<disk name='d{i}'/>" for i in range(30_000))
    with pytest.raises(VirError) as exc:
        await driver.domainBackupBegin(
            dom, f"<domainbackup><disks>{many_disks}</disks></domainbackup>"
        )
    assert exc.value.code == ErrorNumber.XML_ERROR
    assert await vm.mon.execute("query-jobs") == []


async def test_a_large_domain_within_bounds_is_accepted_and_checked_in_code(vm_factory, driver):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    uuid = dom.UUIDString()
    big = redefine_xml("c1", uuid, f"<x a='{'v' * 60}'/>" * 14_500)
    assert len(big) > 1_000_000
    chk = await driver.domainCheckpointCreateXML(dom, big, REDEFINE)
    assert (await driver.domainCheckpointGetXMLDesc(chk)).count("<x a=") == 14_500
    # what the code reads of <domain> is still checked
    for body, culprit in (
        ("<uuid>not-a-uuid</uuid>", "more than one <uuid>"),
        ("<devices><disk type='file'/></devices>", "missing target"),
    ):
        with pytest.raises(VirError, match=culprit) as exc:
            await driver.domainCheckpointCreateXML(dom, redefine_xml("c2", uuid, body), REDEFINE)
        assert exc.value.code == ErrorNumber.XML_ERROR
    bad_uuid = redefine_xml("c2", uuid, "").replace(uuid, "zz-not-a-uuid")
    with pytest.raises(VirError, match="invalid <uuid>"):
        await driver.domainCheckpointCreateXML(dom, bad_uuid, REDEFINE)


async def test_stored_checkpoints_are_read_lazily(vm_factory, tmp_path, monkeypatch):
    """Attach reads no checkpoint; a listing reads only each file's head; a definition
    is parsed when it is used. A damaged file is skipped when it is reached."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    async with Driver(state_dir=state) as drv:
        dom = await drv.attach("vm1", vm.qmp)
        uuid = dom.UUIDString()
        parent = None
        for n in range(30):
            body = f"<x a='{'v' * 60}'/>" * 200
            await drv.domainCheckpointCreateXML(
                dom, redefine_xml(f"k{n:02d}", uuid, body, parent), REDEFINE
            )
            parent = f"k{n:02d}"
    chk_dir = state / "domains" / "vm1" / "checkpoints"
    (chk_dir / "k29.xml").write_text("<domaincheckpoint><name>k29</name><creat")

    parsed: list[str] = []
    real = checkpoints_mod.CheckpointDef.from_xml.__func__

    def counting(cls, text, *args, **kwargs):
        chk = real(cls, text, *args, **kwargs)
        parsed.append(chk.name)
        return chk

    monkeypatch.setattr(checkpoints_mod.CheckpointDef, "from_xml", classmethod(counting))
    async with Driver(state_dir=state) as drv:
        dom = await drv.attach("vm1", vm.qmp)
        assert parsed == []
        names = [c.getName() for c in await drv.domainListAllCheckpoints(dom)]
        assert names == [f"k{n:02d}" for n in range(29)]  # the damaged one skipped
        assert parsed == []
        leaf = await drv.domainCheckpointLookupByName(dom, "k28")
        assert (await drv.domainCheckpointGetParent(leaf)).getName() == "k27"
        assert "<name>k28</name>" in await drv.domainCheckpointGetXMLDesc(leaf)
        assert parsed == ["k28"]


# ------------------------------------------------------------ item 7: absolute paths


async def test_a_windows_style_or_relative_target_is_refused(vm_factory, driver, tmp_path):
    """'C:\\backup.qcow2' is a relative path here: the driver made an empty file in
    its working directory while QEMU overwrote one in QEMU's."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    dom = await driver.attach("vm1", vm.qmp)
    before = await node_names(vm.mon)
    ours, qemus = set(os.listdir(".")), set(os.listdir(f"/proc/{vm.proc.pid}/cwd"))
    for path in ("C:\\backup.qcow2", "backup.qcow2", "./b/vda.qcow2"):
        for mode, element in (("push", "target"), ("pull", "scratch")):
            server = f"<server transport='unix' socket='{tmp_path}/nbd.sock'/>"
            xml = (
                f"<domainbackup mode='{mode}'>{server if mode == 'pull' else ''}<disks>"
                f"<disk name='vda'><{element} file='{path}'/></disk></disks></domainbackup>"
            )
            with pytest.raises(VirError) as exc:
                await driver.domainBackupBegin(dom, xml)
            if path.startswith("C:"):  # libvirt's schema admits it (for Windows hosts)
                assert exc.value.code == ErrorNumber.XML_ERROR
                assert "is not absolute" in exc.value.message and path in exc.value.message
            else:
                assert exc.value.code == ErrorNumber.XML_INVALID_SCHEMA
    assert set(os.listdir(".")) == ours
    assert set(os.listdir(f"/proc/{vm.proc.pid}/cwd")) == qemus
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


# ------------------------------------------------------ item 8: names and terminals


async def test_control_characters_in_domain_names_are_refused(vm_factory, tmp_path, driver):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    cli = CLI(tmp_path / "state-cli")
    for char in CONTROLS:
        name = f"vm{char}1"
        with pytest.raises(VirError, match="not usable") as exc:
            await driver.attach(name, vm.qmp)
        assert exc.value.code == ErrorNumber.INVALID_ARG
        if char == "\x1b":  # the CLI says the same, and prints the name escaped
            res = await cli("attach", name, "--qmp", vm.qmp)
            assert res.rc == 1 and "code 8" in res.err
            assert char not in res.err + res.out
    assert driver.state.domain_names() == []
    assert not (tmp_path / "state-cli" / "domains").exists() or not os.listdir(
        tmp_path / "state-cli" / "domains"
    )


async def test_what_the_cli_prints_carries_no_terminal_controls(vm_factory, tmp_path):
    """A disk file named with escape sequences (QEMU reports its path as it is), and a
    domain directory an older version left with one in its name: neither reaches the
    terminal raw."""
    evil = tmp_path / "images" / "vda\x1b]0;owned\x07\r.qcow2"
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    os.rename(vm.disks["vda"].path, evil)  # the same file, QEMU keeps it open
    vm.disks["vda"].path = str(evil)
    await vm.quit()
    proc = await vm_factory(existing=vm.disks, subdir="again")
    cli = CLI(tmp_path / "state")
    res = await cli.ok("attach", "vm1", "--qmp", proc.qmp)
    assert "vda\\x1b]0;owned\\x07\\x0d.qcow2" in res.out
    planted = tmp_path / "state" / "domains" / "vm\x1b[2J"
    planted.mkdir(mode=0o700)
    (planted / "domain.json").write_text("{}")
    (planted / "domain.json").chmod(0o600)
    res = await cli.ok("list")
    for out in (res.out, res.err):
        assert not any(c in out for c in CONTROLS), repr(out)
    assert "vm1" in res.out


# --------------------------------------------------- item 9: what errors quote


async def test_xmlfile_reads_are_capped_and_errors_quote_little(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    cli = CLI(tmp_path / "state")
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)

    secret = tmp_path / "shadow"
    secret.write_text("root:$6$SECRETSALT$SECRETHASHSECRETHASH:19000:0:99999:7:::\n")
    long_line = tmp_path / "long.xml"
    long_line.write_text("<domaincheckpoint><description>" + "y" * (3 * MiB) + "<\n")
    huge = tmp_path / "huge.xml"
    with open(huge, "wb") as f:  # sparse: 100 MB that take no room
        f.write(b"<domaincheckpoint><name>")
        f.truncate(100 * MiB)

    for path, says in (
        ("/dev/zero", "larger than"),
        (str(huge), "larger than"),
        (str(secret), "not an XML document"),
        (str(long_line), "(domain_checkpoint):1:"),
    ):
        res = await cli("checkpoint-create", "vm1", "--xmlfile", path, timeout=30)
        assert res.rc == 1 and "Traceback" not in res.err, res
        assert says in res.err, res.err
        assert len(res.err) < 600, f"{path}: {len(res.err)} bytes of error"
        assert "SECRET" not in res.err
        assert "code 27" in res.err or "code 35" in res.err
    assert (await cli.ok("checkpoint-list", "vm1", "--name")).out == ""


async def test_a_huge_stored_file_is_not_read_whole(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    state = tmp_path / "state"
    async with Driver(state_dir=state) as drv:
        dom = await drv.attach("vm1", vm.qmp)
        await drv.domainCheckpointCreateXML(dom, checkpoint_xml("c1"))
    stored = state / "domains" / "vm1" / "checkpoints" / "c1.xml"
    with open(stored, "r+b") as f:
        f.truncate(64 * MiB)  # sparse
    completed = state / "domains" / "vm1" / "completed-job.json"
    with open(completed, "wb") as f:
        f.truncate(64 * MiB)
    completed.chmod(0o600)
    async with Driver(state_dir=state) as drv:
        dom = await drv.attach("vm1", vm.qmp)
        assert any("larger than" in p for p in dom.recovery_problems)
        with pytest.raises(VirError) as exc:
            await drv.domainCheckpointLookupByName(dom, "c1")
        assert exc.value.code == ErrorNumber.NO_DOMAIN_CHECKPOINT
