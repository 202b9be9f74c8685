"""Parsing with libvirt's error numbers, RELAX NG validation, and libvirt-style output.

libvirt writes XML with its own buffer code: two-space indentation, attributes in
single quotes, fixed element and attribute order. Users diff GetXMLDesc output
against libvirt's, so we write it the same way instead of using lxml's serializer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path

from lxml import etree

from ..errors import ErrorDomain, ErrorNumber, VirError

_PKG_DIR = Path(__file__).resolve().parent.parent

# Bounds on every document, checked before it is validated: libvirt's RPC caps a
# message at 4 MiB (VIR_NET_MESSAGE_STRING_MAX), and libxml2's RELAX NG validation
# is not linear in what it is given. Real backup and checkpoint documents,
# libvirt domain definitions included, are a few hundred elements.
MAX_XML_BYTES = 4 * 1024 * 1024
MAX_XML_ELEMENTS = 20000
MAX_XML_DEPTH = 64
# how much of a line an error message quotes
EXCERPT_CHARS = 60


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
    check_size(data, url, domain)
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, remove_comments=True, huge_tree=False
    )
    try:
        doc = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise syntax_error(exc, data, url, domain) from None
    check_shape(doc, url, domain)
    if doc.tag != root:
        raise VirError(
            ErrorNumber.XML_ERROR,
            ErrorDomain.XML,
            f"expecting root element of '{root}', not '{doc.tag}'",
        )
    if schema is not None:
        validate(doc, schema)
    return doc


def _too_big(url: str, domain: ErrorDomain, what: str) -> VirError:
    return VirError(ErrorNumber.XML_ERROR, domain, f"({url}): document refused: {what}")


def check_size(data: bytes, url: str, domain: ErrorDomain) -> None:
    """Bytes and markup, before parsing: a start tag is a '<' that is not a '</'."""
    if len(data) > MAX_XML_BYTES:
        raise _too_big(url, domain, f"{len(data)} bytes, more than {MAX_XML_BYTES}")
    markup = data.count(b"<") - data.count(b"</")
    if markup > MAX_XML_ELEMENTS:
        raise _too_big(url, domain, f"more than {MAX_XML_ELEMENTS} elements")


def check_shape(doc: etree._Element, url: str, domain: ErrorDomain) -> None:
    """Elements and nesting of a parsed document (comments are already gone)."""
    depth = count = 0
    for event, _elem in etree.iterwalk(doc, events=("start", "end")):
        if event == "end":
            depth -= 1
            continue
        depth += 1
        count += 1
        if depth > MAX_XML_DEPTH:
            raise _too_big(url, domain, f"elements nested more than {MAX_XML_DEPTH} deep")
        if count > MAX_XML_ELEMENTS:
            raise _too_big(url, domain, f"more than {MAX_XML_ELEMENTS} elements")


def excerpt(line: str, column: int = 0) -> str:
    """At most EXCERPT_CHARS of ``line`` around ``column``, control characters escaped.

    Error messages end up in logs and on terminals: a document's line is quoted
    only in part (it may be a secret file's first line, or 100 MB long).
    """
    start = max(0, min(column - EXCERPT_CHARS // 2, len(line) - EXCERPT_CHARS))
    part = line[start : start + EXCERPT_CHARS]
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in part)
    return ("..." if start else "") + shown + ("..." if start + EXCERPT_CHARS < len(line) else "")


def syntax_error(exc: etree.XMLSyntaxError, data: bytes, url: str, domain: ErrorDomain) -> VirError:
    """libvirt's "(url):line: message" and, if the text is XML at all, where."""
    line = exc.lineno or 0
    msg = (exc.msg or str(exc)).split(f", line {line}")[0]
    if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        # not XML at all (a wrong file given?): quote none of it
        return VirError(
            ErrorNumber.XML_DETAIL, domain, f"({url}):{line}: {msg}: not an XML document"
        )
    lines = data.split(b"\n", line)[:line]
    context = lines[line - 1].decode("utf-8", "replace") if 0 < line <= len(lines) else ""
    column = (exc.position[1] if exc.position else 0) or 0
    return VirError(
        ErrorNumber.XML_DETAIL, domain, f"({url}):{line}: {msg}\n{excerpt(context, column)}"
    )


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


_SPECIAL = re.compile("[&<>'\"]")


def escape(value: str) -> str:
    """Escape as libvirt's virBufferEscapeString does for attribute and text values."""
    if not _SPECIAL.search(value):
        return value
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

    def comment(self, text: str) -> None:
        """An XML comment (``--`` cannot appear in one)."""
        self._lines.append(f"{self._indent()}<!-- {text.replace('--', '- -')} -->")

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

        Linear and lean per element: an embedded domain may hold thousands.
        """
        declared = _declared if _declared is not None else {}
        tag = elem.tag
        if tag.startswith("{"):
            tag = _qualified(elem, tag)
        attrs: list[tuple[str, object | None]] = [
            (_qualified(elem, k) if k.startswith("{") else k, v) for k, v in elem.attrib.items()
        ]
        nsmap = elem.nsmap
        if nsmap:
            declared = dict(declared)
            for prefix, uri in nsmap.items():
                if declared.get(prefix) != uri:
                    attrs.append((f"xmlns:{prefix}" if prefix else "xmlns", uri))
                    declared[prefix] = uri
        children = [c for c in elem if isinstance(c.tag, str)] if len(elem) else []
        indent = "  " * self._depth
        head = f"{indent}<{tag}{self._attrs(attrs)}" if attrs else f"{indent}<{tag}"
        if not children:
            text = (elem.text or "").strip()
            if text:
                self._lines.append(f"{head}>{escape(text)}</{tag}>")
            else:
                self._lines.append(f"{head}/>")
            return
        self._lines.append(f"{head}>")
        self._depth += 1
        for child in children:
            self.element(child, declared)
        self._depth -= 1
        self._lines.append(f"{indent}</{tag}>")

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
