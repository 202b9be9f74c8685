"""The checkpoints of one domain: their tree, the current one, and their files.

libvirt keeps a checkpoint as a definition plus its place in a tree (its parent
is whichever checkpoint was current when it was made). The tree is what survives
a driver restart, so every change goes to the state directory first and to
memory second: a crash between the two leaves the files right, and the next
attach rebuilds the tree from them.

Nothing here talks to QEMU; the driver pairs these changes with the bitmap work.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .conf import CheckpointDef
from .enums import CheckpointCreateFlags, CheckpointListFlags, CheckpointXMLFlags
from .errors import ErrorDomain, ErrorNumber, VirError
from .state import DomainState

if TYPE_CHECKING:
    from .driver import Domain

log = logging.getLogger(__name__)

# the flags that only filter (libvirt's VIR_DOMAIN_CHECKPOINT_FILTERS_LEAVES)
_LEAF_FILTERS = CheckpointListFlags.LEAVES | CheckpointListFlags.NO_LEAVES


class Checkpoint:
    """A checkpoint handle, as libvirt-python's virDomainCheckpoint: a domain and a name.

    Like libvirt's, it is only a reference: it stays valid as an object after the
    checkpoint is deleted, and calls with it then fail with NO_DOMAIN_CHECKPOINT.
    Two handles are equal when they name the same checkpoint of the same domain.
    """

    __slots__ = ("domain", "name")

    def __init__(self, domain: Domain, name: str) -> None:
        self.domain = domain
        self.name = name

    def getName(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Checkpoint):
            return NotImplemented
        return self.domain is other.domain and self.name == other.name

    def __hash__(self) -> int:
        return hash((id(self.domain), self.name))

    def __repr__(self) -> str:
        return f"Checkpoint({getattr(self.domain, 'name', self.domain)!r}, {self.name!r})"


def no_checkpoint(name: str) -> VirError:
    return VirError(
        ErrorNumber.NO_DOMAIN_CHECKPOINT,
        ErrorDomain.QEMU,
        f"no domain checkpoint with matching name '{name}'",
    )


class CheckpointTree:
    """One domain's checkpoint definitions, parent links and current checkpoint.

    Parent links are the definitions' ``parent_name``; a parent that is not (or no
    longer) known makes a root, as libvirt treats dangling parents on load. Order
    is always topological: parents first, siblings by creation time then name.
    """

    def __init__(self, store: DomainState | None = None) -> None:
        self.store = store
        self.defs: dict[str, CheckpointDef] = {}
        self.current: str | None = None

    # loading ------------------------------------------------------------------

    @classmethod
    def load(cls, store: DomainState) -> CheckpointTree:
        """Read every stored checkpoint; a damaged file is skipped with an error logged.

        One unreadable file must not make the domain unusable (libvirt skips it
        the same way); the others and their backups stay reachable.
        """
        tree = cls(store)
        for name in store.checkpoint_names():
            try:
                text = store.read_checkpoint(name)
                if text is None:
                    continue
                chk = CheckpointDef.from_xml(text, CheckpointCreateFlags.REDEFINE)
            except VirError as exc:
                log.error("skipping checkpoint file %s of %s: %s", name, store.name, exc)
                continue
            if chk.name != name:
                log.error(
                    "skipping checkpoint file %s of %s: it defines checkpoint %s",
                    name,
                    store.name,
                    chk.name,
                )
                continue
            tree.defs[name] = chk
        current = store.read_current()
        tree.current = current if current in tree.defs else None
        return tree

    # queries ------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self.defs

    def get(self, name: str) -> CheckpointDef:
        try:
            return self.defs[name]
        except KeyError:
            raise no_checkpoint(name) from None

    def parent(self, name: str) -> str | None:
        """The parent's name, or None for a root (or a parent that is gone)."""
        parent = self.get(name).parent_name
        return parent if parent in self.defs else None

    def parents(self) -> dict[str, str | None]:
        """Name -> parent name, for the cycle check of a redefine."""
        return {name: chk.parent_name for name, chk in self.defs.items()}

    def _key(self, name: str) -> tuple[int, str]:
        return (self.defs[name].creation_time or 0, name)

    def children(self, name: str | None) -> list[str]:
        """Direct children of ``name``; of None: the roots."""
        found = [n for n in self.defs if self.parent(n) == name]
        return sorted(found, key=self._key)

    def descendants(self, name: str | None) -> list[str]:
        """Every checkpoint below ``name`` (None: all), parents before children."""
        out: list[str] = []
        stack = list(reversed(self.children(name)))
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(self.children(n)))
        return out

    def names(self, flags: int = 0, start: str | None = None) -> list[str]:
        """libvirt's listing rules, from the domain (``start`` None) or a checkpoint.

        From the domain: ROOTS lists only the roots, else all. From a checkpoint
        (ListAllChildren): DESCENDANTS lists all below it, else its children. LEAVES
        keeps those without children, NO_LEAVES those with; both together keep all.
        The order is topological whether TOPOLOGICAL is asked for or not.
        """
        if start is not None:
            self.get(start)
        whole = bool(flags & CheckpointListFlags.DESCENDANTS)
        if start is None:
            whole = not flags & CheckpointListFlags.ROOTS
        found = self.descendants(start) if whole else self.children(start)
        leaf_filter = flags & _LEAF_FILTERS
        if leaf_filter == CheckpointListFlags.LEAVES:
            found = [n for n in found if not self.children(n)]
        elif leaf_filter == CheckpointListFlags.NO_LEAVES:
            found = [n for n in found if self.children(n)]
        return found

    # changes ------------------------------------------------------------------

    def add(self, chk: CheckpointDef, *, make_current: bool) -> None:
        """Record a new or redefined checkpoint (replacing one of the same name).

        Children of a replaced checkpoint keep it as their parent: they name it.
        """
        name = chk.name
        assert name is not None
        previous = self.defs.get(name)
        self._save(chk)
        self.defs[name] = chk
        if not make_current:
            return
        try:
            self.set_current(name)
        except VirError:  # keep memory and files saying the same
            if previous is None:
                del self.defs[name]
                if self.store is not None:
                    self.store.delete_checkpoint(name)
            else:
                self.defs[name] = previous
                self._save(previous)
            raise

    def set_current(self, name: str | None) -> None:
        if self.store is not None:
            self.store.write_current(name)
        self.current = name

    def reparent_children(self, name: str) -> None:
        """Give ``name``'s children its parent before it goes (their files rewritten)."""
        new_parent = self.parent(name)
        for child in self.children(name):
            chk = self.defs[child]
            old = chk.parent_name
            chk.parent_name = new_parent
            try:
                self._save(chk)
            except VirError:
                chk.parent_name = old
                raise

    def remove(self, name: str, *, update_current: bool) -> None:
        """Forget one checkpoint and delete its file.

        If it was current, its parent becomes current when ``update_current`` (a
        plain delete), else no checkpoint is (libvirt's discard of descendants).
        """
        parent = self.parent(name)
        if self.current == name:
            self.set_current(parent if update_current else None)
        if self.store is not None:
            self.store.delete_checkpoint(name)
        del self.defs[name]

    def _save(self, chk: CheckpointDef) -> None:
        if self.store is not None:
            assert chk.name is not None
            self.store.write_checkpoint(chk.name, chk.to_xml(CheckpointXMLFlags.SECURE))
