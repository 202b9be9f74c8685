"""Checkpoint bitmaps in QEMU: create, validate, measure and delete them.

A checkpoint is, in QEMU, one persistent recording bitmap per disk named after it
(libvirt's modern design: every checkpoint's bitmap keeps recording, so bitmap C
alone holds every write since C). These are the QMP halves of the checkpoint API;
the metadata tree and the XML live elsewhere. Every function leaves nothing of
its own behind in QEMU, whether it succeeds or fails.

A checkpoint's bitmap may also live in read-only backing layers (an external
snapshot copies it into the new overlay). Editing a bitmap there needs the layer
reopened read-write for the moment of the edit, as libvirt does around its
delete transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ErrorDomain, ErrorNumber, VirError
from .bitmaps import check_chain, merge_actions
from .blockgraph import PROTOCOL_DRIVERS, BlockNode, Disk, query_nodes
from .monitor import Monitor
from .plan import checkpoint_bitmap_actions, inconsistent_error

log = logging.getLogger(__name__)

# The temporary bitmap SIZE merges into (libvirt's is libvirt-tmp-size-xml).
TMP_SIZE_BITMAP = "pvb-tmp-size"

# Names of the bitmaps pyvirtbackup makes for itself and removes again: SIZE's
# TMP_SIZE_BITMAP, a push incremental's "backup-<disk>" (plan.plan_backup). A
# checkpoint named like one would have its bitmap taken for a leftover of ours
# and removed, or collide with a backup's own.
RESERVED_PREFIXES = ("pvb-", "backup-")

# (disk, bitmap name): what a checkpoint holds on one disk
Target = tuple[Disk, str]


# ------------------------------------------------------------------------ create


def check_not_reserved(name: str | None, bitmaps: Iterable[str | None] = ()) -> None:
    """Refuse a checkpoint (or a redefined disk bitmap) named like our temporary bitmaps.

    Create and REDEFINE both go through here: a redefined checkpoint's bitmap is
    found, merged and deleted by name exactly like a created one's.
    """
    for what, value in [("checkpoint name", name)] + [("bitmap name", b) for b in bitmaps]:
        if value is not None and value.startswith(RESERVED_PREFIXES):
            raise VirError(
                ErrorNumber.CONFIG_UNSUPPORTED,
                ErrorDomain.DOMAIN_CHECKPOINT,
                f"{what} '{value}' is reserved: names starting with "
                + " or ".join(f"'{p}'" for p in RESERVED_PREFIXES)
                + " are pyvirtbackup's temporary bitmaps, which it removes as its own; "
                "choose another name",
            )


def check_prepare(name: str, targets: list[Target]) -> None:
    """libvirt's qemuCheckpointPrepare rules, with its messages: QEMU keeps a
    checkpoint as a bitmap named after it, in a qcow2 top image."""
    for disk, bitmap in targets:
        if bitmap != name:
            raise VirError(
                ErrorNumber.CONFIG_UNSUPPORTED,
                ErrorDomain.QEMU,
                f"bitmap for disk '{disk.name}' must match checkpoint name '{name}'",
            )
        if disk.format != "qcow2":
            raise VirError(
                ErrorNumber.CONFIG_UNSUPPORTED,
                ErrorDomain.QEMU,
                f"checkpoint for disk {disk.name} unsupported for storage type {disk.format}",
            )


def check_free(targets: list[Target], nodes: dict[str, BlockNode]) -> None:
    """Refuse a bitmap name already taken on a disk's top image, before the transaction.

    QEMU's own "Bitmap already exists" is what users of other tools meet when
    metadata and images drift apart; say whose bitmap it is and how to get out.
    """
    for disk, bitmap in targets:
        top = nodes.get(disk.node or "")
        if top is not None and bitmap in top.bitmaps:
            raise VirError(
                ErrorNumber.OPERATION_FAILED,
                ErrorDomain.QEMU,
                f"disk '{disk.name}' already has a bitmap named '{bitmap}' (node {top.name}) "
                "that belongs to no checkpoint: it was left by a metadata-only delete, a "
                "lost state directory or another tool. Redefine the checkpoint from its "
                "saved XML (REDEFINE) if the bitmap is still good, or remove it with "
                f"block-dirty-bitmap-remove node={top.name} name={bitmap}",
            )


def add_actions(name: str, targets: list[Target]) -> list[dict[str, Any]]:
    """The transaction actions creating the checkpoint's bitmaps (one per disk)."""
    return checkpoint_bitmap_actions(name, [disk for disk, _ in targets])


async def create(mon: Monitor, name: str, targets: list[Target]) -> None:
    """Create the bitmaps of a checkpoint, all in one transaction (one instant)."""
    check_free(targets, await query_nodes(mon))
    actions = add_actions(name, targets)
    if actions:
        await mon.transaction(actions)


async def remove_new(
    mon: Monitor, name: str, targets: list[Target], *, created: bool | None = None
) -> None:
    """Undo :func:`create` (or a begin's bitmap adds) after a later step failed.

    ``created`` is the caller's word on whether *our* transaction added these
    bitmaps, and it must be given:

    - True: the transaction that added them succeeded (``create`` returned; a
      backup job reached its started phase). They are ours and are removed.
    - False: the transaction failed or never ran. Nothing of ours exists, so a
      bitmap of that name is someone else's (it may be the very reason the
      transaction failed: it appeared between our check and our add) and stays.
    - None (not said): treated as False, with a warning naming what may be left,
      so an unsure caller leaves a stray bitmap rather than deleting one.

    Only top nodes are touched, where the adds went; a bitmap already gone is fine.
    """
    if not created:
        if created is None:
            log.warning(
                "bitmap '%s' of disk(s) %s not removed: the caller did not say whether "
                "pyvirtbackup's transaction created it. If it did, remove it with "
                "block-dirty-bitmap-remove",
                name,
                ", ".join(f"{disk.name} (node {disk.node})" for disk, _ in targets),
            )
        return
    for disk, _ in targets:
        try:
            await mon.execute("block-dirty-bitmap-remove", {"node": disk.node, "name": name})
        except VirError as exc:
            log.debug("undo of bitmap %s on %s: %s", name, disk.name, exc)


# ---------------------------------------------------------------------- validate


def validate(targets: list[Target], nodes: dict[str, BlockNode], way_out: str) -> None:
    """REDEFINE_VALIDATE: each disk's bitmap chain must be usable (libvirt's rule)."""
    for disk, bitmap in targets:
        check = check_chain(disk, nodes, bitmap)
        if not check.valid:
            raise inconsistent_error(disk.name, bitmap, check.problem or "unusable", way_out)


# -------------------------------------------------------------------------- size


async def dirty_sizes(mon: Monitor, targets: list[Target]) -> dict[str, int]:
    """Bytes written since the checkpoint, per disk (XML_SIZE), at bitmap granularity.

    The bitmap of every layer is merged into a temporary disabled bitmap on the
    top node, whose count is read and which is removed again. Disks whose chain is
    not usable get no size, as in libvirt.

    A bitmap already named like the temporary one is removed first only when it
    can be ours (left by a crash between merge and cleanup): not persistent and
    not recording, as we create it. Any other is someone's data: that disk gets
    no size and a warning, and the bitmap stays.
    """
    nodes = await query_nodes(mon)
    usable: list[tuple[Disk, str, Any]] = []
    leftovers: list[dict[str, Any]] = []
    for disk, bitmap in targets:
        check = check_chain(disk, nodes, bitmap)
        if not check.valid or not disk.node:
            continue
        there = nodes[disk.node].bitmaps.get(TMP_SIZE_BITMAP)
        if there is not None and (there.persistent or there.recording):
            log.warning(
                "disk '%s' has a %s bitmap named '%s' (node %s) that pyvirtbackup did not "
                "make; its size since checkpoint '%s' is left out rather than risk that "
                "bitmap",
                disk.name,
                "persistent" if there.persistent else "recording",
                TMP_SIZE_BITMAP,
                disk.node,
                bitmap,
            )
            continue
        if there is not None:
            leftovers.append(_remove_action(disk.node, TMP_SIZE_BITMAP))
        usable.append((disk, bitmap, check.layers))
    if not usable:
        return {}
    if leftovers:  # a crash between our merge and our cleanup
        await mon.transaction(leftovers)
    merges: list[dict[str, Any]] = []
    for disk, _, layers in usable:
        merges += merge_actions(disk.node or "", TMP_SIZE_BITMAP, layers)
    await mon.transaction(merges)
    try:
        after = await query_nodes(mon)
    finally:
        cleanup = [_remove_action(disk.node or "", TMP_SIZE_BITMAP) for disk, _, _ in usable]
        try:
            await mon.transaction(cleanup)
        except VirError as exc:  # QEMU gone: the bitmap (not persistent) went with it
            log.warning("could not remove temporary bitmap %s: %s", TMP_SIZE_BITMAP, exc)
    sizes: dict[str, int] = {}
    for disk, _, _ in usable:
        top = after.get(disk.node or "")
        if top is not None and TMP_SIZE_BITMAP in top.bitmaps:
            sizes[disk.name] = top.bitmaps[TMP_SIZE_BITMAP].count
    return sizes


def _remove_action(node: str, name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": name}}


# ------------------------------------------------------------------------ delete


@dataclass
class Removal:
    """What a delete found: bitmaps absent from a whole chain, and ones it had to leave.

    ``missing`` holds (disk, bitmap) pairs; ``left`` holds (disk, bitmap, node,
    image) for bitmaps in a read-only layer QEMU opened implicitly (from an image
    header), which blockdev-reopen cannot make writable. ``unchecked`` holds
    (disk, bitmap, what) for disks whose chain could not be read to the bottom
    while a layer below might hold a copy of the bitmap: that copy, if any, stays.
    """

    missing: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str, str]] = field(default_factory=list)
    unchecked: list[tuple[str, str, str]] = field(default_factory=list)


async def delete(mon: Monitor, targets: Iterable[Target]) -> Removal:
    """Remove bitmaps from every layer of each disk's chain, in one transaction.

    Unlike libvirt 9.0, a bitmap missing from a disk is not an error: it is
    reported in the result, the rest is removed, and the caller drops the metadata.
    Broken (inconsistent) bitmaps are removed like healthy ones. Layers below the
    part of a chain we could read are not touched and reported in ``unchecked``.
    """
    nodes = await query_nodes(mon)
    result = Removal()
    actions: list[dict[str, Any]] = []
    writable: dict[str, list[dict[str, Any]]] = {}  # read-only layer -> its reopen options
    for disk, bitmap in targets:
        found = False
        for depth, node_name in enumerate(disk.chain):
            node = nodes.get(node_name)
            if node is None or bitmap not in node.bitmaps:
                continue
            found = True
            if node.readonly and node.name not in writable:
                options = _writable_options(disk, depth, nodes)
                if options is None:
                    result.left.append((disk.name, bitmap, node.name, node.filename))
                    continue
                writable[node.name] = options
            actions.append(_remove_action(node.name, bitmap))
        if disk.unread_may_hold_bitmaps():
            result.unchecked.append((disk.name, bitmap, disk.unread_description()))
        elif not found:
            result.missing.append((disk.name, bitmap))
    if not actions:
        return result
    reopened: list[list[dict[str, Any]]] = []
    try:
        for options in writable.values():
            await mon.execute("blockdev-reopen", {"options": options})
            reopened.append(options)
        await mon.transaction(actions)
    finally:
        for options in reversed(reopened):
            # back as they were; the format node first, then the file under it
            back = [{**o, "read-only": True} for o in reversed(options)]
            try:
                await mon.execute("blockdev-reopen", {"options": back})
            except VirError as exc:
                log.error("backing image %s stays read-write: %s", options[0]["filename"], exc)
    return result


def _file_node(fmt: BlockNode, nodes: dict[str, BlockNode]) -> BlockNode | None:
    """The protocol node under a format node, found by file name (QMP has no edges)."""
    matches = [
        n for n in nodes.values() if n.driver in PROTOCOL_DRIVERS and n.filename == fmt.filename
    ]
    return matches[0] if len(matches) == 1 else None


def _writable_options(
    disk: Disk, depth: int, nodes: dict[str, BlockNode]
) -> list[dict[str, Any]] | None:
    """blockdev-reopen options making one backing layer read-write, or None if we cannot.

    blockdev-reopen resets every option it is not given, and refuses nodes QEMU
    named itself; so only a layer whose node names, file child and backing child
    are all known is reopened. Options the query does not show (aio, discard,
    locking) return to QEMU's defaults, which is harmless for a read-only layer.
    The file node comes first: it must be writable before its format node is.
    """
    fmt = nodes[disk.chain[depth]]
    file = _file_node(fmt, nodes)
    if fmt.implicit or file is None or file.implicit:
        return None
    backing: str | None = None
    if fmt.backing_file:
        if depth + 1 >= len(disk.chain):
            return None  # a backing we could not identify: reopening would cut it off
        backing = disk.chain[depth + 1]
    file_opts: dict[str, Any] = {
        "node-name": file.name,
        "driver": file.driver,
        "filename": file.filename,
        "read-only": False,
    }
    fmt_opts: dict[str, Any] = {
        "node-name": fmt.name,
        "driver": fmt.driver,
        "file": file.name,
        "backing": backing,
        "read-only": False,
    }
    for opts, node in ((file_opts, file), (fmt_opts, fmt)):
        if node.cache:
            opts["cache"] = {
                "direct": bool(node.cache.get("direct")),
                "no-flush": bool(node.cache.get("no-flush")),
            }
    if fmt.detect_zeroes and fmt.detect_zeroes != "off":
        fmt_opts["detect-zeroes"] = fmt.detect_zeroes
    return [file_opts, fmt_opts]
