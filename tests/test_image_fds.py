"""Targets, scratch and fleecing images reach QEMU as the descriptors we opened, never
by a name another user could swap (issue 12, item 2).

The attacker is a real second user (nobody) who can write the directory the images
go to. Between our creating a file and QEMU's opening it, they swap its name for a
link to a root-only file, or to a file of their own: QEMU must write neither, and a
push whose target no longer names the file QEMU wrote must fail. The swap is made
deterministic by running it right after our create step. Over a TCP monitor, which
cannot pass descriptors, such a directory is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtbackup import Driver, ErrorNumber, JobType, VirError
from pyvirtbackup.qemu.executor import StepRunner

from . import otheruser
from .conftest import MiB
from .drivertools import (
    NOTHING_LEFT,
    leftovers,
    node_names,
    our_fdsets,
    unthrottle,
    wait_completed,
)
from .nbd_clients import nbdcopy, unix_uri

pytestmark = pytest.mark.asyncio

PRECIOUS = "root's secret\n"
SWAP = r"""
import os, sys
os.unlink(sys.argv[1])
os.symlink(sys.argv[2], sys.argv[1])
print("swapped")
"""


# ------------------------------------------------------------------ inotify


IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_OPEN = 0x1, 0x2, 0x4, 0x20


@contextlib.contextmanager
def watched(path: Path) -> Iterator[list[int]]:
    """Every open, read, write or attribute change of ``path`` while inside, by any
    process (inotify): a file that is neither opened nor read stays empty here."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    events: list[int] = []
    try:
        mask = IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_OPEN
        assert libc.inotify_add_watch(fd, str(path).encode(), mask) >= 0
        yield events
        with contextlib.suppress(BlockingIOError):
            raw = os.read(fd, 65536)
            while raw:  # struct inotify_event: wd, mask, cookie, len, name[len]
                events.append(int.from_bytes(raw[4:8], "little"))
                raw = raw[16 + int.from_bytes(raw[12:16], "little") :]
    finally:
        os.close(fd)


# ------------------------------------------------------------------ helpers


def push_xml(target: Path, fleece: Path | None = None) -> str:
    attr = f" pvb:fleecing='{fleece}'" if fleece else ""
    return (
        "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'><disks>"
        f"<disk name='vda'{attr}><target file='{target}'/></disk></disks></domainbackup>"
    )


def pull_xml(sock: Path, scratch: Path) -> str:
    return (
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
        f"<disk name='vda'><scratch file='{scratch}'/></disk></disks></domainbackup>"
    )


def loose_dir(shared: Path, mode: int = 0o777) -> Path:
    """A directory every local user may change: where the attack happens."""
    d = shared / "backups"
    d.mkdir()
    d.chmod(mode)
    return d


def swap_after_create(monkeypatch, path: Path, link_to: Path) -> list[str]:
    """Run the attacker right after we create ``path`` and before QEMU opens it."""
    real = StepRunner._open_image
    done: list[str] = []

    async def create_then_swap(self, args):
        await real(self, args)
        if args["path"] == str(path):
            res = await otheruser.run(SWAP, str(path), str(link_to))
            assert res.rc == 0 and "swapped" in res.out, res.err
            done.append(str(path))

    monkeypatch.setattr(StepRunner, "_open_image", create_then_swap)
    return done


async def storage_filenames(mon) -> dict[str, str]:
    return {
        n["node-name"]: n["file"]
        for n in await mon.execute("query-named-block-nodes", {"flat": True})
        if n["node-name"].endswith(("-storage", "-flstorage"))
    }


def qemu_release(version: dict) -> tuple[int, int]:
    return version["qemu"]["major"], version["qemu"]["minor"]


# --------------------------------------------------------------- the attack


@pytest.mark.parametrize("image", ["target", "fleecing image", "scratch"])
async def test_a_name_swapped_for_a_link_to_a_root_only_file_is_not_opened(
    vm_factory, shared, tmp_path, monkeypatch, image
):
    """nobody swaps the image's name for a link to root's secret between our create
    and QEMU's open. QEMU opens our descriptor: the secret is not opened, read or
    written, and a push whose target is now that link fails, saying so."""
    # a running guest: the everyday case, where QEMU 7.2 takes descriptors too
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], paused=False)
    before = await node_names(vm.mon)
    secret = tmp_path / "secret.conf"  # root's, in a directory nobody cannot enter
    secret.write_text(PRECIOUS)
    secret.chmod(0o600)
    images = loose_dir(shared)
    target, fleece, scratch = images / "vda.bak", images / "vda.fleece", images / "vda.scratch"
    swapped = swap_after_create(
        monkeypatch, {"target": target, "fleecing image": fleece, "scratch": scratch}[image], secret
    )
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        with watched(secret) as touched:
            if image == "scratch":
                sock = tmp_path / "nbd.sock"
                await drv.domainBackupBegin(dom, pull_xml(sock, scratch))
                # the export reads the disk at begin, from the image QEMU really has
                await nbdcopy(unix_uri(str(sock), "vda"), str(tmp_path / "copy.raw"))
                await drv.domainAbortJob(dom)
                stats = await wait_completed(drv, dom)
                assert stats["type"] == JobType.COMPLETED, stats
            else:
                await drv.domainBackupBegin(dom, push_xml(target, fleece), tuning={"speed": MiB})
                await unthrottle(vm.mon)
                stats = await wait_completed(drv, dom)
                if image == "target":  # loudly: the path names no backup of ours
                    assert stats["type"] == JobType.FAILED, stats
                    assert "replaced" in stats["errmsg"] and str(target) in stats["errmsg"]
                else:  # the fleecing image is the job's own business: the backup is fine
                    assert stats["type"] == JobType.COMPLETED, stats
        assert swapped, "the attacker never ran"
    assert touched == [], f"QEMU or someone touched the secret: inotify masks {touched}"
    assert secret.read_text() == PRECIOUS
    name = {"target": target, "fleecing image": fleece, "scratch": scratch}[image]
    assert name.is_symlink() and os.readlink(name) == str(secret)  # the link: not ours to delete
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_a_target_swapped_for_a_link_to_the_attackers_file_gets_no_data(
    vm_factory, shared, tmp_path, monkeypatch
):
    """The other variant: the link points at a file nobody owns and reads, hoping
    QEMU writes the disk into it. Nothing reaches it."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], paused=False)
    before = await node_names(vm.mon)
    images = loose_dir(shared)
    theirs = shared / "theirs.bin"
    theirs.touch()
    os.chown(theirs, otheruser.NOBODY_UID, otheruser.NOBODY_GID)
    theirs.chmod(0o666)
    target = images / "vda.bak"
    swap_after_create(monkeypatch, target, theirs)
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        await drv.domainBackupBegin(dom, push_xml(target))
        stats = await wait_completed(drv, dom)
    assert stats["type"] == JobType.FAILED and "replaced" in stats["errmsg"], stats
    res = await otheruser.run("import sys; print(len(open(sys.argv[1], 'rb').read()))", str(theirs))
    assert res.rc == 0 and res.out.strip() == "0", res
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


# ------------------------------------------------------------- no fd set left


async def _fail_at_nbd_server(drv, dom, vm, tmp_path):
    """A pull whose NBD server cannot start: the images are made, then rolled back."""
    await vm.mon.execute(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp_path / "o.sock")}}}
    )
    try:
        with pytest.raises(VirError, match="NBD server"):
            await drv.domainBackupBegin(
                dom, pull_xml(tmp_path / "nbd.sock", tmp_path / "vda.scratch")
            )
    finally:
        await vm.mon.execute("nbd-server-stop")


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
@pytest.mark.parametrize("outcome", ["success", "failure", "abort"])
async def test_no_fd_set_of_ours_is_left_in_qemu(vm_factory, tmp_path, outcome, paused):
    """Whatever the outcome, query-fdsets lists nothing of ours once begin returns (the
    image nodes hold their own descriptors by then) and after the end; and the images
    really were opened as /dev/fdset/N where this QEMU takes descriptors (any QEMU
    with a running guest, 9.1 and later with a paused one too)."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], paused=paused)
    before = await node_names(vm.mon)
    by_fd = not paused or qemu_release(await vm.mon.execute("query-version")) >= (9, 1)
    target, fleece = tmp_path / "vda.bak", tmp_path / "vda.fleece"
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        if outcome == "failure":
            await _fail_at_nbd_server(drv, dom, vm, tmp_path)
            assert not (tmp_path / "vda.scratch").exists()
        else:
            await drv.domainBackupBegin(dom, push_xml(target, fleece), tuning={"speed": MiB})
            assert await our_fdsets(vm.mon) == []
            opened = await storage_filenames(vm.mon)
            assert len(opened) == 2, opened  # the target and the fleecing image
            for node, name in opened.items():
                if by_fd:
                    assert name.startswith("/dev/fdset/"), (node, name)
                else:
                    assert name in (str(target), str(fleece)), (node, name)
            if outcome == "abort":
                await drv.domainAbortJob(dom)
            else:
                await unthrottle(vm.mon)
            stats = await wait_completed(drv, dom)
            want = JobType.COMPLETED if outcome == "success" else JobType.CANCELLED
            assert stats["type"] == want, stats
            assert target.exists() == (outcome == "success") and not fleece.exists()
    assert await our_fdsets(vm.mon) == []
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


# ------------------------------------------------------- a monitor over TCP


def tcp_monitor() -> tuple[list[str], tuple[str, int]]:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return ["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"], ("127.0.0.1", port)


@pytest.mark.parametrize("image", ["target", "fleecing image"])
async def test_over_a_tcp_monitor_a_directory_others_can_change_is_refused(
    vm_factory, shared, tmp_path, image
):
    """No descriptors over TCP: QEMU opens the image by name, so its directory must be
    one nobody else can change. 0777 is refused (29, naming the directory) before
    anything is made; the sticky 1777 is accepted and the backup works."""
    args, qmp = tcp_monitor()
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], extra_args=args, paused=False)
    before = await node_names(vm.mon)
    images = loose_dir(shared)
    target = (images if image == "target" else tmp_path) / "vda.bak"
    fleece = (images if image == "fleecing image" else tmp_path) / "vda.fleece"
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", qmp)
        with pytest.raises(VirError) as exc:
            await drv.domainBackupBegin(dom, push_xml(target, fleece))
        assert exc.value.code == ErrorNumber.OPERATION_DENIED
        assert f"directory '{images}'" in exc.value.message and image in exc.value.message
        assert "TCP monitor" in exc.value.message
        assert list(images.iterdir()) == [] and not target.exists() and not fleece.exists()
        assert await leftovers(vm.mon, before) == NOTHING_LEFT
        images.chmod(0o1777)
        await drv.domainBackupBegin(dom, push_xml(target, fleece))
        stats = await wait_completed(drv, dom)
        assert stats["type"] == JobType.COMPLETED, stats
    assert target.exists() and not fleece.exists()
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_over_a_unix_monitor_such_a_directory_is_fine(vm_factory, shared, tmp_path):
    """The same 0777 directory over a unix monitor, guest running: our descriptors go to
    QEMU, so nothing needs refusing."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], paused=False)
    before = await node_names(vm.mon)
    images = loose_dir(shared)
    async with Driver(state_dir=tmp_path / "state") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        await drv.domainBackupBegin(dom, push_xml(images / "vda.bak", images / "vda.fleece"))
        stats = await wait_completed(drv, dom)
    assert stats["type"] == JobType.COMPLETED, stats
    assert [p.name for p in images.iterdir()] == ["vda.bak"]
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


_KILLED_AFTER_ADD_FD = r"""
import asyncio, os, sys
sys.path.insert(0, os.getcwd())
from pyvirtbackup import Driver
from pyvirtbackup.qemu.monitor import Monitor

real = Monitor.add_fd
async def add_fd(self, fd, opaque):
    fdset = await real(self, fd, opaque)
    if opaque.endswith(sys.argv[3]):
        os._exit(9)  # killed while QEMU holds our descriptor and nothing opened it yet
    return fdset
Monitor.add_fd = add_fd

async def main():
    drv = Driver(state_dir=sys.argv[1])
    dom = await drv.attach("vm1", sys.argv[2])
    await drv.domainBackupBegin(dom, sys.argv[4])
asyncio.run(main())
"""


async def test_a_driver_killed_after_add_fd_leaves_nothing_for_long(vm_factory, tmp_path):
    """The process dies between handing QEMU a descriptor and opening it: the next
    attach removes our fd set and deletes the file the record says we created."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], paused=False)
    before = await node_names(vm.mon)
    state, target = tmp_path / "state", tmp_path / "vda.bak"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_AFTER_ADD_FD,
        str(state), vm.qmp, str(target), push_xml(target, tmp_path / "vda.fleece"),
        cwd=os.getcwd(),
    )  # fmt: skip
    assert await proc.wait() == 9
    assert await our_fdsets(vm.mon) == [str(target)] and target.exists()
    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert any("interrupted" in p for p in dom.recovery_problems), dom.recovery_problems
        assert dom.job is None
    assert not target.exists()
    assert await leftovers(vm.mon, before) == NOTHING_LEFT
