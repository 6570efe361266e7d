"""Verifying a checkpoint: every check of :func:`~dcp_safetensors.checkpoint.read_checkpoint`, plus every file's checksum.

:func:`verify` raises the first problem, as :func:`~dcp_safetensors.checkpoint.read_checkpoint`
does, and stops reading there; :func:`verify_all` reads every intact file and
reports every problem in a :class:`VerifyReport` (``dcp-safetensors verify``).
Both are importable from :mod:`dcp_safetensors.checkpoint` too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dcp_safetensors.checkpoint import (
    Checkpoint,
    Problem,
    check_snapshot,
    open_checkpoint,
    open_snapshot,
)
from dcp_safetensors.checksum import crc32, format_crc32
from dcp_safetensors.errors import ChecksumMismatchError, DcpSafetensorsError, shrank
from dcp_safetensors.pinned import PinnedFiles
from dcp_safetensors.storage import open_storage

__all__ = ["ProgressCallback", "VerifyReport", "verify", "verify_all"]

ProgressCallback = Callable[[int, int], object]
"""``progress(done_bytes, total_bytes)``: called with ``(0, total)`` first, then as bytes are done."""


@dataclass
class VerifyReport:
    """What :func:`verify_all` found.

    ``checkpoint`` holds what could be opened (``None`` when the index itself
    is unusable); ``problems`` lists every problem, each naming its file;
    ``bytes_checked`` counts the bytes read for checksums;
    ``files_checked_by_store`` the files whose checksum the store gave
    (S3's full-object CRC-32, checked by the server on receipt), not read.
    """

    checkpoint: Checkpoint | None
    problems: list[Problem]
    files_checked: int = 0
    bytes_checked: int = 0
    files_checked_by_store: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _checksums(
    ckpt: Checkpoint, files: PinnedFiles, chunk_size: int, progress: ProgressCallback | None, read_data: bool
) -> Iterator[tuple[int, bool, Problem | None]]:
    """Check every file that has a recorded checksum, in name order: for each, the bytes read,
    whether the store gave its CRC-32 (then nothing is read; never with ``read_data``), and its
    problem (None if intact). Stopping early reads no further file."""
    recorded = sorted(ckpt.checksums.items())
    sizes = [ckpt.headers[f].file_size for f, _ in recorded]
    total = sum(sizes)
    if progress is not None:
        progress(0, total)
    buf = bytearray(min(chunk_size, max(sizes, default=0)))
    done = 0
    for (file, want), size in zip(recorded, sizes):
        read, by_store = 0, False
        problem: Problem | None = None
        try:
            # An object store that checked the file's full-object CRC-32 on receipt gives it back: no read.
            crc = None if read_data or files.staging is not None else files.storage.stored_crc32(file, files.etags.get(file))
            by_store = crc is not None
            if crc is None:
                crc = 0
                table = ckpt.blocks.get(file)
                # Whole blocks at a time where the save recorded them: each is checked as it goes by.
                spans = table.spans(chunk_size) if table is not None else [
                    (o, min(o + chunk_size, size)) for o in range(0, size, chunk_size)
                ]
                if len(buf) < max((hi - lo for lo, hi in spans), default=0):
                    buf = bytearray(max(hi - lo for lo, hi in spans))
                with shrank(files, file):
                    for lo, hi in spans:
                        view = memoryview(buf)[: hi - lo]
                        files.readinto(file, lo, view)
                        read += view.nbytes
                        if table is not None:  # the first bad block ends the file's check, naming its bytes
                            table.check(lo, view, source=files.path(file), what="restore the file or save again")
                        crc = crc32(view, crc)
                        if progress is not None:
                            progress(done + hi, total)
            if format_crc32(crc) != want:
                if by_store:
                    found, cause = f"the store's CRC-32 of it, {format_crc32(crc)},", "the object was replaced"
                else:
                    found, cause = f"checksum {format_crc32(crc)}", "the file's bytes changed"
                raise ChecksumMismatchError(
                    f"{files.path(file)}: {found} differs from {want} recorded at save time ({cause} after it was written)"
                )
        except (DcpSafetensorsError, OSError) as e:
            problem = e
        yield read, by_store, problem
        done += size
        if progress is not None:
            progress(done, total)


def verify(
    path: str,
    *,
    chunk_size: int = 16 << 20,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    read_data: bool = False,
) -> Checkpoint:
    """Every check :func:`read_checkpoint` makes, plus every file's checksum.

    Files are read in full and CRC-32'd. On S3 a file whose store keeps the
    full-object CRC-32 our save sent (the server checked it against the
    bytes on receipt) is checked by a HEAD instead; ``read_data=True`` reads
    it anyway, as a store that records checksums without checking them
    (moto) needs.

    Raises a :class:`~dcp_safetensors.errors.CheckpointCorruptError` subclass
    naming the first broken file; returns the checkpoint if intact. Checkpoints
    written by other tools carry no checksums: their structure is checked.
    :func:`verify_all` reports every problem instead of the first.
    ``progress(done_bytes, total_bytes)`` is called as the checksums are read.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, d + "/model.safetensors")
        >>> sorted(verify(d).headers)
        ['model.safetensors']
    """
    ckpt, files = open_checkpoint(path, open_storage(path, storage_options), None)
    try:
        for _, _, problem in _checksums(ckpt, files, chunk_size, progress, read_data):
            if problem is not None:
                raise problem
    finally:
        files.close()
    return ckpt


def verify_all(
    path: str,
    *,
    chunk_size: int = 16 << 20,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    read_data: bool = False,
) -> VerifyReport:
    """Like :func:`verify`, but report every problem rather than raise the first.

    Each broken file is reported once (a file whose size, header or snapshot is
    wrong is not also checksummed); every intact file is checksummed. A problem
    that leaves nothing to check file by file (no checkpoint at ``path``, an
    unreadable index) is the only problem reported.

    Example:
        >>> import tempfile, torch, torch.distributed.checkpoint as dcp
        >>> from dcp_safetensors import SafetensorsWriter
        >>> d = tempfile.mkdtemp()
        >>> _ = dcp.save({"a": torch.ones(4), "b": torch.zeros(4)}, no_dist=True,
        ...              storage_writer=SafetensorsWriter(d, max_shard_size=16))
        >>> verify_all(d).ok
        True
        >>> for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        ...     with open(f"{d}/{name}", "r+b") as f:
        ...         _ = f.seek(-1, 2); _ = f.write(b"!")
        >>> [type(p).__name__ for p in verify_all(d).problems]
        ['ChecksumMismatchError', 'ChecksumMismatchError']
    """
    files = open_snapshot(open_storage(path, storage_options))
    try:
        try:
            ckpt, problems = check_snapshot(path, files, None)
        except (DcpSafetensorsError, OSError) as e:
            return VerifyReport(None, [e])
        report = VerifyReport(ckpt, problems)
        for read, by_store, problem in _checksums(ckpt, files, chunk_size, progress, read_data):
            report.files_checked += 1
            report.bytes_checked += read
            report.files_checked_by_store += by_store
            if problem is not None:
                report.problems.append(problem)
    finally:
        files.close()
    return report
