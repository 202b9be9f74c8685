"""``pyvirtbackup serve``: libvirt's RPC daemon in the foreground until SIGTERM.

Unchanged libvirt clients (virsh, libvirt-python, virtnbdbackup) reach it at
libvirt's default socket, or anywhere with ``qemu:///system?socket=PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from ..driver import Driver
from ..rpc.server import DEFAULT_SOCKET, MAX_CLIENTS, Daemon


def add_serve_parser(sub: Any) -> None:
    text = "serve libvirt's remote protocol to virsh, libvirt-python, virtnbdbackup..."
    sp = sub.add_parser("serve", help=text, description=text)
    sp.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"where to listen (default {DEFAULT_SOCKET}, where virsh -c qemu:///system "
        "looks when no libvirt daemon is installed)",
    )
    sp.add_argument(
        "--group",
        metavar="GROUP",
        help="make the socket 0660 for GROUP and admit its members (default: 0600, "
        "root and the daemon's own user only)",
    )
    sp.add_argument("--max-clients", type=int, default=MAX_CLIENTS, metavar="N")
    # libvirt's API has no way to pass these per backup: the daemon sets them for all
    sp.add_argument("--max-workers", type=int, help="QEMU copy workers per disk (x-perf)")
    sp.add_argument("--speed", type=int, help="throttle each disk's job, bytes/s")
    sp.add_argument("--verbose", "-v", action="store_true", help="log every connection")


async def cmd_serve(driver: Driver, args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="pyvirtbackup[%(process)d]: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)  # every QMP message: too much
    values = {"max_workers": args.max_workers, "speed": args.speed}
    driver.tuning = driver.tuning.merged({k: v for k, v in values.items() if v is not None})
    daemon = Daemon(driver, args.socket, group=args.group, max_clients=args.max_clients)
    daemon.listen()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serving = asyncio.ensure_future(daemon.serve_forever())
    print(f"pyvirtbackup: serving qemu:///system on {args.socket}", file=sys.stderr, flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("stopping: finishing running calls")
    await daemon.stop()
    await serving
    return 0
