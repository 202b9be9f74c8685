"""The ``<domain>`` a checkpoint carries: written from our disks, read back later.

libvirt stores the whole inactive domain definition in every checkpoint and
re-aligns the checkpoint's disks against it on REDEFINE. pyvirtbackup has no
domain definition of its own, only the disks it discovered, so it writes the
smallest libvirt-style ``<domain>`` that holds them. Reading goes the other way
and accepts a full libvirt domain XML too (a user may redefine a checkpoint
dumped by libvirt): only ``<uuid>`` and ``<devices>/<disk>`` are looked at.
"""

from __future__ import annotations

import uuid as uuidlib

from lxml import etree

from ..errors import ErrorDomain, ErrorNumber, VirError
from .domain import DomainDisk
from .xmlutil import XMLWriter

# <source> attributes that name the medium, by storage type; any of them means
# "not empty" when reading.
_SOURCE_ATTR = {"file": "file", "block": "dev", "dir": "dir", "network": "name"}
_SOURCE_ATTRS = ("file", "dev", "dir", "name")

# libvirt's default when a <disk> has no <driver type> and format probing is off
_DEFAULT_FORMAT = "raw"


def format_domain_xml(name: str, uuid: str | None, disks: list[DomainDisk]) -> str:
    """A minimal ``<domain type='kvm'>`` holding ``disks`` in order (no uuid: no ``<uuid>``).

    An empty disk is written as a cdrom without ``<source>``: in libvirt only
    removable media can be empty. The element order inside ``<disk>`` is libvirt's
    (driver, source, target, readonly).
    """
    w = XMLWriter()
    w.open("domain", [("type", "kvm")])
    w.text("name", name)
    w.text("uuid", uuid)
    if disks:
        w.open("devices")
        for disk in disks:
            _format_disk(w, disk)
        w.close("devices")
    else:
        w.empty("devices")
    w.close("domain")
    return w.getvalue()


def _format_disk(w: XMLWriter, disk: DomainDisk) -> None:
    device = "cdrom" if disk.empty else "disk"
    w.open("disk", [("type", disk.type), ("device", device)])
    w.empty("driver", [("name", "qemu"), ("type", disk.format)])
    if not disk.empty and disk.path is not None:
        w.empty("source", [(_SOURCE_ATTR.get(disk.type, "file"), disk.path)])
    w.empty("target", [("dev", disk.name)])
    if disk.readonly:
        w.empty("readonly")
    w.close("disk")


def parse_domain_disks(elem: etree._Element) -> list[DomainDisk]:
    """The disks of a ``<domain>`` element, in document order.

    Only what checkpoint alignment needs is read: target dev (the name), source
    path, driver format, storage type, ``<readonly/>``, and whether a medium is
    present at all. A disk without ``<target dev>`` is refused, as libvirt's
    domain parser refuses it.
    """
    return [_parse_disk(d) for d in elem.iterfind("devices/disk")]


def _parse_disk(elem: etree._Element) -> DomainDisk:
    target = elem.find("target")
    name = target.get("dev") if target is not None else None
    if not name:
        raise VirError(
            ErrorNumber.XML_ERROR,
            ErrorDomain.DOMAIN,
            "missing target information for device in the checkpoint's <domain>",
        )
    path = _source_path(elem.find("source"))
    driver = elem.find("driver")
    fmt = driver.get("type") if driver is not None else None
    return DomainDisk(
        name=name,
        path=path,
        format=fmt or _DEFAULT_FORMAT,
        type=elem.get("type") or "file",
        readonly=elem.find("readonly") is not None,
        empty=path is None and not _has_pool_volume(elem.find("source")),
    )


def _source_path(source: etree._Element | None) -> str | None:
    if source is None:
        return None
    for attr in _SOURCE_ATTRS:
        value = source.get(attr)
        if value:
            return value
    return None


def _has_pool_volume(source: etree._Element | None) -> bool:
    """A ``<source pool volume>`` names a medium without giving its path."""
    return source is not None and bool(source.get("pool"))


def check_domain_element(elem: etree._Element) -> None:
    """What a checkpoint reads of its ``<domain>`` must be right; the rest is kept as
    given. In place of libvirt's domain schema (see schemas/domaincheckpoint.rng):
    one ``<uuid>`` at most, a real uuid; every ``<devices>/<disk>`` with a target.
    """
    uuids = elem.findall("uuid")
    if len(uuids) > 1:
        raise _invalid("more than one <uuid> in the checkpoint's <domain>")
    value = domain_uuid(elem)
    if value is not None:
        try:
            uuidlib.UUID(value)
        except ValueError:
            raise _invalid(f"invalid <uuid> '{value[:40]}' in the checkpoint's <domain>") from None
    parse_domain_disks(elem)


def _invalid(message: str) -> VirError:
    return VirError(ErrorNumber.XML_ERROR, ErrorDomain.DOMAIN, message)


def domain_uuid(elem: etree._Element) -> str | None:
    """The domain's ``<uuid>`` text, or None when it has none."""
    value = (elem.findtext("uuid") or "").strip()
    return value or None


def parse_domain_element(text: str) -> etree._Element:
    """Parse our own :func:`format_domain_xml` output back into an element."""
    return etree.fromstring(text.encode("utf-8"))
