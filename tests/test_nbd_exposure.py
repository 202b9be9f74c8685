"""Who can read a pull backup: another local user (nobody) tries, against a real QEMU
(issue 12, items 3, 4, 5 and 12).

- plain TCP is refused unless asked for, and then the job's XML and log say who can
  read the disks;
- a unix socket appears at its path only with its final mode, also when QEMU binds it
  (TCP monitor), and is never chmodded by a path someone else could swap;
- TLS: a private key others can read is refused, and clients can be limited to an
  allow-list of certificate names; QMP over TCP draws a warning.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
from pathlib import Path

import pytest
import pytest_asyncio

from pyvirtbackup import Driver, ErrorNumber, VirError
from pyvirtbackup.qemu.nbd import AUTHZ_ALIAS, TLS_ALIAS

from . import otheruser
from .certs import Pki
from .clitools import CLI
from .conftest import MiB
from .drivertools import NOTHING_LEFT, leftovers, node_names
from .nbd_clients import nbdcopy, nbdinfo, tcp_uri, unix_uri

pytestmark = pytest.mark.asyncio



@pytest_asyncio.fixture
async def drivers(tmp_path: Path):
    made: list[Driver] = []

    def make(**kwargs) -> Driver:
        drv = Driver(state_dir=tmp_path / f"state{len(made)}", **kwargs)
        made.append(drv)
        return drv

    yield make
    for drv in made:
        await drv.close()


def pull_xml(server: str, scratch: str) -> str:
    return (
        f"<domainbackup mode='pull'>{server}<disks><disk name='vda'>"
        f"<scratch file='{scratch}'/></disk></disks></domainbackup>"
    )


def server_port(desc: str) -> int:
    found = re.search(r" port='(\d+)'", desc)
    assert found, desc
    return int(found.group(1))


def tcp_monitor() -> tuple[list[str], tuple[str, int]]:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return ["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"], ("127.0.0.1", port)


async def no_nbd_server(vm) -> bool:
    try:
        await vm.mon.execute("nbd-server-stop")
    except VirError:
        return True
    return False


READ_AS_NOBODY = r"""
import subprocess, sys
r = subprocess.run(["nbdinfo", "--size", sys.argv[1]], capture_output=True, text=True)
print(r.returncode, r.stdout.strip(), r.stderr.strip()[:200])
"""


# ---------------------------------------------------------------- item 3: plain TCP


async def test_plain_tcp_is_refused_unless_asked_for(vm_factory, drivers, tmp_path, caplog):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    before = await node_names(vm.mon)
    scratch = str(tmp_path / "vda.scratch")
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    for xml in (
        pull_xml("<server name='127.0.0.1'/>", scratch),
        pull_xml("<server name='localhost' tls='no'/>", scratch),
        pull_xml("<server transport='tcp' name='::1' port='10809'/>", scratch),
    ):
        with pytest.raises(VirError, match="every local user") as exc:
            await drv.domainBackupBegin(dom, xml)
        assert exc.value.code == ErrorNumber.OPERATION_DENIED
        assert "transport='unix'" in exc.value.message and "tls='yes'" in exc.value.message
    assert not os.path.exists(scratch) and await no_nbd_server(vm)
    assert await leftovers(vm.mon, before) == NOTHING_LEFT

    # asked for: it runs, and says what it exposes (which is true: nobody reads it)
    caplog.set_level(logging.WARNING)
    drv2 = drivers(nbd_allow_plain_tcp=True)
    await drv.detach(dom)  # QEMU serves one client per monitor socket
    dom = await drv2.attach("vm1", vm.qmp)
    await drv2.domainBackupBegin(dom, pull_xml("<server name='127.0.0.1'/>", scratch))
    desc = await drv2.domainBackupGetXMLDesc(dom)
    port = server_port(desc)
    assert f"<!-- NBD over plain TCP at 127.0.0.1:{port}, without TLS: every local user" in desc
    assert any("every local user" in r.getMessage() for r in caplog.records)
    res = await otheruser.run(READ_AS_NOBODY, tcp_uri("127.0.0.1", port, "vda"))
    assert res.out.split()[:2] == ["0", str(16 * MiB)], res
    await drv2.domainAbortJob(dom)
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_the_cli_needs_allow_plain_tcp(vm_factory, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    cli = CLI(tmp_path / "state")
    await cli.ok("attach", "vm1", "--qmp", vm.qmp)
    xml = tmp_path / "pull.xml"
    xml.write_text(pull_xml("<server name='127.0.0.1'/>", str(tmp_path / "vda.scratch")))
    res = await cli("backup-begin", "vm1", "--backupxml", str(xml))
    assert res.rc == 1 and "code 29" in res.err and "--allow-plain-tcp" in res.err
    await cli.ok("backup-begin", "vm1", "--backupxml", str(xml), "--allow-plain-tcp")
    assert "every local user" in (await cli.ok("backup-dumpxml", "vm1")).out
    await cli.ok("domjobabort", "vm1")


async def test_a_unix_socket_in_a_private_directory_keeps_nobody_out(vm_factory, drivers, shared):
    """The way the README recommends: nobody cannot even reach the socket."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    private = shared / "private"
    private.mkdir(mode=0o700)
    sock = str(private / "nbd.sock")
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    await drv.domainBackupBegin(
        dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", str(shared / "s.qcow2"))
    )
    await nbdinfo(unix_uri(sock, "vda"))  # root reads it
    res = await otheruser.run(READ_AS_NOBODY, unix_uri(sock, "vda"))
    assert not res.out.startswith("0 "), res
    await drv.domainAbortJob(dom)


# ------------------------------------------------ items 4 and 5: the unix socket's path


HOLD_CONNECTIONS = r"""
import socket, sys, time
path, held = sys.argv[1], []
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        held.append(s)  # keep the handshake open, read later
        print("CONNECTED", flush=True)
    except OSError:
        s.close()
print("held", len(held), flush=True)
"""


async def test_over_a_tcp_monitor_nobody_cannot_connect_before_the_socket_is_restricted(
    vm_factory, drivers, shared
):
    """QEMU binds the socket (no descriptor passing over a TCP monitor), under QEMU's
    umask: a client connected in the window before the chmod could keep its connection
    and read the disk later. Now QEMU binds in a private directory."""
    args, qmp = tcp_monitor()
    old = os.umask(0)  # QEMU started by a service with a loose umask
    try:
        vm = await vm_factory([("vda", "qcow2", 16 * MiB)], extra_args=args)
    finally:
        os.umask(old)
    before = await node_names(vm.mon)
    sock = str(shared / "nbd.sock")
    drv = drivers()
    dom = await drv.attach("vm1", qmp)
    attacker = await otheruser.start(HOLD_CONNECTIONS, sock, "30")
    try:
        for _ in range(5):
            await drv.domainBackupBegin(
                dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", str(shared / "s"))
            )
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            assert os.stat(sock).st_uid == 0
            await nbdcopy(unix_uri(sock, "vda"), "null:")
            await drv.domainAbortJob(dom)
    finally:
        res = await otheruser.stop(attacker)
    assert "CONNECTED" not in res.out, res
    assert not [p for p in os.listdir(shared) if p.startswith(".pvb-nbd-")]
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


SWAP_IN_SYMLINKS = r"""
import os, sys, time
path, victim = sys.argv[1], sys.argv[2]
tmp = path + ".lnk"
deadline = time.monotonic() + float(sys.argv[3])
swaps = 0
while time.monotonic() < deadline:
    try:
        os.symlink(victim, tmp)
    except FileExistsError:
        pass
    try:
        os.replace(tmp, path)  # over our socket, if the directory lets us
        swaps += 1
    except OSError:
        pass
print("swaps", swaps, flush=True)
"""


@pytest.mark.parametrize("monitor", ["unix", "tcp"])
async def test_a_path_swapped_for_a_symlink_never_gets_chmodded(
    vm_factory, drivers, shared, tmp_path, monitor
):
    """nobody keeps replacing the socket's path with a symlink to a root-only file,
    hoping our chmod to nbd_socket_mode follows it."""
    args, qmp = tcp_monitor() if monitor == "tcp" else ([], None)
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], extra_args=args)
    before = await node_names(vm.mon)
    victim = tmp_path / "root-only"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    drv = drivers(nbd_socket_mode=0o660)
    dom = await drv.attach("vm1", qmp or vm.qmp)

    # a directory nobody may rename in: refused before anything happens
    loose = shared / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    sock = str(loose / "nbd.sock")
    attacker = await otheruser.start(SWAP_IN_SYMLINKS, sock, str(victim), "3")
    try:
        with pytest.raises(VirError, match="writable by group or others") as exc:
            await drv.domainBackupBegin(
                dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", str(shared / "s"))
            )
        assert exc.value.code == ErrorNumber.OPERATION_DENIED
    finally:
        await otheruser.stop(attacker)
    assert await no_nbd_server(vm)

    # a sticky one (like /tmp): the attacker cannot replace our socket; a symlink
    # planted before begin is never replaced or followed
    sticky = shared / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    sock = str(sticky / "nbd.sock")
    attacker = await otheruser.start(SWAP_IN_SYMLINKS, sock, str(victim), "8")
    try:
        refused = started = 0
        for _ in range(6):
            try:
                await drv.domainBackupBegin(
                    dom,
                    pull_xml(f"<server transport='unix' socket='{sock}'/>", str(shared / "s")),
                )
            except VirError as exc:
                assert "not a socket" in exc.message or "appeared" in exc.message, exc
                refused += 1
                continue
            started += 1
            st = os.lstat(sock)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
            await drv.domainAbortJob(dom)
    finally:
        res = await otheruser.stop(attacker)
    assert refused > 0, res  # the planted symlink was seen
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.read_text() == "secret\n"
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_a_stale_socket_of_another_user_is_not_replaced(vm_factory, drivers, shared):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    sticky = shared / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    sock = sticky / "nbd.sock"
    res = await otheruser.run(
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])", str(sock)
    )
    assert res.rc == 0 and sock.exists(), res
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    with pytest.raises(VirError, match="another user's") as exc:
        await drv.domainBackupBegin(
            dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", str(shared / "s"))
        )
    assert exc.value.code == ErrorNumber.INVALID_ARG
    assert os.lstat(sock).st_uid == otheruser.NOBODY_UID


# ------------------------------------------------------------------------- item 12: TLS


def _pki_copy(pki: Pki, dest: Path) -> Path:
    shutil.copytree(pki.server, dest)
    return dest


@pytest.mark.parametrize(
    ("mode", "group", "owner", "accepted"),
    [
        (0o644, 0, 0, False),  # every user reads it (nobody below does)
        (0o604, 0, 0, False),
        (0o640, otheruser.NOBODY_GID, 0, False),  # a group that is not QEMU's
        (0o660, 0, 0, False),  # QEMU's group may read, never write
        (0o600, 0, otheruser.NOBODY_UID, False),  # nobody's own key
        (0o640, 0, 0, True),  # QEMU (root here) reads it through its group
        (0o600, 0, 0, True),
    ],
)
async def test_a_private_key_others_can_read_is_refused(
    vm_factory, drivers, tmp_path, shared, pki, mode, group, owner, accepted
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    before = await node_names(vm.mon)
    certs = _pki_copy(pki, shared / "certs")
    certs.chmod(0o755)
    key = certs / "server-key.pem"
    os.chown(key, owner, group)
    key.chmod(mode)
    drv = drivers(tls_x509_cert_dir=str(certs))
    dom = await drv.attach("vm1", vm.qmp)
    xml = pull_xml("<server name='localhost' tls='yes'/>", str(tmp_path / "s.qcow2"))
    if accepted:
        await drv.domainBackupBegin(dom, xml)
        await drv.domainAbortJob(dom)
    else:
        if mode & 0o004:  # what the refusal is about: nobody reads the key
            res = await otheruser.run("import sys; print(len(open(sys.argv[1]).read()))", str(key))
            assert res.rc == 0 and int(res.out) > 0, res
        with pytest.raises(VirError, match="private key") as exc:
            await drv.domainBackupBegin(dom, xml)
        assert exc.value.code == ErrorNumber.CONF_SYNTAX
        assert str(key) in exc.value.message
        assert not (tmp_path / "s.qcow2").exists()
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_only_allowed_client_names_are_admitted(vm_factory, drivers, tmp_path, pki):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    before = await node_names(vm.mon)
    with pytest.raises(VirError, match="tls_x509_verify") as exc:
        drivers(tls_x509_cert_dir=str(pki.server), tls_x509_verify=False, tls_allowed_dn_list=[])
    assert exc.value.code == ErrorNumber.INVALID_ARG
    for allowed in (["CN=client"], ["CN=cli*", "CN=someone-else"]):
        drv = drivers(tls_x509_cert_dir=str(pki.server), tls_allowed_dn_list=allowed)
        dom = await drv.attach("vm1", vm.qmp)
        await drv.domainBackupBegin(
            dom, pull_xml("<server name='localhost' tls='yes'/>", str(tmp_path / "s.qcow2"))
        )
        desc = await drv.domainBackupGetXMLDesc(dom)
        port = server_port(desc)
        await nbdcopy(tcp_uri("localhost", port, "vda", str(pki.client)), "null:")
        for refused in (pki.intruder, pki.rogue, pki.no_cert):
            res = await nbdcopy(
                tcp_uri("localhost", port, "vda", str(refused)), "null:", check=False
            )
            assert res.returncode != 0, f"{refused.name} read the export"
        await drv.domainAbortJob(dom)
        objects = {o["name"] for o in await vm.mon.execute("qom-list", {"path": "/objects"})}
        assert not {TLS_ALIAS, AUTHZ_ALIAS} & objects
        await drv.detach(dom)
    assert await leftovers(vm.mon, before) == NOTHING_LEFT


async def test_qmp_over_tcp_draws_a_warning(vm_factory, tmp_path, caplog):
    args, qmp = tcp_monitor()
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)], extra_args=args)
    caplog.set_level(logging.WARNING)
    async with Driver(state_dir=tmp_path / "state") as drv:
        await drv.attach("vm1", qmp)
    assert any("cleartext and unauthenticated" in r.getMessage() for r in caplog.records)
    res = await CLI(tmp_path / "state2").ok("attach", "vm1", "--qmp-tcp", f"{qmp[0]}:{qmp[1]}")
    assert "warning: QMP over TCP" in res.err and "unix socket" in res.err
    assert vm.proc.proc.returncode is None
