"""The running backup's record is one atomic file: no instant leaves half of it."""

from __future__ import annotations

import json

import pytest

from pyvirtbackup import state as state_mod
from pyvirtbackup.state import State

RESOURCES = {"version": 2, "mode": "push", "disks": [], "created_files": ["/bk/vda.qcow2"]}
XML = "<domainbackup><disks><disk name='vda' backup='yes'/></disks></domainbackup>"


def test_a_record_round_trips_and_backup_xml_is_a_copy(tmp_path):
    dstate = State(tmp_path).domain("vm1")
    dstate.write_job(XML, RESOURCES)
    assert dstate.read_job() == (XML, RESOURCES)
    assert (dstate.dir / "backup.xml").read_text() == XML
    assert json.loads((dstate.dir / "backup.json").read_text())["status_xml"] == XML


def test_a_crash_before_the_xml_copy_on_the_first_save_still_leaves_the_record(
    tmp_path, monkeypatch
):
    """Written one after the other, backup.json then backup.xml, a crash between them
    on the first save made read_job() say 'no job' for a job QEMU was running."""
    dstate = State(tmp_path).domain("vm1")
    real = state_mod.atomic_write

    def dies_at_the_xml(path, data, mode=0o600, **kwargs):
        if path.name == "backup.xml":
            raise SystemExit("the orchestrator is killed here")
        real(path, data, mode, **kwargs)

    monkeypatch.setattr(state_mod, "atomic_write", dies_at_the_xml)
    with pytest.raises(SystemExit):
        dstate.write_job(XML, RESOURCES)
    monkeypatch.setattr(state_mod, "atomic_write", real)
    assert not (dstate.dir / "backup.xml").exists()
    assert dstate.read_job() == (XML, RESOURCES)


def test_a_stale_xml_copy_is_never_read_over_the_records_own(tmp_path):
    dstate = State(tmp_path).domain("vm1")
    dstate.write_job(XML, RESOURCES)
    (dstate.dir / "backup.xml").write_text("<domainbackup mode='pull'/>")  # an older copy
    assert dstate.read_job() == (XML, RESOURCES)


def test_an_old_record_without_the_key_reads_backup_xml(tmp_path):
    dstate = State(tmp_path).domain("vm1")
    dstate.dir.mkdir(parents=True)
    (dstate.dir / "backup.json").write_text(json.dumps(RESOURCES))
    assert dstate.read_job() is None  # the old format needs both files
    (dstate.dir / "backup.xml").write_text(XML)
    assert dstate.read_job() == (XML, RESOURCES)


def test_delete_and_set_aside_handle_both_files(tmp_path):
    dstate = State(tmp_path).domain("vm1")
    dstate.write_job(XML, RESOURCES)
    dstate.delete_job()
    assert dstate.read_job() is None
    assert not (dstate.dir / "backup.json").exists() and not (dstate.dir / "backup.xml").exists()
    dstate.delete_job()  # nothing there: fine

    dstate.write_job(XML, RESOURCES)
    dstate.set_aside_job()
    assert dstate.read_job() is None
    kept = sorted(p.name.split(".unreadable-")[0] for p in dstate.dir.glob("*.unreadable-*"))
    assert kept == ["backup.json", "backup.xml"]
