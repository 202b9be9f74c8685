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

    @property
    def empty(self) -> bool:
        return self.node is None


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

    Filter nodes (a running backup's copy-before-write, a throttle group) are looked
    through, so a disk is found the same way while a job runs.
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
        top = inserted.get("node-name", "")
        if nodes.get(top) is not None and nodes[top].driver in FILTER_DRIVERS:
            top = by_file.get(image.get("filename", ""), top)
        chain: list[str] = []
        layer: dict[str, Any] | None = image
        while layer is not None:
            node_name = top if not chain else by_file.get(layer.get("filename", ""))
            if node_name is None or node_name in chain:
                break
            chain.append(node_name)
            layer = layer.get("backing-image")
        top_node = nodes.get(top)
        path = image.get("filename") or inserted.get("file")
        fmt = image.get("format") or inserted.get("drv")
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
            )
        )
    return disks


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
            disks.append(Disk(**{**known.__dict__, "name": name, "chain": list(known.chain)}))
            continue
        node = nodes.get(node_name)
        if node is None:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.QEMU,
                f"disk '{name}': QEMU has no block node named '{node_name}'",
            )
        raw = next(r for r in named_nodes if r.get("node-name") == node_name)
        chain = [node_name]
        backing = raw.get("backing_file")
        while backing and by_file.get(backing) and by_file[backing] not in chain:
            chain.append(by_file[backing])
            backing = next(
                (r.get("backing_file") for r in named_nodes if r.get("node-name") == chain[-1]),
                None,
            )
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
            )
        )
    return disks
