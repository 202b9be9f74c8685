"""Pure planning decisions, without QEMU."""

from __future__ import annotations

import pytest

from pyvirtbackup.qemu import nbd
from pyvirtbackup.qemu.blockgraph import Disk
from pyvirtbackup.qemu.features import QemuFeatures
from pyvirtbackup.qemu.fleecing import FleecingSettings
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


# ------------------------------------------------------------------- fleecing

FLEECE_OK = QemuFeatures.unknown().with_features(
    "snapshot-access", "copy-before-write.on-cbw-error", "copy-before-write.cbw-timeout"
)


def attached(fmt: str = "qcow2", **changes) -> Disk:
    d = disk(fmt)
    d.qdev, d.attached_node = "/machine/peripheral/vda/virtio-backend", "vda-fmt"
    for key, value in changes.items():
        setattr(d, key, value)
    return d


def fleece_plan(src: Disk, features: QemuFeatures = FLEECE_OK, mode: str = "push", **pd):
    return plan_backup(
        mode,
        [PlanDisk("vda", "/bk/vda", "file", "qcow2", "full", fleece_path="/fl/vda", **pd)],
        {"vda": src},
        {},
        first_store_id=3,
        reuse_external=False,
        tuning=Tuning(),
        features=features,
        fleecing_settings=FleecingSettings(cbw_timeout=7),
    )


def test_a_fleecing_push_switches_the_device_and_copies_from_the_view():
    plan = fleece_plan(attached())
    (dp,) = plan.disks
    assert dp.fleecing and dp.direct_reason is None
    lane = [s.describe() for s in plan.stores[0]]
    creates = [s["path"] for s in lane if s.get("local") == "create"]
    assert creates == ["/bk/vda", "/fl/vda"]  # the target, then the fleecing image
    cbw = lane[-1]["arguments"]
    assert cbw == {
        "driver": "copy-before-write", "node-name": "pvb-3-cbw", "file": "vda-fmt",
        "target": "pvb-3-flstorage", "on-cbw-error": "break-snapshot", "cbw-timeout": 7,
    }  # fmt: skip
    assert plan.transaction == []  # no checkpoint, no bitmap: nothing else at the instant
    (switch,) = [s.describe() for s in plan.switch]
    assert switch["execute"] == "qom-set"
    assert switch["arguments"]["value"] == "pvb-3-cbw"
    assert plan.switch[0].undo[0].args["value"] == "vda-fmt"
    access, jobs = plan.after
    assert access.args["driver"] == "snapshot-access" and access.args["file"] == "pvb-3-cbw"
    (action,) = jobs.args["actions"]
    assert action["data"]["device"] == "pvb-3-access" and "discard-source" not in action["data"]
    described = [s.get("execute") for s in plan.describe()]
    assert described.index("stop") < described.index("qom-set") < described.index("cont")


def test_where_qemu_can_the_job_discards_what_it_copied():
    features = FLEECE_OK.with_features(
        "blockdev-backup.discard-source",
        "blockdev-backup.x-perf.min-cluster-size",
        "copy-before-write.min-cluster-size",
    )
    plan = fleece_plan(attached(), features)
    data = plan.after[-1].args["actions"][0]["data"]
    assert data["discard-source"] is True
    assert data["x-perf"] == {"max-workers": 8, "min-cluster-size": 65536}
    assert plan.stores[0][-1].args["min-cluster-size"] == 65536


@pytest.mark.parametrize(
    ("src", "features", "pd", "why"),
    [
        (attached(readonly=True), FLEECE_OK, {}, "read-only"),
        (attached(qdev=None), FLEECE_OK, {}, "no guest device"),
        (attached(), QemuFeatures.unknown(), {}, "lacks snapshot-access"),
        (attached(), FLEECE_OK, {"direct": True}, "pvb:fleecing='no'"),
    ],
)
def test_disks_that_cannot_be_fleeced_keep_the_direct_sequence_and_say_why(src, features, pd, why):
    plan = fleece_plan(src, features, **pd)
    (dp,) = plan.disks
    assert not dp.fleecing and why in (dp.direct_reason or "")
    (action,) = plan.transaction  # the job starts at the instant, the direct way
    assert action["data"]["device"] == "vda-fmt" and not plan.switch


def test_on_the_direct_path_a_qemu_that_can_breaks_the_backup_not_the_write():
    plan = fleece_plan(attached(), FLEECE_OK.with_features("blockdev-backup.on-cbw-error"),
                       direct=True)  # fmt: skip
    assert plan.transaction[0]["data"]["on-cbw-error"] == "break-snapshot"
    assert (
        "on-cbw-error" not in fleece_plan(attached(), FLEECE_OK, direct=True).transaction[0]["data"]
    )


def test_a_fleecing_pull_exports_the_view_and_its_scratch_has_no_backing():
    plan = fleece_plan(attached(), mode="pull")
    (dp,) = plan.disks
    assert dp.fleece_node == dp.format_node and dp.backing_node is None
    assert not dp.has_qemu_job and plan.transaction == []
    format_add = plan.stores[0][-2].args
    assert format_add["backing"] is None and format_add["discard"] == "unmap"
    (step,) = nbd.export_steps(plan)
    assert step.args["node-name"] == dp.access_node


# ------------------------------------------------- images handed over as descriptors


def fd_plan(target_fmt: str, pass_fds: bool, tuning: Tuning | None = None):
    return plan_backup(
        "push",
        [PlanDisk("vda", "/bk/vda", "file", target_fmt, "full", fleece_path="/fl/vda")],
        {"vda": attached()},
        {},
        first_store_id=3,
        reuse_external=False,
        tuning=tuning or Tuning(),
        features=FLEECE_OK,
        fleecing_settings=FleecingSettings(),
        pass_fds=pass_fds,
    )


@pytest.mark.parametrize("target_fmt", ["qcow2", "raw"])
def test_images_we_create_reach_qemu_only_as_our_descriptors(target_fmt):
    lane = fd_plan(target_fmt, pass_fds=True).stores[0]
    for path in ("/bk/vda", "/fl/vda"):
        create = next(s for s in lane if s.kind == "create-file" and s.args["path"] == path)
        assert create.args["pass_fd"] is True
        # every command that opens the file says /dev/fdset/N, never the path
        opening = [s for s in lane if s.fdset == path]
        assert {s.command for s in opening} <= {"blockdev-add", "blockdev-reopen"} and opening
        for step in opening:
            described = step.describe()
            assert path not in str(described["arguments"])
            assert "/dev/fdset/N" in str(described["arguments"])
        # the fd set goes once the image's last node holds its own copy: its format
        # node, or the file node itself (the fleecing image, raw without a format layer)
        release = lane.index(
            next(s for s in lane if s.kind == "release-fd" and s.args["path"] == path)
        )
        last_add = max(
            i for i, s in enumerate(lane) if s.command == "blockdev-add" and i < release
        )
        storage = next(s for s in opening).args["node-name"]
        assert storage in (lane[last_add].args.get("file"), lane[last_add].args["node-name"])
        assert [u.kind for u in create.undo] == ["remove-file", "release-fd"]
    # nothing else names a file: QEMU never creates one (a raw one is sized on our fd)
    assert not [s for s in lane if "filename" in str(s.args) and s.fdset is None]
    if target_fmt == "raw":
        target = next(s for s in lane if s.kind == "create-file")
        assert target.args["size"] == 1 << 30


def test_images_qemu_opens_by_name_without_descriptors():
    lane = fd_plan("raw", pass_fds=False).stores[0]
    assert not [s for s in lane if s.fdset or s.kind == "release-fd"]
    assert not [s for s in lane if s.command == "blockdev-create" and "filename" in str(s.args)]
    storage = next(s for s in lane if s.command == "blockdev-add")
    assert storage.args["filename"] == "/bk/vda" and storage.args["auto-read-only"] is True


def test_a_target_opened_with_o_direct_gets_a_descriptor_opened_so():
    lane = fd_plan("qcow2", pass_fds=True, tuning=Tuning(target_cache_direct=True)).stores[0]
    creates = {s.args["path"]: s.args for s in lane if s.kind == "create-file"}
    assert creates["/bk/vda"].get("direct") is True  # QEMU 9.1+ matches O_DIRECT
    assert "direct" not in creates["/fl/vda"]  # the fleecing image has no cache setting
