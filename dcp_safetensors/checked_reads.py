"""Reads a load checks: every byte handed on lies in a block whose CRC-32 matched the save's.

:class:`CheckedReads` stands between the reader and one load's pinned files
(:class:`~dcp_safetensors.pinned.PinnedFiles`). A read that starts and ends
on block bounds (a load with the save's sharding: blocks are cut at every
chunk's rows, :mod:`dcp_safetensors.blocks`) goes straight into its
destination and is checked there, with no copy and no extra byte. A read
that starts or ends inside a block also reads the rest of that block, into a
small buffer that is checked and then copied from; the last few such blocks
are kept, so the rows of a column shard, which fall in the same blocks one
after another, read and check each block once.

A file without recorded blocks (another tool's checkpoint, or a save from
before block checksums) is read as it is.

Example:
    >>> import tempfile, zlib, numpy as np
    >>> from dcp_safetensors.blocks import BlockTable
    >>> from dcp_safetensors.pinned import PinnedFiles
    >>> from dcp_safetensors.storage import open_storage
    >>> d = tempfile.mkdtemp()
    >>> _ = open(d + "/f", "wb").write(b"abcdefgh")
    >>> table = BlockTable(np.array([0, 4]), np.array([zlib.crc32(b"abcd"), zlib.crc32(b"efgh")], np.uint32), 8)
    >>> reads = CheckedReads(PinnedFiles(open_storage(d)), {"f": table}, what="the load of 'w' fails")
    >>> out = bytearray(3)
    >>> reads.readinto("f", 3, memoryview(out))
    >>> bytes(out), reads.extra_bytes  # both blocks read whole, and checked
    (b'def', 5)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dcp_safetensors.blocks import BlockTable
from dcp_safetensors.pinned import PinnedFiles

__all__ = ["CheckedReads"]

KEPT_BLOCKS = 4
"""Checked partial blocks kept for the next reads (a column shard's rows come one block after another)."""


class CheckedReads:
    """``readinto`` of ``files``, checked against ``tables`` (``{file: BlockTable}``); ``what`` ends
    a mismatch's message (:meth:`~dcp_safetensors.blocks.BlockTable.check`). ``extra_bytes``: the
    bytes read beyond those asked for."""

    def __init__(self, files: PinnedFiles, tables: Mapping[str, BlockTable], *, what: str | Callable[[int, int], str]) -> None:
        self.files = files
        self.tables = tables
        self.what = what
        self.bytes_read = 0
        self.bytes_asked = 0
        self._kept: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    @property
    def extra_bytes(self) -> int:
        return max(0, self.bytes_read - self.bytes_asked)

    # What the reader's helpers use of PinnedFiles besides readinto (errors name files by path).
    @property
    def read_span(self) -> int:
        return self.files.read_span

    def path(self, name: str) -> str:
        return self.files.path(name)

    def readinto(self, file: str, offset: int, out: Any) -> None:
        """Fill ``out`` with the file's bytes from ``offset``, every block they touch checked."""
        view = memoryview(out).cast("B")
        table = self.tables.get(file)
        self.bytes_asked += len(view)
        if table is None or not len(view):
            self.files.readinto(file, offset, view)
            self.bytes_read += len(view)
            return
        end = offset + len(view)
        lo, hi = table.span(offset, end)
        first_end, last_start = _block_end(table, lo), _block_start(table, hi - 1)
        inner_lo = offset if offset == lo else first_end
        inner_hi = end if end == hi else last_start
        if inner_lo < inner_hi:  # whole blocks: straight into the destination, checked there
            # One read, as without checks (on an object store a read is a request), then each block's CRC.
            part = view[inner_lo - offset : inner_hi - offset]
            self.files.readinto(file, inner_lo, part)
            self.bytes_read += len(part)
            table.check(inner_lo, part, source=self.files.path(file), what=self.what)
        if offset > lo or first_end > end:  # the first block, in part
            self._copy(file, table, lo, first_end, view, offset)
        if end < hi and last_start != lo:  # the last block, in part (and not the first)
            self._copy(file, table, last_start, hi, view, offset)

    def _copy(self, file: str, table: BlockTable, lo: int, hi: int, view: memoryview, offset: int) -> None:
        """Copy what ``view`` (the bytes from ``offset``) holds of the checked block ``[lo, hi)``."""
        block = self._kept.get((file, lo))
        if block is None:
            block = np.empty(hi - lo, dtype=np.uint8)
            self.files.readinto(file, lo, block)
            self.bytes_read += hi - lo
            table.check(lo, block, source=self.files.path(file), what=self.what)
            self._kept[file, lo] = block
            if len(self._kept) > KEPT_BLOCKS:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end((file, lo))
        a, b = max(lo, offset), min(hi, offset + len(view))
        view[a - offset : b - offset] = block[a - lo : b - lo].data


def _block_start(table: BlockTable, at: int) -> int:
    return int(table.starts[int(np.searchsorted(table.starts, at, side="right")) - 1])


def _block_end(table: BlockTable, start: int) -> int:
    i = int(np.searchsorted(table.starts, start, side="right"))
    return int(table.starts[i]) if i < len(table.starts) else table.size

