"""A guest that really powers off, without an operating system.

A 512-byte boot sector that waits (BIOS int 15h, AH=86h: CX:DX microseconds) and
then writes SLP_EN with sleep type 0 (0x2000) to the ICH9 PM1a control register,
I/O port 0x604 under SeaBIOS on q35: QEMU sees a real ACPI power-off from the guest
(``SHUTDOWN {"guest": true, "reason": "guest-shutdown"}``). SeaBIOS takes some
seconds to get there (reference/qemu-7.2-notes.md §3g).
"""

from __future__ import annotations

import struct
from pathlib import Path

PM1A_CONTROL = 0x604
SLP_EN = 0x2000


def power_off_boot_sector(wait_us: int) -> bytes:
    code = (
        b"\xb4\x86"  # mov ah, 0x86: wait CX:DX microseconds
        + b"\xb9" + struct.pack("<H", wait_us >> 16)  # mov cx, high word
        + b"\xba" + struct.pack("<H", wait_us & 0xFFFF)  # mov dx, low word
        + b"\xcd\x15"  # int 0x15
        + b"\xba" + struct.pack("<H", PM1A_CONTROL)  # mov dx, 0x604
        + b"\xb8" + struct.pack("<H", SLP_EN)  # mov ax, 0x2000
        + b"\xef"  # out dx, ax: power off
        + b"\xf4\xeb\xfd"  # hlt; jmp back to hlt
    )  # fmt: skip
    return code + b"\0" * (510 - len(code)) + b"\x55\xaa"


def power_off_disk_args(directory: Path, wait_us: int = 500_000) -> list[str]:
    """QEMU arguments for a boot disk whose guest powers off after ``wait_us``."""
    image = directory / "poweroff.raw"
    image.write_bytes(power_off_boot_sector(wait_us) + b"\0" * (1024 * 1024 - 512))
    return [
        "-blockdev", f'{{"driver":"file","filename":"{image}","node-name":"boot-file"}}',
        "-blockdev", '{"driver":"raw","file":"boot-file","node-name":"boot-fmt"}',
        "-device", "virtio-blk-pci,drive=boot-fmt,id=boot,bootindex=0",
    ]  # fmt: skip
