"""QEMU over QMP: the monitor, the block graph, bitmaps, stores, backup jobs, NBD.

Nothing in here knows XML; it takes definitions already parsed by ``conf``.
"""
