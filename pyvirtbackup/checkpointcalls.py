"""The checkpoint half of the driver table: create (and redefine), list, look up,
parents and children, XML with SIZE, delete.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from .checkpoints import Checkpoint
from .conf import CheckpointDef
from .conf.checkpoint import BITMAP, disk_by_name
from .driverbase import (
    LIST_FLAGS,
    Domain,
    DriverBase,
    check_exclusive,
    check_flags,
    not_running_error,
)
from .enums import (
    CheckpointCreateFlags,
    CheckpointDeleteFlags,
    CheckpointListFlags,
    CheckpointXMLFlags,
)
from .errors import ErrorDomain, ErrorNumber, VirError
from .qemu import blockgraph, checkpoint_ops

log = logging.getLogger(__name__)


class CheckpointCalls(DriverBase):
    """libvirt's virDomainCheckpoint* entry points."""

    # checkpoints ----------------------------------------------------------------------

    async def domainCheckpointCreateXML(self, dom: Domain, xml: str, flags: int = 0) -> Checkpoint:
        """Create a checkpoint (its bitmaps, one instant) or, with REDEFINE, its metadata."""
        check_exclusive(flags, CheckpointCreateFlags.REDEFINE, CheckpointCreateFlags.QUIESCE)
        if flags & CheckpointCreateFlags.REDEFINE_VALIDATE and not (
            flags & CheckpointCreateFlags.REDEFINE
        ):
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.NONE,
                "Flag 'VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE' is required by flag "
                "'VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE'",
            )
        check_flags(
            flags,
            CheckpointCreateFlags.REDEFINE | CheckpointCreateFlags.REDEFINE_VALIDATE,
            "domainCheckpointCreateXML",
        )
        await self._ready(dom)
        redefine = bool(flags & CheckpointCreateFlags.REDEFINE)
        if not redefine:
            self._check_running(dom, "create checkpoint")
        chk = CheckpointDef.from_xml(xml, flags & CheckpointCreateFlags.REDEFINE)
        checkpoint_ops.check_not_reserved(chk.name, (cd.bitmap for cd in chk.disks))
        async with dom.checkpoint_lock:
            if redefine:
                await self._redefine_checkpoint(
                    dom, chk, bool(flags & CheckpointCreateFlags.REDEFINE_VALIDATE)
                )
            else:
                await self._create_checkpoint(dom, chk)
        return Checkpoint(dom, str(chk.name))

    def _prepare_checkpoint(self, dom: Domain, chk: CheckpointDef) -> list[Any]:
        """Everything before the bitmaps exist: align, QEMU's rules, name, parent, domain.

        Returns the (disk, bitmap) pairs to create; ``dom.disks`` must be fresh.
        A begin's checkpoint comes here too, so reserved names are refused for it.
        """
        checkpoint_ops.check_not_reserved(chk.name)
        domdisks = self._domain_disks(dom)
        chk.align_disks(domdisks)
        by_name = {d.name: d for d in dom.disks}
        targets = [(by_name[cd.name], cd.bitmap) for cd in chk.disks if cd.checkpoint == BITMAP]
        checkpoint_ops.check_prepare(str(chk.name), targets)
        if chk.name in dom.checkpoints:
            raise VirError(
                ErrorNumber.OPERATION_FAILED,
                ErrorDomain.DOMAIN,
                f"domain moment {chk.name} already exists",
            )
        chk.parent_name = dom.checkpoints.current
        chk.set_domain(dom.name, dom.uuid, domdisks)
        return targets

    async def _create_checkpoint(self, dom: Domain, chk: CheckpointDef) -> None:
        await self.refresh_disks(dom)
        targets = self._prepare_checkpoint(dom, chk)
        # a failed transaction raises here: it added nothing, and a bitmap of the
        # name (one that appeared meanwhile, making it fail) is not ours to remove
        await checkpoint_ops.create(dom.monitor, str(chk.name), targets)
        try:
            dom.checkpoints.add(chk, make_current=True)
        except VirError as exc:
            await checkpoint_ops.remove_new(dom.monitor, str(chk.name), targets, created=True)
            raise VirError(
                ErrorNumber.INTERNAL_ERROR,
                ErrorDomain.QEMU,
                f"unable to save metadata for checkpoint {chk.name}: {exc.message}",
            ) from None

    async def _redefine_checkpoint(self, dom: Domain, chk: CheckpointDef, validate: bool) -> None:
        """Metadata only (libvirt's RedefinePrep + Commit); QEMU is only read, to validate.

        It becomes current when its parent is current or no checkpoint is; a name
        already known is replaced, its children kept.
        """
        tree = dom.checkpoints
        chk.redefine_prep(dom.uuid, tree.parents())
        # the bitmap names defaulted just now (to the checkpoint's) count as well
        checkpoint_ops.check_not_reserved(chk.name, (cd.bitmap for cd in chk.disks))
        make_current = tree.current is None or (
            chk.parent_name is not None and chk.parent_name == tree.current
        )
        if validate:
            if not dom.monitor.connected:
                raise not_running_error(dom)
            await self.refresh_disks(dom)
            nodes = await blockgraph.query_nodes(dom.monitor)
            checkpoint_ops.validate(
                self._checkpoint_targets(dom, chk),
                nodes,
                f"Checkpoint '{chk.name}' was not redefined. Redefine it without "
                "REDEFINE_VALIDATE to keep its metadata anyway, or take a full backup "
                "with a new checkpoint",
            )
        tree.add(chk, make_current=make_current)

    def _checkpoint_targets(self, dom: Domain, chk: CheckpointDef) -> list[Any]:
        """(disk, bitmap) for the checkpoint's bitmap disks still in the domain.

        A disk unplugged since is skipped, as libvirt tolerates it.
        """
        domdisks = self._domain_disks(dom)
        by_name = {d.name: d for d in dom.disks}
        targets = []
        for cd in chk.disks:
            found = disk_by_name(domdisks, cd.name)
            if cd.checkpoint == BITMAP and cd.bitmap and found is not None:
                targets.append((by_name[found.name], cd.bitmap))
        return targets

    def _lookup(self, chk: Checkpoint) -> tuple[Domain, CheckpointDef]:
        if not isinstance(chk, Checkpoint):
            raise VirError(
                ErrorNumber.INVALID_ARG,
                ErrorDomain.NONE,
                f"expected a Checkpoint, not {type(chk).__name__}",
            )
        dom = self._check_domain(chk.domain)
        return dom, dom.checkpoints.get(chk.name)

    async def domainListAllCheckpoints(self, dom: Domain, flags: int = 0) -> list[Checkpoint]:
        """The domain's checkpoints, parents before children (ROOTS, LEAVES, NO_LEAVES)."""
        check_flags(flags, LIST_FLAGS | CheckpointListFlags.ROOTS, "domainListAllCheckpoints")
        self._check_domain(dom)
        return [Checkpoint(dom, n) for n in dom.checkpoints.names(flags)]

    async def domainCheckpointListAllChildren(
        self, chk: Checkpoint, flags: int = 0
    ) -> list[Checkpoint]:
        """Children of a checkpoint, or with DESCENDANTS everything below it."""
        check_flags(
            flags, LIST_FLAGS | CheckpointListFlags.DESCENDANTS, "domainCheckpointListAllChildren"
        )
        dom, _ = self._lookup(chk)
        return [Checkpoint(dom, n) for n in dom.checkpoints.names(flags, start=chk.name)]

    async def domainCheckpointLookupByName(
        self, dom: Domain, name: str, flags: int = 0
    ) -> Checkpoint:
        check_flags(flags, 0, "domainCheckpointLookupByName")
        self._check_domain(dom)
        dom.checkpoints.get(name)
        return Checkpoint(dom, name)

    async def domainCheckpointGetParent(self, chk: Checkpoint, flags: int = 0) -> Checkpoint:
        check_flags(flags, 0, "domainCheckpointGetParent")
        dom, _ = self._lookup(chk)
        parent = dom.checkpoints.parent(chk.name)
        if parent is None:
            raise VirError(
                ErrorNumber.NO_DOMAIN_CHECKPOINT,
                ErrorDomain.QEMU,
                f"checkpoint '{chk.name}' does not have a parent",
            )
        return Checkpoint(dom, parent)

    async def domainCheckpointGetXMLDesc(self, chk: Checkpoint, flags: int = 0) -> str:
        """The checkpoint's XML; with SIZE each disk's bytes written since it."""
        check_flags(
            flags,
            CheckpointXMLFlags.SECURE | CheckpointXMLFlags.NO_DOMAIN | CheckpointXMLFlags.SIZE,
            "domainCheckpointGetXMLDesc",
        )
        dom, cdef = self._lookup(chk)
        if not flags & CheckpointXMLFlags.SIZE:
            return cdef.to_xml(flags)
        if not dom.monitor.connected:
            raise not_running_error(dom)
        async with dom.checkpoint_lock:
            cdef = dom.checkpoints.get(chk.name)
            await self.refresh_disks(dom)
            sizes = await checkpoint_ops.dirty_sizes(
                dom.monitor, self._checkpoint_targets(dom, cdef)
            )
        shown = copy.deepcopy(cdef)
        for cd in shown.disks:
            cd.size = sizes.get(cd.name)
        return shown.to_xml(flags)

    async def domainCheckpointDelete(self, chk: Checkpoint, flags: int = 0) -> int:
        """Delete a checkpoint: its bitmaps in every layer, then its metadata.

        Beyond libvirt 9.0: a bitmap already missing from a disk does not block the
        delete (that is the state users most need to get out of); what is missing,
        or had to stay in an implicitly opened backing image, is logged as a warning.
        """
        check_exclusive(flags, CheckpointDeleteFlags.CHILDREN, CheckpointDeleteFlags.CHILDREN_ONLY)
        check_flags(
            flags,
            CheckpointDeleteFlags.CHILDREN
            | CheckpointDeleteFlags.METADATA_ONLY
            | CheckpointDeleteFlags.CHILDREN_ONLY,
            "domainCheckpointDelete",
        )
        dom, _ = self._lookup(chk)
        await self._ready(dom)
        metadata_only = bool(flags & CheckpointDeleteFlags.METADATA_ONLY)
        if not metadata_only:
            self._check_running(dom, "delete checkpoint")
        with_children = bool(
            flags & (CheckpointDeleteFlags.CHILDREN | CheckpointDeleteFlags.CHILDREN_ONLY)
        )
        keep_self = bool(flags & CheckpointDeleteFlags.CHILDREN_ONLY)
        async with dom.checkpoint_lock:
            tree = dom.checkpoints
            tree.get(chk.name)
            below = tree.descendants(chk.name) if with_children else []
            victims = below + ([] if keep_self else [chk.name])
            if not metadata_only and victims:
                await self._delete_bitmaps(dom, victims)
            if with_children:
                had_current = tree.current in below
                for name in below:
                    tree.remove(name, update_current=False)
                if had_current:
                    tree.set_current(chk.name)
            else:
                tree.reparent_children(chk.name)
            if not keep_self:
                tree.remove(chk.name, update_current=True)
        return 0

    async def _delete_bitmaps(self, dom: Domain, names: list[str]) -> None:
        await self.refresh_disks(dom)
        targets = []
        for name in names:
            targets += self._checkpoint_targets(dom, dom.checkpoints.get(name))
        removal = await checkpoint_ops.delete(dom.monitor, targets)
        for disk, bitmap in removal.missing:
            log.warning(
                "domain %s: bitmap '%s' was already missing from disk '%s'; deleted the "
                "rest of the checkpoint and its metadata",
                dom.name,
                bitmap,
                disk,
            )
        for disk, bitmap, what in removal.unchecked:
            log.warning(
                "domain %s: the backing chain of disk '%s' could not be read completely "
                "(%s): a copy of bitmap '%s' in those layers, if there is one, was not "
                "removed; look with 'qemu-img info' on the backing images",
                dom.name,
                disk,
                what,
                bitmap,
            )
        for disk, bitmap, node, image in removal.left:
            log.warning(
                "domain %s: bitmap '%s' stays in backing image %s of disk '%s': QEMU opened "
                "it implicitly (node %s), so it cannot be reopened read-write. Remove it "
                "with 'qemu-img bitmap --remove %s %s' when no QEMU has the image open",
                dom.name,
                bitmap,
                image,
                disk,
                node,
                image,
                bitmap,
            )
