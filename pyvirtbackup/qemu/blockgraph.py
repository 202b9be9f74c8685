"""The disks of a running QEMU as libvirt would see them, read from its block graph.

A disk is a guest device with a BlockBackend: its name is the device id (libvirt's
``<target dev>``), its node the top format node, its chain the format nodes below
it through backing links. Bitmaps live on those format nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ErrorDomain, ErrorNumber, VirError
from .monitor import Monitor

# Drivers that talk to storage rather than interpret an image format.
PROTOCOL_DRIVERS = frozenset(
    {
        "file",
        "host_device",
        "host_cdrom",
        "nbd",
        "iscsi",
        "rbd",
        "ssh",
        "http",
        "https",
        "ftp",
        "ftps",
        "gluster",
        "nfs",
        "null-co",
        "null-aio",
        "nvme",
        "vvfat",
    }
)
# Nodes QEMU or a job inserts above a format node without changing the data.
FILTER_DRIVERS = frozenset(
    {
        "copy-before-write",
        "throttle",
        "blkdebug",
        "blkverify",
        "blklogwrites",
        "compress",
        "preallocate",
        "snapshot-access",
        "copy-on-read",
    }
)
# Image formats that can store persistent dirty bitmaps (checkpoints) in QEMU.
BITMAP_FORMATS = frozenset({"qcow2"})


@dataclass
class Bitmap:
    """A dirty bitmap as query-named-block-nodes reports it."""

    name: str
    node: str
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool
    granularity: int
    count: int

    @classmethod
    def from_qmp(cls, node: str, raw: dict[str, Any]) -> Bitmap:
        return cls(
            name=raw.get("name", ""),
            node=node,
            recording=bool(raw.get("recording", False)),
            persistent=bool(raw.get("persistent", False)),
            busy=bool(raw.get("busy", False)),
            inconsistent=bool(raw.get("inconsistent", False)),
            granularity=int(raw.get("granularity", 65536)),
            count=int(raw.get("count", 0)),
        )


@dataclass
class BlockNode:
    """A node of query-named-block-nodes(flat).

    ``backing_file``, ``cache`` and ``detect_zeroes`` are kept because reopening a
    node (to edit bitmaps in a read-only backing layer) must restate its options.
    """

    name: str
    driver: str
    filename: str
    readonly: bool
    virtual_size: int
    cluster_size: int | None
    bitmaps: dict[str, Bitmap] = field(default_factory=dict)
    backing_file: str | None = None
    cache: dict[str, bool] = field(default_factory=dict)
    detect_zeroes: str | None = None

    @property
    def implicit(self) -> bool:
        """QEMU named it itself (``#block123``): opened from an image header, not by us."""
        return self.name.startswith("#")


@dataclass
class Disk:
    """One guest disk: what libvirt's domain XML and its private node names hold."""

    name: str
    node: str | None  # top format node; None for a drive with no medium
    path: str | None
    format: str | None
    type: str  # storage type of the top image: file, block or network
    size: int
    readonly: bool
    cluster_size: int | None = None
    chain: list[str] = field(default_factory=list)  # format nodes, top first
    # QEMU's own answer to "is there anything below the top image?", independent of
    # whether every layer below could be matched to a node (``chain`` may stop short)
    has_backing: bool = False
    # backing layers below the end of ``chain`` that could not be matched to a format
    # node (a bare protocol node, a json: filename, a filter between layers...), top
    # first, as (filename, format as QEMU reports it, or None when unknown)
    unread_layers: list[tuple[str, str | None]] = field(default_factory=list)
    # the guest device's QOM path and the node it is attached to (the top format
    # node, or a filter above it): what fleecing re-points and later restores;
    # None for a disk named by node only, which no device may be known to use
    qdev: str | None = None
    attached_node: str | None = None

    @property
    def empty(self) -> bool:
        return self.node is None

    @property
    def chain_complete(self) -> bool:
        """Every backing layer QEMU reports is in ``chain``.

        When it is not, anything that reasons over the whole chain (bitmaps merged
        or deleted in every layer, "no backing shows through") must not take
        ``chain`` for all of it.
        """
        return not self.unread_layers

    def unread_description(self) -> str:
        """What ``chain`` misses and why, for messages: what a user can look for."""
        if not self.unread_layers:
            return "the chain is complete"
        filename, fmt = self.unread_layers[0]
        if fmt in FILTER_DRIVERS:
            why = f"is a '{fmt}' filter between two layers"
        elif fmt in PROTOCOL_DRIVERS:
            why = f"is a bare '{fmt}' protocol node with no format node above it"
        else:
            why = f"({fmt or 'format unknown'}) has no format node open on that file"
        text = f"backing layer {len(self.chain)} ({filename or 'unnamed'}) {why}"
        rest = len(self.unread_layers) - 1
        if rest:
            text += f"; {rest} more layer(s) below it are not read either"
        return text

    def unread_may_hold_bitmaps(self) -> bool:
        """Could a layer missing from ``chain`` hold a checkpoint's bitmap?

        Only qcow2 stores persistent bitmaps in QEMU; a bare protocol node, a raw
        image or a filter never does. A layer whose format QEMU did not report
        might be qcow2, so it counts.
        """
        return any(fmt is None or fmt in BITMAP_FORMATS for _, fmt in self.unread_layers)


def parse_nodes(named_nodes: list[dict[str, Any]]) -> dict[str, BlockNode]:
    nodes: dict[str, BlockNode] = {}
    for raw in named_nodes:
        name = raw.get("node-name")
        if not name:
            continue
        image = raw.get("image") or {}
        node = BlockNode(
            name=name,
            driver=raw.get("drv", ""),
            filename=raw.get("file") or image.get("filename", ""),
            readonly=bool(raw.get("ro", False)),
            virtual_size=int(image.get("virtual-size", 0)),
            cluster_size=image.get("cluster-size"),
            backing_file=raw.get("backing_file"),
            cache=dict(raw.get("cache") or {}),
            detect_zeroes=raw.get("detect_zeroes"),
        )
        for bm in raw.get("dirty-bitmaps") or []:
            node.bitmaps[bm.get("name", "")] = Bitmap.from_qmp(name, bm)
        nodes[name] = node
    return nodes


def device_id(qdev: str) -> str:
    """virtio-blk reports its backend (``/machine/peripheral/<id>/virtio-backend``)."""
    prefix = "/machine/peripheral/"
    if qdev.startswith(prefix):
        rest = qdev[len(prefix) :]
        return rest.split("/", 1)[0]
    return qdev


def _format_nodes_by_filename(nodes: dict[str, BlockNode]) -> dict[str, str]:
    out: dict[str, str] = {}
    for node in nodes.values():
        if node.driver not in PROTOCOL_DRIVERS and node.driver not in FILTER_DRIVERS:
            out.setdefault(node.filename, node.name)
    return out


def _storage_type(nodes: dict[str, BlockNode], filename: str) -> str:
    for node in nodes.values():
        if node.filename == filename and node.driver in PROTOCOL_DRIVERS:
            if node.driver in ("file",):
                return "file"
            if node.driver in ("host_device", "host_cdrom"):
                return "block"
            return "network"
    return "file"


def parse_disks(query_block: list[dict[str, Any]], named_nodes: list[dict[str, Any]]) -> list[Disk]:
    """Turn query-block and query-named-block-nodes(flat) replies into disks, in device order.

    Filter nodes above the top image (a running backup's copy-before-write, a
    throttle group) are looked through, so a disk is found the same way while a
    job runs. Whether the disk has a backing at all is QEMU's answer (query-block's
    ``backing-image``, ``backing_file``, ``backing_file_depth``), never inferred from
    how many layers we could match to nodes: a full push of an overlay whose
    backing we cannot name must still copy the backing's data.
    """
    nodes = parse_nodes(named_nodes)
    by_file = _format_nodes_by_filename(nodes)
    disks: list[Disk] = []
    for dev in query_block:
        qdev = dev.get("qdev") or dev.get("device") or ""
        if not qdev:
            continue
        name = device_id(qdev)
        inserted = dev.get("inserted")
        if not inserted:
            disks.append(Disk(name, None, None, None, "file", 0, False))
            continue
        image = inserted.get("image") or {}
        layers = _image_layers(image)
        filters = 0  # leading filter layers (QEMU lists them as backing-image levels)
        while filters < len(layers) and layers[filters].get("format") in FILTER_DRIVERS:
            filters += 1
        top = inserted.get("node-name", "")
        if nodes.get(top) is not None and nodes[top].driver in FILTER_DRIVERS:
            if filters < len(layers):
                top = by_file.get(layers[filters].get("filename", ""), top)
        top_layer = layers[filters] if filters < len(layers) else image
        chain, unread = _walk_backing(top, layers[filters + 1 :], nodes, by_file)
        top_node = nodes.get(top)
        has_backing = (
            filters + 1 < len(layers)
            or bool(inserted.get("backing_file"))
            or int(inserted.get("backing_file_depth") or 0) > filters
            or bool(top_node is not None and top_node.backing_file)
        )
        path = top_layer.get("filename") or image.get("filename") or inserted.get("file")
        fmt = top_layer.get("format") or image.get("format") or inserted.get("drv")
        disks.append(
            Disk(
                name=name,
                node=top,
                path=path,
                format=fmt,
                type=_storage_type(nodes, path or ""),
                size=int(image.get("virtual-size", 0)),
                readonly=bool(inserted.get("ro", False)),
                cluster_size=top_node.cluster_size if top_node else image.get("cluster-size"),
                chain=chain,
                has_backing=has_backing,
                unread_layers=unread,
                qdev=dev.get("qdev") or None,
                attached_node=inserted.get("node-name") or None,
            )
        )
    return disks


def _image_layers(image: dict[str, Any]) -> list[dict[str, Any]]:
    """query-block's nested ``backing-image`` levels as a list, top first."""
    layers: list[dict[str, Any]] = []
    layer: dict[str, Any] | None = image
    while layer:
        layers.append(layer)
        layer = layer.get("backing-image")
    return layers


def _walk_backing(
    top: str,
    below: list[dict[str, Any]],
    nodes: dict[str, BlockNode],
    by_file: dict[str, str],
) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Match the layers below the top image to format nodes by file name.

    QMP has no edges, so a layer is only taken when a format node of the same
    driver is open on its file. The walk stops at the first layer that is not one
    (a bare protocol node, a filter between layers, a json: filename): that layer
    and everything below it are returned as unread, never silently dropped.
    """
    chain = [top]
    for depth, layer in enumerate(below):
        filename = layer.get("filename", "")
        fmt = layer.get("format")
        node_name = by_file.get(filename) if fmt not in FILTER_DRIVERS else None
        node = nodes.get(node_name or "")
        if node is None or node.driver != fmt or node.name in chain:
            rest = [(lay.get("filename", ""), lay.get("format")) for lay in below[depth:]]
            return chain, rest
        chain.append(node.name)
    return chain, []


async def query_nodes(mon: Monitor) -> dict[str, BlockNode]:
    return parse_nodes(await mon.execute("query-named-block-nodes", {"flat": True}))


async def discover_disks(mon: Monitor) -> list[Disk]:
    query_block = await mon.execute("query-block")
    named = await mon.execute("query-named-block-nodes", {"flat": True})
    return parse_disks(query_block, named)


def disks_from_mapping(
    mapping: dict[str, str] | Any, discovered: list[Disk], named_nodes: list[dict[str, Any]]
) -> list[Disk]:
    """Disks named by the caller (name -> top format node) instead of by device ids.

    A node that discovery already saw as some device's top keeps its chain and
    read-only flag; any other node is described from its own entry.
    """
    nodes = parse_nodes(named_nodes)
    by_node = {d.node: d for d in discovered if d.node}
    by_file = _format_nodes_by_filename(nodes)
    disks: list[Disk] = []
    for name, node_name in mapping.items():
        known = by_node.get(node_name)
        if known is not None:
            copied = {"chain": list(known.chain), "unread_layers": list(known.unread_layers)}
            disks.append(Disk(**{**known.__dict__, "name": name, **copied}))
            continue
        node = nodes.get(node_name)
        if node is None:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.QEMU,
                f"disk '{name}': QEMU has no block node named '{node_name}'",
            )
        raw = next(r for r in named_nodes if r.get("node-name") == node_name)
        chain, unread = _walk_backing_files(node_name, raw, named_nodes, nodes, by_file)
        disks.append(
            Disk(
                name=name,
                node=node_name,
                path=node.filename,
                format=node.driver,
                type=_storage_type(nodes, node.filename),
                size=node.virtual_size,
                readonly=node.readonly,
                cluster_size=node.cluster_size,
                chain=chain,
                has_backing=bool(raw.get("backing_file"))
                or bool((raw.get("image") or {}).get("backing-image")),
                unread_layers=unread,
            )
        )
    return disks


def _walk_backing_files(
    top: str,
    raw: dict[str, Any],
    named_nodes: list[dict[str, Any]],
    nodes: dict[str, BlockNode],
    by_file: dict[str, str],
) -> tuple[list[str], list[tuple[str, str | None]]]:
    """The chain below a node no device showed, through each node's ``backing_file``.

    A backing file that matches no format node ends the walk and is returned as
    unread (its driver, when some node is open on it, says what it is).
    """
    chain = [top]
    backing = raw.get("backing_file")
    while backing:
        found = by_file.get(backing)
        if found is None or found in chain:
            seen = next((n.driver for n in nodes.values() if n.filename == backing), None)
            return chain, [(backing, seen)]
        chain.append(found)
        backing = next(
            (r.get("backing_file") for r in named_nodes if r.get("node-name") == found), None
        )
    return chain, []
