"""``SafetensorsWriter``: a DCP ``StorageWriter`` that writes HF safetensors in one pass.

DCP calls the methods in this order (``dcp.save``)::

    all ranks    reset(checkpoint_id)            a new save begins
    all ranks    set_up_storage_writer(is_coordinator, rank=, use_collectives=)
    all ranks    prepare_local_plan(plan)        -> the planner's items, unchanged
    coordinator  prepare_global_plan(plans)      plans the whole byte layout once:
                                                 files, headers, every rank's runs;
                                                 a fresh snapshot id; the staging dir
    all ranks    write_data(plan, planner)       pwrite own runs (+ headers it owns),
                                                 crc32 per run, fsync
    coordinator  finish(metadata, results)       checks the runs tile every file,
                                                 writes the index, commits

No rank gathers a full tensor, nothing is written twice, and no byte is read
back. Errors on any rank reach every rank through DCP (``CheckpointException``),
and the previous checkpoint in the directory stays intact until the commit.

Example:
    >>> import tempfile, torch, torch.distributed.checkpoint as dcp
    >>> from dcp_safetensors import SafetensorsWriter, SafetensorsReader
    >>> path = tempfile.mkdtemp()
    >>> _ = dcp.save({"w": torch.arange(4.0)}, storage_writer=SafetensorsWriter(path))
    >>> out = {"w": torch.zeros(4)}
    >>> dcp.load(out, storage_reader=SafetensorsReader(path))
    >>> out["w"].tolist()
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time
import uuid
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcp_safetensors.checkpoint import OBJECTS_FILE, SNAPSHOT_KEY, build_index
from dcp_safetensors.checksum import combine_runs, format_crc32
from dcp_safetensors.commit import TRAINING_STATE_DIR, commit, recover, staging_name
from dcp_safetensors.dtypes import to_safetensors_dtype
from dcp_safetensors.errors import ConfigurationError, LayoutError
from dcp_safetensors.layout import (
    MODEL_GROUP,
    CheckpointLayout,
    ChunkSpec,
    RankWritePlan,
    TensorSpec,
    parse_size,
    plan_layout,
)
from dcp_safetensors.objects import encode_object
from dcp_safetensors.storage.local import LocalStorage

__all__ = ["SafetensorsWriter"]

logger = logging.getLogger("dcp_safetensors")

TRAINING_STATE_GROUP = posixpath.join(TRAINING_STATE_DIR, "state")


@dataclass(frozen=True)
class _RankStorageData:
    """What the coordinator sends each rank in ``SavePlan.storage_data``."""

    snapshot: str
    staging: str
    writes: RankWritePlan


@dataclass(frozen=True)
class _WrittenRuns:
    """``WriteResult.storage_data`` of a tensor chunk or header: where the bytes went and their CRCs."""

    file: str
    length: int
    offsets: list[int]
    crcs: list[int]


@dataclass(frozen=True)
class _WrittenObject:
    """``WriteResult.storage_data`` of a non-tensor value: its encoded record."""

    record: dict[str, Any]


class SafetensorsWriter(StorageWriter):
    """Save a (sharded) state dict as a Hugging Face safetensors checkpoint.

    Args:
        path: checkpoint directory (created if missing). ``dcp.save``'s
            ``checkpoint_id`` overrides it.
        max_shard_size: most tensor bytes per file, as transformers reads it
            (an int, ``"5GB"``, ``"2GiB"``); a larger tensor sits alone.
        model_prefix: if set (e.g. ``"model"``), only keys under ``"model."``
            go to the HF files, without the prefix; every other tensor
            (optimizer state) goes to ``training_state/`` files that the
            weight map does not list, and non-tensor values to
            ``training_state/objects.json``.

    See the module docstring for the order in which DCP calls the methods.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_size: int | str = "5GB",
        model_prefix: str | None = None,
    ) -> None:
        super().__init__()
        parse_size(max_shard_size)  # fail at construction, not mid-save
        if model_prefix is not None and (not model_prefix or model_prefix.endswith(".")):
            raise ConfigurationError(f"model_prefix must be a key prefix without a trailing dot, got {model_prefix!r}")
        self.path = os.fspath(path)
        self.max_shard_size = max_shard_size
        self.model_prefix = model_prefix
        self._layout: CheckpointLayout | None = None
        self._snapshot: str | None = None

    # -- DCP protocol -------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._layout = None
        self._snapshot = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" not in os.fspath(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, **kwargs: Any) -> None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not kwargs.get("use_collectives", True) and world > 1:
            raise ConfigurationError(
                "SafetensorsWriter needs use_collectives=True with more than one rank: "
                "the file layout is planned from every rank's chunks"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # DCP's dedup drops all but one copy of a replicated item before the coordinator
        # sees it, so a plain tensor whose shape or dtype differs between ranks would be
        # saved silently from one of them. Each rank declares what it holds; the
        # coordinator compares the declarations.
        declared = {
            item.index.fqn: (to_safetensors_dtype(item.tensor_data.properties.dtype, key=item.index.fqn), tuple(item.tensor_data.size))
            for item in plan.items
            if item.tensor_data is not None
        }
        return dataclasses.replace(plan, storage_data=declared)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        started = time.perf_counter()
        storage = LocalStorage(self.path)
        storage.makedirs("")
        recover(storage, discard_uncommitted=True)
        snapshot = uuid.uuid4().hex
        tensors, chunks = self._collect(plans)
        layout = plan_layout(
            tensors,
            chunks,
            max_shard_size=self.max_shard_size,
            metadata={"format": "pt", SNAPSHOT_KEY: snapshot},
        )
        staging = staging_name(snapshot)
        storage.makedirs(staging)
        for f in layout.files:
            storage.makedirs(posixpath.join(staging, posixpath.dirname(f.name)))
        self._layout, self._snapshot = layout, snapshot
        logger.info(
            "planned %d files, %d tensors, %.1f MB in %.3f s",
            len(layout.files),
            len(tensors),
            sum(f.size for f in layout.files) / 1e6,
            time.perf_counter() - started,
        )
        return [
            dataclasses.replace(
                plan,
                storage_data=_RankStorageData(snapshot, staging, layout.rank_plans.get(rank, RankWritePlan())),
            )
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if getattr(planner, "_enable_plan_caching", False):
            raise ConfigurationError(
                "SafetensorsWriter does not support enable_plan_caching=True yet: cached plans "
                "carry a stale layout and snapshot id; construct the planner without it"
            )
        data: _RankStorageData = plan.storage_data
        storage = LocalStorage(self.path)
        results: list[WriteResult] = []
        files: dict[str, Any] = {}

        def open_file(name: str) -> Any:
            if name not in files:
                files[name] = storage.open_for_write(posixpath.join(data.staging, name))
            return files[name]

        try:
            for h in data.writes.headers:
                open_file(h.file).pwrite(h.data, 0)
                written = _WrittenRuns(h.file, len(h.data), [0], [zlib.crc32(h.data)])
                results.append(WriteResult(MetadataIndex(f"__header__/{h.file}"), len(h.data), written))
            runs_of = {(w.key, w.offsets): w for w in data.writes.chunks}
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    if not hasattr(planner, "lookup_object"):
                        raise ConfigurationError(
                            f"planner {type(planner).__name__} has no lookup_object(): cannot store "
                            f"{item.index.fqn!r} without pickle; use a DefaultSavePlanner subclass"
                        )
                    value = planner.lookup_object(item.index)
                    results.append(WriteResult(item.index, 0, _WrittenObject(encode_object(value))))
                    continue
                chunk = item.tensor_data.chunk  # type: ignore[union-attr]
                write = runs_of.get((item.index.fqn, tuple(chunk.offsets)))
                if write is None:  # an empty chunk (e.g. an uneven FSDP shard) has no bytes to write
                    continue
                tensor = planner.resolve_data(item)
                if not isinstance(tensor, torch.Tensor):
                    raise LayoutError(f"tensor {item.index.fqn!r}: planner resolved a {type(tensor).__name__}")
                results.append(self._write_tensor(open_file(write.file), item.index, tensor, write))
            for f in files.values():
                f.fsync()
        finally:
            for f in files.values():
                f.close()
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        layout, snapshot = self._layout, self._snapshot
        if layout is None or snapshot is None:
            raise LayoutError("finish() called without prepare_global_plan() on this coordinator")
        storage = LocalStorage(self.path)
        runs_by_file: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
        objects: dict[str, Any] = {}
        for rank_results in results:
            for r in rank_results:
                if isinstance(r.storage_data, _WrittenObject):
                    objects[r.index.fqn] = r.storage_data.record
                else:
                    w: _WrittenRuns = r.storage_data
                    runs_by_file[w.file].extend((off, w.length, crc) for off, crc in zip(w.offsets, w.crcs, strict=False))
        sizes = {f.name: f.size for f in layout.files}
        checksums = {name: format_crc32(_check_tiled(name, size, runs_by_file[name])) for name, size in sizes.items()}
        published = [f.name for f in layout.files]
        objects_file = None
        if objects:
            objects_file = OBJECTS_FILE
            body = json.dumps(dict(sorted(objects.items())), indent=1).encode()
            storage.write_file(posixpath.join(staging_name(snapshot), objects_file), body)
            published.append(objects_file)
        index = build_index(
            snapshot=snapshot,
            weight_map=layout.weight_map(MODEL_GROUP),
            total_size=layout.total_size(MODEL_GROUP),
            files={name: (sizes[name], checksums[name]) for name in sizes},
            extra_weight_map=layout.weight_map(TRAINING_STATE_GROUP),
            objects_file=objects_file,
            model_prefix=self.model_prefix,
        )
        storage.fsync_dir(staging_name(snapshot))
        commit(storage, snapshot, published, index)
        logger.info("committed %s: %d files, %.1f MB", self.path, len(published), sum(sizes.values()) / 1e6)

    # -- helpers ------------------------------------------------------------------------

    def _collect(self, plans: list[SavePlan]) -> tuple[list[TensorSpec], list[ChunkSpec]]:
        """Every tensor's spec (checked consistent across ranks) and every rank's chunk."""
        declared: dict[str, tuple[int, tuple[str, tuple[int, ...]]]] = {}
        chunks: list[ChunkSpec] = []
        for rank, plan in enumerate(plans):
            for key, decl in plan.storage_data.items():
                first_rank, first = declared.setdefault(key, (rank, decl))
                if first != decl:
                    raise LayoutError(
                        f"tensor {key!r}: rank {first_rank} holds {first[0]} {list(first[1])}, "
                        f"rank {rank} holds {decl[0]} {list(decl[1])}"
                    )
            for item in plan.items:
                if item.tensor_data is not None:
                    chunk = item.tensor_data.chunk
                    chunks.append(ChunkSpec(rank, item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes)))
        prefix = f"{self.model_prefix}." if self.model_prefix else ""
        specs = []
        for key, (_, (dtype, shape)) in declared.items():
            if not prefix:
                specs.append(TensorSpec(key, key, dtype, shape))
            elif key.startswith(prefix):
                specs.append(TensorSpec(key, key[len(prefix) :], dtype, shape))
            else:
                specs.append(TensorSpec(key, key, dtype, shape, TRAINING_STATE_GROUP))
        return specs, chunks

    @staticmethod
    def _write_tensor(file: Any, index: MetadataIndex, tensor: torch.Tensor, write: Any) -> WriteResult:
        runs = write.runs
        if tensor.numel() * tensor.element_size() != runs.nbytes:
            raise LayoutError(
                f"tensor {index.fqn!r}: planner resolved {tensor.numel() * tensor.element_size()} bytes "
                f"({tensor.dtype}, {list(tensor.shape)}) for a chunk planned as {runs.nbytes} bytes"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(flat)  # type: ignore[arg-type]
        offsets = runs.offsets().tolist()
        crcs = []
        for i, off in enumerate(offsets):
            piece = view[i * runs.length : (i + 1) * runs.length]
            file.pwrite(piece, off)
            crcs.append(zlib.crc32(piece))
        return WriteResult(index, runs.nbytes, _WrittenRuns(write.file, runs.length, offsets, crcs))


def _check_tiled(name: str, size: int, runs: list[tuple[int, int, int]]) -> int:
    """The file's CRC-32 if ``runs`` cover ``[0, size)`` exactly once; :class:`LayoutError` otherwise."""
    runs.sort()
    position = 0
    for off, length, _ in runs:
        if off != position:
            what = "a hole" if off > position else "an overlap"
            raise LayoutError(
                f"{name}: written runs leave {what} at byte {min(off, position)}; refusing to commit"
            )
        position += length
    if position != size:
        raise LayoutError(f"{name}: written runs end at byte {position}, the file must be {size} bytes; refusing to commit")
    return combine_runs((length, crc) for _, length, crc in runs)
