"""Features are read from the QEMU we attach to, and each path works on the QEMU that
has it and on the one that does not (scripts/test runs this on 7.2 and on 10.0).

The expectations here use QEMU's version, which the code never does: the test knows
which QEMU release brought what, the driver only asks QEMU's schema.
"""

from __future__ import annotations

import asyncio

import pytest

from pyvirtbackup import Driver
from pyvirtbackup.qemu import nbd

from .clitools import CLI
from .nbd_clients import nbdinfo, unix_uri

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024

# the QEMU release that brought each feature
SINCE = {
    "nbd-server-start.handshake-max-seconds": (10, 0),
    "blockdev-backup.discard-source": (9, 1),
    "blockdev-backup.x-perf.min-cluster-size": (9, 2),
    "blockdev-backup.on-cbw-error": (10, 1),
    "copy-before-write.on-cbw-error": (7, 1),
    "copy-before-write.cbw-timeout": (7, 1),
    "copy-before-write.min-cluster-size": (9, 2),
    "snapshot-access": (7, 0),
    "set-action.shutdown": (6, 0),
    # our sign that remove-fd closes at once (the same QEMU series brought both)
    "migrate-set-parameters.direct-io": (9, 1),
}


async def test_attach_reads_what_this_qemu_supports(vm_factory, driver):
    vm = await vm_factory([("vda", "qcow2", 4 * MiB)], fill=())
    dom = await driver.attach("vm1", vm.qmp)
    version = await vm.mon.execute("query-version")
    release = (version["qemu"]["major"], version["qemu"]["minor"])
    assert dom.features.version[:2] == release
    assert set(dom.features.features) == set(SINCE)
    for name, since in SINCE.items():
        assert dom.features.has(name) == (release >= since), (name, release)
        assert dom.features.features[name].reason  # every choice says why


async def test_cli_prints_the_features_and_their_reasons(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 4 * MiB)], fill=())
    cli = CLI(tmp_path / "state")
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    listed = (await cli.ok("qemu-features", "vm1", "--json")).json()
    by_name = {f["feature"]: f for f in listed["features"]}
    assert set(by_name) == set(SINCE)
    assert by_name["snapshot-access"]["present"] is True
    text = (await cli.ok("qemu-features", "vm1")).out
    assert "nbd-server-start.handshake-max-seconds" in text
    assert listed["qemu"].split(" ")[0] in text.splitlines()[0]


async def connection_closed_within(path: str, seconds: float) -> bool:
    """Connect to the NBD server, say nothing, and see whether it hangs up."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        greeting = await reader.readexactly(18)  # NBDMAGIC, IHAVEOPT, handshake flags
        assert greeting.startswith(b"NBDMAGIC")
        try:
            rest = await asyncio.wait_for(reader.read(), seconds)
        except TimeoutError:
            return False
        return rest == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_an_unfinished_nbd_handshake_is_dropped_where_qemu_can(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 4 * MiB)])
    drv = Driver(state_dir=tmp_path / "state", nbd_handshake_max_seconds=1)
    try:
        dom = await drv.attach("vm1", vm.qmp)
        sock = str(tmp_path / "nbd.sock")
        xml = (
            f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
            f"<disks><disk name='vda'><scratch file='{tmp_path / 'vda.scratch'}'/></disk>"
            "</disks></domainbackup>"
        )
        steps = await drv.backup_dry_run(dom, xml)
        (start,) = [s for s in steps if s.get("execute") == "nbd-server-start"]
        has_it = dom.features.has(nbd.HANDSHAKE_FEATURE)
        # asked for only where QEMU knows it: 7.2 would refuse the begin otherwise
        assert ("handshake-max-seconds" in start["arguments"]) == has_it

        await drv.domainBackupBegin(dom, xml)
        # a client that never finishes its handshake: dropped after 1 s where
        # supported; where not, it can stay (the documented risk) for as long as we wait
        assert await connection_closed_within(sock, 10 if has_it else 3) == has_it
        # a real client is served either way
        await nbdinfo(unix_uri(sock, "vda"))
        await drv.domainAbortJob(dom)
    finally:
        await drv.close()
