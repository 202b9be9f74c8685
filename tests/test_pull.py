"""Pull-mode backups against a real QEMU, read by real NBD clients.

Every test ends the job with domainAbortJob and then checks that nothing of the
backup is left: no export, no NBD server, no job, no node, no TLS object, no
scratch file, no socket file.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest
import pytest_asyncio
from lxml import etree

from pyvirtbackup import (
    BackupBeginFlags,
    DomainEventID,
    Driver,
    ErrorNumber,
    JobStatsFlags,
    JobType,
    VirError,
)
from pyvirtbackup.qemu import imgtools, listen
from pyvirtbackup.qemu.nbd import TLS_ALIAS

from . import drivertools
from .certs import make_flawed
from .conftest import VM, MiB
from .nbd_clients import (
    HeldClient,
    nbdcopy,
    nbdinfo,
    read_then_drop,
    tcp_uri,
    unix_uri,
)

pytestmark = pytest.mark.asyncio


# ------------------------------------------------------------------------ helpers



@pytest_asyncio.fixture
async def drivers(tmp_path: Path):
    """Drivers made by the test, all closed at its end."""
    made: list[Driver] = []

    def make(**kwargs) -> Driver:
        kwargs.setdefault("tls_x509_cert_dir", str(tmp_path / "no-such-pki"))
        drv = Driver(state_dir=tmp_path / f"state{len(made)}", **kwargs)
        made.append(drv)
        return drv

    yield make
    for drv in made:
        await drv.close()


def pull_xml(server: str, scratch: dict[str, str | None], extra: str = "") -> str:
    disks = "".join(
        f"<disk name='{name}'{extra}><scratch file='{path}'/></disk>"
        if path
        else f"<disk name='{name}'{extra}/>"
        for name, path in scratch.items()
    )
    return f"<domainbackup mode='pull'>{server}<disks>{disks}</disks></domainbackup>"


async def node_names(vm: VM) -> set[str]:
    return await drivertools.node_names(vm.mon)


async def assert_nothing_left(vm: VM, nodes_before: set[str], paths: list[str]) -> None:
    """The QEMU and the host look as before the backup began."""
    assert await vm.mon.execute("query-block-exports") == []
    assert await vm.mon.execute("query-jobs") == []
    assert await node_names(vm) == nodes_before
    objects = {o["name"] for o in await vm.mon.execute("qom-list", {"path": "/objects"})}
    assert TLS_ALIAS not in objects
    with pytest.raises(VirError, match="NBD server not running"):
        await vm.mon.execute("nbd-server-stop")
    for path in paths:
        assert not os.path.lexists(path), f"{path} was left behind"


def server_attrs(xml: str) -> dict[str, str]:
    return dict(etree.fromstring(xml.encode()).find("server").attrib)


def disk_attrs(xml: str) -> dict[str, dict[str, str]]:
    root = etree.fromstring(xml.encode())
    return {d.get("name"): dict(d.attrib) for d in root.iter("disk")}


def tcp_listeners(port: int) -> set[str]:
    """Local addresses listening on ``port``, from /proc (hex, as the kernel prints)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":
                found.add(addr)
    return found


async def same_bytes(a: str, b: str) -> bool:
    identical, _msg = await imgtools.compare(a, b, fmt_a="raw", fmt_b="raw")
    return identical


# --------------------------------------------------------------------- the tests


async def test_unix_export_shows_the_disks_as_at_begin(vm_factory, drivers, tmp_path):
    vm = await vm_factory()  # vda qcow2, vdb raw, 16 MiB each
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    completed: list[dict] = []
    await drv.connectDomainEventRegisterAny(
        dom, DomainEventID.JOB_COMPLETED, lambda _c, _d, params, _o: completed.append(params)
    )
    sock = str(tmp_path / "nbd.sock")
    scratch = {"vda": str(tmp_path / "vda.scratch"), "vdb": str(tmp_path / "vdb.scratch")}
    ref = {d: await vm.snapshot(d, str(tmp_path / f"{d}.ref")) for d in scratch}
    before = await node_names(vm)

    await drv.domainBackupBegin(
        dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", scratch)
    )

    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    desc = await drv.domainBackupGetXMLDesc(dom)
    assert server_attrs(desc) == {"transport": "unix", "socket": sock}
    disks = disk_attrs(desc)
    assert disks["vda"]["exportname"] == "vda" and disks["vdb"]["exportname"] == "vdb"
    assert "exportbitmap" not in disks["vda"]
    assert disks["vda"]["index"] != disks["vdb"]["index"]

    # the guest goes on writing: over data, into holes, on both disks
    await vm.write("vda", 0x55, 0, 1 * MiB)
    await vm.write("vda", 0x66, 6 * MiB, 2 * MiB)
    await vm.write("vdb", 0x77, 4 * MiB, 1 * MiB)

    stats = await drv.domainGetJobStats(dom)
    assert stats["type"] == JobType.UNBOUNDED
    assert stats["disk_temp_total"] == 32 * MiB
    # the scratch holds what the guest overwrote: 2 MiB of data (holes cost nothing)
    assert 2 * MiB <= stats["disk_temp_used"] <= 32 * MiB

    out_vda, out_vdb = str(tmp_path / "vda.out"), str(tmp_path / "vdb.out")
    await nbdcopy(unix_uri(sock, "vda"), out_vda)
    await imgtools.convert(unix_uri(sock, "vdb"), out_vdb, src_fmt="raw", dst_fmt="raw")
    assert await same_bytes(out_vda, ref["vda"])
    assert await same_bytes(out_vdb, ref["vdb"])
    # and the disks did change meanwhile, so the comparison above means something
    now = await vm.snapshot("vda", str(tmp_path / "vda.now"))
    assert not await same_bytes(out_vda, now)

    await drv.domainAbortJob(dom)

    final = await drv.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
    assert final["type"] == JobType.COMPLETED and final["success"] is True
    assert final["disk_temp_total"] == 32 * MiB and final["disk_temp_used"] >= 2 * MiB
    assert completed == [final]
    with pytest.raises(VirError) as exc:
        await drv.domainBackupGetXMLDesc(dom)
    assert exc.value.code == ErrorNumber.NO_DOMAIN_BACKUP
    await assert_nothing_left(vm, before, [*scratch.values(), sock])


async def test_tcp_without_port_gets_a_free_port_on_that_address_only(
    vm_factory, drivers, tmp_path
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers(nbd_allow_plain_tcp=True)  # plain TCP: refused unless asked for
    dom = await drv.attach("vm1", vm.qmp)
    scratch = str(tmp_path / "vda.scratch")
    before = await node_names(vm)

    await drv.domainBackupBegin(dom, pull_xml("<server name='127.0.0.1'/>", {"vda": scratch}))
    server = server_attrs(await drv.domainBackupGetXMLDesc(dom))
    assert server["transport"] == "tcp" and server["name"] == "127.0.0.1"
    port = int(server["port"])
    assert port > 0
    assert tcp_listeners(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 nor ::
    info = (await nbdinfo(tcp_uri("127.0.0.1", port, "vda"), "--size")).stdout
    assert int(info) == 16 * MiB

    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [scratch])
    assert tcp_listeners(port) == set()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


async def test_tcp_with_a_port_uses_it_and_a_taken_port_fails_before_qemu(
    vm_factory, drivers, tmp_path
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers(nbd_allow_plain_tcp=True)  # plain TCP: refused unless asked for
    dom = await drv.attach("vm1", vm.qmp)
    scratch = str(tmp_path / "vda.scratch")
    before = await node_names(vm)
    squatter = socket.create_server(("127.0.0.1", 0))
    port = squatter.getsockname()[1]
    xml = pull_xml(f"<server name='127.0.0.1' port='{port}'/>", {"vda": scratch})

    with pytest.raises(VirError, match="Address already in use") as exc:
        await drv.domainBackupBegin(dom, xml)
    assert exc.value.code == ErrorNumber.SYSTEM_ERROR
    assert f"127.0.0.1:{port}" in str(exc.value)
    await assert_nothing_left(vm, before, [scratch])

    squatter.close()
    await drv.domainBackupBegin(dom, xml)
    assert server_attrs(await drv.domainBackupGetXMLDesc(dom))["port"] == str(port)
    await nbdinfo(tcp_uri("127.0.0.1", port, "vda"))
    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [scratch])


async def test_tls_admits_only_clients_with_a_certificate_from_the_ca(
    vm_factory, drivers, tmp_path, pki
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers(tls_x509_cert_dir=str(pki.server))
    dom = await drv.attach("vm1", vm.qmp)
    scratch = str(tmp_path / "vda.scratch")
    ref = await vm.snapshot("vda", str(tmp_path / "vda.ref"))
    before = await node_names(vm)

    await drv.domainBackupBegin(
        dom, pull_xml("<server name='localhost' tls='yes'/>", {"vda": scratch})
    )
    server = server_attrs(await drv.domainBackupGetXMLDesc(dom))
    assert server["tls"] == "yes"
    port = int(server["port"])
    await vm.write("vda", 0x42, 0, 2 * MiB)

    out = str(tmp_path / "vda.out")
    await nbdcopy(tcp_uri("localhost", port, "vda", str(pki.client)), out)
    assert await same_bytes(out, ref)
    # QEMU's own client, with its credentials object
    out2 = str(tmp_path / "vda.out2")
    await imgtools.run(
        [
            "qemu-img", "convert", "-O", "raw",
            "--object", f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client",
            "--image-opts",
            f"driver=nbd,server.type=inet,server.host=localhost,server.port={port},"
            "export=vda,tls-creds=tls0",
            out2,
        ]
    )  # fmt: skip
    assert await same_bytes(out2, ref)

    for refused in (
        tcp_uri("localhost", port, "vda", str(pki.no_cert)),  # no certificate
        tcp_uri("localhost", port, "vda", str(pki.rogue)),  # another CA's
        tcp_uri("localhost", port, "vda"),  # no TLS at all
    ):
        result = await nbdcopy(refused, "null:", check=False)
        assert result.returncode != 0, f"{refused} could read the export"

    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [scratch])


async def test_tls_without_peer_verification_still_requires_tls(vm_factory, drivers, tmp_path, pki):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers(tls_x509_cert_dir=str(pki.server), tls_x509_verify=False)
    dom = await drv.attach("vm1", vm.qmp)
    scratch = str(tmp_path / "vda.scratch")
    before = await node_names(vm)
    await drv.domainBackupBegin(
        dom, pull_xml("<server name='localhost' tls='yes'/>", {"vda": scratch})
    )
    port = int(server_attrs(await drv.domainBackupGetXMLDesc(dom))["port"])

    await nbdcopy(tcp_uri("localhost", port, "vda", str(pki.no_cert)), "null:")
    plain = await nbdcopy(tcp_uri("localhost", port, "vda"), "null:", check=False)
    assert plain.returncode != 0

    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [scratch])


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        ("no-dir", ""),
        ("missing", "server-key.pem"),
        ("dangling", "server-cert.pem"),
        ("directory", "ca-cert.pem"),
        ("not-pem", "server-cert.pem"),
        ("refused-by-newer-qemu", "server-cert.pem"),
    ],
)
async def test_tls_files_are_checked_before_anything_is_added(
    vm_factory, drivers, tmp_path, pki, breakage, named
):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    certs = tmp_path / "certs"
    if breakage == "refused-by-newer-qemu":  # well-formed, but QEMU 10.0 refuses it
        certs = make_flawed(tmp_path, pki, "ecdsa-key-without-key-encipherment")
    elif breakage != "no-dir":
        certs.mkdir()
        for f in pki.server.iterdir():
            (certs / f.name).write_bytes(f.read_bytes())
        target = certs / named
        target.unlink()
        if breakage == "dangling":
            target.symlink_to(tmp_path / "nowhere.pem")
        elif breakage == "directory":
            target.mkdir()
        elif breakage == "not-pem":
            target.write_text("not a certificate\n")
    drv = drivers(tls_x509_cert_dir=str(certs))
    dom = await drv.attach("vm1", vm.qmp)
    scratch = str(tmp_path / "vda.scratch")
    before = await node_names(vm)

    with pytest.raises(VirError) as exc:
        await drv.domainBackupBegin(
            dom, pull_xml("<server name='localhost' tls='yes'/>", {"vda": scratch})
        )
    assert exc.value.code == ErrorNumber.CONF_SYNTAX
    assert str(certs / named) in exc.value.message
    await assert_nothing_left(vm, before, [scratch])


async def test_abort_drops_a_client_that_is_still_connected(vm_factory, drivers, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    sock, scratch = str(tmp_path / "nbd.sock"), str(tmp_path / "vda.scratch")
    before = await node_names(vm)
    await drv.domainBackupBegin(
        dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", {"vda": scratch})
    )

    client = await HeldClient.open(unix_uri(sock, "vda"))
    try:
        await asyncio.wait_for(drv.domainAbortJob(dom), 30)
        await assert_nothing_left(vm, before, [scratch, sock])
        after = await client.command("read 64k 64k")
        assert "read failed" in after, after  # the connection is gone
    finally:
        await client.close()
    final = await drv.domainGetJobStats(dom, JobStatsFlags.COMPLETED)
    assert final["type"] == JobType.COMPLETED


async def test_a_client_vanishing_mid_read_leaves_nothing_behind(vm_factory, drivers, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    sock, scratch = str(tmp_path / "nbd.sock"), str(tmp_path / "vda.scratch")
    before = await node_names(vm)
    await drv.domainBackupBegin(
        dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", {"vda": scratch})
    )

    size = await read_then_drop(sock, "vda", length=8 * MiB, keep=64 * 1024)
    assert size == 16 * MiB
    # the export goes on serving others
    await nbdcopy(unix_uri(sock, "vda"), "null:")

    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [scratch, sock])


async def test_generated_scratch_is_removed_and_reused_scratch_kept(vm_factory, drivers, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    sock = str(tmp_path / "nbd.sock")
    before = await node_names(vm)
    server = f"<server transport='unix' socket='{sock}'/>"

    await drv.domainBackupBegin(dom, f"<domainbackup mode='pull'>{server}</domainbackup>")
    generated = disk_attrs(await drv.domainBackupGetXMLDesc(dom))
    scratch = etree.fromstring((await drv.domainBackupGetXMLDesc(dom)).encode()).find(
        "disks/disk/scratch"
    )
    path = scratch.get("file")
    assert path.startswith(vm.disks["vda"].path + ".") and os.path.exists(path)
    assert generated["vda"]["exportname"] == "vda"
    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [path, sock])

    reused = str(tmp_path / "reused.qcow2")
    await imgtools.create(reused, 16 * MiB)
    await drv.domainBackupBegin(
        dom, pull_xml(server, {"vda": reused}), flags=BackupBeginFlags.REUSE_EXTERNAL
    )
    await nbdcopy(unix_uri(sock, "vda"), "null:")
    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [sock])
    assert os.path.exists(reused)


async def test_unix_socket_path_rules(vm_factory, drivers, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers(nbd_socket_mode=0o660)
    dom = await drv.attach("vm1", vm.qmp)
    sock, scratch = tmp_path / "nbd.sock", str(tmp_path / "vda.scratch")
    before = await node_names(vm)
    xml = pull_xml(f"<server transport='unix' socket='{sock}'/>", {"vda": scratch})

    sock.write_text("precious")  # never replaced (QEMU itself would unlink it)
    with pytest.raises(VirError, match="not a socket") as exc:
        await drv.domainBackupBegin(dom, xml)
    assert exc.value.code == ErrorNumber.INVALID_ARG
    assert sock.read_text() == "precious"
    await assert_nothing_left(vm, before, [scratch])
    sock.unlink()

    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sock))
    live.listen()
    with pytest.raises(VirError, match="in use") as exc:
        await drv.domainBackupBegin(dom, xml)
    assert exc.value.code == ErrorNumber.OPERATION_INVALID
    live.close()  # now a stale socket file: replaced

    old_umask = os.umask(0o077)
    try:
        await drv.domainBackupBegin(dom, xml)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    await nbdinfo(unix_uri(str(sock), "vda"))
    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [scratch, str(sock)])


async def test_failures_after_the_jobs_started_are_rolled_back(vm_factory, drivers, tmp_path):
    vm = await vm_factory()
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    sock = str(tmp_path / "nbd.sock")
    scratch = {"vda": str(tmp_path / "vda.scratch"), "vdb": str(tmp_path / "vdb.scratch")}
    server = f"<server transport='unix' socket='{sock}'/>"
    before = await node_names(vm)

    # QEMU refuses an export name longer than NBD allows: the jobs already run
    xml = pull_xml(server, {"vda": scratch["vda"]}, extra=f" exportname='{'x' * 5000}'")
    with pytest.raises(VirError, match="block-export-add"):
        await drv.domainBackupBegin(dom, xml)
    await assert_nothing_left(vm, before, [*scratch.values(), sock])
    assert (await drv.domainGetJobStats(dom))["type"] == JobType.NONE

    # two disks under one export name: refused before anything is added
    same = (
        f"<domainbackup mode='pull'>{server}<disks>"
        f"<disk name='vda' exportname='d'><scratch file='{scratch['vda']}'/></disk>"
        f"<disk name='vdb' exportname='d'><scratch file='{scratch['vdb']}'/></disk>"
        "</disks></domainbackup>"
    )
    with pytest.raises(VirError, match="export name 'd'") as exc:
        await drv.domainBackupBegin(dom, same)
    assert exc.value.code == ErrorNumber.CONFIG_UNSUPPORTED
    await assert_nothing_left(vm, before, [*scratch.values(), sock])

    # another NBD server already runs in this QEMU (the orchestrator's): ours
    # cannot start, and theirs is left alone
    theirs = str(tmp_path / "theirs.sock")
    await vm.mon.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": theirs}}})
    with pytest.raises(VirError, match="already running"):
        await drv.domainBackupBegin(dom, pull_xml(server, scratch))
    assert os.path.exists(theirs)
    await vm.mon.execute("nbd-server-stop")
    await assert_nothing_left(vm, before, [*scratch.values(), sock])

    # and a backup can begin afterwards
    await drv.domainBackupBegin(dom, pull_xml(server, scratch))
    await nbdinfo(unix_uri(sock, "vdb"))
    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [*scratch.values(), sock])


async def test_fd_transport_needs_an_associated_group(vm_factory, drivers, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    before = await node_names(vm)
    with pytest.raises(VirError, match="file descriptor group 'g' was not associated") as exc:
        await drv.domainBackupBegin(
            dom, "<domainbackup mode='pull'><server transport='fd' fdgroup='g'/></domainbackup>"
        )
    assert exc.value.code == ErrorNumber.INVALID_ARG
    await assert_nothing_left(vm, before, [])


async def test_fd_transport_serves_on_the_associated_socket(vm_factory, drivers, tmp_path):
    """domainFDAssociate, then transport='fd': QEMU's NBD server takes the caller's socket."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    path = str(tmp_path / "mine.sock")
    mine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mine.bind(path)
    mine.listen(4)
    try:
        await drv.domainFDAssociate(dom, "grp", [mine.fileno()])
    finally:
        mine.close()  # the driver keeps its own copy
    scratch = tmp_path / "scratch.qcow2"
    await drv.domainBackupBegin(
        dom,
        "<domainbackup mode='pull'><server transport='fd' fdgroup='grp'/>"
        f"<disks><disk name='vda'><scratch file='{scratch}'/></disk></disks></domainbackup>",
    )
    live = await drv.domainBackupGetXMLDesc(dom)
    assert "<server transport='fd' fdgroup='grp'/>" in live
    before = await vm.snapshot("vda", str(tmp_path / "before.raw"))
    copy = tmp_path / "copy.raw"
    proc = await asyncio.create_subprocess_exec(
        "nbdcopy", f"nbd+unix:///vda?socket={path}", str(copy)
    )
    assert await proc.wait() == 0
    same, message = await imgtools.compare(str(copy), before)
    assert same, message
    await drv.domainAbortJob(dom)
    drv.fd_groups_release(None)  # the owner given (none): its descriptors close


async def test_over_a_tcp_monitor_qemu_binds_and_we_narrow(
    vm_factory, drivers, tmp_path, monkeypatch
):
    """No descriptor passing over TCP: QEMU binds, a picked port may be retried."""
    qmp_port = socket.create_server(("127.0.0.1", 0))
    port_number = qmp_port.getsockname()[1]
    qmp_port.close()
    vm = await vm_factory(
        [("vda", "qcow2", 16 * MiB)],
        extra_args=["-qmp", f"tcp:127.0.0.1:{port_number},server=on,wait=off"],
    )
    drv = drivers(nbd_allow_plain_tcp=True)  # plain TCP: refused unless asked for
    dom = await drv.attach("vm1", ("127.0.0.1", port_number))
    assert not dom.monitor.can_pass_fds
    sock, scratch = str(tmp_path / "nbd.sock"), str(tmp_path / "vda.scratch")
    before = await node_names(vm)

    old_umask = os.umask(0o000)
    try:
        await drv.domainBackupBegin(
            dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", {"vda": scratch})
        )
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    await nbdcopy(unix_uri(sock, "vda"), "null:")
    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [scratch, sock])

    # the first port we pick is taken by the time QEMU binds it: begin tries again
    squatter = socket.create_server(("127.0.0.1", 0))
    taken = squatter.getsockname()[1]
    handed: list[int] = []
    real_pick = listen.pick_tcp_port

    def pick(host: str) -> int:
        handed.append(real_pick(host) if handed else taken)
        return handed[-1]

    monkeypatch.setattr(listen, "pick_tcp_port", pick)
    try:
        await drv.domainBackupBegin(dom, pull_xml("<server name='127.0.0.1'/>", {"vda": scratch}))
    finally:
        squatter.close()
    port = int(server_attrs(await drv.domainBackupGetXMLDesc(dom))["port"])
    assert handed[0] == taken and handed[-1] == port != taken
    await nbdinfo(tcp_uri("127.0.0.1", port, "vda"))
    await drv.domainAbortJob(dom)
    await assert_nothing_left(vm, before, [scratch])


async def test_qemu_dying_mid_backup_leaves_no_scratch_or_socket(vm_factory, drivers, tmp_path):
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    drv = drivers()
    dom = await drv.attach("vm1", vm.qmp)
    sock, scratch = str(tmp_path / "nbd.sock"), str(tmp_path / "vda.scratch")
    completed: list[dict] = []
    await drv.connectDomainEventRegisterAny(
        dom, DomainEventID.JOB_COMPLETED, lambda _c, _d, params, _o: completed.append(params)
    )
    await drv.domainBackupBegin(
        dom, pull_xml(f"<server transport='unix' socket='{sock}'/>", {"vda": scratch})
    )
    assert os.path.exists(sock) and os.path.exists(scratch)

    vm.proc.kill()
    await vm.proc.proc.wait()
    for _ in range(200):
        if completed:
            break
        await asyncio.sleep(0.05)
    assert completed and completed[0]["type"] == JobType.FAILED
    assert "QEMU exited" in completed[0]["errmsg"]
    assert not os.path.lexists(scratch) and not os.path.lexists(sock)


async def test_block_device_scratch(vm_factory, drivers, tmp_path):
    """A scratch on a block device is formatted as qcow2, used, and left in place."""
    vm = await vm_factory([("vda", "qcow2", 16 * MiB)])
    nodes_before = await node_names(vm)
    ref = await vm.snapshot("vda", str(tmp_path / "ref.raw"))
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\0" * (32 * MiB))
    dev = (await imgtools.run(["losetup", "--find", "--show", str(backing)])).stdout.strip()
    driver = drivers()
    dom = await driver.attach("vm1", vm.qmp)
    sock = str(tmp_path / "nbd.sock")
    try:
        xml = (
            f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/><disks>"
            f"<disk name='vda' type='block'><scratch dev='{dev}'/></disk></disks></domainbackup>"
        )
        await driver.domainBackupBegin(dom, xml)
        assert f"<scratch dev='{dev}'/>" in await driver.domainBackupGetXMLDesc(dom)
        await vm.write("vda", 0x5C, 0, 2 * MiB)  # copied into the device before it lands
        out = str(tmp_path / "pulled.raw")
        await nbdcopy(unix_uri(sock, "vda"), out)
        assert await same_bytes(ref, out)
        await driver.domainAbortJob(dom)
        assert os.path.exists(dev)
        await assert_nothing_left(vm, nodes_before, [sock])
    finally:
        await imgtools.run(["losetup", "-d", dev], check=False)
