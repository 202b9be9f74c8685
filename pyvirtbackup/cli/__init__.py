"""The ``pyvirtbackup`` command (virsh's backup and checkpoint commands)."""

from .main import main

__all__ = ["main"]
