"""torch's own per-rank HF output: ``shard-RRRRR-model-KKKKK-of-NNNNN.safetensors``, no index.

``HuggingFaceStorageWriter(save_distributed=True)`` without consolidation has
every rank write its shard of each tensor as a tensor of its own, under the
tensor's key, into files named for the rank (``RRRRR``, from 1) and the file
the key was mapped to (``KKKKK`` of ``NNNNN``). Where each shard sits in the
global tensor is JSON in the header's ``__metadata__["DCP_SHARDING_INFO"]``
(``{key: {"saved_offsets": [...]}}``); no index is written, and the global
shape is recorded nowhere.

:func:`chunked_tensors` rebuilds the tensors from the headers alone. A
tensor's shape is taken as the far end of its chunks in each dim, which is
only right if the chunks tile it, so that is proven first
(:func:`~dcp_safetensors.layout.check_tiling`): a rank's file missing, or a
file of an earlier save with more ranks left in the directory, is a
:class:`~dcp_safetensors.errors.CheckpointCorruptError` naming the files,
where torch's own reader would load a hole or whichever file it read last.

Example:
    >>> from dcp_safetensors.format import Header, TensorEntry
    >>> def shard(rank, offsets):
    ...     meta = {"DCP_SHARDING_INFO": json.dumps({"w": {"saved_offsets": offsets}})}
    ...     return Header({"w": TensorEntry("w", "F32", (2, 3), 0, 24)}, meta, 96, 120)
    >>> headers = {torch_shard_name(r, 1, 1): shard(r, [2 * (r - 1), 0]) for r in (1, 2)}
    >>> whole, chunked, problems = chunked_tensors(headers, "/ckpt")
    >>> chunked["w"].shape, [c.offsets for c in chunked["w"].chunks], problems
    ((4, 3), [(0, 0), (2, 0)], [])
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dcp_safetensors.errors import CheckpointCorruptError, LayoutError
from dcp_safetensors.format import Header
from dcp_safetensors.layout import ChunkSpec, TensorLocation, TensorSpec, check_tiling, natural_key

__all__ = ["SHARDING_INFO_KEY", "StoredChunk", "ChunkedTensor", "torch_shard_files", "torch_shard_name", "chunked_tensors"]

SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
"""The ``__metadata__`` entry in which torch's writer records each tensor's ``saved_offsets``."""

_SHARD_FILE = re.compile(r"shard-(\d{5,})-model-(\d{5,})-of-(\d{5,})\.safetensors")


def torch_shard_name(rank: int, file: int, files: int) -> str:
    """The name torch's writer gives the part of file ``file`` of ``files`` that rank ``rank`` (from 1) writes.

    Example:
        >>> torch_shard_name(2, 1, 3)
        'shard-00002-model-00001-of-00003.safetensors'
    """
    return f"shard-{rank:05d}-model-{file:05d}-of-{files:05d}.safetensors"


def torch_shard_files(entries: Iterable[str]) -> list[str]:
    """The names among ``entries`` (a directory's listing) that torch's per-rank writer gives its files, sorted.

    Example:
        >>> torch_shard_files(["config.json", "shard-00002-model-00001-of-00001.safetensors",
        ...                    "shard-00001-model-00001-of-00001.safetensors"])
        ['shard-00001-model-00001-of-00001.safetensors', 'shard-00002-model-00001-of-00001.safetensors']
    """
    return sorted((e for e in entries if _SHARD_FILE.fullmatch(e)), key=natural_key)


@dataclass(frozen=True)
class StoredChunk:
    """A box of a tensor stored as a tensor of its own: where it starts in the global tensor, where its bytes are."""

    offsets: tuple[int, ...]
    location: TensorLocation


@dataclass(frozen=True)
class ChunkedTensor:
    """A tensor stored in pieces across files (dtype name, global shape, the non-empty pieces in file order).

    Example:
        >>> t = ChunkedTensor("F32", (4,), (StoredChunk((0,), TensorLocation("a", 8, "F32", (2,))),
        ...                                  StoredChunk((2,), TensorLocation("b", 8, "F32", (2,)))))
        >>> t.chunk_at((2,)).location.file, t.nbytes
        ('b', 16)
    """

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[StoredChunk, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.location.nbytes for c in self.chunks)

    def chunk_at(self, offsets: Sequence[int]) -> StoredChunk:
        """The chunk that starts at ``offsets`` (how DCP's read items name the chunk they read from)."""
        want = tuple(int(o) for o in offsets)
        for chunk in self.chunks:
            if chunk.offsets == want:
                return chunk
        raise KeyError(f"no stored chunk at offsets {list(want)}")


def chunked_tensors(
    headers: dict[str, Header], source: str
) -> tuple[dict[str, TensorLocation], dict[str, ChunkedTensor], list[CheckpointCorruptError]]:
    """The tensors of torch's per-rank files, from their ``headers`` (``{file name: header}``).

    Returns the tensors stored whole (one chunk at the origin covering the
    shape: a replicated tensor one rank wrote), the tensors stored in pieces,
    and one problem per file or tensor that cannot be rebuilt (left out of
    both). ``source`` (the directory) names the files in messages.
    """
    problems: list[CheckpointCorruptError] = []
    pieces: dict[str, list[tuple[str, ChunkSpec, TensorLocation]]] = {}
    for file, header in headers.items():
        match = _SHARD_FILE.fullmatch(file)
        rank = int(match.group(1)) - 1 if match else -1
        try:
            offsets = _saved_offsets(header, f"{source}/{file}")
        except CheckpointCorruptError as e:
            problems.append(e)
            continue
        for name, entry in header.tensors.items():
            location = TensorLocation(file, header.data_start + entry.begin, entry.dtype, entry.shape)
            pieces.setdefault(name, []).append((file, ChunkSpec(rank, name, offsets[name], entry.shape), location))
    whole: dict[str, TensorLocation] = {}
    chunked: dict[str, ChunkedTensor] = {}
    for key in sorted(pieces, key=natural_key):
        try:
            tensor = _rebuild(key, pieces[key], source)
        except CheckpointCorruptError as e:
            problems.append(e)
            continue
        first = tensor.chunks[0] if tensor.chunks else None
        if first is None or (len(tensor.chunks) == 1 and first.location.shape == tensor.shape):
            # Stored whole (or empty): a plain tensor to every reader of the checkpoint.
            stored = first.location if first else pieces[key][0][2]
            whole[key] = TensorLocation(stored.file, stored.offset, tensor.dtype, tensor.shape)
        else:
            chunked[key] = tensor
    return whole, chunked, problems


def _saved_offsets(header: Header, where: str) -> dict[str, tuple[int, ...]]:
    """``{tensor name: offsets in the global tensor}`` from a per-rank file's ``__metadata__``, checked."""
    raw = (header.metadata or {}).get(SHARDING_INFO_KEY)
    if raw is None:
        raise CheckpointCorruptError(
            f"{where}: named as a per-rank file of torch's HuggingFaceStorageWriter(save_distributed=True) "
            f"but its __metadata__ has no {SHARDING_INFO_KEY!r}: where its tensors sit in the global tensors is unknown"
        )
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise CheckpointCorruptError(f"{where}: __metadata__[{SHARDING_INFO_KEY!r}] is not JSON ({e})") from None
    offsets: dict[str, tuple[int, ...]] = {}
    for name, entry in header.tensors.items():
        got = info.get(name) if isinstance(info, dict) else None
        saved = got.get("saved_offsets") if isinstance(got, dict) else None
        if (
            not isinstance(saved, list)
            or len(saved) != len(entry.shape)
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in saved)
        ):
            raise CheckpointCorruptError(
                f"{where}: tensor {name!r} of shape {list(entry.shape)} has no valid saved_offsets in "
                f"__metadata__[{SHARDING_INFO_KEY!r}] (found {json.dumps(got)[:200]})"
            )
        offsets[name] = tuple(saved)
    return offsets


def _rebuild(key: str, pieces: list[tuple[str, ChunkSpec, TensorLocation]], source: str) -> ChunkedTensor:
    """The tensor ``key`` whose pieces these are, once they are proven to tile it exactly once."""
    dtypes = {loc.dtype for _, _, loc in pieces}
    if len(dtypes) > 1:
        found = ", ".join(f"{file}: {loc.dtype}" for file, _, loc in pieces[:6])
        raise CheckpointCorruptError(f"{source}: tensor {key!r} is stored in different dtypes ({found})")
    ndims = {len(spec.sizes) for _, spec, _ in pieces}
    if len(ndims) > 1:
        found = ", ".join(f"{file}: {list(spec.sizes)}" for file, spec, _ in pieces[:6])
        raise CheckpointCorruptError(f"{source}: tensor {key!r} is stored with different numbers of dims ({found})")
    ndim = ndims.pop()
    shape = tuple(max(spec.offsets[d] + spec.sizes[d] for _, spec, _ in pieces) for d in range(ndim))
    try:
        check_tiling(TensorSpec(key, key, dtypes.pop(), shape), [spec for _, spec, _ in pieces])
    except LayoutError as e:
        files = {spec.rank: file for file, spec, _ in pieces}
        named = "; ".join(f"rank {rank} wrote {file}" for rank, file in sorted(files.items()))
        raise CheckpointCorruptError(
            f"{source}: torch's per-rank files do not make one tensor of {key!r}: {e} ({named}). "
            "A rank's file is missing, or files of another save (e.g. one with more ranks) are in the "
            "directory: remove the stale shard-* files or save again into an empty directory"
        ) from None
    dtype = pieces[0][2].dtype
    live = tuple(StoredChunk(spec.offsets, loc) for _, spec, loc in pieces if spec.numel)
    return ChunkedTensor(dtype, shape, live)
