"""Reader internals: bounded reads of strided (column-shard) chunks."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex

from dcp_safetensors import SafetensorsWriter


def test_column_shard_reads_are_bounded_slabs(tmp_path, monkeypatch):
    """A Shard(1)-style read of a tensor larger than SPAN_LIMIT is read in slabs, byte-exact."""
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    import dcp_safetensors.reader as reader_mod
    from dcp_safetensors.checkpoint import read_checkpoint
    from dcp_safetensors.storage import open_storage

    full = torch.arange(300 * 40, dtype=torch.float32).reshape(300, 40)
    dcp.save({"w": full}, storage_writer=SafetensorsWriter(str(tmp_path)), no_dist=True)
    monkeypatch.setattr(reader_mod, "SPAN_LIMIT", 1000)  # about 6 rows of 160 bytes per slab
    reads = []
    storage = open_storage(str(tmp_path))
    original = type(storage).readinto

    def counting(self, name, offset, buffer):
        reads.append(memoryview(buffer).nbytes)
        return original(self, name, offset, buffer)

    monkeypatch.setattr(type(storage), "readinto", counting)
    dest = torch.zeros(300, 15)

    class Planner:
        def resolve_tensor(self, item):
            return dest

        def commit_tensor(self, item, tensor):
            pass

    item = ReadItem(LoadItemType.TENSOR, MetadataIndex("w"), torch.Size([0, 0]), MetadataIndex("w"), torch.Size([0, 20]), torch.Size([300, 15]))
    reader_mod._read_tensor(storage, read_checkpoint(str(tmp_path)).tensors["w"], item, Planner())
    assert torch.equal(dest, full[:, 20:35])
    assert len(reads) > 40 and max(reads) <= 1000
