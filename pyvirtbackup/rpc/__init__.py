"""libvirt's remote protocol served over the driver table (``pyvirtbackup serve``)."""
