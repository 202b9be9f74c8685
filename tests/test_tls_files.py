"""The TLS check refuses, before anything reaches QEMU, every server certificate that
any supported QEMU refuses, and accepts what the documented recipe makes.

Each flawed directory is also handed to the QEMU of this test pass (``object-add``
of a tls-creds-x509 server object), to show that the flaw is one QEMU really
refuses, or, for the few that an older QEMU still takes, that the newer one does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

from pyvirtbackup import ErrorNumber, VirError
from pyvirtbackup.qemu import nbd
from pyvirtbackup.qemu.monitor import QMPCommandError

from .certs import FLAWS, make_flawed

pytestmark = pytest.mark.asyncio

# flaws an older QEMU still accepts at object-add: 7.2 took them, 10.0 refuses
# them, so a set-up that works on 7.2 would break on an upgrade
ACCEPTED_BY_SOME_QEMU = {
    "ecdsa-key-without-key-encipherment",
    "rsa-without-key-encipherment",
}



@pytest_asyncio.fixture
async def vm(vm_factory):
    return await vm_factory([("vda", "qcow2", 1024 * 1024)], fill=())


async def qemu_verdict(vm, directory: Path) -> str | None:
    """None if this QEMU accepts the server credentials, else its reason."""
    args = {
        "qom-type": "tls-creds-x509",
        "id": "tls-check",
        "dir": str(directory),
        "endpoint": "server",
        "verify-peer": True,
    }
    try:
        await vm.mon.execute("object-add", args)
    except QMPCommandError as exc:
        return exc.desc
    await vm.mon.execute("object-del", {"id": "tls-check"})
    return None


async def qemu_major(vm) -> int:
    return int((await vm.mon.execute("query-version"))["qemu"]["major"])


async def test_the_documented_recipe_passes_our_check_and_this_qemu(vm, pki):
    nbd.check_tls_dir(str(pki.server))
    assert await qemu_verdict(vm, pki.server) is None


@pytest.mark.parametrize("flaw", sorted(FLAWS))
async def test_a_flawed_certificate_is_refused_naming_file_and_problem(vm, pki, tmp_path, flaw):
    directory = make_flawed(tmp_path, pki, flaw)
    filename, problem = FLAWS[flaw]
    with pytest.raises(VirError) as exc:
        nbd.check_tls_dir(str(directory))
    assert exc.value.code == ErrorNumber.CONF_SYNTAX
    assert str(directory / filename) in exc.value.message
    assert problem in exc.value.message
    assert "README" in exc.value.message  # and where the fix is

    refused_by_qemu = await qemu_verdict(vm, directory)
    if flaw in ACCEPTED_BY_SOME_QEMU:
        if await qemu_major(vm) >= 10:
            assert refused_by_qemu is not None and "key encipherment" in refused_by_qemu
        return
    assert refused_by_qemu is not None, f"QEMU accepts '{flaw}': the test data is wrong"
