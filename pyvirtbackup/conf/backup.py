"""``<domainbackup>``: parse, validate, fill in defaults and format, as libvirt does.

This is libvirt's backup_conf.c rewritten: the same XML accepted and refused, the
same error numbers, the same defaults (virDomainBackupAlignDisks) and the same
output (virDomainBackupDefFormat), so that what a user sees from
``domainBackupGetXMLDesc`` diffs clean against libvirt's.

Two forms exist. The public form is what users write and read; it is validated
against ``schemas/domainbackup.rng``. The internal (status) form is what the
driver saves while a job runs: it adds each disk's ``state=`` and store
``index=`` and a ``<privateData>`` with the TLS object aliases; like libvirt, it
is parsed without the schema and checked by the code alone.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from lxml import etree

from ..errors import ErrorDomain, ErrorNumber, VirError
from .domain import DomainDisk
from .xmlutil import XMLWriter, parse_document

__all__ = ["PVB_NS", "BackupDef", "BackupDisk", "BackupServer"]

# Our own extension of <domainbackup>, in a namespace of its own so that libvirt's
# documents stay valid for us and ours say plainly what is not libvirt's:
#   <target file='/b/vda.inc2.qcow2' pvb:backing='vda.inc1.qcow2'
#           pvb:backing-format='qcow2'/>
# names the previous backup as the new push target's backing file.
PVB_NS = "urn:pyvirtbackup:backup:1.0"
PVB_PREFIX = "pvb"

MODES = ("push", "pull")
# transports a <server> may name; rdma is parsed only to be refused
TRANSPORTS = ("tcp", "unix", "rdma", "fd")
BACKUP_MODES = ("full", "incremental")
DISK_STATES = ("running", "complete", "failed", "cancelling", "cancelled")
# the types a backup store may have; other storage types parse but are refused
STORE_TYPES = ("file", "block")
STORAGE_TYPES = ("file", "block", "dir", "network", "volume", "nvme", "vhostuser", "vdpa")
STORAGE_FORMATS = (
    "raw", "dir", "bochs", "cloop", "dmg", "iso", "vpc", "vdi", "fat", "vhd", "ploop",
    "luks", "cow", "qcow", "qcow2", "qed", "vmdk",
)  # fmt: skip
# storage types whose source is a local path: without one the disk has no media
_LOCAL_TYPES = ("file", "block", "dir")


# --------------------------------------------------------------------------- errors


def _xml_error(message: str, domain: ErrorDomain = ErrorDomain.DOMAIN) -> VirError:
    return VirError(ErrorNumber.XML_ERROR, domain, message)


def _unsupported(message: str) -> VirError:
    return VirError(ErrorNumber.CONFIG_UNSUPPORTED, ErrorDomain.DOMAIN, message)


# ----------------------------------------------------------------- attribute readers
# These mirror libvirt's virXMLProp* helpers (errors from VIR_FROM_XML). With the
# schema in force they cannot fail; they matter for the internal form.


def _prop_enum(
    node: etree._Element, name: str, values: tuple[str, ...], *, required: bool = False
) -> str | None:
    value = node.get(name)
    if value is None:
        if required:
            raise _xml_error(
                f"Missing required attribute '{name}' in element '{node.tag}'", ErrorDomain.XML
            )
        return None
    if value not in values:
        raise _xml_error(
            f"Invalid value for attribute '{name}' in element '{node.tag}': '{value}'. "
            f"Expected one of: {', '.join(values)}",
            ErrorDomain.XML,
        )
    return value


def _prop_yes_no(node: etree._Element, name: str) -> bool | None:
    value = _prop_enum(node, name, ("yes", "no"))
    return None if value is None else value == "yes"


def _prop_uint(node: etree._Element, name: str) -> int | None:
    value = node.get(name)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or int(value) > 0xFFFFFFFF:
        raise _xml_error(
            f"Invalid value for attribute '{name}' in element '{node.tag}': '{value}'. "
            "Expected non-negative integer value",
            ErrorDomain.XML,
        )
    return int(value)


# ------------------------------------------------------------------------ dataclasses


@dataclass
class BackupServer:
    """Where a pull backup's NBD server listens (``<server>``).

    ``tls`` is a tristate: None (not said, printed not at all), True, False.
    """

    transport: str = "tcp"
    name: str | None = None
    port: int | None = None
    socket: str | None = None
    tls: bool | None = None
    fdgroup: str | None = None

    @classmethod
    def from_element(cls, node: etree._Element) -> BackupServer:
        """Parse like virDomainStorageNetworkParseHost, then the backup-only checks."""
        transport = node.get("transport")
        if transport is not None and transport not in TRANSPORTS:
            raise _xml_error(f"unknown protocol transport type '{transport}'")
        server = cls(transport=transport or "tcp", socket=node.get("socket"))
        if server.transport == "unix" and server.socket is None:
            raise _xml_error("missing socket for unix transport")
        if server.transport != "unix" and server.socket is not None:
            raise _xml_error(f"transport '{server.transport}' does not support socket attribute")
        if server.transport == "fd":
            server.fdgroup = node.get("fdgroup")
            if server.fdgroup is None:
                raise _xml_error("missing fdgroup for fd transport")
        elif server.transport != "unix":
            server.name = node.get("name")
            if server.name is None:
                raise _xml_error("missing name for host")
            server.port = _prop_uint(node, "port")
        if server.transport == "rdma":
            raise _unsupported("transport rdma is not supported for <server>")
        if server.transport == "unix" and not server.socket.startswith("/"):
            raise _xml_error(f"backup socket path '{server.socket}' must be absolute")
        server.tls = _prop_yes_no(node, "tls")
        return server

    def write(self, w: XMLWriter) -> None:
        """Attributes in libvirt's order: transport, tls, name, port, socket (fdgroup)."""
        tls = None if self.tls is None else ("yes" if self.tls else "no")
        w.empty(
            "server",
            [
                ("transport", self.transport),
                ("tls", tls),
                ("name", self.name),
                ("port", self.port or None),
                ("socket", self.socket),
                ("fdgroup", self.fdgroup),
            ],
        )


@dataclass
class BackupDisk:
    """One ``<disk>`` of a backup and its store (push ``<target>``, pull ``<scratch>``).

    ``format`` is the store's ``<driver type>``; ``path`` its ``file=`` or ``dev=``;
    ``encryption`` and ``seclabels`` are the elements as given, written back in
    libvirt's normalised form. ``index`` (the store's storage id, 0 = none) is
    printed but parsed only from the internal form, as is ``state``.

    ``backing``/``backing_format`` are our extension (``pvb:backing`` on a push
    ``<target>``): the backing file recorded in the new target's header, so that a
    chain of incremental backups opens as it is. A relative name is relative to
    the target's directory, as in any qcow2 header, and keeps the chain movable.
    """

    name: str
    backup: bool = True
    backupmode: str | None = None
    incremental: str | None = None
    exportname: str | None = None
    exportbitmap: str | None = None
    type: str = "file"
    format: str | None = None
    path: str | None = None
    encryption: etree._Element | None = None
    seclabels: list[etree._Element] = field(default_factory=list)
    index: int = 0
    state: str | None = None
    backing: str | None = None
    backing_format: str | None = None
    fleecing: str | None = None  # pvb:fleecing on a push disk: a path, or "no"

    @classmethod
    def from_element(cls, node: etree._Element, *, push: bool, internal: bool) -> BackupDisk:
        """Parse like virDomainBackupDiskDefParseXML: backup='no' reads nothing else."""
        name = node.get("name")
        if name is None:
            raise _xml_error("missing name from disk backup element")
        disk = cls(name=name, backup=_prop_yes_no(node, "backup") is not False)
        if not disk.backup:
            return disk
        if not push:
            disk.exportname = node.get("exportname")
            disk.exportbitmap = node.get("exportbitmap")
        disk.backupmode = _prop_enum(node, "backupmode", BACKUP_MODES)
        disk.incremental = node.get("incremental")
        if internal:
            disk.state = _prop_enum(node, "state", DISK_STATES, required=True)
        disk._parse_store_base(node, internal)
        if push:
            disk.fleecing = node.get(f"{{{PVB_NS}}}fleecing")
        store = node.find("target" if push else "scratch")
        if store is not None:
            disk._parse_store(store)
            if push:
                disk._parse_backing(store)
        return disk

    def _parse_backing(self, store: etree._Element) -> None:
        """``pvb:backing`` (non-empty) and ``pvb:backing-format`` (only with it)."""
        self.backing = store.get(f"{{{PVB_NS}}}backing")
        fmt = store.get(f"{{{PVB_NS}}}backing-format")
        if self.backing == "":
            raise _xml_error(f"empty {PVB_PREFIX}:backing for disk '{self.name}'")
        if fmt is not None:
            if self.backing is None:
                raise _xml_error(
                    f"{PVB_PREFIX}:backing-format without {PVB_PREFIX}:backing "
                    f"for disk '{self.name}'"
                )
            if fmt not in STORAGE_FORMATS:
                raise _unsupported(f"unknown storage source format '{fmt}'")
        self.backing_format = fmt

    def _parse_store_base(self, node: etree._Element, internal: bool) -> None:
        """Type, format and index of the store (virDomainStorageSourceParseBase)."""
        type_ = node.get("type")
        if type_ is not None and type_ not in STORAGE_TYPES:
            raise _unsupported(f"unknown storage source type '{type_}'")
        driver = node.find("driver")
        fmt = driver.get("type") if driver is not None else None
        if fmt and fmt not in STORAGE_FORMATS:
            raise _unsupported(f"unknown storage source format '{fmt}'")
        self.format = fmt or None
        index = node.get("index") if internal else None
        if index is not None:
            if not index.isascii() or not index.isdigit() or int(index) > 0xFFFFFFFF:
                raise _unsupported(f"invalid storage source index '{index}'")
            self.index = int(index)
        self.type = type_ or "file"
        if self.type not in STORE_TYPES:
            raise _xml_error(f"unsupported disk backup type '{type_}'")

    def _parse_store(self, store: etree._Element) -> None:
        self.path = store.get("file" if self.type == "file" else "dev")
        if self.path is not None and not self.path.startswith("/"):
            # a relative path means one thing to us and another to QEMU (each its
            # own working directory), and 'C:\\backup.qcow2' is relative here
            raise _xml_error(
                f"backup {store.tag} path '{self.path}' of disk '{self.name}' is not absolute"
            )
        self.seclabels = store.findall("seclabel")
        for label in self.seclabels:
            if label.get("relabel") == "no" and _seclabel_text(label) is not None:
                raise _xml_error(
                    "Cannot specify a label if relabelling is turned off. "
                    f"model={label.get('model') or ''}"
                )
        self.encryption = store.find("encryption")

    def write(self, w: XMLWriter, *, push: bool, internal: bool) -> None:
        """Write the ``<disk>`` element in virDomainBackupDiskDefFormat's order."""
        attrs: list[tuple[str, object | None]] = [
            ("name", self.name),
            ("backup", "yes" if self.backup else "no"),
        ]
        if internal:
            attrs.append(("state", self.state))
        if not self.backup:
            w.empty("disk", attrs)
            return
        attrs += [
            ("type", self.type),
            ("backupmode", self.backupmode),
            ("incremental", self.incremental),
            ("exportname", self.exportname),
            ("exportbitmap", self.exportbitmap),
            ("index", self.index or None),
        ]
        if push:
            attrs.append((f"{PVB_PREFIX}:fleecing", self.fleecing))
        store_attrs: list[tuple[str, object | None]] = [
            ("file" if self.type == "file" else "dev", self.path)
        ]
        if push:
            store_attrs += [
                (f"{PVB_PREFIX}:backing", self.backing),
                (f"{PVB_PREFIX}:backing-format", self.backing_format),
            ]
        has_store = (
            self.path is not None
            or bool(self.seclabels)
            or self.encryption is not None
            or (push and self.backing is not None)
        )
        if self.format is None and not has_store:
            w.empty("disk", attrs)
            return
        w.open("disk", attrs)
        if self.format is not None:
            w.empty("driver", [("type", self.format)])
        if has_store:
            _write_store(w, "target" if push else "scratch", store_attrs, self)
        w.close("disk")


@dataclass
class BackupDef:
    """A backup job's definition: what to back up, where, and from which checkpoint."""

    mode: str = "push"
    incremental: str | None = None
    server: BackupServer | None = None
    disks: list[BackupDisk] = field(default_factory=list)
    tls_alias: str | None = None
    tls_secret_alias: str | None = None
    # a pull server on TCP without TLS that the driver was told to allow: its
    # definition says, in a comment beside <server>, who can read the disks
    plain_tcp: bool = False

    # ----------------------------------------------------------------- helpers

    def exposure(self) -> str:
        """What a plain-TCP pull server exposes, in words."""
        server = self.server
        assert server is not None
        where = f"{server.name}:{server.port}" if server.port else str(server.name)
        disks = ", ".join(d.name for d in self.selected_disks()) or "the disks"
        return (
            f"NBD over plain TCP at {where}, without TLS: every local user, and every host "
            f"that can reach that address, can read {disks} while this backup runs"
        )

    @property
    def is_pull(self) -> bool:
        return self.mode == "pull"

    @property
    def store_element(self) -> str:
        """Name of the per-disk store element: ``target`` (push) or ``scratch`` (pull)."""
        return "scratch" if self.is_pull else "target"

    def selected_disks(self) -> list[BackupDisk]:
        """Disks that will be backed up (backup='yes'); the driver refuses an empty list."""
        return [d for d in self.disks if d.backup]

    # ------------------------------------------------------------------- parse

    @classmethod
    def from_xml(cls, text: str | bytes, internal: bool = False) -> BackupDef:
        """Parse a ``<domainbackup>`` document (virDomainBackupDefParseString).

        The public form is validated against the schema first (errors 92, VIR_FROM_XML);
        the internal form skips it, as libvirt's PARSE_INTERNAL does, and relies on the
        checks below.
        """
        root = parse_document(
            text,
            root="domainbackup",
            schema=None if internal else "domainbackup.rng",
            url="domain_backup",
            domain=ErrorDomain.DOMAIN,
        )
        return cls.from_element(root, internal=internal)

    @classmethod
    def from_element(cls, root: etree._Element, *, internal: bool = False) -> BackupDef:
        """Build the definition from an already parsed (and validated) root element."""
        mode = root.get("mode")
        if mode is not None and mode not in MODES:
            raise _unsupported(f"unknown backup mode '{mode}'")
        backup = cls(mode=mode or "push")
        backup.incremental = root.findtext("incremental") or None
        server = root.find("server")
        if server is not None:
            if not backup.is_pull:
                raise _unsupported("use of <server> requires pull mode backup")
            backup.server = BackupServer.from_element(server)
        disks = root.find("disks")
        nodes = [n for n in disks if isinstance(n.tag, str)] if disks is not None else []
        backup.disks = [
            BackupDisk.from_element(n, push=not backup.is_pull, internal=internal) for n in nodes
        ]
        if internal:
            backup._parse_private(root)
        return backup

    def _parse_private(self, root: etree._Element) -> None:
        """TLS object aliases from ``<privateData>`` (status XML only)."""
        self.plain_tcp = root.find("privateData/plainTCP") is not None
        objects = root.find("privateData/objects")
        if objects is None:
            return
        for secret in objects.findall("secret"):
            if secret.get("type") == "tlskey":
                self.tls_secret_alias = secret.get("alias") or None
                break
        tls = objects.find("TLSx509")
        if tls is not None:
            self.tls_alias = tls.get("alias") or None

    # ------------------------------------------------------------------- align

    def align_disks(self, disks: list[DomainDisk], suffix: str | None = None) -> None:
        """Check the listed disks against the domain's and fill in libvirt's defaults.

        virDomainBackupAlignDisks: every listed disk must exist, once; a listed disk
        without a store path gets ``<source path>.<suffix>`` (file disks only); the
        domain's other disks are appended in domain order, backed up only when no
        ``<disks>`` was given (and then only writable disks with media); finally each
        disk's backupmode is settled. ``suffix`` defaults to the unix time, as the
        driver uses when no checkpoint is created with the backup.
        """
        if suffix is None:
            suffix = str(int(time.time()))
        if not disks:
            raise _unsupported("domain must have at least one disk to perform backup")
        listed = self._check_listed(disks, suffix)
        backup_all = not self.disks
        for domdisk in disks:
            if domdisk.name in listed:
                continue
            disk = BackupDisk(name=domdisk.name, backup=False)
            if backup_all and not _is_empty(domdisk) and not domdisk.readonly:
                disk.backup = True
                _assign_store(disk, domdisk, suffix)
            self.disks.append(disk)
        self._settle_backup_modes()

    def _check_listed(self, disks: list[DomainDisk], suffix: str) -> set[str]:
        by_name: dict[str, DomainDisk] = {}
        for domdisk in disks:
            by_name.setdefault(domdisk.name, domdisk)
        seen: set[str] = set()
        for disk in self.disks:
            domdisk = by_name.get(disk.name)
            if domdisk is None:
                raise _unsupported(f"no disk named '{disk.name}'")
            if disk.name in seen:
                raise _unsupported(f"disk '{disk.name}' specified twice")
            seen.add(disk.name)
            if (
                disk.backupmode == "incremental"
                and disk.incremental is None
                and self.incremental is None
            ):
                raise _unsupported(
                    f"'incremental' backup mode of disk '{disk.name}' requires setting "
                    "'incremental' field for disk or backup"
                )
            if disk.backup:
                _assign_store(disk, domdisk, suffix)
        return seen

    def _settle_backup_modes(self) -> None:
        """Default backupmode from the checkpoint names; incremental disks inherit the
        top-level checkpoint. Done for every disk, as libvirt does (only backup='yes'
        disks print it)."""
        for disk in self.disks:
            if disk.backupmode is None:
                has_checkpoint = self.incremental is not None or disk.incremental is not None
                disk.backupmode = "incremental" if has_checkpoint else "full"
            if disk.backupmode == "incremental" and disk.incremental is None:
                disk.incremental = self.incremental

    # ------------------------------------------------------------------ format

    def to_xml(self, internal: bool = False) -> str:
        """Format as virDomainBackupDefFormat does; ``internal`` adds the status parts."""
        w = XMLWriter()
        attrs = [("mode", self.mode)]
        if not self.is_pull and any(d.backup and (d.backing or d.fleecing) for d in self.disks):
            attrs.append((f"xmlns:{PVB_PREFIX}", PVB_NS))
        private = internal and (
            self.tls_alias is not None or self.tls_secret_alias is not None or self.plain_tcp
        )
        if self.incremental is None and self.server is None and not self.disks and not private:
            w.empty("domainbackup", attrs)
            return w.getvalue()
        w.open("domainbackup", attrs)
        w.text("incremental", self.incremental)
        if self.server is not None:
            if self.plain_tcp and not self.server.tls:
                w.comment(self.exposure())
            self.server.write(w)
        if self.disks:
            w.open("disks")
            for disk in self.disks:
                disk.write(w, push=not self.is_pull, internal=internal)
            w.close("disks")
        if private:
            self._write_private(w)
        w.close("domainbackup")
        return w.getvalue()

    def _write_private(self, w: XMLWriter) -> None:
        w.open("privateData")
        if self.tls_secret_alias is not None or self.tls_alias is not None:
            w.open("objects")
            if self.tls_secret_alias is not None:
                w.empty("secret", [("type", "tlskey"), ("alias", self.tls_secret_alias)])
            if self.tls_alias is not None:
                w.empty("TLSx509", [("alias", self.tls_alias)])
            w.close("objects")
        if self.plain_tcp:
            w.empty("plainTCP")
        w.close("privateData")


# ------------------------------------------------------------------------ align helpers


def _is_empty(domdisk: DomainDisk) -> bool:
    """virStorageSourceIsEmpty: no medium, or a local disk without a path."""
    if domdisk.empty or domdisk.type == "none":
        return True
    return domdisk.type in _LOCAL_TYPES and not domdisk.path


def _assign_store(disk: BackupDisk, domdisk: DomainDisk, suffix: str) -> None:
    """virDomainBackupDefAssignStore: generate ``<source>.<suffix>`` when no path given.

    A name can be generated only next to a local file; the store then becomes a
    file whatever type the user gave.
    """
    if _is_empty(domdisk):
        raise _unsupported(f"disk '{disk.name}' has no media")
    if disk.path is not None:
        return
    if domdisk.type != "file":
        raise _unsupported(f"refusing to generate file name for disk '{disk.name}'")
    if not (domdisk.path or "").startswith("/"):
        raise _unsupported(
            f"refusing to generate file name for disk '{disk.name}': its source path "
            f"'{domdisk.path}' is relative (to QEMU's working directory); give the disk "
            "a store with an absolute path"
        )
    disk.type = "file"
    disk.path = f"{domdisk.path}.{suffix}"


# ----------------------------------------------------------------------- store output


def _write_store(
    w: XMLWriter, tag: str, attrs: list[tuple[str, object | None]], disk: BackupDisk
) -> None:
    """``<target>``/``<scratch>``: path attribute, then seclabels, then encryption."""
    if not disk.seclabels and disk.encryption is None:
        w.empty(tag, attrs)
        return
    w.open(tag, attrs)
    for label in disk.seclabels:
        _write_seclabel(w, label)
    if disk.encryption is not None:
        _write_encryption(w, disk.encryption)
    w.close(tag)


def _seclabel_text(label: etree._Element) -> str | None:
    """The first ``<label>``'s text; an empty label counts as none, as in libvirt."""
    text = label.findtext("label")
    return text or None


def _write_seclabel(w: XMLWriter, label: etree._Element) -> None:
    """libvirt's device seclabel form: model, then labelskip='yes' or relabel (default
    yes, always printed), then at most one ``<label>``."""
    attrs: list[tuple[str, object | None]] = [("model", label.get("model"))]
    if label.get("labelskip") == "yes":
        attrs.append(("labelskip", "yes"))
    else:
        attrs.append(("relabel", "no" if label.get("relabel") == "no" else "yes"))
    text = _seclabel_text(label)
    if text is None:
        w.empty("seclabel", attrs)
        return
    w.open("seclabel", attrs)
    w.text("label", text)
    w.close("seclabel")


def _canonical_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


def _write_encryption(w: XMLWriter, enc: etree._Element) -> None:
    """libvirt's encryption form: secrets first (uuid in dashed lower case, else usage),
    then cipher and, with it, ivgen."""
    w.open("encryption", [("format", enc.get("format")), ("engine", enc.get("engine"))])
    for secret in enc.findall("secret"):
        ref = secret.get("uuid")
        attrs = [("type", secret.get("type"))]
        if ref is not None:
            attrs.append(("uuid", _canonical_uuid(ref)))
        else:
            attrs.append(("usage", secret.get("usage")))
        w.empty("secret", attrs)
    cipher = enc.find("cipher")
    if cipher is not None:
        size = cipher.get("size")
        if size is not None and size.isascii() and size.isdigit():
            size = str(int(size))
        w.empty(
            "cipher",
            [
                ("name", cipher.get("name")),
                ("size", size),
                ("mode", cipher.get("mode")),
                ("hash", cipher.get("hash")),
            ],
        )
        ivgen = enc.find("ivgen")
        if ivgen is not None:
            w.empty("ivgen", [("name", ivgen.get("name")), ("hash", ivgen.get("hash"))])
    w.close("encryption")
