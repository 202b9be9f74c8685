"""The shutdown action read from a QEMU command line (QMP cannot tell it)."""

from __future__ import annotations

import os

from pyvirtbackup.qemu.actions import process_shutdown_action, shutdown_action


def test_the_last_word_on_the_command_line_wins():
    assert shutdown_action(["qemu-system-x86_64", "-m", "1G"]) == "poweroff"
    assert shutdown_action(["qemu", "-no-shutdown"]) == "pause"
    assert shutdown_action(["qemu", "--no-shutdown"]) == "pause"
    assert shutdown_action(["qemu", "-action", "reboot=shutdown,shutdown=pause"]) == "pause"
    assert shutdown_action(["qemu", "-no-shutdown", "-action", "shutdown=poweroff"]) == "poweroff"
    assert shutdown_action(["qemu", "-action"]) == "poweroff"  # cut short: QEMU's default


def test_an_unreadable_process_means_qemus_default():
    assert process_shutdown_action(None) == "poweroff"
    assert process_shutdown_action(2**22 + 12345) == "poweroff"  # no such process
    assert process_shutdown_action(os.getpid()) == "poweroff"
