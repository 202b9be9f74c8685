"""The examples are documentation: each runs, as a user would run it, and says it worked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .certs import make_pki

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 120.0
IDENTICAL = "verdict    identical to the disk at begin"


def run_example(name: str, *args: str) -> str:
    """Run examples/<name> with this interpreter; its output, once it exited with 0.

    On a timeout it gets SIGINT first, so that it stops its QEMU itself (QEMU runs
    in a session of its own and would outlive a killed example).
    """
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"{name} {' '.join(args)} took more than {TIMEOUT:g} s:\n{out}")
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited with {proc.returncode}:\n{out}"
    return out


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_pull_backup_full_then_incremental(tmp_path, transport):
    args = ["--size-mib", "32", "--keep", str(tmp_path / "work")]
    if transport == "tls":
        pki = make_pki(tmp_path / "pki")
        args += ["--tls", str(pki.server), str(pki.client)]
    out = run_example("pull_backup.py", *args)

    # both rounds ran and both copies equal the disk at their begin
    assert out.count(IDENTICAL) == 2, out
    assert "result       both backups identical" in out, out
    assert "checkpoints now c1, c2" in out, out
    # round 1 copied everything, round 2 only the dirty extents (a small part)
    copied = [float(m) for m in re.findall(r"([\d.]+) MiB of 32 MiB", out)]
    assert len(copied) == 2 and copied[0] == 32.0 and 0 < copied[1] < 16, out
    assert re.search(r"-> [1-9]\d* dirty extents", out), out
    # what --keep keeps: the chain a restore would open
    work = tmp_path / "work"
    assert (work / "full.qcow2").is_file() and (work / "inc.qcow2").is_file()
    header = subprocess.run(
        ["qemu-img", "info", str(work / "inc.qcow2")], capture_output=True, text=True, check=True
    ).stdout
    assert "backing file: full.qcow2" in header, header


def test_orchestrator_backs_up_two_vms_twice():
    out = run_example("orchestrator.py")
    # it has no verdict of its own: every job, full then incremental, succeeded
    assert out.count("success=True") == 4, out
    assert "success=False" not in out, out
    assert out.count("checkpoints ['c1', 'c2']") == 2, out


def test_cli_chain_script():
    """The shell example: attach, full + c1, incremental + c2, the chain opens as it is."""
    proc = subprocess.run(
        ["sh", str(EXAMPLES / "cli_chain.sh")],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PY": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("Success:          yes") == 3, out  # two --wait, one domjobinfo
    assert "size='8388608'" in out, out
    assert "c1\n  |\n  +- c2\n" in out, out
    assert out.rstrip().endswith("Images are identical."), out


def test_push_demo_small():
    out = run_example("push_backup.py", "--size-mib", "32")
    assert out.count("identical to the disk at begin") == 2, out
    assert "of them failed" in out and ", 0 of them failed" in out, out
