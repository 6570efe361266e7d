"""Reader internals: bounded reads of strided (column-shard) chunks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex

from dcp_safetensors import SafetensorsReader, SafetensorsWriter


def test_column_shard_reads_are_bounded_slabs(tmp_path, monkeypatch):
    """A Shard(1)-style read of a tensor larger than the storage's read_span is read in slabs, byte-exact."""
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    import dcp_safetensors.reader as reader_mod
    from dcp_safetensors.checkpoint import read_checkpoint
    from dcp_safetensors.storage import open_storage

    full = torch.arange(300 * 40, dtype=torch.float32).reshape(300, 40)
    dcp.save({"w": full}, storage_writer=SafetensorsWriter(str(tmp_path)), no_dist=True)
    ckpt = read_checkpoint(str(tmp_path))  # before counting: only the tensor's reads count
    reads = []
    storage = open_storage(str(tmp_path))
    monkeypatch.setattr(type(storage), "read_span", 1000)  # about 6 rows of 160 bytes per slab
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
    [[chunk]] = reader_mod._batches(ckpt, [item], storage.read_batch)
    reader_mod._read_tensor(storage, chunk, Planner())
    assert torch.equal(dest, full[:, 20:35])
    assert len(reads) > 40 and max(reads) <= 1000


def test_header_longer_than_the_first_read_is_read_on(tmp_path, monkeypatch):
    """A header past the first read (HEADER_READ) takes a second read from where the first
    ended; a short one takes one read. Both give every tensor."""
    import safetensors.torch

    from dcp_safetensors import checkpoint, read_checkpoint
    from dcp_safetensors.pinned import PinnedFiles

    tensors = {f"layers.{i}.norm.weight": torch.full((3,), float(i)) for i in range(6000)}
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    n = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert n > checkpoint.HEADER_READ  # the case under test
    reads = []
    original = PinnedFiles.read_range

    def counting(self, name, offset, length):
        reads.append((name, offset, length))
        return original(self, name, offset, length)

    monkeypatch.setattr(PinnedFiles, "read_range", counting)
    ckpt = read_checkpoint(str(tmp_path))
    assert reads == [("model.safetensors", 0, checkpoint.HEADER_READ),
                     ("model.safetensors", checkpoint.HEADER_READ, 8 + n - checkpoint.HEADER_READ)]
    assert len(ckpt.tensors) == 6000 and ckpt.tensors["layers.5999.norm.weight"].shape == (3,)
    out = {"layers.5999.norm.weight": torch.zeros(3)}
    dcp.load(out, storage_reader=SafetensorsReader(str(tmp_path)))
    assert out["layers.5999.norm.weight"].tolist() == [5999.0] * 3

    small = tmp_path / "small"
    small.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, small / "model.safetensors")
    reads.clear()
    read_checkpoint(str(small))
    assert [r[1] for r in reads] == [0]  # prefix and header in one read


# --- tied keys a save_pretrained left out (infer_ties) -------------------------------------

LLAMA = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,)}
GPT2 = {"transformer.wte.weight": (8, 4), "transformer.ln_f.weight": (4,)}


@pytest.mark.parametrize(
    ("keys", "config", "aliases", "unconfirmed"),
    [
        # transformers' _tied_weights_keys of the config's architecture
        (LLAMA, {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True},
         {"lm_head.weight": "model.embed_tokens.weight"}, None),
        (GPT2, {"architectures": ["GPT2LMHeadModel"], "tie_word_embeddings": True},
         {"lm_head.weight": "transformer.wte.weight"}, None),
        # a config saved before transformers 5 leaves out a value equal to the class default (GPT-2: tied)
        (GPT2, {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
         {"lm_head.weight": "transformer.wte.weight"}, None),
        (LLAMA, {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, {}, None),  # Llama: untied
        (LLAMA, {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}, {}, None),
        # only the output embedding saved: tied the other way round, as from_pretrained does
        ({"lm_head.weight": (8, 4), "model.norm.weight": (4,)},
         {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True},
         {"model.embed_tokens.weight": "lm_head.weight"}, None),
        # an architecture transformers does not know (custom code): lm_head.weight and the one input embedding
        (LLAMA, {"architectures": ["MyOwnForCausalLM"], "tie_word_embeddings": True},
         {"lm_head.weight": "model.embed_tokens.weight"}, None),
        (GPT2, {"text_config": {"tie_word_embeddings": True}}, {"lm_head.weight": "transformer.wte.weight"}, None),
        # the reader cannot tell
        (LLAMA, None, {}, "config.json does not exist"),
        (LLAMA, {"architectures": ["MyOwnForCausalLM"], "model_type": "my_own"}, {},
         "config.json does not set tie_word_embeddings"),
        (LLAMA, "{not json", {}, "config.json: not valid JSON"),
    ],
    ids=["llama", "gpt2", "gpt2-v4-config", "llama-v4-config", "untied", "reversed", "custom-code",
         "text-config", "no-config", "no-tie-setting", "bad-config"],
)
def test_ties_inferred_from_the_config(tmp_path, keys, config, aliases, unconfirmed):
    import json

    import safetensors.torch

    from dcp_safetensors.checkpoint import infer_ties, read_checkpoint
    from dcp_safetensors.storage import open_storage

    safetensors.torch.save_file({k: torch.ones(s) for k, s in keys.items()}, tmp_path / "model.safetensors")
    if config is not None:
        (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    ckpt = read_checkpoint(str(tmp_path))
    infer_ties(ckpt, open_storage(str(tmp_path)))
    assert ckpt.aliases == aliases
    for alias, kept in aliases.items():
        assert ckpt.tensors[alias] == ckpt.tensors[kept]
    if unconfirmed is None:
        assert ckpt.unconfirmed == {}
    else:
        ((key, tie),) = ckpt.unconfirmed.items()
        assert (key, tie.twin) == ("lm_head.weight", "model.embed_tokens.weight")
        assert tie.reason.startswith(f"{tmp_path}/config.json") and unconfirmed in tie.reason


def test_our_checkpoints_are_taken_at_their_index_word(tmp_path):
    """Our index records every tied key it left out; a config.json saying otherwise changes nothing."""
    import json

    from dcp_safetensors.checkpoint import infer_ties, read_checkpoint
    from dcp_safetensors.storage import open_storage

    state = {"model.embed_tokens.weight": torch.ones(8, 4)}
    dcp.save(state, storage_writer=SafetensorsWriter(str(tmp_path)), no_dist=True)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}))
    ckpt = read_checkpoint(str(tmp_path))
    infer_ties(ckpt, open_storage(str(tmp_path)))
    assert ckpt.aliases == {} and ckpt.unconfirmed == {}


def test_a_checkpoint_that_cannot_be_opened_keeps_no_file_open(tmp_path):
    """A failed open (here a broken header) closes every file it opened, even while the caller
    keeps the error (whose traceback holds the frames)."""
    import os

    import dcp_safetensors
    from dcp_safetensors.errors import HeaderError

    dcp_safetensors.save({"a": torch.ones(4), "b": torch.ones(4)}, str(tmp_path), max_shard_size=16)
    with open(tmp_path / "model-00002-of-00002.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"!")  # the header is no longer JSON
    before = len(os.listdir("/proc/self/fd"))
    kept = []
    for _ in range(5):
        with pytest.raises(HeaderError) as caught:
            dcp_safetensors.read_checkpoint(str(tmp_path))
        kept.append(caught.value)
    assert len(os.listdir("/proc/self/fd")) == before
