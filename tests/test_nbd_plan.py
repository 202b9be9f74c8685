"""The NBD steps of a pull plan and our listening sockets, without a QEMU."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from pyvirtbackup import ErrorNumber, VirError
from pyvirtbackup.qemu import listen, nbd
from pyvirtbackup.qemu.blockgraph import Disk
from pyvirtbackup.qemu.plan import PlanDisk, Tuning, plan_backup

from .certs import make_pki

MiB = 1024 * 1024


def pull_plan(export_names: dict[str, str | None] | None = None):
    names = export_names or {"vda": None, "vdb": None}
    disks = {
        n: Disk(n, f"{n}-fmt", f"/img/{n}.qcow2", "qcow2", "file", 16 * MiB, False, 65536)
        for n in names
    }
    return plan_backup(
        "pull",
        [
            PlanDisk(n, f"/scratch/{n}", "file", "qcow2", "full", export_name=e)
            for n, e in names.items()
        ],
        disks,
        {},
        first_store_id=1,
        reuse_external=False,
        tuning=Tuning(),
    )


def test_steps_run_tls_then_server_before_the_transaction_and_exports_after():
    plan = nbd.add_pull_steps(
        pull_plan(),
        nbd.fd_address(nbd.LISTEN_FD_NAME),
        tls=nbd.TlsCreds("/pki", verify_peer=True),
        pass_fd=True,
    )
    commands = [c.get("execute", c.get("local")) for c in plan.describe()]
    tx = commands.index("transaction")
    assert commands[tx - 3 : tx] == ["object-add", "getfd", "nbd-server-start"]
    assert commands[tx + 1 :] == ["block-export-add", "block-export-add"]
    described = plan.describe()
    assert described[tx - 3]["arguments"] == {
        "qom-type": "tls-creds-x509",
        "id": nbd.TLS_ALIAS,
        "dir": "/pki",
        "endpoint": "server",
        "verify-peer": True,
    }
    assert described[tx - 1]["arguments"] == {
        "addr": {"type": "fd", "data": {"str": nbd.LISTEN_FD_NAME}},
        "tls-creds": nbd.TLS_ALIAS,
    }
    assert described[tx + 1]["arguments"] == {
        "type": "nbd",
        "id": "pvb-nbd-vda",
        "node-name": "pvb-1-format",
        "name": "vda",
        "writable": False,
    }


def test_every_server_step_can_be_undone():
    steps = nbd.server_steps(nbd.fd_address("l"), pass_fd=True) + nbd.tls_steps(
        nbd.TlsCreds("/pki")
    )
    undo = {s.command: [(u.command, u.ignore_errors) for u in s.undo] for s in steps}
    assert undo == {
        "getfd": [("closefd", True)],  # consumed by nbd-server-start when that ran
        "nbd-server-start": [("nbd-server-stop", False)],
        "object-add": [("object-del", False)],
    }


def test_addresses_use_the_legacy_form_qemu_7_2_wants():
    assert nbd.inet_address("localhost", 10809) == {
        "type": "inet",
        "data": {"host": "localhost", "port": "10809"},
    }
    assert nbd.unix_address("/run/s") == {"type": "unix", "data": {"path": "/run/s"}}


def test_fallback_server_publishes_the_unix_socket_right_after_start():
    """QEMU binds in our private directory; the socket moves into place before any export."""
    steps = nbd.server_steps(
        nbd.unix_address("/run/.pvb-nbd-x/nbd.sock"), publish=("/run/s", 0o600)
    )
    assert [(s.kind, s.command) for s in steps] == [
        ("qmp", "nbd-server-start"),
        ("publish-socket", "publish"),
    ]
    assert steps[1].args == {"path": "/run/s", "mode": 0o600}


def test_export_bitmap_and_name_come_from_the_plan():
    plan = pull_plan({"vda": "disk-a"})
    plan.disks[0].export_bitmap = "backup-vda"
    (step,) = nbd.export_steps(plan)
    assert step.args["name"] == "disk-a" and step.args["bitmaps"] == ["backup-vda"]


def test_one_export_name_for_two_disks_is_refused():
    with pytest.raises(VirError, match="export name 'x'") as exc:
        nbd.check_export_names(pull_plan({"vda": "x", "vdb": "x"}))
    assert exc.value.code == ErrorNumber.CONFIG_UNSUPPORTED


def test_nbd_steps_are_for_pull_plans_only():
    plan = pull_plan()
    plan.mode = "push"
    with pytest.raises(ValueError):
        nbd.add_pull_steps(plan, nbd.unix_address("/s"))


def test_tls_dir_check_accepts_a_complete_directory(tmp_path):
    server = make_pki(tmp_path / "pki").server
    nbd.check_tls_dir(str(server))
    (server / "dh-params.pem").write_text("garbage")  # optional, but broken
    with pytest.raises(VirError, match=r"dh-params\.pem") as exc:
        nbd.check_tls_dir(str(server))
    assert exc.value.code == ErrorNumber.CONF_SYNTAX


# --------------------------------------------------------------------- listeners


def test_unix_listener_has_its_mode_whatever_the_umask(tmp_path):
    path = str(tmp_path / "s")
    for umask, mode in ((0o000, 0o600), (0o077, 0o660), (0o022, 0o600)):
        old = os.umask(umask)
        try:
            listener = listen.listen_unix(path, mode)
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        listener.cleanup()
        assert not os.path.exists(path)


def test_unix_cleanup_removes_only_our_socket(tmp_path):
    path = str(tmp_path / "s")
    listener = listen.listen_unix(path)
    listener.release()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)  # someone else's socket now sits at the path
    listener.cleanup()
    assert os.path.exists(path)
    other.close()


def test_tcp_listener_binds_the_named_address_and_reports_the_port():
    listener = listen.listen_tcp("127.0.0.1", None)
    try:
        assert listener.sock is not None
        assert listener.sock.getsockname() == ("127.0.0.1", listener.port)
        socket.create_connection(("127.0.0.1", listener.port), timeout=5).close()
        with pytest.raises(VirError, match="Address already in use") as exc:
            listen.listen_tcp("127.0.0.1", listener.port)
        assert exc.value.code == ErrorNumber.SYSTEM_ERROR
    finally:
        listener.cleanup()


def test_unknown_host_is_a_clear_error():
    with pytest.raises(VirError, match="cannot resolve NBD server name") as exc:
        listen.listen_tcp("no-such-host.invalid", None)
    assert exc.value.code == ErrorNumber.OPERATION_FAILED
