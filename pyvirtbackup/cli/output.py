"""Text output in virsh's shapes (domjobinfo, checkpoint-list, checkpoint-info)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from ..enums import JobOperation, JobType

JOB_TYPE_NAMES = {
    JobType.NONE: "None",
    JobType.BOUNDED: "Bounded",
    JobType.UNBOUNDED: "Unbounded",
    JobType.COMPLETED: "Completed",
    JobType.FAILED: "Failed",
    JobType.CANCELLED: "Cancelled",
}


def safe(text: str) -> str:
    """``text`` with every control or invisible format character shown as an escape.

    What we print comes partly from elsewhere (names in the state directory, QEMU's
    paths and error messages, documents quoted in errors): a raw ESC, BEL or CR in
    it would let that source retitle, clear or rewrite the operator's terminal.
    Newlines stay: our own messages span lines.
    """
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable() or c == "\n"
        else f"\\x{ord(c):02x}"
        if ord(c) < 256
        else f"\\u{ord(c):04x}"
        for c in text
    )


def say(*values: object, sep: str = " ", end: str = "\n", file: TextIO | None = None) -> None:
    """``print`` for everything the command shows a person, through :func:`safe`."""
    out = file if file is not None else sys.stdout
    out.write(safe(sep.join(str(v) for v in values)) + end)


def pretty_bytes(n: int) -> str:
    """virsh's vshPrettyCapacity: the largest unit that keeps the number >= 1."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.3f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def jobinfo_text(stats: dict[str, Any]) -> str:
    lines = [f"{'Job type:':<17} {JOB_TYPE_NAMES.get(JobType(stats['type']), '?')}"]
    if stats["type"] == JobType.NONE:
        return lines[0] + "\n"
    op = stats.get("operation")
    if op is not None:
        lines.append(f"{'Operation:':<17} {JobOperation(op).name.replace('_', ' ').title()}")
    if "time_elapsed" in stats:
        lines.append(f"{'Time elapsed:':<17} {stats['time_elapsed']:<12} ms")
    for key, label in (
        ("disk_processed", "File processed:"),
        ("disk_remaining", "File remaining:"),
        ("disk_total", "File total:"),
        ("disk_temp_used", "Temporary disk space use:"),
        ("disk_temp_total", "Temporary disk space total:"),
    ):
        if key in stats:
            lines.append(f"{label:<17} {pretty_bytes(stats[key])}")
    if "success" in stats:
        lines.append(f"{'Success:':<17} {'yes' if stats['success'] else 'no'}")
    if "errmsg" in stats:
        lines.append(f"{'Error message:':<17} {stats['errmsg']}")
    return "\n".join(lines) + "\n"


def local_time(epoch: int | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """virsh's vshTable: a leading space, columns padded, a dashed rule."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return (" " + "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))).rstrip()

    rule = "-" * (sum(widths) + 3 * (len(widths) - 1) + 2)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)]) + "\n"


def tree(roots: list[str], children: dict[str, list[str]]) -> str:
    """virsh's --tree drawing."""
    out: list[str] = []

    def walk(name: str, prefix: str, last: bool, depth: int) -> None:
        if depth == 0:
            out.append(name)
        else:
            out.append(f"{prefix}+- {name}")
        kids = children.get(name, [])
        child_prefix = prefix + ("    " if last or depth == 0 else "|   ") if depth else "  "
        for i, kid in enumerate(kids):
            out.append(f"{child_prefix}|")
            walk(kid, child_prefix, i == len(kids) - 1, depth + 1)

    for i, root in enumerate(roots):
        if i:
            out.append("")
        walk(root, "", True, 0)
    return "\n".join(out) + "\n"


def dump_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
