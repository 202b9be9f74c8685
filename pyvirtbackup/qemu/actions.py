"""What QEMU does when the guest powers off, for the time of a backup.

libvirt 11.10's PRESERVE_SHUTDOWN_DOMAIN: a guest that shuts down while its backup
runs is kept (paused) until the backup completes, then QEMU goes as the guest asked.
QMP can set the shutdown action (``set-action``) but not read it, so the action to
restore afterwards is read from QEMU's own command line when we can see its process
(a local unix monitor), and is QEMU's default, poweroff, otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SHUTDOWN_ACTION = "poweroff"
SHUTDOWN_ACTIONS = ("poweroff", "pause")  # QEMU's ShutdownAction, all there is


def shutdown_action(argv: Sequence[str]) -> str:
    """The shutdown action a QEMU command line sets: the last word on it wins."""
    action = DEFAULT_SHUTDOWN_ACTION
    args = list(argv)
    for i, arg in enumerate(args):
        opt = arg[1:] if arg.startswith("--") else arg
        if opt == "-no-shutdown":
            action = "pause"
        elif opt == "-action" and i + 1 < len(args):
            for part in args[i + 1].split(","):
                key, _, value = part.partition("=")
                if key == "shutdown" and value:
                    action = value
    return action


def process_shutdown_action(pid: int | None) -> str:
    """The shutdown action of the QEMU with this pid (QEMU's default if unreadable)."""
    if pid is None:
        return DEFAULT_SHUTDOWN_ACTION
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(1 << 20)
    except OSError:
        return DEFAULT_SHUTDOWN_ACTION
    return shutdown_action([a.decode(errors="replace") for a in raw.split(b"\0") if a])
