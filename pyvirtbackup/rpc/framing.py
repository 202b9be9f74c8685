"""Packets of libvirt's RPC: a length word, the header, an fd count for calls that pass
descriptors, the payload.

The length word counts itself; libvirt refuses a packet longer than
``MESSAGE_MAX`` after it, and so do we, before reading a byte of it. A packet too
big to send is refused here too, so that the caller can answer with an error
instead of a reply the client would reject.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from . import xdr
from .protocol import (
    HEADER,
    MESSAGE_HEADER_MAX,
    MESSAGE_LEN_MAX,
    MESSAGE_MAX,
    MESSAGE_NUM_FDS_MAX,
    MessageStatus,
    MessageType,
)

_LEN = struct.Struct(">I")


class FramingError(ValueError):
    """A packet that cannot be taken apart: the connection it came on is closed."""


@dataclass
class Header:
    prog: int
    vers: int
    proc: int
    type: int
    serial: int
    status: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "prog": self.prog,
            "vers": self.vers,
            "proc": self.proc,
            "type": self.type,
            "serial": self.serial,
            "status": self.status,
        }


def body_length(word: bytes) -> int:
    """How many bytes follow the length word, refusing what libvirt refuses."""
    (length,) = _LEN.unpack(word)
    if length < MESSAGE_LEN_MAX + MESSAGE_HEADER_MAX:
        raise FramingError(f"packet of {length} bytes is shorter than a header")
    if length - MESSAGE_LEN_MAX > MESSAGE_MAX:
        raise FramingError(f"packet of {length} bytes exceeds the limit of {MESSAGE_MAX}")
    return length - MESSAGE_LEN_MAX


def parse_header(body: bytes) -> tuple[Header, int]:
    """The header and the offset of what follows it."""
    try:
        value, pos = xdr.decode(HEADER, body)
    except xdr.XdrError as exc:
        raise FramingError(f"unreadable header: {exc}") from None
    return Header(**value), pos


def parse_fd_count(body: bytes, pos: int) -> tuple[int, int]:
    try:
        count, pos = xdr.decode(xdr.UINT, body, pos)
    except xdr.XdrError as exc:
        raise FramingError(f"unreadable descriptor count: {exc}") from None
    if count > MESSAGE_NUM_FDS_MAX:
        raise FramingError(f"{count} descriptors announced, at most {MESSAGE_NUM_FDS_MAX}")
    return count, pos


class TooLarge(ValueError):
    """An outgoing packet over libvirt's limit."""


def build(header: Header, payload_type: xdr.XdrType, payload: Any) -> bytes:
    """One packet: length word, header, payload. Raises TooLarge or xdr.XdrError."""
    out = bytearray(MESSAGE_LEN_MAX)
    HEADER.pack(header.as_dict(), out)
    payload_type.pack(payload, out)
    if len(out) - MESSAGE_LEN_MAX > MESSAGE_MAX:
        raise TooLarge(f"a message of {len(out)} bytes exceeds the limit of {MESSAGE_MAX}")
    _LEN.pack_into(out, 0, len(out))
    return bytes(out)


def reply_header(call: Header, *, error: bool = False) -> Header:
    return Header(
        call.prog,
        call.vers,
        call.proc,
        MessageType.REPLY,
        call.serial,
        MessageStatus.ERROR if error else MessageStatus.OK,
    )
