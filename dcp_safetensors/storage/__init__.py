"""Storage backends: where a checkpoint's bytes live.

``local.LocalStorage`` serves local and shared POSIX filesystems (NVMe,
Lustre, GPFS, NFS) with ``pwrite``/``pread``/``fsync``/``rename``.
"""

from dcp_safetensors.storage.local import LocalStorage

__all__ = ["LocalStorage"]
