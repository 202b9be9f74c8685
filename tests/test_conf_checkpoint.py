"""<domaincheckpoint> rules, driven by the files in tests/data/checkpoint/.

Each case NAME is ``NAME.in.xml`` (or only ``NAME.out.xml``: an out -> out round
trip), an optional ``NAME.json`` of options and either ``NAME.out.xml`` or an
expected error. The options mirror libvirt's checkpoint test harness:

- ``flags``: CheckpointCreateFlags names for parsing (``REDEFINE``);
- ``internal``: parse and format the stored form (``<active>``, disk ``size``);
- ``now``: the clock a create reads (libvirt's mocked creation time);
- ``parent``: parent name forced after parsing (must not be set already);
- ``vda_bitmap``: the first disk becomes ``vda`` with bitmap = checkpoint name
  (added when there are no disks; an existing one must be ``vda`` without bitmap);
- ``size``: size of the first disk;
- ``format_flags``: CheckpointXMLFlags names for output, default ``["SECURE"]``;
- ``align``: DomainDisk dicts to run align_disks against (no alignment otherwise);
- ``redefine_prep``: ``{"uuid", "parents"}`` for CheckpointDef.redefine_prep;
- ``error`` / ``domain`` / ``match``: the expected VirError code, error domain and
  a substring of its message.

Files whose name contains ``-invalid.`` must fail the schema, all others must pass
it. ``NAME-invalid.xml`` alone is an input that parsing must refuse with 92, with
``NAME-invalid.json`` giving the part of the message that names the culprit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from pyvirtbackup.conf import CheckpointDef, CheckpointDisk, DomainDisk
from pyvirtbackup.conf.checkpoint import validate_schema
from pyvirtbackup.conf.domainxml import domain_uuid, format_domain_xml, parse_domain_disks
from pyvirtbackup.conf.xmlutil import EXCERPT_CHARS, parse_document
from pyvirtbackup.enums import CheckpointCreateFlags, CheckpointXMLFlags
from pyvirtbackup.errors import ErrorDomain, ErrorNumber, VirError

DATA = Path(__file__).parent / "data" / "checkpoint"
DOMAIN_DATA = DATA / "domain"


def _case_names() -> list[str]:
    names = set()
    for path in DATA.glob("*.xml"):
        if path.name.endswith((".in.xml", ".out.xml")):
            names.add(path.name.rsplit(".", 2)[0])
    return sorted(names)


def _invalid_inputs() -> list[str]:
    return sorted(
        p.name for p in DATA.glob("*-invalid.xml") if not p.name.endswith((".in.xml", ".out.xml"))
    )


def _options(name: str, folder: Path = DATA) -> dict:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _flags(enum_cls: type, names: list[str]) -> int:
    value = 0
    for flag in names:
        value |= enum_cls[flag]
    return value


def _input_text(name: str) -> str:
    path = DATA / f"{name}.in.xml"
    if not path.exists():
        path = DATA / f"{name}.out.xml"
    return path.read_text()


def _apply_harness(chk: CheckpointDef, opts: dict) -> None:
    """What libvirt's harness does between parse and format."""
    if "parent" in opts:
        assert chk.parent_name is None, "harness: parent already set by the input"
        chk.parent_name = opts["parent"]
    if opts.get("vda_bitmap"):
        if not chk.disks:
            chk.disks.append(CheckpointDisk("vda", "bitmap"))
        first = chk.disks[0]
        assert first.name == "vda" and first.bitmap is None, "harness: first disk must be vda"
        first.bitmap = chk.name
    if "size" in opts:
        chk.disks[0].size = opts["size"]
    if "align" in opts:
        chk.align_disks([DomainDisk(**d) for d in opts["align"]])
    if "redefine_prep" in opts:
        prep = opts["redefine_prep"]
        chk.redefine_prep(prep["uuid"], prep["parents"])


def _run_case(name: str, opts: dict) -> str:
    internal = bool(opts.get("internal"))
    chk = CheckpointDef.from_xml(
        _input_text(name),
        _flags(CheckpointCreateFlags, opts.get("flags", [])),
        internal,
        now=opts.get("now"),
    )
    _apply_harness(chk, opts)
    return chk.to_xml(_flags(CheckpointXMLFlags, opts.get("format_flags", ["SECURE"])), internal)


@pytest.mark.parametrize("name", _case_names())
def test_case(name: str) -> None:
    opts = _options(name)
    if "error" in opts:
        with pytest.raises(VirError) as info:
            _run_case(name, opts)
        err = info.value
        assert err.code == opts["error"], repr(err)
        if "domain" in opts:
            assert err.domain == opts["domain"], repr(err)
        assert opts["match"] in err.message
        return
    expected = (DATA / f"{name}.out.xml").read_text()
    assert _run_case(name, opts) == expected


def _redefinable_cases() -> list[str]:
    """Cases whose output can be redefined as is: it has a creationTime, and a size
    only where the internal form keeps it (error cases have no output)."""
    names = []
    for name in _case_names():
        out_path = DATA / f"{name}.out.xml"
        if not out_path.exists():
            continue
        out = out_path.read_text()
        internal = bool(_options(name).get("internal"))
        if "<creationTime>" in out and ("size=" not in out or internal):
            names.append(name)
    return names


@pytest.mark.parametrize("name", _redefinable_cases())
def test_out_idempotent(name: str) -> None:
    """to_xml(from_xml(out, REDEFINE)) == out, wherever out can be redefined as is."""
    out_path = DATA / f"{name}.out.xml"
    opts = _options(name)
    out = out_path.read_text()
    internal = bool(opts.get("internal"))
    chk = CheckpointDef.from_xml(out, CheckpointCreateFlags.REDEFINE, internal)
    flags = _flags(CheckpointXMLFlags, opts.get("format_flags", ["SECURE"]))
    assert chk.to_xml(flags, internal) == out


@pytest.mark.parametrize("path", sorted(DATA.glob("*.xml")), ids=lambda p: p.name)
def test_schema(path: Path) -> None:
    """Every file validates against the schema, except the -invalid ones, which must not.

    The embedded <domain> is outside the schema (checked by the code), so documents
    are validated the way the parser does it."""
    doc = etree.parse(str(path)).getroot()
    if "-invalid." in path.name:
        with pytest.raises(VirError) as info:
            validate_schema(doc)
        assert info.value.code == ErrorNumber.XML_INVALID_SCHEMA
    else:
        validate_schema(doc)


@pytest.mark.parametrize("name", _invalid_inputs())
def test_invalid_input_refused(name: str) -> None:
    """Refused with 92 whatever the flags, and the message names the culprit."""
    opts = _options(name[: -len(".xml")])
    for flags in (0, CheckpointCreateFlags.REDEFINE):
        with pytest.raises(VirError) as info:
            CheckpointDef.from_xml((DATA / name).read_text(), flags, now=1)
        assert info.value.code == ErrorNumber.XML_INVALID_SCHEMA
        assert info.value.domain == ErrorDomain.XML
        assert opts["match"] in info.value.message


def test_enough_cases() -> None:
    assert len(_case_names()) + len(_invalid_inputs()) >= 18


# ---------------------------------------------------------------- direct API checks


def _disks() -> list[DomainDisk]:
    return [
        DomainDisk("vda", "/fake/vda.qcow2"),
        DomainDisk("vdb", "/fake/vdb.qcow2"),
        DomainDisk("sdc", None, "raw", empty=True),
    ]


def test_now_defaults_to_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.time", lambda: 1234567890.9)
    chk = CheckpointDef.from_xml("<domaincheckpoint/>")
    assert (chk.name, chk.creation_time) == ("1234567890", 1234567890)


def test_redefine_keeps_domain_element() -> None:
    text = (DATA / "redefine.out.xml").read_text()
    chk = CheckpointDef.from_xml(text, CheckpointCreateFlags.REDEFINE)
    assert chk.domain is not None and chk.domain.tag == "domain"
    assert chk.domain_uuid() == "e8a0f4b2-6c1d-4f3e-9a57-2b8c0d1e3f46"
    assert [d.name for d in chk.domain_disks()] == ["vda", "vdb", "sdc", "vdd"]
    assert chk.parent_name == "1525111885" and chk.creation_time == 1525889631


def test_create_ignores_domain_and_parent() -> None:
    text = (DATA / "redefine.out.xml").read_text()
    chk = CheckpointDef.from_xml(text, now=5)
    assert chk.domain is None and chk.parent_name is None and chk.creation_time == 5
    with pytest.raises(VirError) as info:
        chk.domain_disks()
    assert info.value.code == ErrorNumber.INTERNAL_ERROR


def test_align_error_leaves_definition_untouched() -> None:
    chk = CheckpointDef.from_xml(
        "<domaincheckpoint><name>c1</name><disks><disk name='/fake/vda.qcow2'/>"
        "<disk name='vdz'/></disks></domaincheckpoint>",
        now=1,
    )
    before = [CheckpointDisk(d.name, d.checkpoint, d.bitmap, d.size) for d in chk.disks]
    with pytest.raises(VirError):
        chk.align_disks(_disks())
    assert chk.disks == before


def test_too_many_is_checked_before_no_disks() -> None:
    chk = CheckpointDef.from_xml(
        "<domaincheckpoint><disks><disk name='vda'/></disks></domaincheckpoint>", now=1
    )
    with pytest.raises(VirError, match="too many disk checkpoint requests"):
        chk.align_disks([])


def test_set_domain_then_realign() -> None:
    """What a create stores is enough to re-align the checkpoint on REDEFINE."""
    chk = CheckpointDef.from_xml("<domaincheckpoint><name>c1</name></domaincheckpoint>", now=7)
    chk.align_disks(_disks())
    chk.set_domain("vm1", "0f1e2d3c-4b5a-4697-8877-665544332211", _disks())
    stored = chk.to_xml(CheckpointXMLFlags.SECURE)
    again = CheckpointDef.from_xml(stored, CheckpointCreateFlags.REDEFINE)
    again.redefine_prep("0f1e2d3c-4b5a-4697-8877-665544332211", {})
    assert again.to_xml(CheckpointXMLFlags.SECURE) == stored
    assert again.domain_disks() == _disks()


def test_size_needs_flag_and_value() -> None:
    chk = CheckpointDef(name="c1", creation_time=1)
    chk.disks = [CheckpointDisk("vda", "bitmap", "c1", 0), CheckpointDisk("vdb", "bitmap", "c1")]
    out = chk.to_xml(CheckpointXMLFlags.SIZE)
    assert "<disk name='vda' checkpoint='bitmap' bitmap='c1' size='0'/>" in out
    assert "<disk name='vdb' checkpoint='bitmap' bitmap='c1'/>" in out
    assert "size=" not in chk.to_xml()


def test_default_checkpoint_type_not_printed() -> None:
    chk = CheckpointDef(name="c1", disks=[CheckpointDisk("vda")])
    assert "<disk name='vda'/>" in chk.to_xml()


def test_internal_without_active_formats_zero() -> None:
    chk = CheckpointDef.from_xml(
        "<domaincheckpoint><name>c1</name><creationTime>3</creationTime></domaincheckpoint>",
        CheckpointCreateFlags.REDEFINE,
        internal=True,
    )
    assert chk.active is None
    assert chk.to_xml(internal=True).endswith("  <active>0</active>\n</domaincheckpoint>\n")
    assert "<active>" not in chk.to_xml()


def test_not_well_formed_and_wrong_root() -> None:
    with pytest.raises(VirError) as info:
        CheckpointDef.from_xml("<domaincheckpoint>", now=1)
    assert (info.value.code, info.value.domain) == (
        ErrorNumber.XML_DETAIL,
        ErrorDomain.DOMAIN_CHECKPOINT,
    )
    with pytest.raises(VirError) as info:
        CheckpointDef.from_xml("<domainbackup/>", now=1)
    assert info.value.code == ErrorNumber.XML_ERROR
    assert "expecting root element of 'domaincheckpoint'" in info.value.message


# ---------------------------------------------------------------- domain XML


def _domain_cases() -> list[str]:
    return sorted(p.name[: -len(".in.xml")] for p in DOMAIN_DATA.glob("*.in.xml"))


@pytest.mark.parametrize("name", _domain_cases())
def test_domain_xml(name: str) -> None:
    opts = _options(name, DOMAIN_DATA)
    elem = etree.parse(str(DOMAIN_DATA / f"{name}.in.xml")).getroot()
    if "error" in opts:
        with pytest.raises(VirError) as info:
            parse_domain_disks(elem)
        assert (info.value.code, info.value.domain) == (opts["error"], opts["domain"])
        assert opts["match"] in info.value.message
        return
    disks = parse_domain_disks(elem)
    assert disks == [DomainDisk(**d) for d in opts["disks"]]
    assert domain_uuid(elem) == opts["uuid"]
    out = format_domain_xml(elem.findtext("name"), domain_uuid(elem), disks)
    assert out == (DOMAIN_DATA / f"{name}.out.xml").read_text()
    # and what we write reads back to the same disks
    assert parse_domain_disks(etree.fromstring(out.encode())) == disks


def test_domain_xml_round_trip_every_kind() -> None:
    disks = [
        DomainDisk("vda", "/srv/a.qcow2", "qcow2", "file"),
        DomainDisk("vdb", "/dev/sdz", "raw", "block", readonly=True),
        DomainDisk("vdc", "pool/img", "raw", "network"),
        DomainDisk("cd0", None, "raw", "file", readonly=True, empty=True),
    ]
    text = format_domain_xml("vm", "0f1e2d3c-4b5a-4697-8877-665544332211", disks)
    assert parse_domain_disks(etree.fromstring(text.encode())) == disks


def test_a_parse_error_quotes_an_excerpt_around_the_error() -> None:
    line = "<domaincheckpoint><description>" + "a" * 5000 + "</wrong></domaincheckpoint>"
    with pytest.raises(VirError) as exc:
        parse_document(
            line,
            root="domaincheckpoint",
            schema=None,
            url="u",
            domain=0,  # type: ignore[arg-type]
        )
    quoted = exc.value.message.split("\n", 1)[1]
    assert len(quoted) <= EXCERPT_CHARS + 6 and "</wrong>" in quoted
