"""XDR (RFC 4506) as data: each wire type is an object, encoding and decoding are generic.

libvirt's protocol is declared in ``.x`` files that rpcgen turns into C. Here the
declarations are Python values (``Struct``, ``Array``, ``Optional``...) built once in
``rpc.protocol``, and one pair of functions walks them. Every length read from the
wire is checked against its declared maximum and against the bytes actually left
before anything is allocated, so an oversized or truncated packet costs nothing but
an ``XdrError``.

Values: integers are ``int``, ``bool`` is ``bool``, strings are ``str`` (UTF-8 on
the wire), opaque data is ``bytes``, a struct is a ``dict`` in field order, an
optional (XDR's ``*``) is ``None`` or the value, an array a ``list``, a union a
``(discriminant, value)`` pair.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")


class XdrError(ValueError):
    """Data that does not match its declaration (or a value that cannot be encoded)."""


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


class XdrType:
    """A wire type: ``pack`` appends a value's encoding, ``unpack`` reads one back."""

    name = "?"

    def pack(self, value: Any, out: bytearray) -> None:
        raise NotImplementedError

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<xdr {self.name}>"


def _need(buf: memoryview, pos: int, n: int, what: str) -> None:
    if n < 0 or pos + n > len(buf):
        raise XdrError(f"{what}: needs {n} bytes at offset {pos}, {len(buf) - pos} left")


class _Fixed(XdrType):
    """A fixed-size number: int, unsigned int, hyper, unsigned hyper, double."""

    def __init__(self, name: str, codec: struct.Struct, low: float, high: float) -> None:
        self.name, self.codec, self.low, self.high = name, codec, low, high

    def pack(self, value: Any, out: bytearray) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise XdrError(f"{self.name}: {value!r} is not a number")
        if isinstance(value, float) and self.codec is not _F64:
            raise XdrError(f"{self.name}: {value!r} is not an integer")
        if not self.low <= value <= self.high and not (self.codec is _F64 and math.isnan(value)):
            raise XdrError(f"{self.name}: {value!r} out of range")
        out += self.codec.pack(value)

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        size = self.codec.size
        _need(buf, pos, size, self.name)
        return self.codec.unpack_from(buf, pos)[0], pos + size


INT = _Fixed("int", _I32, -(2**31), 2**31 - 1)
UINT = _Fixed("unsigned int", _U32, 0, 2**32 - 1)
HYPER = _Fixed("hyper", _I64, -(2**63), 2**63 - 1)
UHYPER = _Fixed("unsigned hyper", _U64, 0, 2**64 - 1)
DOUBLE = _Fixed("double", _F64, -math.inf, math.inf)


class _Bool(XdrType):
    name = "bool"

    def pack(self, value: Any, out: bytearray) -> None:
        out += _I32.pack(1 if value else 0)

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        value, pos = INT.unpack(buf, pos)
        if value not in (0, 1):
            raise XdrError(f"bool: {value} is neither 0 nor 1")
        return bool(value), pos


BOOL = _Bool()


class _Void(XdrType):
    name = "void"

    def pack(self, value: Any, out: bytearray) -> None:
        if value is not None:
            raise XdrError(f"void: got {value!r}")

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        return None, pos


VOID = _Void()


class Opaque(XdrType):
    """``opaque name<max>``: a counted byte string."""

    def __init__(self, maximum: int, name: str = "opaque") -> None:
        self.maximum, self.name = maximum, name

    def pack(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise XdrError(f"{self.name}: {type(value).__name__} is not bytes")
        data = bytes(value)
        if len(data) > self.maximum:
            raise XdrError(f"{self.name}: {len(data)} bytes, at most {self.maximum}")
        out += _U32.pack(len(data)) + data + b"\0" * _pad(len(data))

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        length, pos = UINT.unpack(buf, pos)
        if length > self.maximum:
            raise XdrError(f"{self.name}: length {length} exceeds its limit {self.maximum}")
        _need(buf, pos, length + _pad(length), self.name)
        return bytes(buf[pos : pos + length]), pos + length + _pad(length)


class FixedOpaque(XdrType):
    """``opaque name[size]``."""

    def __init__(self, size: int, name: str = "fixed opaque") -> None:
        self.size, self.name = size, name

    def pack(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, bytes | bytearray) or len(value) != self.size:
            raise XdrError(f"{self.name}: wants exactly {self.size} bytes, got {value!r}")
        out += bytes(value) + b"\0" * _pad(self.size)

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        total = self.size + _pad(self.size)
        _need(buf, pos, total, self.name)
        return bytes(buf[pos : pos + self.size]), pos + total


class String(Opaque):
    """``string name<max>``: UTF-8 text. A NUL inside is refused, as C would cut there."""

    def __init__(self, maximum: int, name: str = "string") -> None:
        super().__init__(maximum, name)

    def pack(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, str):
            raise XdrError(f"{self.name}: {value!r} is not a string")
        super().pack(value.encode("utf-8", "surrogateescape"), out)

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        raw, pos = super().unpack(buf, pos)
        if b"\0" in raw:
            raise XdrError(f"{self.name}: contains a NUL byte")
        try:
            return raw.decode("utf-8"), pos
        except UnicodeDecodeError as exc:
            raise XdrError(f"{self.name}: not UTF-8 ({exc.reason})") from None


class Optional(XdrType):
    """``type *name``: a presence flag, then the value if present."""

    def __init__(self, inner: XdrType) -> None:
        self.inner = inner
        self.name = f"{inner.name}*"

    def pack(self, value: Any, out: bytearray) -> None:
        if value is None:
            out += _U32.pack(0)
        else:
            out += _U32.pack(1)
            self.inner.pack(value, out)

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        present, pos = BOOL.unpack(buf, pos)
        if not present:
            return None, pos
        return self.inner.unpack(buf, pos)


class Array(XdrType):
    """``type name<max>``: a counted list."""

    def __init__(self, inner: XdrType, maximum: int) -> None:
        self.inner, self.maximum = inner, maximum
        self.name = f"{inner.name}<{maximum}>"

    def pack(self, value: Any, out: bytearray) -> None:
        items = list(value)
        if len(items) > self.maximum:
            raise XdrError(f"{self.name}: {len(items)} items, at most {self.maximum}")
        out += _U32.pack(len(items))
        for item in items:
            self.inner.pack(item, out)

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        count, pos = UINT.unpack(buf, pos)
        if count > self.maximum:
            raise XdrError(f"{self.name}: count {count} exceeds its limit {self.maximum}")
        # every XDR item takes at least 4 bytes: a count the packet cannot hold is a lie
        _need(buf, pos, 4 * count, self.name)
        items = []
        for _ in range(count):
            item, pos = self.inner.unpack(buf, pos)
            items.append(item)
        return items, pos


class Struct(XdrType):
    """``struct name { ... }``: fields in order; the value is a dict."""

    def __init__(self, name: str, fields: Iterable[tuple[str, XdrType]]) -> None:
        self.name = name
        self.fields = tuple(fields)

    def pack(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, dict):
            raise XdrError(f"{self.name}: wants a dict, got {type(value).__name__}")
        for field, ftype in self.fields:
            if field not in value:
                raise XdrError(f"{self.name}: field '{field}' missing")
            try:
                ftype.pack(value[field], out)
            except XdrError as exc:
                raise XdrError(f"{self.name}.{field}: {exc}") from None

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        value = {}
        for field, ftype in self.fields:
            try:
                value[field], pos = ftype.unpack(buf, pos)
            except XdrError as exc:
                raise XdrError(f"{self.name}.{field}: {exc}") from None
        return value, pos


class Union(XdrType):
    """``union name switch (int d) { case ...: }``: the value is (discriminant, arm value)."""

    def __init__(self, name: str, arms: dict[int, XdrType]) -> None:
        self.name, self.arms = name, arms

    def pack(self, value: Any, out: bytearray) -> None:
        disc, arm_value = value
        arm = self.arms.get(disc)
        if arm is None:
            raise XdrError(f"{self.name}: no arm for discriminant {disc!r}")
        INT.pack(disc, out)
        arm.pack(arm_value, out)

    def unpack(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        disc, pos = INT.unpack(buf, pos)
        arm = self.arms.get(disc)
        if arm is None:
            raise XdrError(f"{self.name}: unknown discriminant {disc}")
        arm_value, pos = arm.unpack(buf, pos)
        return (disc, arm_value), pos


def struct_of(name: str, /, **fields: XdrType) -> Struct:
    """``struct_of("x", a=INT, b=STRING)``: keyword order is field order."""
    return Struct(name, fields.items())


def encode(xtype: XdrType, value: Any) -> bytes:
    out = bytearray()
    xtype.pack(value, out)
    return bytes(out)


def decode(xtype: XdrType, data: bytes | memoryview, pos: int = 0) -> tuple[Any, int]:
    """The value at ``pos`` and where it ends (trailing bytes are the caller's business)."""
    return xtype.unpack(memoryview(data), pos)
