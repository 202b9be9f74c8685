"""Fleecing: the data path that never makes the guest pay for the backup's storage.

QEMU's backup job copies old data to the target (push) or scratch (pull) inside the
guest's write, and on QEMU 7.2 a failed copy fails that write: a full or slow
backup store fails or stalls the guest (measured: reference/qemu-7.2-notes.md §3f).
Here each disk's device is re-pointed at an explicit copy-before-write filter whose
target is a local, thin fleecing image, with ``on-cbw-error=break-snapshot`` and a
``cbw-timeout``; a ``snapshot-access`` node on the filter is the point-in-time view
that a push copies from and a pull exports. The guest's writes then only ever wait
for the fleecing image; when it cannot take the old data, the snapshot breaks and
the backup fails, never the write.

This module is pure planning: which disks can be fleeced, and the steps that build
the path. The executor runs them and ``jobevents`` takes the path down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .blockgraph import Disk
from .features import QemuFeatures
from .plan import DiskPlan, ImageSpec, Step

# the features fleecing cannot do without, and why
REQUIRED = ("snapshot-access", "copy-before-write.on-cbw-error", "copy-before-write.cbw-timeout")
DEFAULT_CBW_TIMEOUT = 30  # seconds a guest write may wait for the fleecing image
FLEECE_CLUSTER = 65536
DISCARD_SOURCE = "blockdev-backup.discard-source"
MIN_CLUSTER = "blockdev-backup.x-perf.min-cluster-size"
CBW_MIN_CLUSTER = "copy-before-write.min-cluster-size"


@dataclass
class FleecingSettings:
    """Whether a backup fleeces, and how long a guest write may wait for the image."""

    enabled: bool = True
    cbw_timeout: int = DEFAULT_CBW_TIMEOUT


def unavailable(features: QemuFeatures) -> str | None:
    """Why this QEMU cannot fleece at all, or None."""
    missing = [name for name in REQUIRED if not features.has(name)]
    if missing:
        return f"this QEMU lacks {', '.join(missing)} (QEMU 7.1 or newer has them)"
    return None


def direct_reason(src: Disk) -> str | None:
    """Why one disk takes libvirt's direct sequence even with fleecing on, or None.

    A read-only disk is never written, so no copy ever runs in a guest write. A disk
    named only by its node has no device we know of to re-point: re-pointing is what
    makes the guest's writes go through the filter, and a snapshot its writes bypass
    would not be a snapshot.
    """
    if src.readonly:
        return "read-only disk: the guest cannot write it, so nothing runs in its writes"
    if not src.qdev or not src.attached_node:
        return "no guest device is known to use this disk's node, so none can be re-pointed"
    return None


def names(store_id: int) -> dict[str, str]:
    return {
        "fleece_storage_node": f"pvb-{store_id}-flstorage",
        "fleece_node": f"pvb-{store_id}-fleece",
        "cbw_node": f"pvb-{store_id}-cbw",
        "access_node": f"pvb-{store_id}-access",
    }


def prepare(dp: DiskPlan, src: Disk, settings: FleecingSettings, fleece_path: str | None) -> None:
    """Turn a disk's plan into a fleecing one. Pull: the scratch is the fleecing image."""
    dp.fleecing = True
    dp.qdev, dp.attached_node = src.qdev, src.attached_node
    dp.cbw_timeout = settings.cbw_timeout
    for key, value in names(dp.store_id).items():
        setattr(dp, key, value)
    if dp.sync == "none":  # pull: no backing (the filter's snapshot reads through)
        dp.fleece_path = dp.path
        dp.fleece_storage_node, dp.fleece_node = dp.storage_node, dp.format_node
        dp.backing_node = dp.backing_file = dp.backing_fmt = None
    else:
        dp.fleece_path = fleece_path


def image(dp: DiskPlan, *, pass_fd: bool = False) -> ImageSpec:
    """A push's fleecing image: a sparse raw file, discards passed down so that it
    shrinks as the job copies (where QEMU can discard the source).

    Raw, not qcow2: the filter keeps in memory which clusters it copied, so the image
    needs no metadata of its own, and a guest write that triggers a copy then waits
    for one file write instead of a qcow2 allocation too (guest write latency p50
    1.4x its time without a backup, against 1.8x with qcow2, here); and it takes
    three QMP round trips fewer to set up.
    """
    assert dp.fleece_path and dp.fleece_node and dp.fleece_storage_node
    return ImageSpec(
        disk=dp.disk,
        path=dp.fleece_path,
        store_type="file",
        fmt="raw",
        size=dp.size,
        storage_node=dp.fleece_storage_node,
        format_node=dp.fleece_node,
        create_file=True,
        create_format=True,
        job_prefix=f"pvb-create-{dp.store_id}-fleece",
        discard=True,
        format_layer=False,
        pass_fd=pass_fd,
    )


def filter_step(dp: DiskPlan, features: QemuFeatures) -> Step:
    """The copy-before-write filter over what the device uses now. Added before the
    instant: until the device is switched onto it, nothing goes through it."""
    args: dict[str, Any] = {
        "driver": "copy-before-write",
        "node-name": dp.cbw_node,
        "file": dp.attached_node,
        "target": dp.fleece_target,
        "on-cbw-error": "break-snapshot",
        "cbw-timeout": dp.cbw_timeout,
    }
    if features.has(CBW_MIN_CLUSTER) and features.has(DISCARD_SOURCE):
        args["min-cluster-size"] = FLEECE_CLUSTER
    return Step(
        "qmp",
        "blockdev-add",
        args,
        undo=[Step("qmp", "blockdev-del", {"node-name": dp.cbw_node})],
    )


def switch_step(dp: DiskPlan) -> Step:
    """The instant for this disk: from here on its guest writes go through the filter.

    Never set ``drive`` to the node the device already uses: QEMU 7.2 aborts
    (qemu-7.2-notes pitfall 2); the executor's teardown reads it back first.
    """
    return Step(
        "qmp",
        "qom-set",
        {"path": dp.qdev, "property": "drive", "value": dp.cbw_node},
        undo=[
            Step(
                "qmp",
                "qom-set",
                {"path": dp.qdev, "property": "drive", "value": dp.attached_node},
            )
        ],
    )


def access_steps(dp: DiskPlan, granularity: int | None) -> list[Step]:
    """The point-in-time view; for a push incremental, the job's bitmap moved onto it.

    The view can only be added once the device is on the filter (the filter then
    refuses other writers of the disk, which QEMU checks here: a second writer we do
    not know of fails the begin instead of slipping writes past the snapshot).
    """
    steps = [
        Step(
            "qmp",
            "blockdev-add",
            {
                "driver": "snapshot-access",
                "node-name": dp.access_node,
                "file": dp.cbw_node,
                "discard": "unmap",
            },
            undo=[Step("qmp", "blockdev-del", {"node-name": dp.access_node})],
        )
    ]
    if dp.sync == "incremental" and dp.bitmap and dp.instant_bitmap_node:
        add: dict[str, Any] = {
            "node": dp.access_node,
            "name": dp.bitmap,
            "persistent": False,
            "disabled": True,
        }
        if granularity:
            add["granularity"] = granularity
        steps += [
            Step(
                "qmp",
                "block-dirty-bitmap-add",
                add,
                undo=[
                    Step(
                        "qmp",
                        "block-dirty-bitmap-remove",
                        {"node": dp.access_node, "name": dp.bitmap},
                        ignore_errors=True,
                    )
                ],
            ),
            Step(
                "qmp",
                "block-dirty-bitmap-merge",
                {
                    "node": dp.access_node,
                    "target": dp.bitmap,
                    "bitmaps": [{"node": dp.instant_bitmap_node, "name": dp.bitmap}],
                },
            ),
            Step(
                "qmp",
                "block-dirty-bitmap-remove",
                {"node": dp.instant_bitmap_node, "name": dp.bitmap},
            ),
        ]
    return steps


def backup_options(dp: DiskPlan, features: QemuFeatures) -> dict[str, Any]:
    """What a push job reading the view adds: discard what it copied (the fleecing
    image shrinks, and the filter stops copying those clusters), in the image's
    cluster size so the discards are not rounded away."""
    options: dict[str, Any] = {"device": dp.access_node}
    if features.has(DISCARD_SOURCE):
        options["discard-source"] = True
        if features.has(MIN_CLUSTER):
            options["x-perf"] = {"min-cluster-size": FLEECE_CLUSTER}
    return options
