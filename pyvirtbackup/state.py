"""On-disk metadata: attached domains, checkpoints, the running job, the last finished job.

This is the only module that touches the state directory. Every write is atomic
(temp file, fsync, rename, fsync of the directory) so that a crash at any instant
leaves either the old or the new file, never a torn one: the operator who finds a
dead orchestrator at 3 a.m. must still find valid metadata.

Layout::

    <state_dir>/domains/<domain>/domain.json        where its QMP socket is, its uuid
    <state_dir>/domains/<domain>/checkpoints/<name>.xml
    <state_dir>/domains/<domain>/current-checkpoint  name of the current checkpoint
    <state_dir>/domains/<domain>/backup.json        the running backup: what it created in
                                                    QEMU and its status XML, one file
    <state_dir>/domains/<domain>/backup.xml         a copy of that status XML, for humans
    <state_dir>/domains/<domain>/completed-job.json stats of the last finished job
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import ErrorDomain, ErrorNumber, VirError

# The key of backup.json that holds the running backup's status XML.
STATUS_XML_KEY = "status_xml"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/pyvirtbackup")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "pyvirtbackup"


def check_component(name: str, what: str, domain: ErrorDomain = ErrorDomain.DOMAIN) -> str:
    """Refuse a name that is not a single, harmless path component."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or "\0" in name
        or "\n" in name
        or len(name.encode()) > 200
    ):
        raise VirError(
            ErrorNumber.INVALID_ARG, domain, f"{what} name {name!r} is not usable as a file name"
        )
    return name


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace ``path`` in one step. ``durable=False`` skips the fsyncs, for copies
    nothing reads back (a crash may then leave the old copy, never a torn one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
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


class DomainState:
    """The files of one domain."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = check_component(name, "domain")
        self.dir = root / "domains" / name

    # generic ------------------------------------------------------------------

    def _write(self, rel: str, data: str | bytes, *, durable: bool = True) -> None:
        path = self.dir / rel
        try:
            atomic_write(path, data, durable=durable)
        except OSError as exc:
            raise _state_error("write", path, exc) from None

    def _read(self, rel: str) -> str | None:
        path = self.dir / rel
        try:
            return path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _state_error("read", path, exc) from None

    def _write_json(self, rel: str, obj: Any) -> None:
        self._write(rel, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def _read_json(self, rel: str) -> Any:
        text = self._read(rel)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise VirError(
                ErrorNumber.INTERNAL_ERROR,
                ErrorDomain.NONE,
                f"state file {self.dir / rel} is damaged: {exc}",
            ) from None

    def _delete(self, rel: str) -> bool:
        path = self.dir / rel
        try:
            return _remove(path)
        except OSError as exc:
            raise _state_error("remove", path, exc) from None

    # the domain record --------------------------------------------------------

    def exists(self) -> bool:
        return (self.dir / "domain.json").exists()

    def read_record(self) -> dict[str, Any] | None:
        return self._read_json("domain.json")

    def write_record(self, record: dict[str, Any]) -> None:
        self._write_json("domain.json", record)

    def delete_record(self) -> None:
        self._delete("domain.json")

    # checkpoints ----------------------------------------------------------------

    def checkpoint_names(self) -> list[str]:
        cdir = self.dir / "checkpoints"
        if not cdir.is_dir():
            return []
        return sorted(p.name[:-4] for p in cdir.iterdir() if p.name.endswith(".xml"))

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

    def read_job(self) -> tuple[str, dict[str, Any]] | None:
        """The recorded backup as (status XML, resources), or None when there is none."""
        res = self._read_json("backup.json")
        if res is None:
            return None
        if not isinstance(res, dict):
            raise VirError(
                ErrorNumber.INTERNAL_ERROR,
                ErrorDomain.NONE,
                f"state file {self.dir / 'backup.json'} is damaged: not a JSON object",
            )
        xml = res.pop(STATUS_XML_KEY, None)
        if xml is None:  # a record from before the XML moved into backup.json
            xml = self._read("backup.xml")
        if xml is None:
            return None
        return xml, res

    def set_aside_job(self) -> None:
        """Keep an unreadable job record for a human, under a name we never read again."""
        stamp = str(int(time.time()))
        for rel in ("backup.json", "backup.xml"):
            src = self.dir / rel
            if src.exists():
                os.replace(src, self.dir / f"{rel}.unreadable-{stamp}")

    def delete_job(self) -> None:
        """The record first: a crash before the copy goes leaves no job, as it should."""
        self._delete("backup.json")
        self._delete("backup.xml")

    # the last finished job ------------------------------------------------------

    def write_completed(self, stats: dict[str, Any]) -> None:
        self._write_json("completed-job.json", stats)

    def read_completed(self) -> dict[str, Any] | None:
        return self._read_json("completed-job.json")

    def delete_completed(self) -> None:
        self._delete("completed-job.json")


class State:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_state_dir()

    def domain(self, name: str) -> DomainState:
        return DomainState(self.root, name)

    def fleecing_dir(self) -> Path:
        """Where fleecing images go when nothing better is known: private to us."""
        path = self.root / "fleecing"
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise _state_error("create", path, exc) from None
        return path

    def domain_names(self) -> list[str]:
        ddir = self.root / "domains"
        if not ddir.is_dir():
            return []
        return sorted(p.name for p in ddir.iterdir() if (p / "domain.json").exists())
