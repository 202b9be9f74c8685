"""On-disk metadata: attached domains, checkpoints, the running job, the last finished job.

This is the only module that touches the state directory. Every write is atomic
(temp file, fsync, rename, fsync of the directory) so that a crash at any instant
leaves either the old or the new file, never a torn one: the operator who finds a
dead orchestrator at 3 a.m. must still find valid metadata.

The records decide which files get deleted and which nodes get removed from QEMU,
so whoever can write them can make us delete things. The directory is therefore
trusted only when nobody else can write it, the way OpenSSH's StrictModes trusts
``~/.ssh``: every level we use must be a directory owned by us and writable by
nobody else (we create each one 0700), every directory above the root must be
owned by us or root and, unless sticky, writable by nobody else, and every file
we read must be a regular file of ours that nobody else can write. Anything else
is refused before it is read.

Layout::

    <state_dir>/domains/<domain>/domain.json        where its QMP socket is, its uuid
    <state_dir>/domains/<domain>/checkpoints/<name>.xml
    <state_dir>/domains/<domain>/current-checkpoint  name of the current checkpoint
    <state_dir>/domains/<domain>/backup.json        the running backup: what it created in
                                                    QEMU and its status XML, one file
    <state_dir>/domains/<domain>/backup.xml         a copy of that status XML, for humans
    <state_dir>/domains/<domain>/completed-job.json stats of the last finished job
    <state_dir>/fleecing/                           push fleecing images, when neither the
                                                    XML nor Driver(fleecing_dir) says where
                                                    and the disk has no directory of its own
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import ErrorDomain, ErrorNumber, VirError

log = logging.getLogger(__name__)

# The key of backup.json that holds the running backup's status XML.
STATUS_XML_KEY = "status_xml"

# Nothing we write comes near this: a checkpoint's XML is capped at
# conf.xmlutil.MAX_XML_BYTES on input and re-indented on output. A bigger file
# was not written by us, and reading it whole is how /dev/zero exhausts memory.
MAX_STATE_FILE_BYTES = 16 * 1024 * 1024

# libvirt's typed-parameter names of a finished job, and the type each must have
_COMPLETED_KEYS: dict[str, type | tuple[type, ...]] = {
    "type": int,
    "operation": int,
    "time_elapsed": int,
    "disk_total": int,
    "disk_processed": int,
    "disk_remaining": int,
    "disk_temp_used": int,
    "disk_temp_total": int,
    "success": bool,
    "errmsg": str,
}


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/pyvirtbackup")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "pyvirtbackup"


def check_component(name: str, what: str, domain: ErrorDomain = ErrorDomain.DOMAIN) -> str:
    """Refuse a name that is not a single, harmless path component.

    Harmless on a terminal too: names are printed by ``list`` and in messages,
    and a control character (ESC, BEL, CR, TAB...) or an invisible format
    character in a name would let it retitle or clear the operator's terminal.
    """
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or not name.isprintable()
        or name != name.strip()
        or len(name.encode(errors="surrogateescape")) > 200
    ):
        raise VirError(
            ErrorNumber.INVALID_ARG,
            domain,
            f"{what} name {name!r} is not usable: printable characters only, no '/', "
            "no leading '.' or surrounding spaces, at most 200 bytes",
        )
    return name


def _denied(message: str) -> VirError:
    return VirError(ErrorNumber.OPERATION_DENIED, ErrorDomain.NONE, message)


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def check_ancestor(path: Path, st: os.stat_result) -> None:
    """A directory above the state root: owned by us or root, and if others may write
    it, sticky (so that they cannot rename what is ours in it)."""
    me = os.geteuid()
    if st.st_uid not in (0, me):
        raise _denied(
            f"state directory {path} is owned by uid {st.st_uid}, who could replace "
            "what is below it; refusing to trust it"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _denied(
            f"state directory {path} is writable by group or others (mode {_mode(st)}) "
            "and not sticky; refusing to trust what is below it"
        )


def check_private_dir(path: Path, st: os.stat_result) -> None:
    """A level of the state directory: a real directory of ours nobody else can write."""
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise _denied(f"state directory {path} is not a directory; refusing to use it")
    if st.st_uid != os.geteuid():
        raise _denied(
            f"state directory {path} is owned by uid {st.st_uid}, not by us "
            f"(uid {os.geteuid()}); refusing to trust records there"
        )
    if st.st_mode & 0o022:
        raise _denied(
            f"state directory {path} is writable by group or others (mode {_mode(st)}); "
            f"refusing to trust records there (chmod go-w {path})"
        )


def _check_own_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _denied(f"state file {path} is not a regular file; refusing to read it")
    if st.st_uid != os.geteuid():
        raise _denied(f"state file {path} is owned by uid {st.st_uid}, not by us; refusing it")
    if st.st_mode & 0o022:
        raise _denied(
            f"state file {path} is writable by group or others (mode {_mode(st)}); refusing it"
        )


class _Trust:
    """Which directories have passed the checks, so each is checked once per State.

    Once a directory of ours is 0700 (or at least not writable by others), nobody
    else can change that, so a check stays true for the life of the process.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.checked: set[Path] = set()

    def dir(self, path: Path, *, create: bool) -> bool:
        """True if ``path`` exists and is trusted; with ``create`` make it (0700)."""
        if path in self.checked:
            return True
        if path == self.root:
            return self._root(create)
        if path == path.parent:  # pragma: no cover - only paths below the root come here
            raise ValueError(f"{path} is not below the state directory {self.root}")
        if not self.dir(path.parent, create=create):
            return False
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return False
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            st = os.lstat(path)
        except OSError as exc:
            raise _state_error("check", path, exc) from None
        check_private_dir(path, st)
        self.checked.add(path)
        return True

    def _root(self, create: bool) -> bool:
        """The root may be a symlink (an admin's choice); what it resolves to and every
        directory above that is checked."""
        real = Path(os.path.realpath(self.root))
        missing: list[Path] = []
        probe = real
        while True:
            try:
                st = os.stat(probe)
                break
            except FileNotFoundError:
                missing.append(probe)
                probe = probe.parent
            except OSError as exc:
                raise _state_error("check", probe, exc) from None
        for ancestor in [*reversed(probe.parents), probe] if missing else real.parents:
            with contextlib.suppress(FileNotFoundError):
                check_ancestor(ancestor, os.stat(ancestor))
        if missing:
            if not create:
                return False
            for level in reversed(missing):
                try:
                    os.mkdir(level, 0o700)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise _state_error("create", level, exc) from None
            st = os.stat(real)
        check_private_dir(self.root, st)
        self.checked.add(self.root)
        return True


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace ``path`` in one step. ``durable=False`` skips the fsyncs, for copies
    nothing reads back (a crash may then leave the old copy, never a torn one).

    The directory must exist (the caller made it, 0700, and checked it).
    """
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_own_file(path: Path, limit: int = MAX_STATE_FILE_BYTES) -> bytes | None:
    """A file of ours, never through a symlink, never more than ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _denied(f"state file {path} is a symbolic link; refusing to follow it") from None
        raise _state_error("read", path, exc) from None
    with os.fdopen(fd, "rb") as f:
        _check_own_file(path, os.fstat(fd))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise VirError(
            ErrorNumber.INTERNAL_ERROR,
            ErrorDomain.NONE,
            f"state file {path} is damaged: larger than {limit} bytes",
        )
    return data


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return True


def _state_error(action: str, path: Path, exc: OSError) -> VirError:
    return VirError(
        ErrorNumber.SYSTEM_ERROR, ErrorDomain.NONE, f"cannot {action} {path}: {exc.strerror or exc}"
    )


def _damaged(path: Path, why: str) -> VirError:
    return VirError(
        ErrorNumber.INTERNAL_ERROR, ErrorDomain.NONE, f"state file {path} is damaged: {why}"
    )


def check_domain_record(path: Path, record: Any) -> dict[str, Any]:
    """domain.json as attach wrote it, or a VirError naming what is wrong."""
    if not isinstance(record, dict):
        raise _damaged(path, "not a JSON object")
    qmp = record.get("qmp")
    is_path = isinstance(qmp, str) and qmp.startswith("/")
    is_inet = (
        isinstance(qmp, list)
        and len(qmp) == 2
        and isinstance(qmp[0], str)
        and isinstance(qmp[1], int)
        and not isinstance(qmp[1], bool)
        and 0 < qmp[1] < 65536
    )
    if not (is_path or is_inet):
        raise _damaged(path, "'qmp' is neither an absolute socket path nor [host, port]")
    if not isinstance(record.get("uuid"), str):
        raise _damaged(path, "'uuid' is not a string")
    disks = record.get("disks")
    if disks is not None and not (
        isinstance(disks, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in disks.items())
    ):
        raise _damaged(path, "'disks' is not a map of disk names to node names")
    if not isinstance(record.get("uuid_from_qemu", False), bool):
        raise _damaged(path, "'uuid_from_qemu' is not true or false")
    return record


def check_completed_record(path: Path, stats: Any) -> dict[str, Any]:
    """completed-job.json: libvirt's typed parameters with their types."""
    if not isinstance(stats, dict):
        raise _damaged(path, "not a JSON object")
    if "type" not in stats:
        raise _damaged(path, "no 'type'")
    for key, value in stats.items():
        want = _COMPLETED_KEYS.get(key)
        if want is None:
            raise _damaged(path, f"unknown key {key!r}")
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise _damaged(path, f"{key!r} is not {'a number' if want is int else want.__name__}")
    if not 0 <= stats["type"] <= 5:
        raise _damaged(path, f"'type' {stats['type']} is not a job type")
    return stats


class DomainState:
    """The files of one domain."""

    def __init__(self, root: Path, name: str, trust: _Trust | None = None) -> None:
        self.name = check_component(name, "domain")
        self.dir = root / "domains" / name
        self._trust = trust or _Trust(root)

    # generic ------------------------------------------------------------------

    def _dir_for(self, rel: str, *, create: bool) -> bool:
        return self._trust.dir((self.dir / rel).parent, create=create)

    def _write(self, rel: str, data: str | bytes, *, durable: bool = True) -> None:
        path = self.dir / rel
        try:
            self._dir_for(rel, create=True)
            atomic_write(path, data, durable=durable)
        except OSError as exc:
            raise _state_error("write", path, exc) from None

    def _read(self, rel: str) -> str | None:
        if not self._dir_for(rel, create=False):
            return None
        path = self.dir / rel
        data = read_own_file(path)
        if data is None:
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise _damaged(path, "not UTF-8 text") from None

    def _write_json(self, rel: str, obj: Any) -> None:
        self._write(rel, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def _read_json(self, rel: str) -> Any:
        text = self._read(rel)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise _damaged(self.dir / rel, str(exc)) from None

    def _delete(self, rel: str) -> bool:
        path = self.dir / rel
        if not self._dir_for(rel, create=False):
            return False
        try:
            return _remove(path)
        except OSError as exc:
            raise _state_error("remove", path, exc) from None

    def _set_aside(self, rels: tuple[str, ...]) -> list[str]:
        """Keep damaged files for a human, under names we never read again."""
        stamp = str(int(time.time()))
        kept = []
        if not self._trust.dir(self.dir, create=False):
            return kept
        for rel in rels:
            src = self.dir / rel
            if os.path.lexists(src):
                dest = self.dir / f"{rel}.unreadable-{stamp}"
                try:
                    os.replace(src, dest)
                except OSError as exc:
                    raise _state_error("set aside", src, exc) from None
                kept.append(str(dest))
        return kept

    # the domain record --------------------------------------------------------

    def exists(self) -> bool:
        if not self._trust.dir(self.dir, create=False):
            return False
        return os.path.lexists(self.dir / "domain.json")

    def read_record(self) -> dict[str, Any] | None:
        """The domain's record (a VirError naming the damage if it is not usable)."""
        record = self._read_json("domain.json")
        if record is None:
            return None
        return check_domain_record(self.dir / "domain.json", record)

    def write_record(self, record: dict[str, Any]) -> None:
        self._write_json("domain.json", record)

    def delete_record(self) -> None:
        self._delete("domain.json")

    # checkpoints ----------------------------------------------------------------

    def checkpoint_names(self) -> list[str]:
        if not self._dir_for("checkpoints/x", create=False):
            return []
        cdir = self.dir / "checkpoints"
        names = []
        for entry in os.scandir(cdir):
            if entry.name.endswith(".xml") and not entry.name.startswith("."):
                names.append(entry.name[:-4])
        return sorted(names)

    def checkpoint_path(self, name: str) -> Path:
        return self.dir / f"checkpoints/{check_component(name, 'checkpoint')}.xml"

    def read_checkpoint(self, name: str) -> str | None:
        return self._read(f"checkpoints/{check_component(name, 'checkpoint')}.xml")

    def write_checkpoint(self, name: str, xml: str) -> None:
        self._write(f"checkpoints/{check_component(name, 'checkpoint')}.xml", xml)

    def delete_checkpoint(self, name: str) -> None:
        self._delete(f"checkpoints/{check_component(name, 'checkpoint')}.xml")

    def read_current(self) -> str | None:
        text = self._read("current-checkpoint")
        return text.strip() or None if text is not None else None

    def write_current(self, name: str | None) -> None:
        if name is None:
            self._delete("current-checkpoint")
        else:
            self._write("current-checkpoint", name + "\n")

    # the running backup ---------------------------------------------------------

    def write_job(self, status_xml: str, resources: dict[str, Any]) -> None:
        """Record the running backup: one atomic file, so a crash at any instant leaves
        the old record or the new one, never half of each (two files written one after
        the other left a first record with no XML, which read as no job at all).

        backup.xml is written afterwards as a copy for people reading the directory;
        nothing reads it back unless backup.json predates ``status_xml``.
        """
        self._write_json("backup.json", {**resources, STATUS_XML_KEY: status_xml})
        self._write("backup.xml", status_xml, durable=False)

    def has_job(self) -> bool:
        return self._dir_for("backup.json", create=False) and os.path.lexists(
            self.dir / "backup.json"
        )

    def read_job(self) -> tuple[str, dict[str, Any]] | None:
        """The recorded backup as (status XML, resources), or None when there is none."""
        res = self._read_json("backup.json")
        if res is None:
            return None
        if not isinstance(res, dict):
            raise _damaged(self.dir / "backup.json", "not a JSON object")
        xml = res.pop(STATUS_XML_KEY, None)
        if xml is None:  # a record from before the XML moved into backup.json
            xml = self._read("backup.xml")
        if xml is None:
            return None
        if not isinstance(xml, str):
            raise _damaged(self.dir / "backup.json", f"{STATUS_XML_KEY!r} is not a string")
        return xml, res

    def set_aside_job(self) -> list[str]:
        """Keep an unreadable job record for a human, under a name we never read again."""
        return self._set_aside(("backup.json", "backup.xml"))

    def delete_job(self) -> None:
        """The record first: a crash before the copy goes leaves no job, as it should."""
        self._delete("backup.json")
        self._delete("backup.xml")

    # the last finished job ------------------------------------------------------

    def write_completed(self, stats: dict[str, Any]) -> None:
        self._write_json("completed-job.json", stats)

    def read_completed(
        self, problems: list[str] | None = None, *, set_aside: bool = True
    ) -> dict[str, Any] | None:
        """The last finished job's stats. It is optional: a damaged record is set aside
        (and said in ``problems``) instead of making every command on the domain fail;
        ``set_aside=False`` (a listing) only reports it."""
        path = self.dir / "completed-job.json"
        try:
            stats = self._read_json("completed-job.json")
            if stats is None:
                return None
            return check_completed_record(path, stats)
        except VirError as exc:
            if exc.code != ErrorNumber.INTERNAL_ERROR:  # refused, not damaged
                raise
            if not set_aside:
                if problems is not None:
                    problems.append(exc.message)
                return None
            kept = self._set_aside(("completed-job.json",))
            problem = f"{exc.message}; set aside as {', '.join(kept) or 'nothing'}"
            log.warning("domain %s: %s", self.name, problem)
            if problems is not None:
                problems.append(problem)
            return None

    def delete_completed(self) -> None:
        self._delete("completed-job.json")


class State:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_state_dir()
        self._trust = _Trust(self.root)

    def domain(self, name: str) -> DomainState:
        return DomainState(self.root, name, self._trust)

    def fleecing_dir(self) -> Path:
        """Where fleecing images go when nothing better is known: private to us, by
        the same rules as every other level of the state directory."""
        path = self.root / "fleecing"
        self._trust.dir(path, create=True)
        return path

    def domain_names(self) -> list[str]:
        """Recorded domains; an entry whose name we would refuse is skipped, loudly."""
        if not self._trust.dir(self.root / "domains", create=False):
            return []
        names = []
        for entry in os.scandir(self.root / "domains"):
            try:
                check_component(entry.name, "domain")
            except VirError:
                log.warning(
                    "skipping %r in %s: not a usable domain name",
                    entry.name,
                    self.root / "domains",
                )
                continue
            if entry.is_dir(follow_symlinks=False) and os.path.lexists(
                Path(entry.path) / "domain.json"
            ):
                names.append(entry.name)
        return sorted(names)
