"""Fleecing against a real QEMU: one instant for every disk of a running guest and
its checkpoint, incrementals through the view, and a driver killed while the guest
is paused for that instant. (The fault cases are in test_faults.py.)"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from pyvirtbackup import Driver
from pyvirtbackup.qemu import imgtools

from .conftest import MiB
from .drivertools import NOTHING_LEFT, bitmaps, leftovers, node_names, unthrottle, wait_completed

pytestmark = pytest.mark.asyncio

KiB = 1024
SLOW = {"speed": 1 * MiB}
# one disk of each bus, qcow2 and raw
DISKS = [("sda", "qcow2", 16 * MiB, "scsi"), ("vdb", "raw", 16 * MiB, "virtio"),
         ("hdc", "qcow2", 16 * MiB, "ide")]  # fmt: skip
CHECKPOINTED = ("sda", "hdc")  # raw disks hold no bitmap


def push_xml(targets: dict[str, str], incremental: str | None = None, backing: str = "") -> str:
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    disks = "".join(
        f"<disk name='{d}'><target file='{path}'"
        + (f" pvb:backing='{backing.format(disk=d)}'" if backing and d in CHECKPOINTED else "")
        + "/></disk>"
        for d, path in targets.items()
    )
    return (
        "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'>"
        f"{inc}<disks>{disks}</disks></domainbackup>"
    )


CHECKPOINT = (
    "<domaincheckpoint><name>{name}</name><disks><disk name='sda'/><disk name='hdc'/>"
    "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>"
)


async def test_one_instant_for_every_disk_of_a_running_guest(vm_factory, driver, tmp_path):
    vm = await vm_factory(DISKS, paused=False)
    assert (await vm.mon.execute("query-status"))["status"] == "running"
    dom = await driver.attach("vm1", vm.qmp)
    before = await node_names(vm.mon)
    names = [d[0] for d in DISKS]
    ref = {d: await vm.snapshot(d, str(tmp_path / f"ref-{d}.raw")) for d in names}
    full = {d: str(tmp_path / f"{d}.full") for d in names}

    await driver.domainBackupBegin(dom, push_xml(full), CHECKPOINT.format(name="c1"), tuning=SLOW)
    # the guest was paused for the instant only, and resumed
    assert (await vm.mon.execute("query-status"))["status"] == "running"
    assert dom.job is not None and dom.job.pause_ms is not None
    # right after begin returns, on every disk: none of it is in the backup, all of it
    # is in the checkpoint made at the same instant
    for d in names:
        await vm.write(d, 0x5A, 0, 64 * KiB)
        await vm.write(d, 0x5B, 15 * MiB, 1 * MiB)
    found = await bitmaps(vm.mon)
    for d in CHECKPOINTED:
        assert found[f"{d}-fmt"]["c1"]["count"] == 64 * KiB + 1 * MiB
    await unthrottle(vm.mon)
    final = await wait_completed(driver, dom)
    assert final["success"] is True, final
    for d in names:
        same, msg = await imgtools.compare(ref[d], full[d], fmt_a="raw", fmt_b="qcow2")
        assert same, f"{d}: {msg}"
    assert not [p for p in os.listdir(vm.workdir) if ".fleece." in p]
    assert await leftovers(vm.mon, before) == NOTHING_LEFT

    # an incremental through the view: only what changed since c1, and the chain
    # (full <- incremental) is the disk at the second instant
    for d in names:
        await vm.write(d, 0x6C, 8 * MiB, 256 * KiB)
    ref2 = {d: await vm.snapshot(d, str(tmp_path / f"ref2-{d}.raw")) for d in names}
    inc = {d: str(tmp_path / f"{d}.inc") for d in CHECKPOINTED}
    await driver.domainBackupBegin(
        dom, push_xml(inc, "c1", backing="{disk}.full"), CHECKPOINT.format(name="c2")
    )
    for d in names:
        await vm.write(d, 0x7D, 0, 1 * MiB)  # after the second instant
    final = await wait_completed(driver, dom)
    assert final["success"] is True, final
    assert final["disk_total"] == 2 * (64 * KiB + 1 * MiB + 256 * KiB)
    for d in CHECKPOINTED:
        same, msg = await imgtools.compare(ref2[d], inc[d], fmt_a="raw", fmt_b="qcow2")
        assert same, f"{d}: {msg}"
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


_CHILD = r"""
import asyncio, os, sys
sys.path.insert(0, os.getcwd())
from pyvirtbackup import Driver
from pyvirtbackup.qemu.monitor import Monitor

real = Monitor.transaction
async def transaction(self, actions, properties=None):
    await real(self, actions, properties)
    if any(a["data"].get("name") == "c1" for a in actions):
        os._exit(9)  # killed during the instant: the guest is stopped right now
Monitor.transaction = transaction

async def main():
    drv = Driver(state_dir=sys.argv[1])
    dom = await drv.attach("vm1", sys.argv[2])
    await drv.domainBackupBegin(dom, sys.argv[3], sys.argv[4])
asyncio.run(main())
"""


async def test_a_driver_killed_while_the_guest_is_paused_leaves_it_running(
    vm_factory, tmp_path
):
    vm = await vm_factory([("sda", "qcow2", 16 * MiB)], paused=False)
    before = await node_names(vm.mon)
    state = tmp_path / "state"
    target = tmp_path / "sda.bak"
    xml = (
        f"<domainbackup><disks><disk name='sda'><target file='{target}'/></disk>"
        "</disks></domainbackup>"
    )
    chk = "<domaincheckpoint><name>c1</name></domaincheckpoint>"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(state), vm.qmp, xml, chk, cwd=os.getcwd()
    )
    assert await proc.wait() == 9
    assert (await vm.mon.execute("query-status"))["status"] == "paused"  # left stopped
    async with Driver(state_dir=state) as second:
        dom = await second.attach("vm1", vm.qmp)
        assert (await vm.mon.execute("query-status"))["status"] == "running"
        assert any("resumed" in p for p in dom.recovery_problems), dom.recovery_problems
        assert dom.job is None and "c1" not in dom.checkpoints
        # the device writes to its own node again; nothing of the begin is left
        assert await vm.mon.execute("qom-get", {"path": "sda", "property": "drive"}) == "sda-fmt"
        assert await leftovers(vm.mon, before) == NOTHING_LEFT
        assert "c1" not in (await bitmaps(vm.mon)).get("sda-fmt", {})
        assert not target.exists()
        assert not [p for p in os.listdir(vm.workdir) if ".fleece." in p]
        # and the next backup works
        await second.domainBackupBegin(dom, xml, chk)
        assert (await wait_completed(second, dom))["success"] is True
