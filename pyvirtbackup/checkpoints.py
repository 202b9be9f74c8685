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
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from .conf import CheckpointDef
from .conf.checkpoint import read_head
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


class _Defs(Mapping[str, CheckpointDef]):
    """``tree.defs``: every definition by name, each parsed when first looked at."""

    def __init__(self, tree: CheckpointTree) -> None:
        self._tree = tree

    def __getitem__(self, name: str) -> CheckpointDef:
        if name not in self._tree:
            raise KeyError(name)
        return self._tree.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._tree._heads_view()))

    def __len__(self) -> int:
        return len(self._tree._heads_view())


class CheckpointTree:
    """One domain's checkpoint definitions, parent links and current checkpoint.

    Parent links are the definitions' ``parent_name``; a parent that is not (or no
    longer) known makes a root, as libvirt treats dangling parents on load. Order
    is always topological: parents first, siblings by creation time then name.

    Loading is lazy, because every command attaches and a domain may have
    thousands of checkpoints: attach lists their names; the first look at the
    tree reads each file's head (name, parent, creation time); a definition is
    parsed and validated only when it is used.
    """

    def __init__(self, store: DomainState | None = None) -> None:
        self.store = store
        # name -> (parent, creation time); None until the stored heads are read
        self._heads: dict[str, tuple[str | None, int]] | None = {} if store is None else None
        self._names: set[str] = set()
        self._defs: dict[str, CheckpointDef] = {}
        self._current: str | None = None

    # loading ------------------------------------------------------------------

    @classmethod
    def load(cls, store: DomainState) -> CheckpointTree:
        """The stored checkpoints, by name only (see the class); a damaged file is
        skipped with an error logged when it is first read.

        One unreadable file must not make the domain unusable (libvirt skips it
        the same way); the others and their backups stay reachable.
        """
        tree = cls(store)
        tree._names = set(store.checkpoint_names())
        tree._current = store.read_current()
        return tree

    def _heads_view(self) -> dict[str, tuple[str | None, int]]:
        if self._heads is None:
            self._heads = {}
            for name in sorted(self._names):
                head = self._read_head(name)
                if head is not None:
                    self._heads[name] = head
            self._names = set(self._heads)
        return self._heads

    def _read_head(self, name: str) -> tuple[str | None, int] | None:
        assert self.store is not None
        try:
            text = self.store.read_checkpoint(name)
            if text is None:
                return None
            head = read_head(text)
        except VirError as exc:
            self._skip(name, str(exc))
            return None
        if head.name != name:
            self._skip(name, f"it defines checkpoint {head.name}")
            return None
        return head.parent_name, head.creation_time

    def _skip(self, name: str, why: str) -> None:
        store = self.store.name if self.store is not None else "?"
        log.error("skipping checkpoint file %s of %s: %s", name, store, why)
        self._names.discard(name)
        if self._heads is not None:
            self._heads.pop(name, None)
        self._defs.pop(name, None)

    @property
    def defs(self) -> Mapping[str, CheckpointDef]:
        return _Defs(self)

    @property
    def current(self) -> str | None:
        """The current checkpoint, if it is (still) a readable one."""
        if self._current is not None and self._current not in self._heads_view():
            self._current = None
        return self._current

    # queries ------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._names if self._heads is None else name in self._heads

    def get(self, name: str) -> CheckpointDef:
        if name not in self:
            raise no_checkpoint(name)
        chk = self._defs.get(name)
        if chk is not None:
            return chk
        assert self.store is not None
        try:
            text = self.store.read_checkpoint(name)
            if text is None:
                raise no_checkpoint(name)
            chk = CheckpointDef.from_xml(text, CheckpointCreateFlags.REDEFINE)
        except VirError as exc:
            if exc.code == ErrorNumber.OPERATION_DENIED:
                raise
            self._skip(name, exc.message)
            raise no_checkpoint(name) from None
        if chk.name != name:
            self._skip(name, f"it defines checkpoint {chk.name}")
            raise no_checkpoint(name)
        if self._heads is not None:  # the file is the truth, its head read alone may lag
            self._heads[name] = (chk.parent_name, chk.creation_time or 0)
        self._defs[name] = chk
        return chk

    def _parent_of(self, name: str) -> str | None:
        heads = self._heads_view()
        parent = heads[name][0]
        return parent if parent in heads else None

    def parent(self, name: str) -> str | None:
        """The parent's name, or None for a root (or a parent that is gone)."""
        if name not in self._heads_view():
            raise no_checkpoint(name)
        return self._parent_of(name)

    def parents(self) -> dict[str, str | None]:
        """Name -> parent name, for the cycle check of a redefine."""
        return {name: head[0] for name, head in self._heads_view().items()}

    def _children_index(self) -> dict[str | None, list[str]]:
        """Every checkpoint's children (None: the roots), each list in sibling order."""
        heads = self._heads_view()
        index: dict[str | None, list[str]] = {}
        for name in sorted(heads, key=lambda n: (heads[n][1] or 0, n)):
            index.setdefault(self._parent_of(name), []).append(name)
        return index

    def children(self, name: str | None) -> list[str]:
        """Direct children of ``name``; of None: the roots."""
        return list(self._children_index().get(name, []))

    def descendants(self, name: str | None) -> list[str]:
        """Every checkpoint below ``name`` (None: all), parents before children."""
        return self._descendants(name, self._children_index())

    @staticmethod
    def _descendants(name: str | None, index: dict[str | None, list[str]]) -> list[str]:
        out: list[str] = []
        stack = list(reversed(index.get(name, [])))
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(index.get(n, [])))
        return out

    def names(self, flags: int = 0, start: str | None = None) -> list[str]:
        """libvirt's listing rules, from the domain (``start`` None) or a checkpoint.

        From the domain: ROOTS lists only the roots, else all. From a checkpoint
        (ListAllChildren): DESCENDANTS lists all below it, else its children. LEAVES
        keeps those without children, NO_LEAVES those with; both together keep all.
        The order is topological whether TOPOLOGICAL is asked for or not.
        """
        if start is not None and start not in self._heads_view():
            raise no_checkpoint(start)
        index = self._children_index()
        whole = bool(flags & CheckpointListFlags.DESCENDANTS)
        if start is None:
            whole = not flags & CheckpointListFlags.ROOTS
        found = self._descendants(start, index) if whole else list(index.get(start, []))
        leaf_filter = flags & _LEAF_FILTERS
        if leaf_filter == CheckpointListFlags.LEAVES:
            found = [n for n in found if not index.get(n)]
        elif leaf_filter == CheckpointListFlags.NO_LEAVES:
            found = [n for n in found if index.get(n)]
        return found

    # changes ------------------------------------------------------------------

    def add(self, chk: CheckpointDef, *, make_current: bool) -> None:
        """Record a new or redefined checkpoint (replacing one of the same name).

        Children of a replaced checkpoint keep it as their parent: they name it.
        """
        name = chk.name
        assert name is not None
        heads = self._heads_view()
        previous = self.get(name) if name in heads else None
        self._save(chk)
        self._remember(chk)
        if not make_current:
            return
        try:
            self.set_current(name)
        except VirError:  # keep memory and files saying the same
            if previous is None:
                self._forget(name)
                if self.store is not None:
                    self.store.delete_checkpoint(name)
            else:
                self._remember(previous)
                self._save(previous)
            raise

    def _remember(self, chk: CheckpointDef) -> None:
        assert chk.name is not None
        self._heads_view()[chk.name] = (chk.parent_name, chk.creation_time or 0)
        self._names.add(chk.name)
        self._defs[chk.name] = chk

    def _forget(self, name: str) -> None:
        self._heads_view().pop(name, None)
        self._names.discard(name)
        self._defs.pop(name, None)

    def set_current(self, name: str | None) -> None:
        if self.store is not None:
            self.store.write_current(name)
        self._current = name

    def reparent_children(self, name: str) -> None:
        """Give ``name``'s children its parent before it goes (their files rewritten)."""
        new_parent = self.parent(name)
        for child in self.children(name):
            chk = self.get(child)
            old = chk.parent_name
            chk.parent_name = new_parent
            try:
                self._save(chk)
            except VirError:
                chk.parent_name = old
                raise
            self._remember(chk)

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
        self._forget(name)

    def _save(self, chk: CheckpointDef) -> None:
        if self.store is not None:
            assert chk.name is not None
            self.store.write_checkpoint(chk.name, chk.to_xml(CheckpointXMLFlags.SECURE))
