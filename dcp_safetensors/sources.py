"""What :func:`~dcp_safetensors.convert.convert` reads: a checkpoint streamed tensor by tensor.

A :class:`Source` lists its tensors, values, config files and ties, and
yields each tensor's bytes in pieces of at most :data:`PIECE` bytes, in the
order convert writes them. :func:`open_source` picks the kind:

* :class:`SafetensorsSource`: any HF safetensors checkpoint (ours or another
  tool's, single file or indexed, or torch's per-rank files, local or
  ``s3://``), read with ranged reads;
* :class:`DistcpSource`: a torch ``.distcp`` checkpoint on local disk, loaded
  with ``dcp.load(..., no_dist=True)`` a batch of tensors at a time. Its
  ``.metadata`` pickle is read with an allow-list of DCP's own types and its
  values with ``torch.load(weights_only=True)``: converting runs no code from
  the checkpoint.

Example:
    >>> import tempfile, torch, safetensors.torch
    >>> src = tempfile.mkdtemp()
    >>> safetensors.torch.save_file({"w": torch.ones(2)}, src + "/model.safetensors")
    >>> source = open_source(src, None, None)
    >>> [(t.key, t.dtype, t.shape) for t in source.tensors], [bytes(v) for v in next(source.read(["w"]))[1]]
    ([('w', 'F32', (2,))], [b'\\x00\\x00\\x80?\\x00\\x00\\x80?'])
"""

from __future__ import annotations

import io
import logging
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import is_dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from dcp_safetensors.checkpoint import read_checkpoint
from dcp_safetensors.dtypes import to_safetensors_dtype, to_torch_dtype
from dcp_safetensors.errors import (
    ConfigurationError,
    ConversionError,
    DcpSafetensorsError,
    truncated,
)
from dcp_safetensors.layout import TensorSpec
from dcp_safetensors.names import CONFIG_FILES, DCP_METADATA_FILE, INDEX_NAME, SINGLE_FILE
from dcp_safetensors.storage import is_url, open_storage

__all__ = ["PIECE", "Source", "SafetensorsSource", "DistcpSource", "open_source"]

logger = logging.getLogger("dcp_safetensors")

PIECE = 16 << 20
"""Bytes per read and cast of a safetensors source, per ``.distcp`` load batch, per local part."""


class Source(Protocol):
    """What :func:`~dcp_safetensors.convert.convert` reads from."""


    description: str
    tensors: list[TensorSpec]
    """Every tensor to convert, by DCP key (its name and group are the source's; the destination's are planned anew)."""
    objects: dict[str, Any]
    model_prefix: str | None
    extra_files: dict[str, bytes]
    aliases: dict[str, str]
    """Tied keys stored once: ``{alias key: key of the stored tensor}``."""

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, Iterator[memoryview]]]:
        """Each key's bytes (source dtype, row-major) as consecutive views, in the order given.

        A view is valid until the next one is requested.
        """


class SafetensorsSource:
    """Any HF safetensors checkpoint, read in pieces of at most :data:`PIECE` bytes."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None, model_prefix: str | None) -> None:
        self.ckpt = read_checkpoint(path, model_prefix=model_prefix, storage_options=storage_options)
        self.storage = open_storage(path, storage_options)
        who = "dcp_safetensors" if self.ckpt.written_by_us else "another tool"
        self.description = f"safetensors checkpoint written by {who}, {len(self.ckpt.headers)} files"
        self.aliases = dict(self.ckpt.aliases)
        self.tensors = [
            TensorSpec(k, k, loc.dtype, loc.shape) for k, loc in self.ckpt.tensors.items() if k not in self.aliases
        ] + [TensorSpec(k, k, t.dtype, t.shape) for k, t in self.ckpt.chunked.items()]
        self.objects = dict(self.ckpt.objects)
        self.model_prefix = self.ckpt.model_prefix
        self.extra_files = {
            name: self.storage.read_range(name, 0, self.storage.size(name))
            for name in CONFIG_FILES
            if self.storage.exists(name)
        }

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, Iterator[memoryview]]]:
        buffer = np.empty(min(PIECE, max((t.nbytes for t in self.tensors), default=0)), dtype=np.uint8)
        for key in keys:
            yield key, self._pieces(key, buffer)

    def _pieces(self, key: str, buffer: np.ndarray) -> Iterator[memoryview]:
        if key in self.ckpt.chunked:
            yield from _tensor_pieces(self._assemble(key))
            return
        loc = self.ckpt.tensors[key]
        nbytes = loc.nbytes
        for offset in range(0, nbytes, PIECE):
            view = buffer.data[: min(PIECE, nbytes - offset)]
            with truncated(self.storage, loc.file, f"tensor {key!r}"):
                self.storage.readinto(loc.file, loc.offset + offset, view)
            yield view


    def _assemble(self, key: str) -> torch.Tensor:
        """The tensor ``key`` stored in pieces (torch's per-rank files), put together in memory: one tensor at a time."""
        tensor = self.ckpt.chunked[key]
        whole = torch.empty(tensor.shape, dtype=to_torch_dtype(tensor.dtype, source=self.ckpt.root))
        for chunk in tensor.chunks:
            loc = chunk.location
            piece = torch.empty(loc.shape, dtype=whole.dtype)
            with truncated(self.storage, loc.file, f"tensor {key!r}"):
                self.storage.readinto(loc.file, loc.offset, piece.reshape(-1).view(torch.uint8).numpy())
            whole[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, loc.shape, strict=True))] = piece
        return whole


# Globals a ``.metadata`` pickle of torch's FileSystemWriter may name, beyond DCP's own
# dataclasses and enums (``torch.distributed.checkpoint.*``). Anything else is refused.
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` but refuses any global outside its own types (no code runs)."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint" or module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (is_dataclass(obj) or issubclass(obj, Enum)):
                return obj
        raise ConversionError(
            f"{self.source}: refusing to unpickle {module}.{name}: not a type of torch's checkpoint metadata "
            "(the file could run code when loaded; convert only checkpoints you can load with torch's own reader)"
        )


class _DistcpReader(dcp.FileSystemReader):
    """``FileSystemReader`` that reads ``.metadata`` once, with :class:`_MetadataUnpickler`."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f, str(path)).load()
            if not isinstance(metadata, Metadata):
                raise ConversionError(f"{path}: holds a {type(metadata).__name__}, not DCP checkpoint metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata = metadata
        assert self._metadata.storage_meta is not None
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _CapturingPlanner(DefaultLoadPlanner):
    """Loads non-tensor values with ``weights_only=True`` into :attr:`objects` (torch's default unpickles)."""

    def __init__(self, source: str) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.source = source
        self.objects: dict[str, Any] = {}

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            self.objects[fqn] = torch.load(value, weights_only=True)
        except Exception as e:
            raise ConversionError(
                f"{self.source}: value of {fqn!r} cannot be loaded safely (torch.load(weights_only=True)): "
                f"{str(e).splitlines()[0][:300]}"
            ) from None


class DistcpSource:
    """A torch ``.distcp`` checkpoint on local disk, loaded with ``dcp.load`` a batch at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader = _DistcpReader(path)
        metadata = self.reader.read_metadata()
        self.tensors: list[TensorSpec] = []
        object_keys = []
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                dtype = to_safetensors_dtype(md.properties.dtype, key=key)
                self.tensors.append(TensorSpec(key, key, dtype, tuple(md.size)))
            elif isinstance(md, BytesStorageMetadata):
                object_keys.append(key)
            else:
                raise ConversionError(f"{path}: entry {key!r} is a {type(md).__name__}, neither a tensor nor a value")
        self.description = f"torch .distcp checkpoint, {len(self.tensors)} tensors, {len(object_keys)} values"
        self.model_prefix: str | None = None
        self.extra_files: dict[str, bytes] = {}
        self.aliases: dict[str, str] = {}
        self.objects = self._load(dict.fromkeys(object_keys, 0)) if object_keys else {}

    def _load(self, state: dict[str, Any]) -> dict[str, Any]:
        planner = _CapturingPlanner(self.path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            try:
                dcp.load(state, storage_reader=self.reader, planner=planner, no_dist=True)
            except CheckpointException as e:
                failures = list(e.failures.values())
                error = failures[0][0] if failures else e
                if isinstance(error, (DcpSafetensorsError, OSError)):
                    raise error from None
                keys = ", ".join(repr(k) for k in list(state)[:3]) + (", ..." if len(state) > 3 else "")
                raise ConversionError(f"{self.path}: loading {keys} failed: {type(error).__name__}: {error}") from None
        return planner.objects

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, Iterator[memoryview]]]:
        specs = {t.key: t for t in self.tensors}
        batch: list[str] = []
        size = 0
        for key in [*keys, None]:
            if batch and (key is None or size + specs[key].nbytes > PIECE):
                state = {
                    k: torch.empty(specs[k].shape, dtype=to_torch_dtype(specs[k].dtype, source=self.path)) for k in batch
                }
                self._load(state)
                for k in batch:
                    yield k, _tensor_pieces(state.pop(k))
                batch, size = [], 0
            if key is not None:
                batch.append(key)
                size += specs[key].nbytes


def _tensor_pieces(tensor: torch.Tensor) -> Iterator[memoryview]:
    flat = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    for offset in range(0, flat.nbytes, PIECE):
        yield flat[offset : offset + PIECE].data


def open_source(src: str, storage_options: dict[str, Any] | None, model_prefix: str | None) -> Source:
    storage = open_storage(src, storage_options)
    if storage.exists(INDEX_NAME) or storage.exists(SINGLE_FILE):
        if storage.exists(DCP_METADATA_FILE):
            logger.warning("%s holds both safetensors and .distcp files; converting the safetensors", src)
        return SafetensorsSource(src, storage_options, model_prefix)
    if storage.exists(DCP_METADATA_FILE):
        if is_url(src):
            raise ConfigurationError(
                f"{src}: converting a .distcp checkpoint from an object store is not supported; copy it to local disk first"
            )
        return DistcpSource(src)
    return SafetensorsSource(src, storage_options, model_prefix)  # raises CheckpointNotFoundError, saying what is there
