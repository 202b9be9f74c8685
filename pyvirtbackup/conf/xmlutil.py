"""Parsing with libvirt's error numbers, RELAX NG validation, and libvirt-style output.

libvirt writes XML with its own buffer code: two-space indentation, attributes in
single quotes, fixed element and attribute order. Users diff GetXMLDesc output
against libvirt's, so we write it the same way instead of using lxml's serializer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

from lxml import etree

from ..errors import ErrorDomain, ErrorNumber, VirError

_PKG_DIR = Path(__file__).resolve().parent.parent


def schema_dir() -> Path:
    """Where the RELAX NG schemas are: inside the installed package, or the source tree."""
    for candidate in (_PKG_DIR / "schemas", _PKG_DIR.parent / "schemas"):
        if any(candidate.glob("*.rng")):
            return candidate
    raise VirError(
        ErrorNumber.INTERNAL_ERROR,
        ErrorDomain.XML,
        f"RELAX NG schemas not found next to {_PKG_DIR}",
    )


@functools.cache
def _relaxng(name: str) -> etree.RelaxNG:
    path = schema_dir() / name
    return etree.RelaxNG(etree.parse(str(path)))


def parse_document(
    text: str | bytes,
    *,
    root: str,
    schema: str | None,
    url: str,
    domain: ErrorDomain,
) -> etree._Element:
    """Parse ``text``, check its root element and validate it against ``schema``.

    Error numbers follow libvirt 9.0 as run: not well formed -> XML_DETAIL in the
    document's own error domain; wrong root -> XML_ERROR; schema -> XML_INVALID_SCHEMA
    (both from VIR_FROM_XML).
    """
    if isinstance(text, str):
        data = text.encode("utf-8")
    elif isinstance(text, bytes):
        data = text
    else:
        raise VirError(
            ErrorNumber.INVALID_ARG, domain, f"XML must be str or bytes, not {type(text).__name__}"
        )
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, remove_comments=True, huge_tree=False
    )
    try:
        doc = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        line = exc.lineno or 0
        msg = (exc.msg or str(exc)).split(f", line {line}")[0]
        src_lines = data.decode("utf-8", "replace").splitlines()
        context = src_lines[line - 1] if 0 < line <= len(src_lines) else ""
        raise VirError(
            ErrorNumber.XML_DETAIL, domain, f"({url}):{line}: {msg}\n{context}"
        ) from None
    if doc.tag != root:
        raise VirError(
            ErrorNumber.XML_ERROR,
            ErrorDomain.XML,
            f"expecting root element of '{root}', not '{doc.tag}'",
        )
    if schema is not None:
        validate(doc, schema)
    return doc


def validate(doc: etree._Element, schema: str) -> None:
    rng = _relaxng(schema)
    if not rng.validate(doc):
        lines = [f"{e.line}: {e.message}" for e in rng.error_log]
        raise VirError(
            ErrorNumber.XML_INVALID_SCHEMA,
            ErrorDomain.XML,
            "XML document failed to validate against schema: Unable to validate doc "
            f"against {schema}\n" + "\n".join(lines),
        )


def escape(value: str) -> str:
    """Escape as libvirt's virBufferEscapeString does for attribute and text values."""
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
    )


Attrs = Iterable[tuple[str, object | None]]


class XMLWriter:
    """A small virBuffer: elements with two-space indent, attributes in given order.

    Attributes whose value is None are left out, so callers write libvirt's
    "print only when set" rules inline.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._depth = 0

    def _indent(self) -> str:
        return "  " * self._depth

    @staticmethod
    def _attrs(attrs: Attrs) -> str:
        return "".join(f" {k}='{escape(str(v))}'" for k, v in attrs if v is not None)

    def open(self, tag: str, attrs: Attrs = ()) -> None:
        self._lines.append(f"{self._indent()}<{tag}{self._attrs(attrs)}>")
        self._depth += 1

    def close(self, tag: str) -> None:
        self._depth -= 1
        self._lines.append(f"{self._indent()}</{tag}>")

    def empty(self, tag: str, attrs: Attrs = ()) -> None:
        self._lines.append(f"{self._indent()}<{tag}{self._attrs(attrs)}/>")

    def text(self, tag: str, value: object | None, attrs: Attrs = ()) -> None:
        if value is None:
            return
        self._lines.append(
            f"{self._indent()}<{tag}{self._attrs(attrs)}>{escape(str(value))}</{tag}>"
        )

    def element(self, elem: etree._Element, _declared: dict[str | None, str] | None = None) -> None:
        """Write a kept subtree (seclabel, encryption, an embedded domain) re-indented.

        Namespaced content (an embedded domain's ``<metadata>`` or
        ``<qemu:commandline>``) keeps its prefixes; each namespace is declared on
        the first written element that has it in scope, after the attributes, as
        libvirt writes ``<domain type='kvm' xmlns:qemu='...'>``.
        """
        declared = dict(_declared or {})
        tag = _qualified(elem, elem.tag)
        attrs: list[tuple[str, object | None]] = [
            (_qualified(elem, k), v) for k, v in elem.attrib.items()
        ]
        for prefix, uri in elem.nsmap.items():
            if declared.get(prefix) != uri:
                attrs.append((f"xmlns:{prefix}" if prefix else "xmlns", uri))
                declared[prefix] = uri
        children = [c for c in elem if isinstance(c.tag, str)]
        text = (elem.text or "").strip()
        if not children:
            if text:
                self.text(tag, text, attrs)
            else:
                self.empty(tag, attrs)
            return
        self.open(tag, attrs)
        for child in children:
            self.element(child, declared)
        self.close(tag)

    def getvalue(self) -> str:
        return "\n".join(self._lines) + "\n"


_XML_NS = "http://www.w3.org/XML/1998/namespace"


def _qualified(elem: etree._Element, name: str) -> str:
    """``{uri}local`` as ``prefix:local`` using the prefixes in scope at ``elem``."""
    if not name.startswith("{"):
        return name
    uri, local = name[1:].split("}", 1)
    if uri == _XML_NS:
        return f"xml:{local}"
    for prefix, ns in elem.nsmap.items():
        if ns == uri and prefix:
            return f"{prefix}:{local}"
    return local
