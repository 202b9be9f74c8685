"""<domainbackup> parse / align / format, driven by the cases in tests/data/backup.

A case is one of:
  NAME.in.xml + NAME.out.xml [+ NAME.json]   parse, align, format, compare
  NAME.in.xml + NAME.json with "error"       parse or align must fail that way
  NAME-invalid.xml                           must fail schema validation (92)

NAME.json options: "internal" (status form), "align" (default true), "suffix"
(default "SUFFIX"), "disks" (the domain's disks; default as libvirt's test harness:
one qcow2 file disk /fake/<name>.qcow2 per listed disk, plus vdextradisk), "error"
(expected code), "domain" (expected error domain), "match" (part of the message).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from lxml import etree

from pyvirtbackup import ErrorDomain, ErrorNumber, VirError
from pyvirtbackup.conf import BackupDef, BackupDisk, BackupServer, DomainDisk
from pyvirtbackup.conf.xmlutil import validate

DATA = Path(__file__).parent / "data" / "backup"


def _options(name: str) -> dict:
    path = DATA / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _names(pattern: str) -> list[str]:
    found = []
    for path in sorted(DATA.iterdir()):
        match = re.fullmatch(pattern, path.name)
        if match:
            found.append(match.group(1))
    return found


INPUTS = _names(r"(.+)\.in\.xml")
VALID = [n for n in INPUTS if (DATA / f"{n}.out.xml").exists()]
FAILING = [n for n in INPUTS if "error" in _options(n)]
INVALID = _names(r"(.+)-invalid\.xml")
PUBLIC_VALID = [n for n in VALID if not _options(n).get("internal")]
INTERNAL_VALID = [n for n in VALID if _options(n).get("internal")]


def fake_domain(backup: BackupDef) -> list[DomainDisk]:
    """libvirt's genericxml2xml harness: a qcow2 file per listed disk, plus vdextradisk."""
    names = [d.name for d in backup.disks] + ["vdextradisk"]
    return [DomainDisk(name=n, path=f"/fake/{n}.qcow2", format="qcow2", type="file") for n in names]


def run_case(name: str) -> str:
    opts = _options(name)
    internal = opts.get("internal", False)
    backup = BackupDef.from_xml((DATA / f"{name}.in.xml").read_text(), internal=internal)
    if opts.get("align", True):
        if "disks" in opts:
            disks = [DomainDisk(**d) for d in opts["disks"]]
        else:
            disks = fake_domain(backup)
        backup.align_disks(disks, opts.get("suffix", "SUFFIX"))
    return backup.to_xml(internal=internal)


def _schema_ok(text: str) -> bool:
    try:
        validate(etree.fromstring(text.encode()), "domainbackup.rng")
    except VirError as exc:
        assert exc.code == ErrorNumber.XML_INVALID_SCHEMA
        return False
    return True


def test_every_file_belongs_to_a_case() -> None:
    known = set()
    for name in INPUTS:
        known |= {f"{name}.in.xml", f"{name}.out.xml", f"{name}.json"}
    known |= {f"{name}-invalid.xml" for name in INVALID}
    stray = sorted(p.name for p in DATA.iterdir() if p.name not in known)
    assert stray == []
    for name in INPUTS:
        assert (name in VALID) != (name in FAILING), f"{name}: needs an .out.xml or an error"


def test_enough_cases() -> None:
    assert len(VALID) + len(FAILING) + len(INVALID) >= 28


@pytest.mark.parametrize("name", VALID)
def test_xml2xml(name: str) -> None:
    assert run_case(name) == (DATA / f"{name}.out.xml").read_text()


@pytest.mark.parametrize("name", VALID)
def test_output_is_stable(name: str) -> None:
    """Formatting a parsed output gives the same output back (no align needed)."""
    internal = _options(name).get("internal", False)
    out = (DATA / f"{name}.out.xml").read_text()
    assert BackupDef.from_xml(out, internal=internal).to_xml(internal=internal) == out


@pytest.mark.parametrize("name", FAILING)
def test_failing(name: str) -> None:
    opts = _options(name)
    with pytest.raises(VirError) as info:
        run_case(name)
    assert info.value.code == opts["error"], info.value.message
    assert opts["match"] in info.value.message
    if "domain" in opts:
        assert info.value.domain == opts["domain"]


@pytest.mark.parametrize("name", PUBLIC_VALID)
def test_schema_accepts_public_files(name: str) -> None:
    assert _schema_ok((DATA / f"{name}.in.xml").read_text())
    assert _schema_ok((DATA / f"{name}.out.xml").read_text())


@pytest.mark.parametrize("name", INTERNAL_VALID)
def test_schema_refuses_internal_files(name: str) -> None:
    """Status-only parts are not public: a status document must not validate."""
    for suffix in ("in", "out"):
        text = (DATA / f"{name}.{suffix}.xml").read_text()
        assert not _schema_ok(text)
        with pytest.raises(VirError) as info:
            BackupDef.from_xml(text)
        assert info.value.code == ErrorNumber.XML_INVALID_SCHEMA


@pytest.mark.parametrize(
    "name",
    [n for n in FAILING if _options(n)["error"] == 67 and not _options(n).get("internal")],
)
def test_schema_accepts_inputs_refused_later(name: str) -> None:
    """Align errors concern valid documents: the schema must not catch them first."""
    assert _schema_ok((DATA / f"{name}.in.xml").read_text())


@pytest.mark.parametrize("name", INVALID)
def test_invalid(name: str) -> None:
    text = (DATA / f"{name}-invalid.xml").read_text()
    assert not _schema_ok(text)
    with pytest.raises(VirError) as info:
        BackupDef.from_xml(text)
    assert info.value.code == ErrorNumber.XML_INVALID_SCHEMA
    assert info.value.domain == ErrorDomain.XML
    assert info.value.message.startswith("XML document failed to validate against schema")


# ---------------------------------------------------------------- direct unit tests


def _disks(*names: str) -> list[DomainDisk]:
    return [DomainDisk(name=n, path=f"/images/{n}.qcow2") for n in names]


def test_error_numbers_and_domains() -> None:
    with pytest.raises(VirError) as info:
        BackupDef.from_xml("<domainbackup mode='pull'/>")
    assert (info.value.code, info.value.domain) == (92, 5)
    assert info.value.get_error_code() == 92

    with pytest.raises(VirError) as info:
        BackupDef.from_xml("<domainbackup>")
    assert (info.value.code, info.value.domain) == (35, 20)

    with pytest.raises(VirError) as info:
        BackupDef.from_xml("<domain/>")
    assert (info.value.code, info.value.domain) == (27, 5)

    backup = BackupDef.from_xml("<domainbackup><disks><disk name='vdq'/></disks></domainbackup>")
    with pytest.raises(VirError) as info:
        backup.align_disks(_disks("vda"), "s")
    assert (info.value.code, info.value.domain) == (67, 20)
    assert "'vdq'" in info.value.message


def test_parsed_fields() -> None:
    backup = BackupDef.from_xml(
        "<domainbackup mode='pull'><incremental>c1</incremental>"
        "<server tls='no' name='h' port='10809'/>"
        "<disks><disk name='vda' backupmode='incremental' exportname='e' exportbitmap='b'>"
        "<driver type='qcow2'/><scratch file='/s'><seclabel model='dac' relabel='no'/>"
        "</scratch></disk><disk name='vdb' backup='no'/></disks></domainbackup>"
    )
    assert backup.is_pull and backup.store_element == "scratch"
    assert backup.server == BackupServer(transport="tcp", name="h", port=10809, tls=False)
    vda, vdb = backup.disks
    assert (vda.backup, vda.backupmode, vda.incremental) == (True, "incremental", None)
    assert (vda.exportname, vda.exportbitmap, vda.format, vda.path) == ("e", "b", "qcow2", "/s")
    assert [s.get("model") for s in vda.seclabels] == ["dac"]
    assert vda.index == 0 and vda.state is None
    assert vdb == BackupDisk(name="vdb", backup=False)
    assert backup.selected_disks() == [vda]


def test_push_is_default_and_printed() -> None:
    backup = BackupDef.from_xml("<domainbackup/>")
    assert backup.mode == "push" and not backup.is_pull and backup.store_element == "target"
    assert backup.to_xml() == "<domainbackup mode='push'/>\n"


def test_default_suffix_is_unix_time() -> None:
    backup = BackupDef.from_xml("<domainbackup/>")
    backup.align_disks(_disks("vda"))
    suffix = backup.disks[0].path.rsplit(".", 1)[1]
    assert suffix.isdigit() and abs(int(suffix) - __import__("time").time()) < 60


def test_align_appends_in_domain_order_and_no_driver_default() -> None:
    backup = BackupDef.from_xml("<domainbackup><disks><disk name='vdc'/></disks></domainbackup>")
    backup.align_disks(_disks("vda", "vdb", "vdc"), "x")
    assert [(d.name, d.backup) for d in backup.disks] == [
        ("vdc", True),
        ("vda", False),
        ("vdb", False),
    ]
    assert backup.disks[0].format is None
    assert [d.name for d in backup.selected_disks()] == ["vdc"]


def test_nothing_selected_is_left_to_the_driver() -> None:
    backup = BackupDef.from_xml(
        "<domainbackup><disks><disk name='vda' backup='no'/></disks></domainbackup>"
    )
    backup.align_disks(_disks("vda"), "x")
    assert backup.selected_disks() == []


def test_internal_roundtrip_keeps_tls_aliases() -> None:
    text = (DATA / "pull-internal.in.xml").read_text()
    backup = BackupDef.from_xml(text, internal=True)
    assert backup.tls_alias == "objlibvirt_backup_tls0"
    assert backup.tls_secret_alias == "objlibvirt_backup_tls0_tlskey-secret0"
    assert backup.disks[0].state == "running" and backup.disks[0].index == 7
    public = backup.to_xml()
    assert "privateData" not in public and "state=" not in public and "index='7'" in public


def test_bytes_input_and_non_text() -> None:
    assert BackupDef.from_xml(b"<domainbackup/>").mode == "push"
    with pytest.raises(VirError) as info:
        BackupDef.from_xml(None)  # type: ignore[arg-type]
    assert info.value.code == ErrorNumber.INVALID_ARG


def test_pvb_backing_extension() -> None:
    """Our namespaced backing attributes: any prefix, push only, kept in status XML."""
    backup = BackupDef.from_xml(
        "<domainbackup xmlns:x='urn:pyvirtbackup:backup:1.0'><disks>"
        "<disk name='vda'><target file='/b/vda.inc.qcow2' x:backing='vda.full.qcow2'/></disk>"
        "</disks></domainbackup>"
    )
    vda = backup.disks[0]
    assert (vda.backing, vda.backing_format) == ("vda.full.qcow2", None)
    out = backup.to_xml()
    assert "<domainbackup mode='push' xmlns:pvb='urn:pyvirtbackup:backup:1.0'>" in out
    assert "pvb:backing='vda.full.qcow2'" in out
    vda.state = "running"
    status = BackupDef.from_xml(backup.to_xml(internal=True), internal=True)
    assert status.disks[0].backing == "vda.full.qcow2"
    # the status form has no schema: the code refuses what the schema would
    with pytest.raises(VirError) as info:
        BackupDef.from_xml(
            "<domainbackup xmlns:pvb='urn:pyvirtbackup:backup:1.0'><disks>"
            "<disk name='vda' state='running'><target file='/b/i' pvb:backing-format='qcow2'/>"
            "</disk></disks></domainbackup>",
            internal=True,
        )
    assert info.value.code == ErrorNumber.XML_ERROR
    assert "pvb:backing-format without pvb:backing for disk 'vda'" in info.value.message
    # without the extension nothing changes in libvirt's own output
    assert "xmlns" not in BackupDef.from_xml("<domainbackup/>").to_xml()


def test_no_target_is_generated_next_to_a_relative_source() -> None:
    """QEMU opened the disk by a relative name (relative to QEMU's working directory):
    '<source>.<suffix>' would name a different file for us."""
    disks = [DomainDisk(name="vda", path="vda.qcow2", format="qcow2")]
    backup = BackupDef.from_xml("<domainbackup/>")
    with pytest.raises(VirError, match="relative") as exc:
        backup.align_disks(disks, suffix="1")
    assert exc.value.code == ErrorNumber.CONFIG_UNSUPPORTED
