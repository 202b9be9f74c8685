"""The checkpoint tree without QEMU: listing flags, re-parenting, current, persistence."""

from __future__ import annotations

import pytest

from pyvirtbackup import CheckpointListFlags as L
from pyvirtbackup import ErrorNumber, VirError
from pyvirtbackup.checkpoints import Checkpoint, CheckpointTree
from pyvirtbackup.conf import CheckpointDef, CheckpointDisk
from pyvirtbackup.state import State

#        a            x
#      /   \
#     b     d
#     |
#     c
SHAPE = [("a", None, 10), ("b", "a", 20), ("c", "b", 30), ("d", "a", 25), ("x", None, 40)]


def _def(name: str, parent: str | None, created: int) -> CheckpointDef:
    return CheckpointDef(
        name=name,
        creation_time=created,
        parent_name=parent,
        disks=[CheckpointDisk("vda", "bitmap", name)],
    )


def _tree(store=None) -> CheckpointTree:
    tree = CheckpointTree(store)
    for name, parent, created in SHAPE:
        tree.add(_def(name, parent, created), make_current=True)
    return tree


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0, ["a", "b", "c", "d", "x"]),
        (L.TOPOLOGICAL, ["a", "b", "c", "d", "x"]),
        (L.ROOTS, ["a", "x"]),
        (L.LEAVES, ["c", "d", "x"]),
        (L.NO_LEAVES, ["a", "b"]),
        (L.LEAVES | L.NO_LEAVES, ["a", "b", "c", "d", "x"]),
        (L.ROOTS | L.LEAVES, ["x"]),
        (L.ROOTS | L.NO_LEAVES, ["a"]),
    ],
)
def test_domain_listing_flags(flags, expected):
    assert _tree().names(flags) == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (0, ["b", "d"]),
        (L.DESCENDANTS, ["b", "c", "d"]),
        (L.DESCENDANTS | L.LEAVES, ["c", "d"]),
        (L.DESCENDANTS | L.NO_LEAVES, ["b"]),
        (L.LEAVES, ["d"]),
    ],
)
def test_children_listing_flags(flags, expected):
    assert _tree().names(flags, start="a") == expected


def test_topological_order_puts_parents_first_even_against_creation_time():
    tree = CheckpointTree()
    tree.add(_def("late-root", None, 100), make_current=False)
    tree.add(_def("early-child", "late-root", 5), make_current=False)
    tree.add(_def("other-root", None, 50), make_current=False)
    assert tree.names(L.TOPOLOGICAL) == ["other-root", "late-root", "early-child"]


def test_unknown_names_are_no_domain_checkpoint():
    tree = _tree()
    for call in (lambda: tree.get("nope"), lambda: tree.names(0, start="nope")):
        with pytest.raises(VirError) as exc:
            call()
        assert exc.value.code == ErrorNumber.NO_DOMAIN_CHECKPOINT
        assert "'nope'" in exc.value.message


def test_dangling_parent_makes_a_root():
    tree = CheckpointTree()
    tree.add(_def("orphan", "gone", 1), make_current=False)
    assert tree.parent("orphan") is None
    assert tree.names(L.ROOTS) == ["orphan"]


def test_delete_middle_reparents_children_and_moves_current(tmp_path):
    store = State(tmp_path).domain("vm")
    tree = _tree(store)
    tree.set_current("b")
    tree.reparent_children("b")
    tree.remove("b", update_current=True)
    assert tree.parent("c") == "a"
    assert tree.current == "a"
    assert tree.names(0, start="a") == ["d", "c"]
    # the child's file says so too
    again = CheckpointTree.load(store)
    assert again.parent("c") == "a"
    assert again.current == "a"
    assert "b" not in again


def test_removing_current_without_update_leaves_no_current():
    tree = _tree()
    tree.set_current("c")
    tree.remove("c", update_current=False)
    assert tree.current is None


def test_tree_survives_a_reload(tmp_path):
    store = State(tmp_path).domain("vm")
    tree = _tree(store)
    again = CheckpointTree.load(store)
    assert again.names(0) == tree.names(0)
    assert again.current == "x"
    assert again.get("c").disks == [CheckpointDisk("vda", "bitmap", "c")]
    assert again.get("c").creation_time == 30


def test_damaged_or_misnamed_files_are_skipped(tmp_path, caplog):
    store = State(tmp_path).domain("vm")
    _tree(store)
    (store.dir / "checkpoints" / "d.xml").write_text("<domaincheckpoint><name>")
    (store.dir / "checkpoints" / "x.xml").write_text(
        _def("other", None, 1).to_xml().replace("<name>other", "<name>zz")
    )
    store.write_current("d")
    tree = CheckpointTree.load(store)
    assert tree.names(0) == ["a", "b", "c"]
    assert tree.current is None
    assert "checkpoint file d of vm" in caplog.text
    assert "checkpoint file x of vm: it defines checkpoint zz" in caplog.text


def test_checkpoint_handles_compare_by_domain_and_name():
    dom1, dom2 = object(), object()
    assert Checkpoint(dom1, "c1") == Checkpoint(dom1, "c1")
    assert Checkpoint(dom1, "c1") != Checkpoint(dom2, "c1")
    assert Checkpoint(dom1, "c1") != Checkpoint(dom1, "c2")
    assert len({Checkpoint(dom1, "c1"), Checkpoint(dom1, "c1"), Checkpoint(dom2, "c1")}) == 2
    assert Checkpoint(dom1, "c1").getName() == "c1"
