"""Pure planning decisions, without QEMU."""

from __future__ import annotations

import pytest

from pyvirtbackup.qemu.blockgraph import Disk
from pyvirtbackup.qemu.plan import PlanDisk, Tuning, plan_backup


def disk(fmt: str = "qcow2", chain: int = 1) -> Disk:
    return Disk(
        "vda",
        "vda-fmt",
        "/img/vda",
        fmt,
        "file",
        1 << 30,
        False,
        65536,
        ["vda-fmt", "base-fmt"][:chain],
    )


@pytest.mark.parametrize(
    ("src", "target_fmt", "store_type", "reuse", "sync"),
    [
        (disk(), "qcow2", "file", False, "top"),  # one qcow2 layer, new target
        (disk(), "raw", "file", False, "top"),  # a new raw file reads as zeros too
        (disk(), "raw", "block", False, "full"),  # a raw device may hold old data
        (disk(), "qcow2", "block", False, "top"),  # a new qcow2 on a device reads zeros
        (disk(), "qcow2", "file", True, "full"),  # reused target: old data must go
        (disk("raw"), "qcow2", "file", False, "full"),  # raw counts as allocated anyway
        (disk(chain=2), "qcow2", "file", False, "full"),  # the backing shows through
    ],
)
def test_full_push_copies_only_allocated_data_where_that_is_the_same_backup(
    src, target_fmt, store_type, reuse, sync
):
    plan = plan_backup(
        "push",
        [PlanDisk("vda", "/bk/vda", store_type, target_fmt, "full")],
        {"vda": src},
        {},
        first_store_id=1,
        reuse_external=reuse,
        tuning=Tuning(),
    )
    (action,) = plan.transaction
    assert action["data"]["sync"] == sync
