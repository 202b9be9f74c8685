"""The one exception a public call raises, with libvirt's error numbers.

Callers port code written for libvirt-python, which branches on
``e.get_error_code()``; keeping libvirt's numbers (virErrorNumber, virErrorDomain)
lets that code keep working unchanged.
"""

from __future__ import annotations

import enum


class ErrorNumber(enum.IntEnum):
    """virErrorNumber: the subset pyvirtbackup raises or maps QEMU errors to."""

    OK = 0
    INTERNAL_ERROR = 1
    NO_MEMORY = 2
    NO_SUPPORT = 3
    INVALID_ARG = 8
    OPERATION_FAILED = 9
    XML_ERROR = 27
    OPERATION_DENIED = 29
    CONF_SYNTAX = 33
    XML_DETAIL = 35
    SYSTEM_ERROR = 38
    NO_DOMAIN = 42
    OPERATION_INVALID = 55
    CONFIG_UNSUPPORTED = 67
    OPERATION_TIMEOUT = 68
    ARGUMENT_UNSUPPORTED = 74
    OPERATION_ABORTED = 78
    OPERATION_UNSUPPORTED = 84
    XML_INVALID_SCHEMA = 92
    INVALID_DOMAIN_CHECKPOINT = 102
    NO_DOMAIN_CHECKPOINT = 103
    NO_DOMAIN_BACKUP = 104
    CHECKPOINT_INCONSISTENT = 109


class ErrorDomain(enum.IntEnum):
    """virErrorDomain: which part of libvirt would have raised the error."""

    NONE = 0
    XML = 5
    QEMU = 10
    DOMAIN = 20
    DOMAIN_CHECKPOINT = 69


class VirError(Exception):
    """A libvirt-style error: ``code`` (ErrorNumber), ``domain`` (ErrorDomain), message."""

    def __init__(self, code: int, domain: int, message: str) -> None:
        super().__init__(message)
        self.code = _as_enum(ErrorNumber, code)
        self.domain = _as_enum(ErrorDomain, domain)
        self.message = message

    # libvirt-python spellings, so ported code reads the same
    def get_error_code(self) -> int:
        return int(self.code)

    def get_error_domain(self) -> int:
        return int(self.domain)

    def get_error_message(self) -> str:
        return self.message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        code = getattr(self.code, "name", self.code)
        domain = getattr(self.domain, "name", self.domain)
        return f"VirError({code}, {domain}, {self.message!r})"


def _as_enum(cls: type[enum.IntEnum], value: int) -> int:
    try:
        return cls(value)
    except ValueError:
        return int(value)
