"""``<domaincheckpoint>``: parse, fill libvirt's defaults, format.

What a user sees of a checkpoint is this XML, so it follows libvirt's
checkpoint_conf.c rule for rule: what is read with and without REDEFINE, the
defaults a create fills in (name and creationTime from the clock, disk alignment),
and the exact output order. Nothing here talks to QEMU; the driver calls
:meth:`CheckpointDef.align_disks` with the disks it discovered and stores
:meth:`CheckpointDef.to_xml` output.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from lxml import etree

from ..enums import CheckpointCreateFlags, CheckpointXMLFlags
from ..errors import ErrorDomain, ErrorNumber, VirError
from . import xmlutil
from .domain import DomainDisk
from .domainxml import (
    check_domain_element,
    domain_uuid,
    format_domain_xml,
    parse_domain_disks,
    parse_domain_element,
)

_ROOT = "domaincheckpoint"
_SCHEMA = "domaincheckpoint.rng"
_URL = "domain_checkpoint"
_DOM = ErrorDomain.DOMAIN_CHECKPOINT

BITMAP = "bitmap"
NO = "no"


def _error(code: ErrorNumber, message: str, domain: ErrorDomain = _DOM) -> VirError:
    return VirError(code, domain, message)


@dataclass
class CheckpointDisk:
    """One ``<disk>`` of a checkpoint.

    ``checkpoint`` is ``'bitmap'``, ``'no'`` or None (libvirt's "default", never
    printed); parsing turns an absent attribute into ``'bitmap'``. ``size`` is
    output-only data (XML_SIZE) and is only read back from internal XML.
    """

    name: str
    checkpoint: str | None = None
    bitmap: str | None = None
    size: int | None = None


class CheckpointDef:
    """A checkpoint definition, as libvirt's virDomainCheckpointDef holds it."""

    def __init__(
        self,
        name: str | None = None,
        description: str | None = None,
        creation_time: int | None = None,
        parent_name: str | None = None,
        disks: list[CheckpointDisk] | None = None,
        domain: etree._Element | None = None,
        active: bool | None = None,
    ) -> None:
        self.name = name
        self.description = description
        self.creation_time = creation_time
        self.parent_name = parent_name
        self.disks: list[CheckpointDisk] = list(disks or [])
        self.domain = domain
        self.active = active

    def __repr__(self) -> str:
        return (
            f"CheckpointDef(name={self.name!r}, parent_name={self.parent_name!r}, "
            f"creation_time={self.creation_time!r}, disks={self.disks!r})"
        )

    # ------------------------------------------------------------------ parse

    @classmethod
    def from_xml(
        cls,
        text: str | bytes,
        flags: int = 0,
        internal: bool = False,
        *,
        now: int | None = None,
    ) -> CheckpointDef:
        """Parse a ``<domaincheckpoint>`` as virDomainCheckpointDefParseString does.

        The schema is always enforced, as libvirt does for checkpoints. Without
        REDEFINE the read-only parts (creationTime, parent, domain) are ignored and
        the clock supplies creationTime and the default name; with REDEFINE they
        are read and name and creationTime are required. ``internal`` reads the
        stored form: ``<active>`` and disk ``size`` are kept.
        """
        doc, active = _parse_document(text, internal)
        redefine = bool(flags & CheckpointCreateFlags.REDEFINE)
        chk = cls(name=_xpath_string(doc, "name"), active=active)
        if redefine and chk.name is None:
            raise _error(ErrorNumber.XML_ERROR, "a redefined checkpoint must have a name")
        chk.description = _xpath_string(doc, "description")
        if redefine:
            chk._read_redefine_fields(doc)
        else:
            chk._post_parse(int(time.time()) if now is None else now)
        chk.disks = [_parse_disk(d, internal) for d in doc.iterfind("disks/*")]
        return chk

    def _read_redefine_fields(self, doc: etree._Element) -> None:
        """creationTime, parent and domain: trusted only when redefining."""
        created = _xpath_string(doc, "creationTime")
        if created is None or not created.isdigit():
            raise _error(
                ErrorNumber.INTERNAL_ERROR, "missing creationTime from existing checkpoint"
            )
        self.creation_time = int(created)
        self.parent_name = _xpath_string(doc, "parent/name")
        self.domain = doc.find("domain")
        if self.domain is not None:
            check_domain_element(self.domain)

    def _post_parse(self, now: int) -> None:
        """libvirt's moment post-parse: a new checkpoint is stamped with the clock."""
        self.creation_time = now
        if self.name is None:
            self.name = str(now)

    # ------------------------------------------------------------------ defaults

    def default_bitmap_names(self) -> None:
        """Name every bitmap disk's bitmap after the checkpoint, unless already named.

        This is all a REDEFINE without ``<domain>`` gets (no alignment possible).
        """
        for disk in self.disks:
            if disk.checkpoint == BITMAP and disk.bitmap is None:
                disk.bitmap = self.name

    def align_disks(self, disks: list[DomainDisk]) -> None:
        """virDomainCheckpointAlignDisks against the domain's ``disks``.

        Afterwards every domain disk appears once, in domain order, under its
        target name, with an explicit ``checkpoint`` and (for bitmap disks) a
        bitmap name. Nothing is changed when an error is raised.
        """
        if len(self.disks) > len(disks):
            raise _error(
                ErrorNumber.CONFIG_UNSUPPORTED, "too many disk checkpoint requests for domain"
            )
        if not disks:
            raise _error(
                ErrorNumber.CONFIG_UNSUPPORTED,
                "domain must have at least one disk to perform checkpoints",
            )
        listed = self._match_listed_disks(disks)
        # <disks> absent: checkpoint every writable disk; present: only those listed
        default = BITMAP if not self.disks else NO
        aligned = []
        for domdisk in disks:
            if domdisk.name in listed:
                aligned.append(listed[domdisk.name])
            elif domdisk.empty or domdisk.readonly:
                aligned.append(CheckpointDisk(domdisk.name, NO))
            else:
                aligned.append(CheckpointDisk(domdisk.name, default))
        self.disks = aligned
        self.default_bitmap_names()

    def _match_listed_disks(self, disks: list[DomainDisk]) -> dict[str, CheckpointDisk]:
        """Map each listed disk to its domain disk's target, checking libvirt's rules."""
        listed: dict[str, CheckpointDisk] = {}
        for chkdisk in self.disks:
            domdisk = disk_by_name(disks, chkdisk.name)
            if domdisk is None:
                raise _error(ErrorNumber.CONFIG_UNSUPPORTED, f"no disk named '{chkdisk.name}'")
            if domdisk.name in listed:
                raise _error(
                    ErrorNumber.CONFIG_UNSUPPORTED, f"disk '{chkdisk.name}' specified twice"
                )
            if (domdisk.empty or domdisk.readonly) and chkdisk.checkpoint != NO:
                raise _error(
                    ErrorNumber.CONFIG_UNSUPPORTED,
                    f"disk '{chkdisk.name}' is empty or readonly",
                )
            listed[domdisk.name] = dataclasses.replace(chkdisk, name=domdisk.name)
        return listed

    # ------------------------------------------------------------------ domain

    def set_domain(self, name: str, uuid: str, disks: list[DomainDisk]) -> None:
        """Record the domain as it is now (what a create stores with the checkpoint)."""
        self.domain = parse_domain_element(format_domain_xml(name, uuid, disks))

    def domain_disks(self) -> list[DomainDisk]:
        """The disks of the recorded ``<domain>``, to re-align a redefined checkpoint."""
        if self.domain is None:
            raise _error(ErrorNumber.INTERNAL_ERROR, "missing domain in checkpoint")
        return parse_domain_disks(self.domain)

    def domain_uuid(self) -> str | None:
        """The recorded domain's uuid, or None without ``<domain>`` or ``<uuid>``."""
        return None if self.domain is None else domain_uuid(self.domain)

    def check_uuid(self, vm_uuid: str) -> None:
        """A redefined checkpoint's ``<domain>`` must be the VM's (by uuid)."""
        if self.domain is None:
            return
        if _uuid_key(self.domain_uuid()) != _uuid_key(vm_uuid):
            raise _error(
                ErrorNumber.INVALID_ARG,
                f"definition for checkpoint {self.name} must use uuid {vm_uuid}",
            )

    def check_cycles(self, parents: Mapping[str, str | None]) -> None:
        """virDomainMomentCheckCycles: the parent must exist and not descend from us.

        ``parents`` maps every existing checkpoint name to its parent's name.
        """
        if self.parent_name is None:
            return
        if self.parent_name == self.name:
            raise _error(
                ErrorNumber.INVALID_ARG,
                f"cannot set moment {self.name} as its own parent",
                ErrorDomain.DOMAIN,
            )
        if self.parent_name not in parents:
            raise _error(
                ErrorNumber.INVALID_ARG,
                f"parent {self.parent_name} for moment {self.name} not found",
                ErrorDomain.DOMAIN,
            )
        _check_ancestors(self.name, self.parent_name, parents)

    def redefine_prep(self, vm_uuid: str, parents: Mapping[str, str | None]) -> None:
        """virDomainCheckpointRedefinePrep, minus the "current" bookkeeping.

        Cycles, then uuid; with ``<domain>`` the disks are aligned against it,
        without one only the bitmap names are defaulted.
        """
        self.check_cycles(parents)
        if self.domain is None:
            self.default_bitmap_names()
            return
        self.check_uuid(vm_uuid)
        self.align_disks(self.domain_disks())

    # ------------------------------------------------------------------ format

    def to_xml(self, flags: int = 0, internal: bool = False) -> str:
        """Format as virDomainCheckpointDefFormat, in libvirt's element order.

        Flags are CheckpointXMLFlags: SECURE keeps secrets of the embedded domain,
        NO_DOMAIN leaves it out, SIZE prints the disk sizes that were computed.
        ``internal`` adds the stored-only ``<active>``.
        """
        w = xmlutil.XMLWriter()
        w.open(_ROOT)
        w.text("name", self.name)
        w.text("description", self.description)
        if self.parent_name is not None:
            w.open("parent")
            w.text("name", self.parent_name)
            w.close("parent")
        if self.creation_time:
            w.text("creationTime", self.creation_time)
        self._format_disks(w, bool(flags & CheckpointXMLFlags.SIZE))
        if self.domain is not None and not flags & CheckpointXMLFlags.NO_DOMAIN:
            w.element(_domain_for_output(self.domain, bool(flags & CheckpointXMLFlags.SECURE)))
        if internal:
            w.text("active", 1 if self.active else 0)
        w.close(_ROOT)
        return w.getvalue()

    def _format_disks(self, w: xmlutil.XMLWriter, with_size: bool) -> None:
        if not self.disks:
            return
        w.open("disks")
        for disk in self.disks:
            size = disk.size if with_size and disk.bitmap is not None else None
            w.empty(
                "disk",
                [
                    ("name", disk.name),
                    ("checkpoint", disk.checkpoint),
                    ("bitmap", disk.bitmap),
                    ("size", size),
                ],
            )
        w.close("disks")


# ---------------------------------------------------------------------- helpers


@dataclass
class CheckpointHead:
    """What the tree needs of a stored checkpoint: its name, parent and creation time."""

    name: str | None
    parent_name: str | None
    creation_time: int


_HEAD_CHUNK = 4096
_HEAD_END = ("disks", "domain", "active")


def read_head(text: str | bytes) -> CheckpointHead:
    """The head of a checkpoint we stored, read without parsing the rest.

    :meth:`CheckpointDef.to_xml` writes name, description, parent and creationTime
    before the disks and the (possibly large) domain, so a domain's whole tree of
    checkpoints is known from the first few hundred bytes of each file. The full
    definition is parsed, and validated, only when one is used.
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    parser = etree.XMLPullParser(
        events=("start", "end"), resolve_entities=False, no_network=True, huge_tree=False
    )
    path: list[str] = []
    found: dict[str, str] = {}
    try:
        for offset in range(0, max(len(data), 1), _HEAD_CHUNK):
            parser.feed(data[offset : offset + _HEAD_CHUNK])
            for event, elem in parser.read_events():
                if event == "start":
                    path.append(str(elem.tag))
                    if len(path) == 1 and elem.tag != _ROOT:
                        raise _error(ErrorNumber.XML_ERROR, f"root element is <{elem.tag}>")
                    if len(path) == 2 and elem.tag in _HEAD_END:
                        return _head(found)
                    continue
                key = "/".join(path[1:])
                if key in ("name", "parent/name", "creationTime"):
                    found.setdefault(key, elem.text or "")
                path.pop()
        parser.close()
    except etree.XMLSyntaxError as exc:
        raise _error(ErrorNumber.XML_DETAIL, f"not well formed: {exc.msg}") from None
    return _head(found)


def _head(found: dict[str, str]) -> CheckpointHead:
    created = found.get("creationTime", "").strip()
    if not created.isdigit():
        raise _error(ErrorNumber.INTERNAL_ERROR, "missing creationTime from existing checkpoint")
    return CheckpointHead(found.get("name") or None, found.get("parent/name") or None, int(created))


def disk_by_name(disks: list[DomainDisk], name: str) -> DomainDisk | None:
    """virDomainDiskByName without ambiguity: a target, or an absolute source path.

    A path shared by two disks names neither of them.
    """
    if not name.startswith("/"):
        return next((d for d in disks if d.name == name), None)
    matches = [d for d in disks if d.path == name]
    return matches[0] if len(matches) == 1 else None


def _parse_document(text: str | bytes, internal: bool) -> tuple[etree._Element, bool | None]:
    """Parse and validate; in internal mode take ``<active>`` out first.

    ``<active>`` is status-only: the public schema refuses it, so the stored form
    is validated without it (libvirt's PARSE_INTERNAL did the equivalent).
    """
    doc = xmlutil.parse_document(text, root=_ROOT, schema=None, url=_URL, domain=_DOM)
    active = _take_active(doc) if internal else None
    validate_schema(doc)
    return doc, active


def validate_schema(doc: etree._Element) -> None:
    """The schema's judgement on everything but the embedded ``<domain>``, which the
    code checks (see the schema for why); a failure names its culprit."""
    domains = doc.findall("domain")
    if len(domains) > 1:
        raise _error(ErrorNumber.XML_INVALID_SCHEMA, "element <domain> given more than once")
    where = doc.index(domains[0]) if domains else -1
    for elem in domains:
        doc.remove(elem)
    try:
        xmlutil.validate(doc, _SCHEMA)
    except VirError as err:
        culprit = _schema_culprit(doc)
        if culprit is None:
            raise
        raise VirError(err.code, err.domain, f"{err.message}\n{culprit}") from None
    finally:
        if domains:
            doc.insert(where, domains[0])


def _take_active(doc: etree._Element) -> bool | None:
    elems = doc.findall("active")
    for elem in elems:
        doc.remove(elem)
    if not elems:
        return None
    value = (elems[0].text or "").strip()
    if len(elems) > 1 or value not in ("0", "1"):
        raise _error(ErrorNumber.XML_ERROR, f"invalid <active> in checkpoint: '{value}'")
    return value == "1"


def _xpath_string(doc: etree._Element, path: str) -> str | None:
    """virXPathString("string(./path)"): the text, or None when absent or empty."""
    value = doc.xpath(f"string(./{path})")
    return value or None


def _parse_disk(elem: etree._Element, internal: bool) -> CheckpointDisk:
    """virDomainCheckpointDiskDefParseXML: checkpoint defaults to bitmap."""
    disk = CheckpointDisk(
        name=elem.get("name"),
        checkpoint=elem.get("checkpoint") or BITMAP,
        bitmap=elem.get("bitmap"),
    )
    size = elem.get("size")
    if internal and size is not None:
        disk.size = int(size)
    return disk


def _domain_for_output(domain: etree._Element, secure: bool) -> etree._Element:
    """Without SECURE drop what libvirt hides: the graphics passwords."""
    if secure:
        return domain
    stripped = copy.deepcopy(domain)
    for graphics in stripped.iter("graphics"):
        graphics.attrib.pop("passwd", None)
    return stripped


def _uuid_key(value: str | None) -> str | None:
    """Compare uuids as libvirt does, by value: dashes and case do not matter."""
    return None if value is None else value.replace("-", "").lower()


def _check_ancestors(name: str, parent: str, parents: Mapping[str, str | None]) -> None:
    other = parent
    seen = {other}
    while parents.get(other) is not None:
        grandparent = parents[other]
        if grandparent == name:
            raise _error(
                ErrorNumber.INVALID_ARG,
                f"parent {other} would create cycle to {name}",
                ErrorDomain.DOMAIN,
            )
        if grandparent not in parents or grandparent in seen:
            break  # inconsistent metadata: libvirt only warns
        seen.add(grandparent)
        other = grandparent


# ------------------------------------------------------- naming the schema's culprit
#
# libxml2 reports most failures inside an <interleave> as "Extra element disks in
# interleave", which names neither the disk nor the attribute. These checks repeat
# the schema's rules in Python only to say which value was refused; the schema
# stays the judge (a document they find nothing in still fails with libxml2's text).

_NAME_RE = re.compile(r"[a-zA-Z0-9_\-][a-zA-Z0-9_\-.]*")
_TARGET_RE = re.compile(r"[a-zA-Z0-9_\-.]+|/.+")
_DIGITS_RE = re.compile(r"[0-9]+")
_DISK_ATTRS = {"name", "checkpoint", "bitmap", "size"}


def _schema_culprit(doc: etree._Element) -> str | None:
    seen: set[str] = set()
    for child in doc.iterchildren(tag=etree.Element):
        if child.tag in seen:
            return f"element <{child.tag}> given more than once"
        seen.add(child.tag)
        check = _CHILD_CHECKS.get(child.tag)
        if check is None:
            return f"unexpected element <{child.tag}> in <{_ROOT}>"
        problem = check(child)
        if problem:
            return problem
    return None


def _check_name(elem: etree._Element, where: str = "<name>") -> str | None:
    value = elem.text or ""
    if len(elem) or not _NAME_RE.fullmatch(value):
        return (
            f"invalid checkpoint name '{value}' in {where}: letters, digits, '_', '-' "
            "and '.' only, not starting with '.'"
        )
    return None


def _check_parent(elem: etree._Element) -> str | None:
    names = elem.findall("name")
    if len(names) != 1 or len(elem) != 1:
        return "<parent> must hold exactly one <name>"
    return _check_name(names[0], "<parent><name>")


def _check_creation_time(elem: etree._Element) -> str | None:
    value = elem.text or ""
    if not _DIGITS_RE.fullmatch(value.strip()):
        return f"invalid <creationTime> '{value}': not an unsigned number"
    return None


def _check_disks(elem: etree._Element) -> str | None:
    disks = list(elem.iterchildren(tag=etree.Element))
    if not disks:
        return "<disks> must hold at least one <disk>"
    for index, disk in enumerate(disks, 1):
        problem = _check_disk(disk, index)
        if problem:
            return problem
    return None


def _check_disk(disk: etree._Element, index: int) -> str | None:
    if disk.tag != "disk":
        return f"unexpected element <{disk.tag}> in <disks>"
    name = disk.get("name")
    if name is None:
        return f"<disk> number {index} in <disks> has no name"
    label = f"disk '{name}'"
    if not _TARGET_RE.fullmatch(name):
        return f"{label}: name is neither a target nor an absolute source path"
    extra = sorted(set(disk.attrib) - _DISK_ATTRS)
    if extra:
        return f"{label}: unexpected attribute '{extra[0]}'"
    kind = disk.get("checkpoint")
    if kind not in (None, BITMAP, NO):
        return f"{label}: checkpoint='{kind}' is neither 'bitmap' nor 'no'"
    if kind == NO and (disk.get("bitmap") is not None or disk.get("size") is not None):
        return f"{label}: checkpoint='no' takes no bitmap or size"
    size = disk.get("size")
    if size is not None and not _DIGITS_RE.fullmatch(size.strip()):
        return f"{label}: size='{size}' is not an unsigned number"
    if len(disk):
        return f"{label}: <disk> takes no child elements"
    return None


_CHILD_CHECKS = {
    "name": _check_name,
    "description": lambda elem: "<description> takes text only" if len(elem) else None,
    "creationTime": _check_creation_time,
    "parent": _check_parent,
    "disks": _check_disks,
    "domain": lambda elem: None,
}
