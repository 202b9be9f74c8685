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
)
_INT = ("store_id", "size")
_BOOL = ("create_file", "create_format")
# nodes a record may name that are not ours to delete: the disk's and its backing
_FOREIGN_NODES = ("source_node", "backing_node", "bitmap_node")
# paths a plan names that are never files we created: the disk and its backing
_NOT_OURS_FILES = ("source_path", "backing_file")
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
    bitmap = plan.get("bitmap")
    if bitmap is not None:
        on_ours = _our_node(plan.get("bitmap_node"), plan)
        if mode == "push" and not (bitmap == f"backup-{disk}" or on_ours):
            raise RecordError(f"bitmap {bitmap!r} is not one of our temporary bitmaps")
        if mode == "pull" and not on_ours:
            raise RecordError(f"bitmap {bitmap!r} is not on a node of ours")


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
    chk = record.get("checkpoint")
    if chk is not None and not (isinstance(chk, str) and _CHECKPOINT_NAME.fullmatch(chk)):
        raise RecordError(f"checkpoint {chk!r} is not a checkpoint name")
    _check_listener(record.get("nbd_listener"))


def _check_files(record: dict[str, Any], plans: list[dict[str, Any]]) -> None:
    """Only files the plan names, by absolute path, each with its (device, inode)."""
    files = record.get("created_files", [])
    named = {
        v
        for p in plans
        for k, v in p.items()
        if k not in _NOT_OURS_FILES and isinstance(v, str) and v.startswith("/")
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
    so it belongs to somebody else (a checkpoint, another tool) and stays."""
    named = [dp for dp in plans if dp.bitmap and not _our_node(dp.bitmap_node, asdict(dp))]
    if not named:
        return []
    found = {
        (n["node-name"], b.get("name")): b
        for n in await mon.execute("query-named-block-nodes", {"flat": True})
        for b in n.get("dirty-bitmaps") or []
    }
    problems = []
    for dp in named:
        info = found.get((dp.bitmap_node, dp.bitmap))
        if info is not None and info.get("persistent"):
            problems.append(
                f"bitmap '{dp.bitmap}' on node '{dp.bitmap_node}' is persistent, so it is "
                "not a temporary bitmap of ours; it was left alone"
            )
            dp.bitmap = None
    return problems
