"""Reading QEMU's introspection, and the handshake step, without a QEMU."""

from __future__ import annotations

import pytest

from pyvirtbackup.qemu import nbd
from pyvirtbackup.qemu.features import QemuFeatures, Schema


def test_schema_lookup_follows_union_branches_and_nested_members():
    """The schema walker on a small introspection reply shaped like QEMU's."""
    reply = [
        {"name": "blockdev-add", "meta-type": "command", "arg-type": "1"},
        {
            "name": "1",
            "meta-type": "object",
            "members": [{"name": "driver", "type": "2"}],
            "tag": "driver",
            "variants": [{"case": "copy-before-write", "type": "3"}],
        },
        {"name": "3", "meta-type": "object", "members": [{"name": "cbw-timeout", "type": "int"}]},
        {"name": "blockdev-backup", "meta-type": "command", "arg-type": "4"},
        {"name": "4", "meta-type": "object", "members": [{"name": "x-perf", "type": "5"}]},
        {"name": "5", "meta-type": "object", "members": [{"name": "max-workers", "type": "int"}]},
    ]
    schema = Schema(reply)
    assert schema.has_argument("blockdev-add", "driver=copy-before-write", "cbw-timeout")
    assert not schema.has_argument("blockdev-add", "driver=copy-before-write", "nosuch")
    assert not schema.has_argument("blockdev-add", "driver=snapshot-access")
    assert schema.has_argument("blockdev-backup", "x-perf", "max-workers")
    assert not schema.has_argument("blockdev-backup", "x-perf", "min-cluster-size")
    assert not schema.has_argument("no-such-command")
    features = QemuFeatures.from_replies(reply, {"qemu": {"major": 1, "minor": 2, "micro": 3}})
    assert features.has("copy-before-write.cbw-timeout")
    assert not features.has("snapshot-access")
    assert features.version_string == "1.2.3"


def test_unknown_features_are_all_absent_and_can_be_switched_on_for_plans():
    unknown = QemuFeatures.unknown()
    assert not any(f.present for f in unknown.features.values())
    on = unknown.with_features("blockdev-backup.on-cbw-error")
    assert on.has("blockdev-backup.on-cbw-error") and not unknown.has(
        "blockdev-backup.on-cbw-error"
    )
    with pytest.raises(KeyError):
        unknown.with_features("no-such-feature")


def test_server_steps_ask_for_the_handshake_limit_only_when_given():
    address = nbd.unix_address("/s")
    (plain,) = nbd.server_steps(address)
    assert "handshake-max-seconds" not in plain.args
    (limited,) = nbd.server_steps(address, handshake_max_seconds=5)
    assert limited.args["handshake-max-seconds"] == 5
