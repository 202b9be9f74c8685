"""Incremental pull at the qemu layer: the dirty bitmap an export carries.

This drives the planner and the job directly, with a bitmap the test adds the way
a checkpoint does, to show the NBD side alone: the ``qemu:dirty-bitmap:`` context
shows exactly the areas written since the bitmap was made, and nothing the guest
writes after begin. The driver-level test, with real checkpoints, is in
test_incremental.py.
"""

from __future__ import annotations

import pytest

from pyvirtbackup import JobType
from pyvirtbackup.qemu import blockgraph, listen, nbd
from pyvirtbackup.qemu.job import BackupJob
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.plan import PlanDisk, Tuning, next_store_id, plan_backup

from .conftest import MiB
from .nbd_clients import dirty_extents, nbdcopy, unix_uri

pytestmark = pytest.mark.asyncio

KiB = 1024


async def test_exported_bitmap_shows_exactly_the_writes_since_the_checkpoint(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    await vm.mon.execute(
        "block-dirty-bitmap-add", {"node": "vda-fmt", "name": "c1", "persistent": True}
    )
    since_c1 = [(1 * MiB, 64 * KiB), (5 * MiB, 1 * MiB), (15 * MiB, 512 * KiB)]
    for i, (offset, length) in enumerate(since_c1):
        await vm.write("vda", 0x21 + i, offset, length)

    mon = Monitor("pull-bitmap-test")
    await mon.connect(vm.qmp)
    try:
        disks = {d.name: d for d in await blockgraph.discover_disks(mon)}
        nodes = await blockgraph.query_nodes(mon)
        before = set(nodes)
        scratch, sock = str(tmp_path / "vda.scratch"), str(tmp_path / "nbd.sock")
        plan = plan_backup(
            "pull",
            [PlanDisk("vda", scratch, "file", "qcow2", "incremental", incremental="c1")],
            disks,
            nodes,
            first_store_id=next_store_id(nodes),
            reuse_external=False,
            tuning=Tuning(),
            known_checkpoints={"c1"},
        )
        nbd.add_pull_steps(plan, nbd.fd_address(nbd.LISTEN_FD_NAME), pass_fd=True)
        job = BackupJob(mon, plan, listener=listen.listen_unix(sock))
        await job.start()

        await vm.write("vda", 0x30, 9 * MiB, 1 * MiB)  # after begin: the next backup's
        uri = unix_uri(sock, "vda")
        assert await dirty_extents(uri, "qemu:dirty-bitmap:backup-vda") == since_c1
        await nbdcopy(uri, "null:")

        await job.abort(wait=True)
        assert job.result is not None and job.result.type == JobType.COMPLETED
        nodes = await blockgraph.query_nodes(mon)
        assert set(nodes) == before
        # the checkpoint's bitmap is untouched and still records; the temporary one
        # went with the scratch node
        (c1,) = nodes["vda-fmt"].bitmaps.values()
        assert c1.name == "c1" and c1.recording
        assert c1.count == sum(length for _o, length in since_c1) + 1 * MiB
        assert await mon.execute("query-block-exports") == []
    finally:
        await mon.close()
