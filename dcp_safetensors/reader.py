"""``SafetensorsReader``: a DCP ``StorageReader`` for any HF safetensors checkpoint.

DCP calls the methods in this order (``dcp.load``)::

    all ranks    reset(checkpoint_id)
    all ranks    read_metadata()                 rank 0 of the group reads and validates the
                                                 index and every header once, then broadcasts
                                                 the result (or its error) to the other ranks
    all ranks    set_up_storage_reader(metadata, is_coordinator)
                                                 raises the error read_metadata deferred
    all ranks    prepare_local_plan(plan)
    coordinator  prepare_global_plan(plans)
    all ranks    read_data(plan, planner)        each rank preads only the byte runs of its
                                                 own shards, straight into the destination
                                                 when it is a contiguous CPU tensor of the
                                                 file's dtype

Every tensor is described to DCP as one chunk of its full shape, so
``dcp.load`` reshards to any world size or mesh; one stored in pieces (torch's
per-rank HF output, :mod:`dcp_safetensors.torch_shards`) as its pieces, which
DCP reshards the same way.

A tied key saved once (``lm_head.weight`` of a ``save_pretrained`` checkpoint
with ``tie_word_embeddings``, or an alias our index records) is described as a
:class:`TiedTensorStorageMetadata` whose bytes are its twin's, so any planner,
DCP's default included, loads it. One the reader cannot confirm (the
checkpoint has no ``config.json``) is described too, and reading it raises
:class:`~dcp_safetensors.errors.CheckpointMismatchError` saying why and what
to do, rather than DCP's bare "Missing key" error.

Why ``read_metadata`` defers errors: DCP catches an ``Exception`` from it and
re-raises it as ``AssertionError("metadata is None ...")``, losing its type.
Returning an empty ``Metadata`` and raising the original error from
``set_up_storage_reader`` (the next call, on every rank) keeps the type and
message intact inside ``CheckpointException.failures``.

Example:
    >>> import tempfile, torch, safetensors.torch, torch.distributed.checkpoint as dcp
    >>> path = tempfile.mkdtemp()
    >>> safetensors.torch.save_file({"w": torch.arange(6.0).reshape(2, 3)}, path + "/model.safetensors")
    >>> out = {"w": torch.zeros(2, 3)}
    >>> dcp.load(out, storage_reader=SafetensorsReader(path))
    >>> out["w"][1].tolist()
    [3.0, 4.0, 5.0]
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcp_safetensors.agreement import check_agreement
from dcp_safetensors.checked_reads import CheckedReads
from dcp_safetensors.checkpoint import Checkpoint, open_checkpoint, read_header
from dcp_safetensors.dtypes import to_torch_dtype
from dcp_safetensors.errors import (
    CheckpointChangedError,
    CheckpointCorruptError,
    CheckpointMismatchError,
    DcpSafetensorsError,
    truncated,
)
from dcp_safetensors.hooks import RankZeroBroadcast
from dcp_safetensors.layout import Extents, TensorLocation
from dcp_safetensors.pinned import PinnedFiles
from dcp_safetensors.progress import STALL_WARNING, Progress
from dcp_safetensors.storage import Storage, open_storage
from dcp_safetensors.ties import infer_ties

__all__ = ["SafetensorsReader", "TiedTensorStorageMetadata"]

logger = logging.getLogger("dcp_safetensors")

COALESCE_GAP = 1 << 20
"""Extents of one chunk closer than this are read as one span (fewer, larger reads)."""


@dataclass
class TiedTensorStorageMetadata(TensorStorageMetadata):
    """A key the checkpoint stores once, under ``same_as``: its chunks are that tensor's bytes.

    ``unconfirmed`` says why the reader cannot tell whether the key is tied
    (reading it then raises :class:`~dcp_safetensors.errors.CheckpointMismatchError`,
    or, with ``allow_partial_load``, leaves the target as it is); ``None`` when
    our index or the model's ``config.json`` says so. A planner that finds the
    pair tied in its target (one tensor under both keys) reads it once, through
    ``same_as``.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> path = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"model.embed_tokens.weight": torch.ones(4, 2)}, path + "/model.safetensors")
        >>> md = SafetensorsReader(path).read_metadata().state_dict_metadata["lm_head.weight"]
        >>> md.same_as, md.unconfirmed.endswith("config.json does not exist")
        ('model.embed_tokens.weight', True)
    """

    same_as: str = ""
    unconfirmed: str | None = None


class SafetensorsReader(StorageReader):
    """Load a Hugging Face safetensors checkpoint into a (sharded) state dict.

    Args:
        path: checkpoint directory; ``dcp.load``'s ``checkpoint_id`` overrides it.
        model_prefix: prepended with a dot to every weight-map key, to load into
            a nested ``{"model": ...}`` state dict. Default: the prefix our save
            recorded, or none for checkpoints of other tools.
        process_group: group whose rank 0 reads the index and headers and
            broadcasts them (default: the world group).
        storage_options: for an fsspec URL (``s3://...``), what its
            filesystem takes (``key``, ``secret``, ``client_kwargs``, ...).
        read_threads: concurrent reads (ranged GETs on object stores) per rank.
        verify_checksums: check every byte read against the block checksums the
            save recorded (:mod:`dcp_safetensors.checked_reads`); a mismatch is a
            :class:`~dcp_safetensors.errors.ChecksumMismatchError` naming the
            file, bytes and tensors, and nothing wrong is loaded. Checkpoints of
            other tools record none and load unchecked.
        stall_warning: seconds without a byte read before a rank logs a WARNING saying
            what it waits on, again every as many seconds (:mod:`.progress`); None: never.

    See the module docstring for the order in which DCP calls the methods.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        model_prefix: str | None = None,
        process_group: dist.ProcessGroup | None = None,
        storage_options: dict[str, Any] | None = None,
        read_threads: int = 8,
        verify_checksums: bool = True,
        stall_warning: float | None = STALL_WARNING,
    ) -> None:
        super().__init__()
        self.stall_warning = stall_warning
        self.verify_checksums = verify_checksums
        self.path = os.fspath(path)
        self.model_prefix = model_prefix
        self.process_group = process_group
        self.storage_options = storage_options
        self.read_threads = read_threads
        self._checkpoint: Checkpoint | None = None
        self._deferred_error: BaseException | None = None
        self._is_coordinator = False
        self._store: Storage | None = None
        self._files: PinnedFiles | None = None  # the files rank 0 read the headers through

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["process_group"] = None  # a group handle does not travel between processes
        state["_store"] = None
        state["_files"] = None
        return state

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._checkpoint = None
        self._deferred_error = None
        self._store = None
        self._close_files()

    def _close_files(self) -> None:
        if self._files is not None:
            self._files.close()
            self._files = None

    def _storage(self) -> Storage:
        # One per load: the storage's client (an S3 session, its connection pool) is made
        # once per rank, not once per step.
        if self._store is None:
            self._store = open_storage(self.path, self.storage_options)
        return self._store

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def _read_once(self) -> Checkpoint | DcpSafetensorsError | OSError:
        self._close_files()
        try:
            ckpt, files = open_checkpoint(self.path, self._storage(), self.model_prefix)
        except (DcpSafetensorsError, OSError) as e:
            return e
        try:
            infer_ties(ckpt, files)
        except (DcpSafetensorsError, OSError) as e:
            files.close()
            return e
        # Kept open until read_data: this rank then reads the very files whose headers it checked.
        self._files = files
        return ckpt

    def read_metadata(self) -> Metadata:
        group = self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            payload: list[Any] = [self._read_once() if dist.get_rank(group) == 0 else None]
            dist.broadcast_object_list(payload, group=group, group_src=0)
            result = payload[0]
        else:
            result = self._read_once()
        if isinstance(result, BaseException):
            self._deferred_error = result
            return Metadata(state_dict_metadata={})
        self._checkpoint = result
        return _to_metadata(result)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, **kwargs: Any) -> None:
        self._is_coordinator = is_coordinator
        if self._deferred_error is not None:
            raise self._deferred_error

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        # Compared by the coordinator: a rank reading another path would read another
        # checkpoint's bytes at the offsets of the one rank 0 described.
        return dataclasses.replace(plan, storage_data=self._agreed_options())

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        check_agreement("SafetensorsReader", [p.storage_data if isinstance(p.storage_data, dict) else None for p in plans])
        # The planner decides collectives of read_data (a rank-0 broadcast): every rank must
        # use the same kind of planner, whose own options its global step compared.
        check_agreement("the load planner", [{"planner": type(p.planner_data).__qualname__} for p in plans])
        return plans

    def _agreed_options(self) -> dict[str, Any]:
        """The options every rank must share; ``read_threads`` may differ."""
        return {"path": self.path if "://" in self.path else os.path.abspath(self.path), "model_prefix": self.model_prefix}

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        ckpt = self._checkpoint
        if ckpt is None:
            raise CheckpointCorruptError(f"{self.path}: read_data() before read_metadata()")
        started = time.perf_counter()
        tensor_items = []
        unconfirmed: set[str] = set()
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                buffer = io.BytesIO()
                # The value was decoded without pickle (JSON or weights_only=True); re-serialising
                # it hands the planner bytes that hold nothing but that value.
                torch.save(ckpt.objects[item.storage_index.fqn], buffer)
                buffer.seek(0)
                planner.load_bytes(item, buffer)
            elif item.storage_index.fqn in ckpt.unconfirmed:
                unconfirmed.add(item.storage_index.fqn)
            else:
                tensor_items.append(item)

        files = self._files
        if files is None:
            sizes = {name: header.file_size for name, header in ckpt.headers.items()}
            files = PinnedFiles(self._storage(), staging=ckpt.staging, etags=ckpt.etags, sizes=sizes)

        tables = ckpt.blocks if self.verify_checksums else {}
        extra = [0]

        def read_one(batch: list[_ChunkRead]) -> None:
            def what(lo: int, hi: int) -> str:
                keys = sorted({repr(c.item.storage_index.fqn) for c in batch if _overlaps(c.extents, lo, hi)})
                return f"the load of {', '.join(keys)} fails rather than hand on wrong weights: restore the file or save again"

            reads = CheckedReads(files, tables, what=what)
            if len(batch) == 1:
                _read_tensor(reads, batch[0], planner)
            else:
                _read_batch(reads, batch, planner)
            extra[0] += reads.extra_bytes
            progress.add(sum(c.extents.nbytes for c in batch))

        batches = _batches(ckpt, tensor_items, files.read_batch)
        error: BaseException | None = None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        progress = Progress(f"load of {self.path}", sum(c.extents.nbytes for b in batches for c in b), rank=rank,
                            stall_warning=self.stall_warning)
        try:
            progress.start()
            # With allow_partial_load a key the checkpoint may lack is skipped, as DCP skips a missing one.
            if unconfirmed and not (isinstance(planner, DefaultLoadPlanner) and planner.allow_partial_load):
                raise _unconfirmed_error(ckpt, sorted(unconfirmed))
            if files is not self._files:
                _check_same_files(ckpt, files, sorted({chunk.location.file for batch in batches for chunk in batch}))
            if self.read_threads > 1 and len(batches) > 1:
                with ThreadPoolExecutor(self.read_threads, thread_name_prefix="dcp-safetensors-read") as pool:
                    list(pool.map(read_one, batches))
            else:
                for batch in batches:
                    read_one(batch)
        except Exception as e:
            error = e
        finally:
            progress.stop()
            files.close()
            self._files = None
        # A planner that reads plain tensors on rank 0 only broadcasts them now; every rank
        # takes part, failed or not, so none waits alone in the collective.
        if isinstance(planner, RankZeroBroadcast) and planner.broadcast_keys:
            planner.broadcast_after_read(error)
        elif error is not None:
            raise error
        if not tables:
            logger.debug("loaded %s without checking its bytes: %s", self.path,
                          "verify_checksums=False" if ckpt.blocks else "the checkpoint records no block checksums")
        if self._is_coordinator:
            elapsed = time.perf_counter() - started
            nbytes = sum(math.prod(i.lengths) * _location(ckpt, i).itemsize for i in tensor_items)
            logger.log(
                logging.INFO if elapsed >= 1.0 else logging.DEBUG,
                "loaded %s: this rank read %.1f MB of %d tensor pieces (%.1f MB more, to check whole blocks) in %.2f s (%.0f MB/s)",
                self.path,
                nbytes / 1e6,
                len(tensor_items),
                extra[0] / 1e6,
                elapsed,
                nbytes / 1e6 / max(elapsed, 1e-9),
            )
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def _check_same_files(ckpt: Checkpoint, files: PinnedFiles, names: list[str]) -> None:
    """Check that this rank opened the versions of ``names`` whose headers rank 0 read.

    On object stores the ETag pins it (every read is ``If-Match``). On POSIX
    the header is read again and compared: ours carry the snapshot id, so a
    file of another save never matches.
    """
    for name in names:
        if name in ckpt.etags:
            continue  # every read of it is conditional on the ETag rank 0 saw
        if read_header(files, name) != ckpt.headers[name]:
            raise CheckpointChangedError(
                f"{files.path(name)}: replaced by another save since rank 0 of this load read its header "
                "(a save is overwriting this checkpoint while it loads); nothing mixed was loaded: load again"
            )


def _unconfirmed_error(ckpt: Checkpoint, keys: list[str]) -> CheckpointMismatchError:
    missing = "; ".join(
        f"no tensor {k!r}, which may be tied to {ckpt.unconfirmed[k].twin!r} and saved once, as save_pretrained "
        f"saves tied weights, but the reader cannot tell: {ckpt.unconfirmed[k].reason}"
        for k in keys
    )
    return CheckpointMismatchError(
        f"{ckpt.root}: {missing}. Put the model's config.json (it sets tie_word_embeddings) next to the weights; "
        "or load with dcp_safetensors.load / SafetensorsLoadPlanner into a model whose tied keys share one tensor; "
        "or leave the key out of the state dict and tie it after loading (model.tie_weights())"
    )


def _to_metadata(ckpt: Checkpoint) -> Metadata:
    sd: dict[str, Any] = {}
    for key, loc in ckpt.tensors.items():
        sd[key] = _tensor_metadata(loc, ckpt.aliases.get(key), None)
    for key, tie in ckpt.unconfirmed.items():
        sd[key] = _tensor_metadata(ckpt.tensors[tie.twin], tie.twin, tie.reason)
    for key, chunked in ckpt.chunked.items():
        sd[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=to_torch_dtype(chunked.dtype, source=chunked.chunks[0].location.file)),
            size=torch.Size(chunked.shape),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.location.shape)) for c in chunked.chunks],
        )
    for key in ckpt.objects:
        sd[key] = BytesStorageMetadata()
    # storage_meta names the checkpoint in planners' messages (e.g. a missing expert key).
    return Metadata(state_dict_metadata=sd, storage_meta=StorageMeta(checkpoint_id=ckpt.root))


def _tensor_metadata(loc: TensorLocation, same_as: str | None, unconfirmed: str | None) -> TensorStorageMetadata:
    """One full-shape chunk of the tensor at ``loc``; for a tied key, marked with the key it is stored under."""
    size = torch.Size(loc.shape)
    fields: dict[str, Any] = {
        "properties": TensorProperties(dtype=to_torch_dtype(loc.dtype, source=loc.file)),
        "size": size,
        "chunks": [ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)],
    }
    if same_as is None:
        return TensorStorageMetadata(**fields)
    return TiedTensorStorageMetadata(**fields, same_as=same_as, unconfirmed=unconfirmed)


def _read_extents(storage: CheckedReads, file: str, extents: Extents, out: np.ndarray) -> None:
    """Fill ``out`` (uint8, ``extents.nbytes``) with the extents' bytes, coalescing runs closer than COALESCE_GAP."""
    if extents.count == 1:
        storage.readinto(file, extents.start, out)
        return
    span = sum((c - 1) * s for c, s in zip(extents.counts, extents.strides)) + extents.length
    if span > storage.read_span and extents.counts[0] > 1:
        # Read the span in slabs along the outermost run dim, each slab's span at most read_span.
        step = max(1, storage.read_span // extents.strides[0])
        per_outer = extents.nbytes // extents.counts[0]
        for first in range(0, extents.counts[0], step):
            count = min(step, extents.counts[0] - first)
            slab = Extents(extents.start + first * extents.strides[0], extents.length, (count, *extents.counts[1:]), extents.strides)
            _read_extents(storage, file, slab, out[first * per_outer : (first + count) * per_outer])
        return
    offsets = extents.offsets()
    if extents.strides[-1] - extents.length <= COALESCE_GAP:
        # Extents on a regular grid with small gaps: one sequential read of the span, then a strided copy.
        block = np.empty(span, dtype=np.uint8)
        storage.readinto(file, int(offsets[0]), block)
        picked = np.lib.stride_tricks.as_strided(
            block, shape=(*extents.counts, extents.length), strides=(*extents.strides, 1), writeable=False
        )
        out.reshape(*extents.counts, extents.length)[...] = picked
        return
    for i, off in enumerate(offsets.tolist()):
        storage.readinto(file, off, out[i * extents.length : (i + 1) * extents.length])


def _overlaps(extents: Extents, lo: int, hi: int) -> bool:
    """Whether any byte of ``extents`` lies in ``[lo, hi)`` (the bad block: which tensors it held)."""
    offsets = extents.offsets()
    return bool(((offsets < hi) & (offsets + extents.length > lo)).any())


def _location(ckpt: Checkpoint, item: ReadItem) -> TensorLocation:
    """The stored tensor ``item`` reads from: its key's, or the chunk of it that starts at the item's
    storage offset (``item.storage_offsets`` are within that chunk)."""
    return ckpt.location(item.storage_index.fqn, item.storage_index.offset or ())


class _ChunkRead(NamedTuple):
    """One read item, where its tensor lies, and the byte extents its chunk covers in that file."""

    location: TensorLocation
    item: ReadItem
    extents: Extents


def _batches(ckpt: Checkpoint, items: list[ReadItem], limit: int) -> list[list[_ChunkRead]]:
    """The reads of a rank: chunks that are one contiguous range smaller than ``limit`` and lie
    within ``COALESCE_GAP`` of each other in one file share a read of at most ``limit`` bytes
    (the storage's ``read_batch``); every other chunk is read alone."""
    chunks = []
    for item in items:
        loc = _location(ckpt, item)
        chunks.append(_ChunkRead(loc, item, loc.extents(item.storage_offsets, item.lengths)))
    alone: list[list[_ChunkRead]] = []
    small: dict[str, list[_ChunkRead]] = {}
    for chunk in chunks:
        if chunk.extents.count == 1 and 0 < chunk.extents.nbytes < limit:
            small.setdefault(chunk.location.file, []).append(chunk)
        else:
            alone.append([chunk])
    batched: list[list[_ChunkRead]] = []
    for pieces in small.values():
        pieces.sort(key=lambda c: c.extents.start)
        first, last = pieces[0].extents.start, pieces[0].extents.start + pieces[0].extents.nbytes
        batch: list[_ChunkRead] = []
        for chunk in pieces:
            start, end = chunk.extents.start, chunk.extents.start + chunk.extents.nbytes
            if batch and (start - last > COALESCE_GAP or max(end, last) - first > limit):
                batched.append(batch)
                first, last, batch = start, end, []
            batch.append(chunk)
            last = max(last, end)
        batched.append(batch)
    return batched + alone


def _read_batch(storage: CheckedReads, batch: list[_ChunkRead], planner: LoadPlanner) -> None:
    """One read of the range holding every chunk of ``batch`` (one file, sorted), then each chunk from it."""
    file, first = batch[0].location.file, batch[0].extents.start
    block = np.empty(max(c.extents.start + c.extents.nbytes for c in batch) - first, dtype=np.uint8)
    keys = ", ".join(repr(c.item.storage_index.fqn) for c in batch[:3]) + (" ..." if len(batch) > 3 else "")
    with truncated(storage, file, keys):
        storage.readinto(file, first, block)
    for chunk in batch:
        _read_tensor(storage, chunk, planner, (first, block))


def _read_tensor(
    storage: CheckedReads,
    chunk: _ChunkRead,
    planner: LoadPlanner,
    span: tuple[int, np.ndarray] | None = None,
) -> None:
    """Read one chunk into its destination; ``span`` is ``(file offset, bytes)`` of a batch's
    read that already holds the chunk's bytes."""
    loc, item, extents = chunk
    dtype = to_torch_dtype(loc.dtype, source=loc.file)
    dest = planner.resolve_tensor(item)
    direct = dest.device.type == "cpu" and dest.dtype == dtype and dest.is_contiguous()
    if extents.nbytes:
        if direct:
            out = dest.detach().reshape(-1).view(torch.uint8).numpy()
        else:
            out = np.empty(extents.nbytes, dtype=np.uint8)
        if span is not None:
            first, block = span
            out[...] = block[extents.start - first : extents.start - first + extents.nbytes]
        else:
            with truncated(storage, loc.file, repr(item.storage_index.fqn)):
                _read_extents(storage, loc.file, extents, out)
        if not direct:
            src = torch.from_numpy(out).view(dtype).reshape(tuple(item.lengths))
            dest.copy_(src)
    planner.commit_tensor(item, dest)
