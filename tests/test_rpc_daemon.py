"""The daemon as a service: libvirt's default socket reached by ``virsh -c qemu:///system``,
``--group``, SIGTERM with a backup running (taken over by the next daemon), and the
guest agent paths a backup tool meets.
"""

from __future__ import annotations

import asyncio
import grp
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtbackup.qemu.agent import GuestAgent
from pyvirtbackup.rpc.server import DEFAULT_SOCKET

from .rpctools import SYSTEM_PYTHON, Daemon, MiB, RpcEnv, cli, env_fixture, run

pytestmark = pytest.mark.asyncio(loop_scope="module")

env = env_fixture([("vda", "qcow2", 8 * MiB, "virtio")])
NO_FULL_FREEZE = ["-b", "guest-fsfreeze-freeze"]  # on this host it would freeze the host


async def start_waiting(daemon: Daemon, timeout: float = 120.0) -> None:
    """Start ``daemon``; while another test run on this machine serves the same path,
    wait for it to finish (the daemon refuses a socket someone serves)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await asyncio.to_thread(daemon.start)
            return
        except RuntimeError as exc:
            if "already listening" not in str(exc) or loop.time() > deadline:
                raise
            await asyncio.sleep(1.0)


async def test_default_socket_reached_by_plain_qemu_system(env: RpcEnv, tmp_path: Path) -> None:
    """No --socket: libvirt's own path, where virsh looks when no libvirt daemon exists."""
    assert not os.path.exists("/var/run/libvirt/virtqemud-sock"), "a libvirt daemon is installed"
    state = tmp_path / "state"
    attached = await asyncio.to_thread(cli, state, "attach", "vmdef", "--qmp", env.extra_qmp)
    assert attached.returncode == 0, attached.stderr
    daemon = Daemon(state, None)
    await start_waiting(daemon)
    try:
        assert stat.S_IMODE(os.stat(DEFAULT_SOCKET).st_mode) == 0o600
        listing = run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"])
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.split() == ["vmdef"]
        # and with no -c at all, as root: virsh's default URI is the same
        assert run(["virsh", "domstate", "vmdef"]).stdout.strip() == "paused"
    finally:
        assert await asyncio.to_thread(daemon.stop) == 0
    assert not os.path.exists(DEFAULT_SOCKET)  # removed by the daemon that made it


async def test_group_widens_the_socket(env: RpcEnv, tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    daemon = Daemon(tmp_path / "state", tmp_path / "sock", "--group", group)
    await asyncio.to_thread(daemon.start)
    try:
        st = os.stat(tmp_path / "sock")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        assert await asyncio.to_thread(daemon.stop) == 0


async def test_sigterm_leaves_the_backup_to_the_next_daemon(env: RpcEnv, tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    xml = tmp_path / "pull.xml"
    xml.write_text(
        f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
        f"<disks><disk name='vda'><scratch file='{tmp_path / 'scratch'}'/></disk></disks>"
        "</domainbackup>"
    )
    assert env.virsh("backup-begin", "vm1", "--backupxml", str(xml)).returncode == 0
    assert await asyncio.to_thread(env.daemon.stop) == 0  # SIGTERM
    # the job goes on in QEMU without any daemon
    assert run(["nbdinfo", "--size", f"nbd+unix:///vda?socket={sock}"]).stdout.strip() == str(
        8 * MiB
    )
    await asyncio.to_thread(env.daemon.start)
    assert "Job type:         Unbounded" in env.virsh("domjobinfo", "vm1").stdout
    assert f"socket='{sock}'" in env.virsh("backup-dumpxml", "vm1").stdout
    assert env.virsh("domjobabort", "vm1").returncode == 0
    assert "Job type:         Completed" in env.virsh("domjobinfo", "vm1", "--completed").stdout
    assert not sock.exists()


async def test_guest_agent_errors(env: RpcEnv, tmp_path: Path) -> None:
    """No agent configured: libvirt's 74; configured but nobody answering: 86."""
    script = (
        "import sys, libvirt\n"
        "libvirt.registerErrorHandler(lambda c, e: None, None)\n"
        "dom = libvirt.open(sys.argv[1]).lookupByName(sys.argv[2])\n"
        "for call in (dom.fsFreeze, dom.fsThaw):\n"
        "    try:\n"
        "        print(call())\n"
        "    except libvirt.libvirtError as e:\n"
        "        print(e.get_error_code(), e.get_error_message())\n"
    )
    out = run([SYSTEM_PYTHON, "-c", script, env.uri, "vm1"]).stdout.splitlines()
    assert out == ["74 argument unsupported: QEMU guest agent is not configured"] * 2
    # the same QEMU recorded again, with an agent socket nobody listens on
    agent = tmp_path / "agent.sock"
    attached = await asyncio.to_thread(
        cli, env.state_dir, "attach", "vmga", "--qmp", env.extra_qmp, "--agent", str(agent)
    )
    assert attached.returncode == 0, attached.stderr
    try:
        out = run([SYSTEM_PYTHON, "-c", script, env.uri, "vmga"]).stdout.splitlines()
        assert len(out) == 2
        for line in out:
            assert line.startswith(
                "86 Guest agent is not responding: QEMU guest agent is not connected"
            ), line
    finally:
        assert (await asyncio.to_thread(cli, env.state_dir, "detach", "vmga")).returncode == 0


@pytest.fixture
def guest_agent(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real qemu-ga, run on this host as no guest OS is at hand, and a small ext4
    mounted from a loop device for it to freeze. Freezing everything would freeze the
    host: that command is disabled (-b), so only the listed filesystem can be frozen."""
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    for argv in (["mkfs.ext4", "-q", str(image)], ["mount", "-o", "loop", str(image), str(mnt)]):
        result = run(argv)
        assert result.returncode == 0, result.stderr
    sock = tmp_path / "qga.sock"
    agent = subprocess.Popen(
        ["qemu-ga", "-m", "unix-listen", "-p", str(sock), "-t", str(tmp_path), *NO_FULL_FREEZE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "qemu-ga did not start"
            time.sleep(0.02)
        yield sock, mnt
    finally:
        run(["fsfreeze", "--unfreeze", str(mnt)])  # in case a test left it frozen
        agent.terminate()
        agent.wait(10)
        result = run(["umount", str(mnt)])
        assert result.returncode == 0, result.stderr


async def test_fsfreeze_and_thaw_through_a_real_agent(
    env: RpcEnv, guest_agent: tuple[Path, Path]
) -> None:
    sock, mnt = guest_agent
    attached = await asyncio.to_thread(
        cli, env.state_dir, "attach", "vmga", "--qmp", env.extra_qmp, "--agent", str(sock)
    )
    assert attached.returncode == 0, attached.stderr
    status = GuestAgent(str(sock)).fsfreeze_status
    try:
        frozen = env.virsh("domfsfreeze", "vmga", "--mountpoint", str(mnt))
        assert frozen.returncode == 0, frozen.stderr
        assert frozen.stdout.strip() == "Froze 1 filesystem(s)"
        assert await status() == "frozen"
        thawed = env.virsh("domfsthaw", "vmga")
        assert thawed.returncode == 0, thawed.stderr
        assert thawed.stdout.strip() == "Thawed 1 filesystem(s)"
        assert await status() == "thawed"
        # the agent's own refusal travels with libvirt's number for it
        refused = env.virsh("domfsfreeze", "vmga")
        assert refused.returncode == 1
        assert (
            "internal error: unable to execute QEMU agent command 'guest-fsfreeze-freeze'"
            in refused.stderr
        )
    finally:
        detached = await asyncio.to_thread(cli, env.state_dir, "detach", "vmga")
        assert detached.returncode == 0, detached.stderr


async def test_keepalive_answered(env: RpcEnv) -> None:
    """virsh pings every second and gives up after one unanswered ping; it stays."""
    result = await asyncio.to_thread(
        env.virsh, "-k", "1", "-K", "1", "event", "--all", "--timeout", "3"
    )
    assert "events received: 0" in result.stdout, result.stdout + result.stderr
    assert "keepalive" not in result.stderr
