"""Checking a job record before a new process acts on it.

A record says which nodes to delete, which bitmaps to remove, which exports and
objects to drop and which files to unlink. Even in a state directory nobody else
can write, it is checked against our own naming before anything is done with it:
node names must be the ones the planner gives a store, jobs and exports ours,
temporary bitmaps named as ours and, on a disk's own node, not persistent (a
persistent bitmap is somebody's checkpoint), files ones the plan names. A record
that fails is not taken over (the driver sets it aside) rather than half obeyed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict
from typing import Any

from .actions import SHUTDOWN_ACTIONS
from .fleecing import names as fleecing_names
from .monitor import Monitor
from .nbd import AUTHZ_ALIAS, TLS_ALIAS
from .plan import DiskPlan, job_id, node_names

_STR = ("disk", "source_node", "job_id", "storage_node", "format_node", "path", "store_type", "fmt")
_OPT_STR = (
    "source_path",
    "backing_node",
    "backing_file",
    "backing_fmt",
    "bitmap",
    "bitmap_node",
    "export_name",
    "export_bitmap",
    "export_id",
    "sync",
    "qdev",
    "attached_node",
    "fleece_path",
    "fleece_storage_node",
    "fleece_node",
    "cbw_node",
    "access_node",
    "instant_bitmap_node",
    "direct_reason",
)
_INT = ("store_id", "size")
_BOOL = ("create_file", "create_format")
# nodes a record may name that are not ours to delete: the disk's, its backing, what
# its device used before the fleecing filter, and where a bitmap is made or moved from
_FOREIGN_NODES = (
    "source_node",
    "backing_node",
    "bitmap_node",
    "attached_node",
    "instant_bitmap_node",
)
# the only plan fields that name files we create: a target or scratch, a fleecing image
_OUR_FILES = ("path", "fleece_path")
_CHECKPOINT_NAME = re.compile(r"[a-zA-Z0-9_\-][a-zA-Z0-9_\-.]*")
_OBJECTS = {TLS_ALIAS, AUTHZ_ALIAS}


class RecordError(ValueError):
    """The record is not one we wrote: it is not acted on."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt(value: Any, kind: type) -> bool:
    return value is None or (isinstance(value, kind) and (kind is not int or _is_int(value)))


def _our_node(node: Any, plan: dict[str, Any]) -> bool:
    """A node of the job's own (its store, or one named as ours): what is on it is ours."""
    return node == plan.get("format_node") or (isinstance(node, str) and node.startswith("pvb-"))


def check_plan(plan: Any, mode: str) -> None:
    if not isinstance(plan, dict):
        raise RecordError("a disk's plan is not an object")
    known = {f.name for f in dataclasses.fields(DiskPlan)}
    extra = set(plan) - known
    if extra:
        raise RecordError(f"unknown plan field(s) {sorted(extra)}")
    for key in _STR:
        if not isinstance(plan.get(key), str):
            raise RecordError(f"plan field {key!r} is missing or not a string")
    for key in _OPT_STR:
        if not _opt(plan.get(key), str):
            raise RecordError(f"plan field {key!r} is not a string")
    for key in _INT:
        if not _is_int(plan.get(key)) or plan[key] < 0:
            raise RecordError(f"plan field {key!r} is missing or not a number")
    for key in _BOOL:
        if not isinstance(plan.get(key), bool):
            raise RecordError(f"plan field {key!r} is missing or not true/false")
    if not _opt(plan.get("cluster_size"), int) or not isinstance(plan.get("merge", []), list):
        raise RecordError("plan fields 'cluster_size' or 'merge' have the wrong type")
    if not isinstance(plan.get("fleecing", False), bool) or not _is_int(plan.get("cbw_timeout", 0)):
        raise RecordError("plan fields 'fleecing' or 'cbw_timeout' have the wrong type")
    disk = plan["disk"]
    if plan["job_id"] != job_id(disk):
        raise RecordError(f"job id {plan['job_id']!r} is not ours")
    if (plan["storage_node"], plan["format_node"]) != node_names(plan["store_id"]):
        raise RecordError(
            f"nodes {plan['storage_node']!r}, {plan['format_node']!r} are not our store's"
        )
    for key, value in plan.items():
        if key.endswith("_node") and key not in _FOREIGN_NODES and value is not None:
            if not (isinstance(value, str) and value.startswith("pvb-")):
                raise RecordError(f"node {value!r} ({key}) is not named as ours")
    if plan.get("export_id") not in (None, f"pvb-nbd-{disk}"):
        raise RecordError(f"export id {plan['export_id']!r} is not ours")
    _check_fleecing(plan, mode)
    _check_bitmaps(plan, mode)


def _check_fleecing(plan: dict[str, Any], mode: str) -> None:
    """The filter's, view's and fleecing image's nodes are exactly the planner's names:
    teardown deletes them and switches the device back from one of them."""
    fleece_nodes = ("fleece_storage_node", "fleece_node", "cbw_node", "access_node")
    if not plan.get("fleecing"):
        if any(plan.get(k) is not None for k in (*fleece_nodes, "fleece_path")):
            raise RecordError("a disk without fleecing names fleecing nodes or an image")
        return
    expected = fleecing_names(plan["store_id"])
    if mode == "pull":  # the scratch is the fleecing image
        expected["fleece_storage_node"] = plan["storage_node"]
        expected["fleece_node"] = plan["format_node"]
    for key in fleece_nodes:
        if plan.get(key) != expected[key]:
            raise RecordError(f"node {plan.get(key)!r} ({key}) is not the one we name")
    if not (isinstance(plan.get("qdev"), str) and isinstance(plan.get("attached_node"), str)):
        raise RecordError("a fleecing disk's device or its previous node is missing")
    path = plan.get("fleece_path")
    if mode == "pull" and path != plan["path"]:
        raise RecordError(f"a pull's fleecing image {path!r} is not its scratch")


def _check_bitmaps(plan: dict[str, Any], mode: str) -> None:
    """Temporary bitmaps: on a node of ours, or on the disk's own node under the name
    we give them (push) or the export's bitmap name (a fleecing pull exports the
    disk's own node). Persistent ones are spared whatever this says
    (``spare_persistent_bitmaps``)."""
    disk = plan["disk"]
    bitmap = plan.get("bitmap")
    instant = plan.get("instant_bitmap_node")
    if bitmap is None:
        if instant is not None:
            raise RecordError("an instant's bitmap node without a bitmap")
        return
    ours = f"backup-{disk}"
    node = plan.get("bitmap_node")
    if not _our_node(node, plan):
        if node != plan["source_node"]:
            raise RecordError(f"bitmap {bitmap!r} is on {node!r}, neither ours nor the disk's")
        if mode == "pull" and not (plan.get("fleecing") and bitmap == plan.get("export_bitmap")):
            raise RecordError(f"bitmap {bitmap!r} is not on a node of ours")
        if mode == "push" and bitmap != ours:
            raise RecordError(f"bitmap {bitmap!r} is not one of our temporary bitmaps")
    if instant is not None and not (
        mode == "push" and instant == plan["source_node"] and bitmap == ours
    ):
        raise RecordError(f"the instant's bitmap {bitmap!r} on {instant!r} is not ours")


def check(record: Any) -> None:
    """Raise RecordError unless ``record`` is a job record as BackupJob.snapshot writes."""
    if not isinstance(record, dict):
        raise RecordError("not an object")
    mode = record.get("mode")
    if mode not in ("push", "pull"):
        raise RecordError(f"mode {mode!r} is neither push nor pull")
    if record.get("phase", "started") not in ("preparing", "started"):
        raise RecordError(f"phase {record.get('phase')!r} is unknown")
    disks = record.get("disks")
    if not isinstance(disks, list) or not disks:
        raise RecordError("no disks")
    plans = []
    for d in disks:
        if not isinstance(d, dict):
            raise RecordError("a disk is not an object")
        check_plan(d.get("plan"), mode)
        plans.append(d["plan"])
        if not _opt(d.get("state"), str) or not _opt(d.get("error"), str):
            raise RecordError("a disk's state or error is not a string")
        if not isinstance(d.get("cleaned", False), bool):
            raise RecordError("a disk's 'cleaned' is not true/false")
        if not (_is_int(d.get("current", 0)) and _is_int(d.get("total", 0))):
            raise RecordError("a disk's progress is not a number")
    if len({p["job_id"] for p in plans}) != len(plans):
        raise RecordError("two disks share a job")
    if not isinstance(record.get("started", 0), (int, float)):
        raise RecordError("'started' is not a time")
    _check_files(record, plans)
    exports = record.get("exports", [])
    ours = {p.get("export_id") for p in plans} - {None}
    if not isinstance(exports, list) or not set(exports) <= ours:
        raise RecordError(f"exports {exports!r} are not this job's")
    objects = record.get("objects", [])
    if not isinstance(objects, list) or not set(objects) <= _OBJECTS:
        raise RecordError(f"objects {objects!r} are not ours")
    for key in ("nbd_server", "cancel_requested"):
        if not isinstance(record.get(key, False), bool):
            raise RecordError(f"{key!r} is not true/false")
    for key in ("first_error", "checkpoint_xml"):
        if not _opt(record.get(key), str):
            raise RecordError(f"{key!r} is not a string")
    for key in ("paused_by_us", "guest_shut_down"):
        if not isinstance(record.get(key, False), bool):
            raise RecordError(f"{key!r} is not true/false")
    if record.get("shutdown_restore") not in (None, *SHUTDOWN_ACTIONS):
        raise RecordError(f"shutdown action {record.get('shutdown_restore')!r} is unknown")
    if not _is_int(record.get("version", 2)):
        raise RecordError("'version' is not a number")
    chk = record.get("checkpoint")
    if chk is not None and not (isinstance(chk, str) and _CHECKPOINT_NAME.fullmatch(chk)):
        raise RecordError(f"checkpoint {chk!r} is not a checkpoint name")
    _check_listener(record.get("nbd_listener"))


def _check_files(record: dict[str, Any], plans: list[dict[str, Any]]) -> None:
    """Only files the plan names, by absolute path, each with its (device, inode)."""
    files = record.get("created_files", [])
    named = {
        v for p in plans for k in _OUR_FILES if isinstance(v := p.get(k), str) and v.startswith("/")
    }
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise RecordError("'created_files' is not a list of paths")
    for path in files:
        if path not in named:
            raise RecordError(f"created file {path!r} is not one this job's plan names")
    ids = record.get("created_ids", {})
    if not isinstance(ids, dict):
        raise RecordError("'created_ids' is not an object")
    for path, ident in ids.items():
        if path not in files or not (
            isinstance(ident, list) and len(ident) == 2 and all(_is_int(x) for x in ident)
        ):
            raise RecordError(f"file id of {path!r} is not a (device, inode) of a created file")


def _check_listener(rec: Any) -> None:
    if rec is None:
        return
    if not isinstance(rec, dict) or rec.get("transport") not in ("tcp", "unix"):
        raise RecordError("the NBD listener's record is unusable")
    for key in ("path", "private_dir"):
        value = rec.get(key)
        if value is not None and not (isinstance(value, str) and value.startswith("/")):
            raise RecordError(f"the NBD listener's {key} is not an absolute path")
    if not _opt(rec.get("host"), str) or not _opt(rec.get("port"), int):
        raise RecordError("the NBD listener's address is unusable")
    ident = rec.get("ident")
    if ident is not None and not (
        isinstance(ident, list) and len(ident) == 3 and all(_is_int(x) for x in ident)
    ):
        raise RecordError("the NBD socket's identity is unusable")


async def spare_persistent_bitmaps(mon: Monitor, plans: list[DiskPlan]) -> list[str]:
    """Forget a recorded temporary bitmap that is persistent in QEMU: ours never are,
    so it belongs to somebody else (a checkpoint, another tool) and stays. Looked at
    on every node not ours that a record names for one: the bitmap's, and a fleecing
    push's instant node (where its bitmap was made before moving to the view)."""
    named = [
        dp
        for dp in plans
        if dp.bitmap
        and (not _our_node(dp.bitmap_node, asdict(dp)) or dp.instant_bitmap_node is not None)
    ]
    if not named:
        return []
    found = {
        (n["node-name"], b.get("name")): b
        for n in await mon.execute("query-named-block-nodes", {"flat": True})
        for b in n.get("dirty-bitmaps") or []
    }
    problems = []
    for dp in named:
        for field in ("instant_bitmap_node", "bitmap_node"):
            node = getattr(dp, field)
            info = found.get((node, dp.bitmap))
            if node is None or info is None or not info.get("persistent"):
                continue
            problems.append(
                f"bitmap '{dp.bitmap}' on node '{node}' is persistent, so it is "
                "not a temporary bitmap of ours; it was left alone"
            )
            if field == "instant_bitmap_node":
                dp.instant_bitmap_node = None
            else:
                dp.bitmap = dp.instant_bitmap_node = None
    return problems
