"""Dirty bitmaps across a disk's backing chain: validity and merge actions.

A checkpoint's bitmap may exist in several layers of a chain (an external snapshot
re-creates it in the new overlay); the changes since the checkpoint are the union
of all of them. The rules follow libvirt's qemuBlockBitmapChainIsValid and
qemuBlockGetBitmapMergeActions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .blockgraph import Bitmap, BlockNode, Disk


@dataclass
class ChainCheck:
    """The bitmap's layers (top first) and, when unusable, why."""

    layers: list[Bitmap]
    problem: str | None = None
    incomplete: bool = False  # the problem is a chain we could not read, not the bitmap

    @property
    def valid(self) -> bool:
        return self.problem is None


def check_chain(disk: Disk, nodes: dict[str, BlockNode], name: str) -> ChainCheck:
    """Is bitmap ``name`` usable on ``disk``: present on top, contiguous, and healthy.

    A chain we could not read to the bottom is unusable when a layer we could not
    read might hold a copy of the bitmap (a qcow2 layer, or one of unknown format):
    the merge would silently leave out the writes recorded there. Layers that
    cannot store persistent bitmaps (a bare raw ``file`` node) change nothing.
    """
    layers: list[Bitmap] = []
    gap = False
    problem: str | None = None
    for depth, node_name in enumerate(disk.chain):
        node = nodes.get(node_name)
        bm = node.bitmaps.get(name) if node else None
        if bm is None:
            if depth == 0:
                problem = "missing from the disk's top image"
            gap = True
            continue
        if gap and problem is None:
            problem = f"missing from a layer above {node_name} (the chain has a gap)"
        layers.append(bm)
        if problem is None:
            if bm.inconsistent:
                problem = (
                    f"marked inconsistent on node {node_name} (QEMU was not shut down "
                    "cleanly while it was in use)"
                )
            elif not bm.recording:
                problem = f"disabled (not recording writes) on node {node_name}"
            elif not bm.persistent:
                problem = f"not persistent on node {node_name} (it would not survive a restart)"
    if not disk.chain:
        problem = "the disk has no image"
    elif problem is None and disk.unread_may_hold_bitmaps():
        problem = (
            "the disk's backing chain could not be read completely: "
            f"{disk.unread_description()}; writes recorded in a copy of the bitmap "
            "there would be left out"
        )
        return ChainCheck(layers, problem, incomplete=True)
    return ChainCheck(layers, problem)


def merge_actions(
    target_node: str, target_name: str, layers: list[Bitmap], granularity: int | None = None
) -> list[dict[str, Any]]:
    """Create a disabled temporary bitmap on ``target_node`` holding the union of ``layers``."""
    add: dict[str, Any] = {
        "node": target_node,
        "name": target_name,
        "persistent": False,
        "disabled": True,
    }
    gran = granularity or (layers[0].granularity if layers else None)
    if gran:
        add["granularity"] = gran
    return [
        {"type": "block-dirty-bitmap-add", "data": add},
        {
            "type": "block-dirty-bitmap-merge",
            "data": {
                "node": target_node,
                "target": target_name,
                "bitmaps": [{"node": b.node, "name": b.name} for b in layers],
            },
        },
    ]
