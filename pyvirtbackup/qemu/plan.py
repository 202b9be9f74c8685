"""Pure planning of a backup: from an aligned definition and the discovered block
graph to the QMP commands that will run.

Nothing here talks to QEMU, so a plan can be tested without one and printed for a
dry run. The executor (``qemu.job``) runs the steps in order, keeps an undo for
each, and rolls back on any failure before the transaction succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ErrorDomain, ErrorNumber, VirError
from .bitmaps import check_chain, merge_actions
from .blockgraph import BlockNode, Disk
from .features import QemuFeatures

if TYPE_CHECKING:
    from .fleecing import FleecingSettings

FORMATS_WITH_BACKING = frozenset({"qcow2", "qed", "vmdk"})
ON_CBW_ERROR = "blockdev-backup.on-cbw-error"


@dataclass
class Tuning:
    """How QEMU copies: settings libvirt never exposes.

    ``None`` leaves QEMU's own default. ``max_workers``/``max_chunk`` are the backup
    job's ``x-perf``; ``speed`` throttles it (bytes/s, 0 = unlimited);
    ``target_cache_direct`` opens the target with O_DIRECT; ``detect_zeroes``
    is the target node's zero detection (off, on, unmap).

    The default of 8 workers is measured (benchmarks/bench.py --only tuning): QEMU's
    own 64 workers x 1 MiB buffers grow QEMU by ~64 MiB per disk during a push and
    are no faster; 8 grow it by ~8 MiB.
    """

    max_workers: int | None = 8
    max_chunk: int | None = None
    use_copy_range: bool | None = None
    speed: int = 0
    target_cache_direct: bool | None = None
    detect_zeroes: str | None = None

    def merged(self, override: Tuning | dict[str, Any] | None) -> Tuning:
        if override is None:
            return self
        values = override.__dict__ if isinstance(override, Tuning) else dict(override)
        unknown = set(values) - set(self.__dict__)
        if unknown:
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.QEMU,
                f"unknown tuning setting(s): {', '.join(sorted(unknown))}",
            )
        merged = dict(self.__dict__)
        merged.update({k: v for k, v in values.items() if v is not None})
        return Tuning(**merged)


@dataclass
class Step:
    """One thing to do: a QMP command, a QMP job (wait + dismiss), handing QEMU a
    descriptor (``pass-fd``: the listening socket, then ``getfd``), or a local file
    action (``create-file`` creates an image and, with ``pass_fd``, hands QEMU our
    descriptor of it with ``add-fd``; ``release-fd`` removes that fd set once the
    image's nodes hold their own copies).

    ``fdset`` names the image whose ``filename`` the step gives QEMU as the fd set
    of our descriptor (``/dev/fdset/N``, known once the file exists) and never by
    its path: the path could name another file by then.

    ``undo`` runs, in reverse order, when a later step fails before the backup starts.
    ``ignore_errors`` is for undo steps whose object may already be gone.
    """

    # "qmp", "qmp-job", "pass-fd", "create-file", "release-fd", "remove-file",
    # "publish-socket"
    kind: str
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    undo: list[Step] = field(default_factory=list)
    ignore_errors: bool = False
    fdset: str | None = None

    def describe(self) -> dict[str, Any]:
        if self.kind in ("qmp", "qmp-job", "pass-fd"):
            if self.fdset is None:
                return {"execute": self.command, "arguments": self.args}
            args = with_fdset(self.args, self.fdset, "/dev/fdset/N")
            return {"execute": self.command, "arguments": args, "fdset-of": self.fdset}
        return {"local": self.command, **self.args}


def with_fdset(value: Any, path: str, fdset: str) -> Any:
    """``value`` with every ``filename`` that is ``path`` replaced by ``fdset``."""
    if isinstance(value, dict):
        return {
            k: fdset if k == "filename" and v == path else with_fdset(v, path, fdset)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [with_fdset(v, path, fdset) for v in value]
    return value


@dataclass
class DiskPlan:
    """Everything about one disk of the backup."""

    disk: str
    source_node: str
    source_path: str | None
    job_id: str
    store_id: int
    storage_node: str
    format_node: str
    path: str
    store_type: str  # file | block
    fmt: str
    size: int
    create_file: bool  # we create the file, so we may delete it
    create_format: bool  # blockdev-create formats the store
    cluster_size: int | None
    sync: str  # full | incremental | none
    backing_node: str | None = None
    backing_file: str | None = None
    backing_fmt: str | None = None
    bitmap: str | None = None  # temporary bitmap the job or export uses
    bitmap_node: str | None = None
    merge: list[dict[str, Any]] = field(default_factory=list)
    export_name: str | None = None
    export_bitmap: str | None = None
    export_id: str | None = None
    # fleecing (qemu.fleecing): the device's writes go through a copy-before-write
    # filter into a local image, the backup reads a snapshot-access view of it
    fleecing: bool = False
    qdev: str | None = None  # the device re-pointed at the filter
    attached_node: str | None = None  # what the device used before, restored after
    fleece_path: str | None = None  # push: the fleecing image (pull: the scratch)
    fleece_storage_node: str | None = None
    fleece_node: str | None = None
    cbw_node: str | None = None
    access_node: str | None = None
    cbw_timeout: int = 0
    # push incremental through fleecing: the instant's bitmap is made on the source
    # node in the transaction, then moved to the access node the job reads
    instant_bitmap_node: str | None = None
    direct_reason: str | None = None  # why this disk runs libvirt's direct sequence

    @property
    def store_nodes(self) -> tuple[str, str]:
        return self.storage_node, self.format_node

    @property
    def fleece_target(self) -> str | None:
        """The node the filter copies old data into: a pull's qcow2 scratch, or a
        push's fleecing image, a sparse raw file used without a format layer."""
        return self.fleece_node if self.sync == "none" else self.fleece_storage_node

    @property
    def has_qemu_job(self) -> bool:
        """A pull through fleecing has no block job: its end is an abort or a break."""
        return not (self.fleecing and self.sync == "none")


@dataclass
class Plan:
    mode: str  # push | pull
    disks: list[DiskPlan]
    checkpoint_actions: list[dict[str, Any]] = field(default_factory=list)
    tuning: Tuning = field(default_factory=Tuning)
    stores: list[list[Step]] = field(default_factory=list)  # one lane per disk, run side by side
    prepare: list[Step] = field(default_factory=list)  # then these, in order (TLS, NBD server)
    # the instant: guest paused (if it runs), the transaction, the devices switched
    # onto their fleecing filters, guest resumed
    transaction: list[dict[str, Any]] = field(default_factory=list)
    switch: list[Step] = field(default_factory=list)
    after: list[Step] = field(default_factory=list)  # steps after the instant
    # PRESERVE_SHUTDOWN_DOMAIN: the guest's shutdown action while the job runs is
    # pause; this is the one to restore (and to carry out) when it ends
    shutdown_restore: str | None = None

    def preserve_shutdown(self, previous: str) -> None:
        self.shutdown_restore = previous
        self.prepare.insert(
            0,
            Step(
                "qmp",
                "set-action",
                {"shutdown": "pause"},
                undo=[Step("qmp", "set-action", {"shutdown": previous})],
            ),
        )

    @property
    def pauses(self) -> bool:
        """Several disks switched one by one share one instant only with the guest
        paused; one disk switched alone is one instant by itself, but its checkpoint
        bitmaps (made in the transaction) must be that instant too."""
        return bool(self.switch)

    def describe(self) -> list[dict[str, Any]]:
        """The commands in the order they will run, for a dry run."""
        out = [s.describe() for lane in self.stores for s in lane]
        out += [s.describe() for s in self.prepare]
        if self.pauses:
            out.append({"execute": "stop", "when": "the guest is running"})
        out.append({"execute": "transaction", "arguments": {"actions": self.transaction}})
        out += [s.describe() for s in self.switch]
        if self.pauses:
            out.append({"execute": "cont", "when": "the guest was running"})
        out += [s.describe() for s in self.after]
        return out


@dataclass
class PlanDisk:
    """What the planner needs of one disk of the (aligned) backup definition."""

    name: str
    path: str
    store_type: str
    fmt: str
    backupmode: str  # full | incremental
    incremental: str | None = None
    export_name: str | None = None
    export_bitmap: str | None = None
    backing_file: str | None = None  # our extension: previous backup as the target's backing
    backing_fmt: str | None = None
    fleece_path: str | None = None  # push with fleecing: where the fleecing image goes
    direct: bool = False  # this disk asked for libvirt's direct sequence


def node_names(store_id: int) -> tuple[str, str]:
    return f"pvb-{store_id}-storage", f"pvb-{store_id}-format"


def job_id(disk: str) -> str:
    return f"pvb-backup-{disk}"


def _cache(tuning: Tuning) -> dict[str, Any] | None:
    if tuning.target_cache_direct is None:
        return None
    return {"direct": tuning.target_cache_direct}


def store_steps(dp: DiskPlan, tuning: Tuning, *, pass_fd: bool = False) -> list[Step]:
    """Create (unless reused) and open one target or scratch: libvirt's order."""
    return image_steps(
        ImageSpec(
            disk=dp.disk,
            path=dp.path,
            store_type=dp.store_type,
            fmt=dp.fmt,
            size=dp.size,
            storage_node=dp.storage_node,
            format_node=dp.format_node,
            create_file=dp.create_file,
            create_format=dp.create_format,
            cluster_size=dp.cluster_size,
            backing_node=dp.backing_node,
            backing_file=dp.backing_file,
            backing_fmt=dp.backing_fmt,
            job_prefix=f"pvb-create-{dp.store_id}",
            discard=dp.fleecing and dp.sync == "none",  # a pull scratch is a fleecing image
            pass_fd=pass_fd,
        ),
        tuning,
    )


@dataclass
class ImageSpec:
    """An image the backup creates and opens: a target, a scratch, a fleecing image."""

    disk: str
    path: str
    store_type: str
    fmt: str
    size: int
    storage_node: str
    format_node: str
    create_file: bool
    create_format: bool
    cluster_size: int | None = None
    backing_node: str | None = None
    backing_file: str | None = None
    backing_fmt: str | None = None
    job_prefix: str = "pvb-create"
    discard: bool = False  # pass discards down to the file (a fleecing image shrinks)
    format_layer: bool = True  # False: a raw file's node is the image, no format node
    pass_fd: bool = False  # QEMU gets our descriptor of the file we create, not its path


def image_steps(img: ImageSpec, tuning: Tuning) -> list[Step]:
    """Create (unless reused) and open one image.

    A file we create is made by us (O_EXCL, never through a link) and, when
    ``pass_fd``, reaches QEMU only as our descriptor: every command that names it
    says ``/dev/fdset/N``, and the fd set goes as soon as the image's nodes hold
    their own copies. A raw image is sized on that descriptor (ftruncate, which is
    all QEMU's file creation would do).
    """
    cache = _cache(tuning) or {}
    fdset = img.path if img.create_file and img.pass_fd else None
    steps: list[Step] = []
    if img.create_file:
        undo = [Step("remove-file", "remove", {"path": img.path})]
        if fdset:
            undo.append(Step("release-fd", "remove-fd", {"path": img.path}))
        args: dict[str, Any] = {"path": img.path, "disk": img.disk}
        if img.fmt == "raw":
            args["size"] = img.size
        if fdset:
            args["pass_fd"] = True
        if cache.get("direct"):
            args["direct"] = True  # QEMU 9.1+ dups only a descriptor opened the same way
        steps.append(Step("create-file", "create", args, undo=undo))
    storage: dict[str, Any] = {
        "driver": "file" if img.store_type == "file" else "host_device",
        "filename": img.path,
        "node-name": img.storage_node,
        "discard": "unmap",
    }
    if fdset:  # opened read-write at once: the fd set holds a read-write descriptor only
        storage["read-only"] = False
    else:
        storage["auto-read-only"] = True
    if cache.get("direct"):
        storage["aio"] = "native"
    add = Step(
        "qmp",
        "blockdev-add",
        {**storage, "cache": cache} if cache else dict(storage),
        undo=[Step("qmp", "blockdev-del", {"node-name": img.storage_node})],
        fdset=fdset,
    )
    if img.create_format and img.fmt != "raw":
        # Format while the node does not flush: a flush here would wait for every
        # dirty page of the host's filesystem journal (seconds on a busy host) and
        # buys nothing, since deleting the node at the end flushes the file. Then
        # the node is reopened with flushes on, before any backup data reaches it.
        options: dict[str, Any] = {"driver": img.fmt, "file": img.storage_node, "size": img.size}
        if img.backing_file:
            options["backing-file"] = img.backing_file
            if img.backing_fmt:
                options["backing-fmt"] = img.backing_fmt
        if img.cluster_size and img.fmt == "qcow2":
            options["cluster-size"] = img.cluster_size
        add.args["cache"] = {**cache, "no-flush": True}
        flushing = {**storage, "cache": {**cache, "no-flush": False}}
        steps += [
            add,
            Step(
                "qmp-job",
                "blockdev-create",
                {"job-id": f"{img.job_prefix}-format", "options": options},
            ),
            Step("qmp", "blockdev-reopen", {"options": [flushing]}, fdset=fdset),
        ]
    else:
        steps.append(add)
    if not img.format_layer:  # a raw file used as it is: its file node is the image
        if fdset:
            steps.append(Step("release-fd", "remove-fd", {"path": img.path}))
        return steps
    fmt_node: dict[str, Any] = {
        "node-name": img.format_node,
        "read-only": False,
        "driver": img.fmt,
        "file": img.storage_node,
    }
    if img.fmt in FORMATS_WITH_BACKING:
        fmt_node["backing"] = img.backing_node  # None terminates the chain
    if img.discard:
        fmt_node["discard"] = "unmap"
    elif tuning.detect_zeroes:
        fmt_node["detect-zeroes"] = tuning.detect_zeroes
        fmt_node["discard"] = "unmap"
    steps.append(
        Step(
            "qmp",
            "blockdev-add",
            fmt_node,
            undo=[Step("qmp", "blockdev-del", {"node-name": img.format_node})],
        )
    )
    if fdset:  # the nodes hold their own copies now
        steps.append(Step("release-fd", "remove-fd", {"path": img.path}))
    return steps


def skips_unallocated_safely(src: Disk, dp: DiskPlan) -> bool:
    """May a full push copy only what the source image has allocated (``sync=top``)?

    With ``sync=full`` QEMU writes zeroes for every unallocated range, and a qcow2
    target allocates L2 tables for all of them: a 1 TiB disk holding 256 MiB took
    6.4 s and 384 MiB, against 0.74 s and 256 MiB with ``top`` (benchmarks/).
    ``top`` is the same backup when the source is one qcow2 layer (nothing below
    it shows through) and the store is new, so what is skipped already reads as
    zeros there; a reused target or a raw block device may hold old data, and a
    raw source counts as allocated everywhere anyway.

    "One layer" is QEMU's answer (``has_backing``), not the length of the chain we
    could match to nodes: a backing we cannot name (a bare raw ``file`` node, as
    libvirt opens plain raw images) still shows through, and ``top`` would leave
    its data out of the backup without a word.
    """
    return (
        src.format == "qcow2"
        and not src.has_backing
        and src.chain_complete
        and len(src.chain) == 1
        and dp.create_format
        and (dp.fmt != "raw" or dp.store_type == "file")
    )


def backup_action(
    dp: DiskPlan, tuning: Tuning, features: QemuFeatures | None = None
) -> dict[str, Any]:
    features = features or QemuFeatures.unknown()
    data: dict[str, Any] = {
        "device": dp.source_node,
        "job-id": dp.job_id,
        "target": dp.format_node,
        "sync": dp.sync,
        "auto-finalize": True,
        "auto-dismiss": False,
    }
    perf: dict[str, Any] = {}
    if dp.fleecing:
        from . import fleecing

        options = fleecing.backup_options(dp, features)
        perf.update(options.pop("x-perf", {}))
        data.update(options)
    elif features.has(ON_CBW_ERROR):
        # QEMU 10.1+: even on the direct path, a failed copy breaks the backup and
        # not the guest's write
        data["on-cbw-error"] = "break-snapshot"
    if dp.sync == "incremental":
        data["bitmap"] = dp.bitmap
    if tuning.speed:
        data["speed"] = tuning.speed
    if tuning.max_workers is not None:
        perf["max-workers"] = tuning.max_workers
    if tuning.max_chunk is not None:
        perf["max-chunk"] = tuning.max_chunk
    if tuning.use_copy_range is not None:
        perf["use-copy-range"] = tuning.use_copy_range
    if perf:
        data["x-perf"] = perf
    return {"type": "blockdev-backup", "data": data}


def checkpoint_bitmap_actions(name: str, disks: list[Disk]) -> list[dict[str, Any]]:
    """The persistent, recording bitmap of a new checkpoint on each disk's top node."""
    return [
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": d.node, "name": name, "persistent": True, "disabled": False},
        }
        for d in disks
    ]


# What to do when a bitmap is fine but the chain around it cannot be read whole.
INCOMPLETE_WAY_OUT = (
    "Way out: open every layer of the disk's chain as a named format node "
    "(-blockdev with node-name, as libvirt does) so that its bitmaps can be found, "
    "or take a full backup"
)


def inconsistent_error(
    disk: str, bitmap: str, problem: str, way_out: str | None = None
) -> VirError:
    """libvirt's "missing or broken bitmap" (109), plus why and what to do about it.

    The default way out is the one for a checkpoint whose bitmap is gone or broken
    (QEMU killed, bitmap removed by hand): a user who hits it needs the next step,
    not only the diagnosis.
    """
    if way_out is None:
        way_out = (
            f"Way out: delete checkpoint '{bitmap}' (domainCheckpointDelete removes its "
            "bitmaps, broken ones included, and its metadata; or delete it with "
            "METADATA_ONLY and remove the bitmap yourself with block-dirty-bitmap-remove), "
            "then take a full backup with a new checkpoint"
        )
    return VirError(
        ErrorNumber.CHECKPOINT_INCONSISTENT,
        ErrorDomain.QEMU,
        f"missing or broken bitmap '{bitmap}' for disk '{disk}': {problem}. {way_out}",
    )


def plan_backup(
    mode: str,
    disks: list[PlanDisk],
    domain_disks: dict[str, Disk],
    nodes: dict[str, BlockNode],
    *,
    first_store_id: int,
    reuse_external: bool,
    tuning: Tuning,
    checkpoint_actions: list[dict[str, Any]] | None = None,
    known_checkpoints: set[str] | None = None,
    features: QemuFeatures | None = None,
    fleecing_settings: FleecingSettings | None = None,
    pass_fds: bool = False,
) -> Plan:
    """Plan the stores, the merge actions, the instant and what follows it.

    ``fleecing_settings`` (None: libvirt's direct sequence for every disk) routes
    each disk that can be fleeced through ``qemu.fleecing``; the others keep the
    direct sequence, with the reason in ``DiskPlan.direct_reason``. ``pass_fds``:
    the images we create reach QEMU as our descriptors (``image_steps``).

    Raises VirError for what libvirt refuses at this stage (unknown checkpoint,
    broken bitmap chain, a disk without media) before anything is touched.
    """
    from . import fleecing

    features = features or QemuFeatures.unknown()
    no_reason = fleecing.unavailable(features) if fleecing_settings else None
    if mode not in ("push", "pull"):
        raise VirError(
            ErrorNumber.CONFIG_UNSUPPORTED, ErrorDomain.DOMAIN, f"unknown backup mode '{mode}'"
        )
    if not disks:
        raise VirError(
            ErrorNumber.CONFIG_UNSUPPORTED, ErrorDomain.DOMAIN, "no disks selected for backup"
        )
    plan = Plan(
        mode=mode, disks=[], tuning=tuning, checkpoint_actions=list(checkpoint_actions or [])
    )
    store_id = first_store_id
    for pd in disks:
        src = domain_disks.get(pd.name)
        if src is None:
            raise VirError(ErrorNumber.INVALID_ARG, ErrorDomain.QEMU, f"no disk named '{pd.name}'")
        if src.node is None:
            raise VirError(
                ErrorNumber.CONFIG_UNSUPPORTED, ErrorDomain.DOMAIN, f"disk '{pd.name}' has no media"
            )
        if mode == "pull" and pd.fmt != "qcow2":
            raise VirError(
                ErrorNumber.CONFIG_UNSUPPORTED,
                ErrorDomain.QEMU,
                f"pull mode backup for disk '{pd.name}' requires qcow2 driver",
            )
        storage_node, format_node = node_names(store_id)
        incremental = pd.backupmode == "incremental"
        dp = DiskPlan(
            disk=pd.name,
            source_node=src.node,
            source_path=src.path,
            job_id=job_id(pd.name),
            store_id=store_id,
            storage_node=storage_node,
            format_node=format_node,
            path=pd.path,
            store_type=pd.store_type,
            fmt=pd.fmt,
            size=src.size,
            create_file=pd.store_type == "file" and not reuse_external,
            create_format=not reuse_external,
            cluster_size=src.cluster_size if src.format == "qcow2" else None,
            sync="none" if mode == "pull" else ("incremental" if incremental else "full"),
        )
        if dp.sync == "full" and skips_unallocated_safely(src, dp):
            dp.sync = "top"
        store_id += 1
        if mode == "pull" or (incremental and pd.fmt in FORMATS_WITH_BACKING):
            if pd.backing_file and mode == "push":
                # our extension: the previous backup becomes the backing file, so the
                # chain of backups opens as it is; it is never opened by QEMU
                dp.backing_file, dp.backing_fmt = pd.backing_file, pd.backing_fmt or "qcow2"
            else:
                dp.backing_node = src.node
                dp.backing_file, dp.backing_fmt = src.path, src.format
        elif pd.backing_file:
            raise VirError(
                ErrorNumber.CONFIG_UNSUPPORTED,
                ErrorDomain.DOMAIN,
                f"a backing file for the target of disk '{pd.name}' needs an incremental "
                f"backup into a format with backing files (qcow2), not a {pd.fmt} "
                f"{'incremental' if incremental else 'full'} backup",
            )
        fleece = False
        if fleecing_settings is not None and fleecing_settings.enabled:
            dp.direct_reason = (
                no_reason
                or ("the backup XML says pvb:fleecing='no'" if pd.direct else None)
                or fleecing.direct_reason(src)
            )
            if dp.direct_reason is None:
                fleecing.prepare(dp, src, fleecing_settings, pd.fleece_path)
                fleece = True
        granularity: int | None = None
        if incremental:
            chk = pd.incremental or ""
            if known_checkpoints is not None and chk not in known_checkpoints:
                raise VirError(
                    ErrorNumber.NO_DOMAIN_CHECKPOINT,
                    ErrorDomain.DOMAIN_CHECKPOINT,
                    f"Checkpoint '{chk}' for incremental backup of disk '{pd.name}' not found",
                )
            check = check_chain(src, nodes, chk)
            if not check.valid:
                way_out = INCOMPLETE_WAY_OUT if check.incomplete else None
                raise inconsistent_error(pd.name, chk, check.problem or "unusable", way_out)
            if mode == "push":
                dp.bitmap = f"backup-{pd.name}"
                dp.bitmap_node = src.node
            else:
                dp.bitmap = pd.export_bitmap or f"backup-{pd.name}"
                # fleecing exports the source's bitmap; the direct way, the scratch's
                dp.bitmap_node = src.node if fleece else format_node
            dp.merge = merge_actions(dp.bitmap_node, dp.bitmap, check.layers)
            if fleece and mode == "push":  # the job reads the view: its bitmap goes there
                dp.instant_bitmap_node, dp.bitmap_node = src.node, dp.access_node
                granularity = check.layers[0].granularity if check.layers else None
        if mode == "pull":
            dp.export_name = pd.export_name or pd.name
            dp.export_bitmap = dp.bitmap
            dp.export_id = f"pvb-nbd-{pd.name}"
        plan.disks.append(dp)
        lane = store_steps(dp, tuning, pass_fd=pass_fds)
        if fleece:
            if mode == "push":  # the fleecing image is local: no target cache settings
                lane += image_steps(fleecing.image(dp, pass_fd=pass_fds), Tuning())
            lane.append(fleecing.filter_step(dp, features))
            plan.switch.append(fleecing.switch_step(dp))
            plan.after += fleecing.access_steps(dp, granularity)
        plan.stores.append(lane)

    plan.transaction = list(plan.checkpoint_actions)
    for dp in plan.disks:
        plan.transaction += dp.merge
        if not dp.fleecing:
            plan.transaction.append(backup_action(dp, tuning, features))
    # fleecing pushes start once the instant is over, all in one transaction
    jobs = [
        backup_action(dp, tuning, features) for dp in plan.disks if dp.fleecing and dp.has_qemu_job
    ]
    if jobs:
        plan.after.append(Step("qmp", "transaction", {"actions": jobs}))
    return plan


def next_store_id(nodes: dict[str, BlockNode]) -> int:
    """The first store id whose node names are free in QEMU."""
    used = 0
    for name in nodes:
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "pvb" and parts[1].isdigit():
            used = max(used, int(parts[1]))
    return used + 1
