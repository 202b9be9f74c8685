"""The harness itself: a real QEMU, guest-like writes through HMP, bytes checked offline."""

from __future__ import annotations

import pytest

from pyvirtbackup import ErrorNumber, VirError
from pyvirtbackup.qemu import imgtools
from pyvirtbackup.qemu.monitor import Monitor
from pyvirtbackup.qemu.process import QemuProcess

from .conftest import DEFAULT_FILL, MiB

pytestmark = pytest.mark.asyncio


async def test_writes_through_devices_reach_the_images(vm_factory):
    vm = await vm_factory(
        [
            ("vda", "qcow2", 16 * MiB, "scsi"),
            ("vdb", "raw", 16 * MiB, "virtio"),
            ("hda", "qcow2", 16 * MiB, "ide"),
        ]
    )
    await vm.write("vda", 0x5A, 1 * MiB, 1 * MiB)
    await vm.write("vdb", 0x6B, 6 * MiB, 512 * 1024)
    await vm.write("hda", 0x7C, 0, 64 * 1024)
    await vm.quit()

    fill_a, fill_b, fill_c = DEFAULT_FILL
    await imgtools.check_pattern(
        vm.disks["vda"].path, "qcow2", [(fill_a[0], 0, MiB), (0x5A, MiB, MiB), fill_b, fill_c]
    )
    await imgtools.check_pattern(
        vm.disks["vdb"].path, "raw", [fill_a, fill_b, (0x6B, 6 * MiB, 512 * 1024), fill_c]
    )
    await imgtools.check_pattern(vm.disks["hda"].path, "qcow2", [(0x7C, 0, 64 * 1024)])
    # and the check itself can fail: the old pattern is gone where we wrote
    with pytest.raises(imgtools.ToolError, match="Pattern verification failed"):
        await imgtools.check_pattern(vm.disks["vda"].path, "qcow2", [(fill_a[0], MiB, MiB)])


async def test_qemu_io_errors_are_reported(vm_factory):
    vm = await vm_factory([("vda", "qcow2", 4 * MiB)])
    with pytest.raises(VirError, match="nosuchdisk"):
        await vm.mon.qemu_io("nosuchdisk", "write 0 4k")
    with pytest.raises(VirError, match="double quote"):
        await vm.mon.qemu_io("vda", 'write "0" 4k')


async def test_qmp_errors_keep_qemus_text(vm_factory):
    vm = await vm_factory([("vda", "qcow2", 4 * MiB)])
    with pytest.raises(VirError) as exc:
        await vm.mon.execute("blockdev-del", {"node-name": "no-such-node"})
    assert exc.value.code == ErrorNumber.INTERNAL_ERROR
    assert "no-such-node" in str(exc.value)
    assert "blockdev-del" in str(exc.value)


async def test_dead_qemu_is_an_error_not_a_hang(vm_factory):
    vm = await vm_factory([("vda", "qcow2", 4 * MiB)])
    other = Monitor()
    await other.connect(vm.qmp)
    vm.proc.kill()
    await vm.proc.proc.wait()
    await other.disconnected.wait()
    with pytest.raises(VirError) as exc:
        await other.execute("query-status")
    assert exc.value.code == ErrorNumber.OPERATION_INVALID
    await other.close()


async def test_missing_socket_is_a_clear_error(tmp_path):
    mon = Monitor()
    with pytest.raises(VirError, match="cannot connect") as exc:
        await mon.connect(str(tmp_path / "nothing.sock"), timeout=2)
    assert exc.value.code == ErrorNumber.OPERATION_FAILED


async def test_qemu_start_failure_reports_stderr(tmp_path):
    proc = QemuProcess([("vda", str(tmp_path / "missing.qcow2"), "qcow2")])
    with pytest.raises(VirError, match=r"missing\.qcow2"):
        await proc.start()
