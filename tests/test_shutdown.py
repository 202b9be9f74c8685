"""A guest that really powers off while its backup runs (tests/guestos.py).

With VIR_DOMAIN_BACKUP_BEGIN_PRESERVE_SHUTDOWN_DOMAIN QEMU is kept (paused) until the
backup completes, then quits as the guest asked; without it, libvirt's behaviour:
QEMU exits, the backup fails with a clear reason, nothing of ours is left. Both run
at once, each on its own QEMU, since each waits for SeaBIOS to boot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pyvirtbackup import BackupBeginFlags, DomainEventID, Driver, JobStatsFlags, JobType
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.plan import Tuning

from .conftest import MiB
from .guestos import power_off_disk_args

pytestmark = pytest.mark.asyncio

KiB = 1024
SLOW = Tuning(speed=256 * KiB)  # 16 MiB take a minute: the guest powers off long before


async def wait_status(vm, wanted: str, timeout: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await vm.mon.execute("query-status"))["status"] != wanted:
        assert loop.time() < deadline, f"the guest did not reach '{wanted}'"
        await asyncio.sleep(0.2)


async def backup_through_shutdown(vm_factory, tmp_path: Path, preserve: bool) -> dict:
    name = "preserve" if preserve else "plain"
    workdir = tmp_path / name
    workdir.mkdir()
    vm = await vm_factory(
        [("vda", "qcow2", 16 * MiB)],
        fill=[(0x41, 0, 16 * MiB)],
        subdir=name,
        paused=False,
        extra_args=power_off_disk_args(workdir),
    )
    disk = vm.disks["vda"].path
    target = tmp_path / f"{name}.vda.bak"
    async with Driver(state_dir=tmp_path / f"state-{name}") as drv:
        dom = await drv.attach("vm1", vm.qmp)
        completed: asyncio.Queue[dict] = asyncio.Queue()
        await drv.connectDomainEventRegisterAny(
            dom, DomainEventID.JOB_COMPLETED, lambda c, d, params, o: completed.put_nowait(params)
        )
        flags = BackupBeginFlags.PRESERVE_SHUTDOWN_DOMAIN if preserve else 0
        xml = (
            f"<domainbackup><disks><disk name='vda'><target file='{target}'/></disk>"
            "</disks></domainbackup>"
        )
        await drv.domainBackupBegin(dom, xml, None, flags, tuning=SLOW)
        assert vm.proc.proc is not None
        if preserve:
            await wait_status(vm, "shutdown")  # the guest powered off; QEMU stays
            assert vm.proc.proc.returncode is None
            assert (await drv.domainGetJobStats(dom))["type"] == JobType.UNBOUNDED
            # let the backup finish now
            await vm.mon.execute("block-job-set-speed", {"device": "pvb-backup-vda", "speed": 0})
        params = await asyncio.wait_for(completed.get(), 90)
        exit_status = await asyncio.wait_for(vm.proc.proc.wait(), 30)
        stats = await drv.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
        record = drv.state.domain("vm1").read_job()
    return {
        "params": params,
        "stats": stats,
        "exit_status": exit_status,
        "record": record,
        "target": target,
        "disk": disk,
        "fleecing_left": sorted(p.name for p in workdir.rglob("*.fleece.*")),
        "stderr": vm.proc.stderr_text(),
    }


async def test_a_guest_powering_off_during_its_backup(vm_factory, tmp_path):
    kept, plain = await asyncio.gather(
        backup_through_shutdown(vm_factory, tmp_path, preserve=True),
        backup_through_shutdown(vm_factory, tmp_path, preserve=False),
    )
    # with the flag: the backup completed, then QEMU quit as the guest had asked
    assert kept["stats"]["type"] == JobType.COMPLETED and kept["stats"]["success"] is True
    assert kept["params"]["success"] is True
    assert kept["exit_status"] == 0
    res = await imgtools.run(["qemu-img", "compare", str(kept["target"]), kept["disk"]])
    assert res.returncode == 0
    assert kept["record"] is None and kept["fleecing_left"] == []

    # without it: QEMU went with the guest, the backup failed and says why
    assert plain["stats"]["type"] == JobType.FAILED and plain["stats"]["success"] is False
    assert "guest shut down" in plain["stats"]["errmsg"]
    assert "PRESERVE_SHUTDOWN_DOMAIN" in plain["stats"]["errmsg"]
    assert plain["params"]["success"] is False
    assert not plain["target"].exists()
    assert plain["record"] is None and plain["fleecing_left"] == []
