"""What the connected QEMU can do, read from QEMU itself once per attach.

Hosts run QEMU from 7.2 (Debian 12) to 10.x (Debian 13, RHEL 10), and the safest
or fastest way to run a backup differs between them. Version numbers lie (distros
backport features, and a build may leave one out), so every choice is made from
``query-qmp-schema``: the command and argument we want either exist or not.
``query-version`` is kept only to say which QEMU made the choices.

Each feature carries the reason for the choice beside it, so that logs, the CLI
(``pyvirtbackup qemu-features``) and the closing notes of a backup can say why a
QEMU got one path and not another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class Schema:
    """QEMU's introspection reply (``query-qmp-schema``), navigable by name.

    Type names in the reply are opaque numbers; commands, members, union branches
    and enum values carry their real names, which is all we look at.
    """

    def __init__(self, entries: Iterable[dict[str, Any]]) -> None:
        self._by_name = {e["name"]: e for e in entries}

    def has_command(self, command: str) -> bool:
        entry = self._by_name.get(command)
        return entry is not None and entry.get("meta-type") == "command"

    def _members(self, type_name: str | None) -> dict[str, str]:
        entry = self._by_name.get(type_name or "")
        if entry is None or entry.get("meta-type") != "object":
            return {}
        return {m["name"]: m["type"] for m in entry.get("members", [])}

    def _variant(self, type_name: str | None, case: str) -> str | None:
        entry = self._by_name.get(type_name or "")
        for variant in (entry or {}).get("variants", []):
            if variant.get("case") == case:
                return str(variant["type"])
        return None

    def has_argument(self, command: str, *path: str) -> bool:
        """Does ``command`` take the (possibly nested) argument ``path``?

        A path element ``"driver=NAME"`` steps into a flat union's branch, as in
        ``has_argument("blockdev-add", "driver=copy-before-write", "cbw-timeout")``.
        """
        entry = self._by_name.get(command)
        if entry is None or entry.get("meta-type") != "command":
            return False
        type_name: str | None = entry.get("arg-type")
        for i, name in enumerate(path):
            if "=" in name:
                type_name = self._variant(type_name, name.split("=", 1)[1])
                if type_name is None:
                    return False
                continue
            members = self._members(type_name)
            if name not in members:
                return False
            if i < len(path) - 1:
                type_name = self._resolve_alternate(members[name])
        return True

    def _resolve_alternate(self, type_name: str) -> str:
        """An argument that may be given as a string or an object (an alternate):
        its object form is what has members."""
        entry = self._by_name.get(type_name, {})
        if entry.get("meta-type") == "alternate":
            for member in entry.get("members", []):
                if self._by_name.get(member["type"], {}).get("meta-type") == "object":
                    return str(member["type"])
        return type_name


@dataclass(frozen=True)
class Feature:
    """One capability and what we do with or without it."""

    name: str  # the QMP spelling
    present: bool
    with_it: str  # why we use it
    without_it: str  # what that costs, or the fallback

    @property
    def reason(self) -> str:
        return self.with_it if self.present else self.without_it


REMOVE_FD_AT_ONCE = "migrate-set-parameters.direct-io"

# name -> (schema lookup, why we use it, what happens without it)
_FEATURES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "nbd-server-start.handshake-max-seconds": (
        ("nbd-server-start", "handshake-max-seconds"),
        "used: a client that opens a connection to the NBD server and never finishes "
        "its handshake (TLS included) is dropped after the set time, so it cannot hold "
        "a connection slot open",
        "not available: a client may hold an unfinished NBD handshake open for as long "
        "as the pull backup runs; keep the server on a private unix socket or use TLS",
    ),
    "blockdev-backup.discard-source": (
        ("blockdev-backup", "discard-source"),
        "used for fleecing: each cluster copied to the target is discarded from the "
        "fleecing image, so the image shrinks as the backup progresses",
        "not available: a fleecing image keeps every cluster the guest overwrote until "
        "the backup ends",
    ),
    "blockdev-backup.x-perf.min-cluster-size": (
        ("blockdev-backup", "x-perf", "min-cluster-size"),
        "used with discard-source: the job copies in units of the fleecing image's "
        "cluster size, so that its discards are not rounded away",
        "not available: copies use the target's cluster size",
    ),
    "blockdev-backup.on-cbw-error": (
        ("blockdev-backup", "on-cbw-error"),
        "used on the direct path: a copy-before-write failure breaks the backup, not "
        "the guest's write",
        "not available: on the direct path (fleecing off) a full or failing target "
        "fails the guest's writes; fleecing avoids that",
    ),
    "copy-before-write.on-cbw-error": (
        ("blockdev-add", "driver=copy-before-write", "on-cbw-error"),
        "used for fleecing: break-snapshot makes a failed copy fail the backup and "
        "never the guest's write",
        "not available: fleecing cannot protect the guest's writes on this QEMU",
    ),
    "copy-before-write.cbw-timeout": (
        ("blockdev-add", "driver=copy-before-write", "cbw-timeout"),
        "used for fleecing: a copy that takes longer breaks the snapshot instead of "
        "stalling the guest",
        "not available: a stalled fleecing image stalls the guest's writes",
    ),
    "copy-before-write.min-cluster-size": (
        ("blockdev-add", "driver=copy-before-write", "min-cluster-size"),
        "used with discard-source: the filter copies in units of the fleecing image's cluster size",
        "not available: the filter copies in units of the target's cluster size",
    ),
    "snapshot-access": (
        ("blockdev-add", "driver=snapshot-access"),
        "used for fleecing: the point-in-time view that push copies from and pull exports",
        "not available: only libvirt's direct sequence can run",
    ),
    # Not a capability we call: QEMU 9.1 brought migration's direct-io in the same
    # series that made remove-fd close a passed descriptor at once; before it, a
    # removed descriptor stays open (and listed) for as long as the guest does not run.
    REMOVE_FD_AT_ONCE: (
        ("migrate-set-parameters", "direct-io"),
        "taken as the sign that remove-fd closes a passed descriptor at once, guest "
        "running or not (QEMU 9.1 brought both): targets, scratch and fleecing images "
        "are always handed to QEMU as descriptors we opened",
        "this QEMU closes a removed descriptor only while the guest runs: images are "
        "handed over as descriptors while the guest runs, by name otherwise, and then "
        "only in directories no other user can change",
    ),
    "set-action.shutdown": (
        ("set-action", "shutdown"),
        "used for PRESERVE_SHUTDOWN_DOMAIN: a guest that powers off during the backup "
        "is paused until the backup completes",
        "not available: a guest that powers off ends the backup",
    ),
}


@dataclass
class QemuFeatures:
    """The capabilities of one QEMU, each with the reason for the choice it makes."""

    version: tuple[int, int, int] = (0, 0, 0)
    package: str = ""
    features: dict[str, Feature] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        feature = self.features.get(name)
        return feature is not None and feature.present

    @property
    def version_string(self) -> str:
        text = ".".join(map(str, self.version))
        return f"{text} ({self.package})" if self.package else text

    def describe(self) -> list[dict[str, Any]]:
        """One entry per feature: its name, whether this QEMU has it, and why it matters."""
        return [
            {"feature": f.name, "present": f.present, "choice": f.reason}
            for f in self.features.values()
        ]

    @classmethod
    def from_replies(
        cls, schema_reply: Iterable[dict[str, Any]], version_reply: dict[str, Any]
    ) -> QemuFeatures:
        schema = Schema(schema_reply)
        qemu = version_reply.get("qemu", {})
        version = (int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0)))
        features = {
            name: Feature(name, schema.has_argument(*path), with_it, without_it)
            for name, (path, with_it, without_it) in _FEATURES.items()
        }
        return cls(version, str(version_reply.get("package", "")).strip(), features)

    @classmethod
    def unknown(cls) -> QemuFeatures:
        """Nothing known (a dry run without QEMU, a plan in a unit test): every
        optional feature is taken as absent, which is always a valid choice."""
        return cls(
            features={
                name: Feature(name, False, with_it, without_it)
                for name, (_, with_it, without_it) in _FEATURES.items()
            }
        )

    def with_features(self, *present: str) -> QemuFeatures:
        """A copy with the named features present (planner tests of the other path)."""
        unknown = set(present) - set(self.features)
        if unknown:
            raise KeyError(f"unknown features: {sorted(unknown)}")
        features = {
            name: Feature(f.name, f.present or name in present, f.with_it, f.without_it)
            for name, f in self.features.items()
        }
        return QemuFeatures(self.version, self.package, features)


async def probe(mon: Any) -> QemuFeatures:
    """Ask the QEMU behind ``mon`` (a ``Monitor``) what it supports: two queries."""
    schema = await mon.execute("query-qmp-schema")
    version = await mon.execute("query-version")
    return QemuFeatures.from_replies(schema, version)
