"""``pyvirtbackup``: virsh's backup and checkpoint commands for QEMUs without libvirt.

Every command is a new process that attaches to the domain's QMP socket recorded by
``attach``, does its work and detaches; a running backup is taken over from the
state directory by whichever command comes next, the way virsh commands talk to a
libvirtd that remembers jobs. Exit codes: 0 ok, 1 error (libvirt-style, with its
number), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from ..conf import xmlutil
from ..driver import Domain, Driver
from ..driverbase import address_from_record
from ..enums import (
    BackupBeginFlags,
    CheckpointCreateFlags,
    CheckpointDeleteFlags,
    CheckpointListFlags,
    CheckpointXMLFlags,
    ConnectListAllDomainsFlags,
    DomainEventID,
    JobStatsFlags,
    JobType,
)
from ..errors import ErrorDomain, ErrorNumber, VirError
from ..qemu.plan import Tuning
from . import output
from .output import say
from .progress import Progress
from .serve import add_serve_parser, cmd_serve  # noqa: F401 - cmd_serve is a command


class UsageError(Exception):
    """Bad command-line use: exit code 2."""


# ------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyvirtbackup",
        description="libvirt-style backups and checkpoints of running QEMUs, over QMP.",
    )
    p.add_argument(
        "--state-dir",
        help="metadata directory (default: /var/lib/pyvirtbackup "
        "as root, else $XDG_STATE_HOME/pyvirtbackup)",
    )
    p.add_argument("--tls-x509-cert-dir", help="certificates for pull backups with tls='yes'")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str, domain: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if domain:
            sp.add_argument("domain", metavar="DOMAIN")
        return sp

    sp = cmd("attach", "record where a domain's QMP socket is")
    group = sp.add_mutually_exclusive_group(required=True)
    group.add_argument("--qmp", metavar="SOCKET", help="QMP unix socket")
    group.add_argument(
        "--qmp-tcp",
        metavar="HOST:PORT",
        help="QMP over TCP (cleartext, unauthenticated: anyone who reaches it controls QEMU)",
    )
    sp.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="NAME=NODE",
        help="name a disk by its top node instead of discovering device ids",
    )
    sp.add_argument(
        "--agent", metavar="SOCKET", help="the guest agent's unix socket (for fs freeze/thaw)"
    )
    cmd("detach", "forget a domain")
    sp = cmd("qemu-features", "what the domain's QEMU supports, and the choice each makes")
    sp.add_argument("--json", action="store_true")
    sp = cmd("list", "attached domains with their backup job and checkpoints", domain=False)
    sp.add_argument("--with-checkpoint", action="store_true")
    sp.add_argument("--without-checkpoint", action="store_true")
    sp.add_argument("--json", action="store_true")

    sp = cmd("backup-begin", "start a backup job")
    sp.add_argument("--backupxml", metavar="FILE")
    sp.add_argument("--checkpointxml", metavar="FILE")
    sp.add_argument("--reuse-external", action="store_true")
    sp.add_argument(
        "--allow-plain-tcp",
        action="store_true",
        help="allow a pull backup's NBD server on TCP without TLS (every local user can "
        "read the disks)",
    )
    sp.add_argument(
        "--wait", action="store_true", help="follow the job with progress until it ends"
    )
    sp.add_argument(
        "--abort-on-interrupt",
        action="store_true",
        help="with --wait, Ctrl-C aborts the backup without asking",
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="print the QMP commands that would run; change nothing",
    )
    sp.add_argument(
        "--no-fleecing",
        action="store_true",
        help="libvirt's direct sequence: a full or slow target can fail or stall the "
        "guest's writes",
    )
    sp.add_argument("--max-workers", type=int, help="QEMU copy workers per disk (x-perf)")
    sp.add_argument("--max-chunk", type=int, help="QEMU copy chunk in bytes (x-perf)")
    sp.add_argument("--speed", type=int, help="throttle each disk's job, bytes/s")
    sp = cmd("backup-dumpxml", "the running backup's XML")
    sp = cmd("domjobinfo", "progress of the running backup job")
    sp.add_argument("--completed", action="store_true", help="the last finished job")
    sp.add_argument("--keep-completed", action="store_true")
    sp.add_argument("--json", action="store_true")
    cmd("domjobabort", "abort the running backup job")

    sp = cmd("checkpoint-create", "create a checkpoint from XML")
    sp.add_argument("--xmlfile", metavar="FILE")
    sp.add_argument("--redefine", action="store_true")
    sp.add_argument("--redefine-validate", action="store_true")
    sp.add_argument("--quiesce", action="store_true")
    sp = cmd("checkpoint-create-as", "create a checkpoint from options")
    sp.add_argument("--name")
    sp.add_argument("--description")
    sp.add_argument("--print-xml", action="store_true")
    sp.add_argument("--quiesce", action="store_true")
    sp.add_argument(
        "--diskspec", action="append", default=[], metavar="DISK[,checkpoint=TYPE][,bitmap=NAME]"
    )
    sp = cmd("checkpoint-list", "list checkpoints")
    for flag in (
        "--parent",
        "--roots",
        "--leaves",
        "--no-leaves",
        "--tree",
        "--name",
        "--topological",
        "--descendants",
        "--json",
    ):
        sp.add_argument(flag, action="store_true")
    sp.add_argument("--from", dest="from_", metavar="NAME")
    sp = cmd("checkpoint-dumpxml", "a checkpoint's XML")
    sp.add_argument("checkpoint", metavar="CHECKPOINT")
    sp.add_argument("--security-info", action="store_true")
    sp.add_argument("--no-domain", action="store_true")
    sp.add_argument("--size", action="store_true")
    sp = cmd("checkpoint-delete", "delete a checkpoint")
    sp.add_argument("checkpoint", metavar="CHECKPOINT")
    sp.add_argument("--children", action="store_true")
    sp.add_argument("--children-only", action="store_true")
    sp.add_argument("--metadata", action="store_true")
    sp = cmd("checkpoint-parent", "the name of a checkpoint's parent")
    sp.add_argument("checkpoint", metavar="CHECKPOINT")
    sp = cmd("checkpoint-info", "facts about a checkpoint")
    sp.add_argument("checkpoint", metavar="CHECKPOINT")
    sp.add_argument("--json", action="store_true")
    add_serve_parser(sub)
    return p


# ------------------------------------------------------------------------ helpers


def read_file(path: str | None) -> str | None:
    """A document named on the command line, never more of it than a document may be
    (``/dev/zero`` or a huge log given by mistake must not fill memory)."""
    if path is None:
        return None
    limit = xmlutil.MAX_XML_BYTES
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise VirError(
            ErrorNumber.SYSTEM_ERROR, ErrorDomain.NONE, f"cannot read '{path}': {exc.strerror}"
        ) from None
    if len(data) > limit:
        raise VirError(
            ErrorNumber.XML_ERROR,
            ErrorDomain.NONE,
            f"'{path}' is larger than {limit} bytes: not a backup or checkpoint document",
        )
    return data.decode("utf-8", errors="replace")


async def open_domain(driver: Driver, name: str) -> Domain:
    record = driver.state.domain(name).read_record()
    if record is None:
        raise VirError(
            ErrorNumber.NO_DOMAIN,
            ErrorDomain.DOMAIN,
            f"Domain not found: no domain with matching name '{name}'",
        )
    dom = await driver.attach(
        name, address_from_record(record), record.get("disks"), record.get("agent")
    )
    for problem in dom.recovery_problems:
        say(f"warning: {problem}", file=sys.stderr)
    return dom


async def open_checkpoint(driver: Driver, args: argparse.Namespace) -> Any:
    """The checkpoint named on the command line, of the domain named there."""
    dom = await open_domain(driver, args.domain)
    return await driver.domainCheckpointLookupByName(dom, args.checkpoint)


def checkpoint_flags(args: argparse.Namespace) -> int:
    flags = 0
    if args.redefine:
        flags |= CheckpointCreateFlags.REDEFINE
    if args.redefine_validate:
        if not args.redefine:
            raise UsageError("--redefine-validate requires --redefine")
        flags |= CheckpointCreateFlags.REDEFINE_VALIDATE
    if args.quiesce:
        flags |= CheckpointCreateFlags.QUIESCE
    return flags


def diskspec_xml(spec: str) -> str:
    """``vda,checkpoint=bitmap,bitmap=NAME`` → ``<disk name='vda' .../>`` (virsh's parser)."""
    from ..conf.xmlutil import escape

    name, *opts = spec.split(",")
    attrs = [f"name='{escape(name)}'"]
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("checkpoint", "bitmap"):
            raise UsageError(f"unknown --diskspec option '{opt}'")
        attrs.append(f"{key}='{escape(value)}'")
    return f"<disk {' '.join(attrs)}/>"


def checkpoint_as_xml(args: argparse.Namespace) -> str:
    from ..conf.xmlutil import escape

    parts = ["<domaincheckpoint>"]
    if args.name:
        parts.append(f"  <name>{escape(args.name)}</name>")
    if args.description:
        parts.append(f"  <description>{escape(args.description)}</description>")
    if args.diskspec:
        parts.append("  <disks>")
        parts += [f"    {diskspec_xml(s)}" for s in args.diskspec]
        parts.append("  </disks>")
    parts.append("</domaincheckpoint>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------ commands


async def cmd_attach(driver: Driver, args: argparse.Namespace) -> int:
    if args.qmp:
        address: Any = os.path.abspath(args.qmp)
    else:
        host, sep, port = args.qmp_tcp.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError("--qmp-tcp wants HOST:PORT")
        address = (host, int(port))
        say(
            f"warning: QMP over TCP ({args.qmp_tcp}) is cleartext and unauthenticated: "
            "anyone who can reach it controls the QEMU; prefer --qmp with a unix socket",
            file=sys.stderr,
        )
    mapping = {}
    for item in args.disk:
        name, sep, node = item.partition("=")
        if not sep:
            raise UsageError(f"--disk wants NAME=NODE, not '{item}'")
        mapping[name] = node
    agent = os.path.abspath(args.agent) if args.agent else None
    dom = await driver.attach(args.domain, address, mapping or None, agent)
    for problem in dom.recovery_problems:
        say(f"warning: {problem}", file=sys.stderr)
    disks = ", ".join(
        f"{d.name} ({d.format}, {d.path})" if not d.empty else f"{d.name} (empty)"
        for d in dom.disks
    )
    say(f"Domain '{dom.name}' attached: {disks}")
    return 0


async def cmd_detach(driver: Driver, args: argparse.Namespace) -> int:
    await driver.forget(args.domain)
    say(f"Domain '{args.domain}' detached")
    return 0


async def cmd_list(driver: Driver, args: argparse.Namespace) -> int:
    flags = 0
    if args.with_checkpoint:
        flags |= ConnectListAllDomainsFlags.HAS_CHECKPOINT
    if args.without_checkpoint:
        flags |= ConnectListAllDomainsFlags.NO_CHECKPOINT
    rows = []
    for dom in await driver.connectListAllDomains(flags):
        state = await driver.domain_state(dom)
        job: dict[str, Any] = {}
        # read only: a listing never takes a recorded backup over (it would act on it)
        stats = await driver.peek_job(dom)
        if stats is not None:
            job = {**stats, "state": "running"}
            if stats.get("disk_total"):
                job["progress"] = round(100 * stats["disk_processed"] / stats["disk_total"], 1)
        count = len(driver.state.domain(dom.name).checkpoint_names())
        rows.append({"name": dom.name, "state": state, "backup": job or None, "checkpoints": count})
    if args.json:
        output.dump_json(rows)
        return 0

    def job_text(job: dict[str, Any] | None) -> str:
        if not job:
            return "-"
        if "progress" in job:
            return f"{job['mode']} {job['progress']:.1f}%"
        return f"{job['mode']} running"

    say(
        output.table(
            ["Name", "State", "Backup job", "Checkpoints"],
            [[r["name"], r["state"], job_text(r["backup"]), str(r["checkpoints"])] for r in rows],
        ),
        end="",
    )
    return 0


def tuning_from(args: argparse.Namespace) -> Tuning | None:
    values = {"max_workers": args.max_workers, "max_chunk": args.max_chunk, "speed": args.speed}
    values = {k: v for k, v in values.items() if v is not None}
    return Tuning(**values) if values else None


async def cmd_backup_begin(driver: Driver, args: argparse.Namespace) -> int:
    dom = await open_domain(driver, args.domain)
    backup_xml = read_file(args.backupxml)
    checkpoint_xml = read_file(args.checkpointxml)
    flags = BackupBeginFlags.REUSE_EXTERNAL if args.reuse_external else 0
    tuning = tuning_from(args)
    fleecing = False if args.no_fleecing else None
    if args.dry_run:
        for step in await driver.backup_dry_run(
            dom, backup_xml, checkpoint_xml, flags, tuning=tuning, fleecing=fleecing
        ):
            say(json.dumps(step))
        return 0
    await driver.domainBackupBegin(
        dom, backup_xml, checkpoint_xml, flags, tuning=tuning, fleecing=fleecing
    )
    say("Backup started")
    if not args.wait:
        return 0
    return await follow(driver, dom, args.abort_on_interrupt)


async def follow(driver: Driver, dom: Domain, abort_on_interrupt: bool) -> int:
    """Show progress until the job ends; Ctrl-C asks whether to abort."""
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    interrupted = asyncio.Event()
    await driver.connectDomainEventRegisterAny(
        dom, DomainEventID.JOB_COMPLETED, lambda *a: finished.set()
    )
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    progress = Progress(sys.stdout, sys.stdout.isatty())
    try:
        while dom.job is not None and not finished.is_set():
            stats = await driver.domainGetJobStats(dom)
            if stats["type"] != JobType.NONE:
                progress.update(stats)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupted.wait(), 0.5)
            if interrupted.is_set():
                progress.finish()
                if abort_on_interrupt or await ask("Abort the backup? [y/N] "):
                    await driver.domainAbortJob(dom)
                    say("Backup aborted")
                else:
                    say(f"Backup goes on; see 'pyvirtbackup domjobinfo {dom.name}'")
                    return 0
                break
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    progress.finish()
    keep = JobStatsFlags.COMPLETED | JobStatsFlags.KEEP_COMPLETED
    stats = await driver.domainGetJobStats(dom, keep)
    say(output.jobinfo_text(stats), end="")
    if stats.get("type") == JobType.COMPLETED:
        return 0
    say(
        f"error: backup {output.JOB_TYPE_NAMES[JobType(stats['type'])].lower()}: "
        f"{stats.get('errmsg', 'no reason given')}",
        file=sys.stderr,
    )
    return 1


async def ask(question: str) -> bool:
    if not sys.stdin.isatty():
        say("\n(not a terminal: leaving the backup running)", file=sys.stderr)
        return False
    answer = await asyncio.get_running_loop().run_in_executor(None, input, "\n" + question)
    return answer.strip().lower() in ("y", "yes")


async def cmd_qemu_features(driver: Driver, args: argparse.Namespace) -> int:
    dom = await open_domain(driver, args.domain)
    features = dom.features.describe()
    if args.json:
        output.dump_json({"qemu": dom.features.version_string, "features": features})
        return 0
    say(f"QEMU {dom.features.version_string}")
    for f in features:
        say(f"{'yes' if f['present'] else 'no ':<4} {f['feature']}")
        say(f"     {f['choice']}")
    return 0


async def cmd_backup_dumpxml(driver: Driver, args: argparse.Namespace) -> int:
    dom = await open_domain(driver, args.domain)
    say(await driver.domainBackupGetXMLDesc(dom), end="")
    return 0


async def cmd_domjobinfo(driver: Driver, args: argparse.Namespace) -> int:
    flags = 0
    if args.completed:
        flags |= JobStatsFlags.COMPLETED
        if args.keep_completed:
            flags |= JobStatsFlags.KEEP_COMPLETED
    elif args.keep_completed:
        raise UsageError("--keep-completed requires --completed")
    dom = await open_domain(driver, args.domain)
    stats = await driver.domainGetJobStats(dom, flags)
    if args.json:
        output.dump_json(stats)
    else:
        say(output.jobinfo_text(stats), end="")
    return 0


async def cmd_domjobabort(driver: Driver, args: argparse.Namespace) -> int:
    dom = await open_domain(driver, args.domain)
    await driver.domainAbortJob(dom)
    return 0


async def cmd_checkpoint_create(driver: Driver, args: argparse.Namespace) -> int:
    dom = await open_domain(driver, args.domain)
    xml = read_file(args.xmlfile) or "<domaincheckpoint/>"
    chk = await driver.domainCheckpointCreateXML(dom, xml, checkpoint_flags(args))
    source = f" from '{args.xmlfile}'" if args.xmlfile else ""
    verb = "redefined" if args.redefine else "created"
    say(f"Domain checkpoint {chk.name} {verb}{source}")
    return 0


async def cmd_checkpoint_create_as(driver: Driver, args: argparse.Namespace) -> int:
    xml = checkpoint_as_xml(args)
    if args.print_xml:
        say(xml, end="")
        return 0
    dom = await open_domain(driver, args.domain)
    flags = CheckpointCreateFlags.QUIESCE if args.quiesce else 0
    chk = await driver.domainCheckpointCreateXML(dom, xml, flags)
    say(f"Domain checkpoint {chk.name} created")
    return 0


async def checkpoint_facts(driver: Driver, chk: Any) -> dict[str, Any]:
    from ..conf import CheckpointDef

    xml = await driver.domainCheckpointGetXMLDesc(chk, CheckpointXMLFlags.NO_DOMAIN)
    cdef = CheckpointDef.from_xml(xml, CheckpointCreateFlags.REDEFINE)
    return {"name": cdef.name, "parent": cdef.parent_name, "creation_time": cdef.creation_time}


async def cmd_checkpoint_list(driver: Driver, args: argparse.Namespace) -> int:
    exclusive = [
        ("tree", "name"),
        ("parent", "roots"),
        ("parent", "tree"),
        ("roots", "tree"),
        ("roots", "from_"),
        ("leaves", "tree"),
        ("no_leaves", "tree"),
    ]
    for a, b in exclusive:
        if getattr(args, a) and getattr(args, b):
            raise UsageError(
                f"--{a.rstrip('_').replace('_', '-')} and "
                f"--{b.rstrip('_').replace('_', '-')} are mutually exclusive"
            )
    if args.descendants and not args.from_:
        raise UsageError("--descendants requires --from")
    dom = await open_domain(driver, args.domain)
    flags = 0
    for name, flag in (
        ("roots", CheckpointListFlags.ROOTS),
        ("topological", CheckpointListFlags.TOPOLOGICAL),
        ("leaves", CheckpointListFlags.LEAVES),
        ("no_leaves", CheckpointListFlags.NO_LEAVES),
    ):
        if getattr(args, name):
            flags |= flag
    if args.from_:
        start = await driver.domainCheckpointLookupByName(dom, args.from_)
        if args.descendants:
            flags |= CheckpointListFlags.DESCENDANTS
        chks = await driver.domainCheckpointListAllChildren(
            start, flags & ~CheckpointListFlags.ROOTS if not args.descendants else flags
        )
    else:
        chks = await driver.domainListAllCheckpoints(dom, flags)
    facts = [await checkpoint_facts(driver, c) for c in chks]
    if not args.topological:
        facts.sort(key=lambda f: f["name"])
    if args.json:
        output.dump_json(facts)
        return 0
    if args.name:
        for f in facts:
            say(f["name"])
        return 0
    if args.tree:
        names = {f["name"] for f in facts}
        children: dict[str, list[str]] = {}
        roots = []
        for f in facts:
            if f["parent"] in names:
                children.setdefault(f["parent"], []).append(f["name"])
            else:
                roots.append(f["name"])
        say(output.tree(roots, children), end="")
        return 0
    headers = ["Name", "Creation Time"] + (["Parent"] if args.parent else [])
    rows = [
        [f["name"], output.local_time(f["creation_time"])]
        + ([f["parent"] or ""] if args.parent else [])
        for f in facts
    ]
    say(output.table(headers, rows), end="")
    return 0


async def cmd_checkpoint_dumpxml(driver: Driver, args: argparse.Namespace) -> int:
    chk = await open_checkpoint(driver, args)
    flags = 0
    if args.security_info:
        flags |= CheckpointXMLFlags.SECURE
    if args.no_domain:
        flags |= CheckpointXMLFlags.NO_DOMAIN
    if args.size:
        flags |= CheckpointXMLFlags.SIZE
    say(await driver.domainCheckpointGetXMLDesc(chk, flags), end="")
    return 0


async def cmd_checkpoint_delete(driver: Driver, args: argparse.Namespace) -> int:
    if args.children and args.children_only:
        raise UsageError("--children and --children-only are mutually exclusive")
    chk = await open_checkpoint(driver, args)
    flags = 0
    if args.children:
        flags |= CheckpointDeleteFlags.CHILDREN
    if args.children_only:
        flags |= CheckpointDeleteFlags.CHILDREN_ONLY
    if args.metadata:
        flags |= CheckpointDeleteFlags.METADATA_ONLY
    await driver.domainCheckpointDelete(chk, flags)
    what = "children deleted" if args.children_only else "deleted"
    say(f"Domain checkpoint {args.checkpoint} {what}")
    return 0


async def cmd_checkpoint_parent(driver: Driver, args: argparse.Namespace) -> int:
    chk = await open_checkpoint(driver, args)
    parent = await driver.domainCheckpointGetParent(chk)
    say(parent.name)
    return 0


async def cmd_checkpoint_info(driver: Driver, args: argparse.Namespace) -> int:
    chk = await open_checkpoint(driver, args)
    facts = await checkpoint_facts(driver, chk)
    children = await driver.domainCheckpointListAllChildren(chk, 0)
    descendants = await driver.domainCheckpointListAllChildren(chk, CheckpointListFlags.DESCENDANTS)
    info = {
        "name": facts["name"],
        "domain": args.domain,
        "parent": facts["parent"],
        "children": len(children),
        "descendants": len(descendants),
    }
    if args.json:
        output.dump_json(info)
        return 0
    say(f"{'Name:':<15} {info['name']}")
    say(f"{'Domain:':<15} {info['domain']}")
    say(f"{'Parent:':<15} {info['parent'] or '-'}")
    say(f"{'Children:':<15} {info['children']}")
    say(f"{'Descendants:':<15} {info['descendants']}")
    return 0


COMMANDS = {name: func for name, func in globals().items() if name.startswith("cmd_")}


async def run(args: argparse.Namespace) -> int:
    func = COMMANDS["cmd_" + args.command.replace("-", "_")]
    async with Driver(
        state_dir=args.state_dir,
        tls_x509_cert_dir=args.tls_x509_cert_dir,
        nbd_allow_plain_tcp=getattr(args, "allow_plain_tcp", False),
    ) as drv:
        return await func(drv, args)


def main(argv: list[str] | None = None) -> int:
    # qemu.qmp logs a dropped connection as an error of its own; what it means for
    # the command (QEMU exited, the backup failed) is said once, by us
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        say(f"pyvirtbackup: error: {exc}", file=sys.stderr)
        return 2
    except VirError as exc:
        code = getattr(exc.code, "name", exc.code)
        say(f"error: {exc.message}", file=sys.stderr)
        say(
            f"error: code {int(exc.code)} (VIR_ERR_{code}), domain {int(exc.domain)}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        say("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
