"""Convert a checkpoint to HF safetensors in one streaming pass: ``dcp-safetensors convert``.

Sources:

* a torch ``.distcp`` checkpoint (``FileSystemWriter`` output: a ``.metadata``
  file and ``__R_N.distcp`` files), loaded a few tensors at a time with
  ``dcp.load(..., no_dist=True)``; its non-tensor values are loaded with
  ``torch.load(weights_only=True)`` and its ``.metadata`` pickle with an
  allow-list of DCP's own metadata types, so converting runs no code from the
  checkpoint;
* any HF safetensors checkpoint (ours or another tool's, single file or
  indexed, local or ``s3://``), re-sharded to another ``max_shard_size``
  and/or cast to another floating dtype.

The destination (local or ``s3://``) is written exactly as
:class:`~dcp_safetensors.SafetensorsWriter` writes it, with the same pieces:
:func:`~dcp_safetensors.layout.plan_layout` plans files, tensor order, headers
and parts (one "rank" holding every full tensor); the storage's save protocol
(``begin_save``, ``part_writer().write``, ``write_small``, ``commit_save``,
``abort_save`` on any error) writes and commits; every header carries a fresh
snapshot id and every file a CRC-32 computed while writing.

Memory stays bounded: tensors stream in file order and each part is written
as soon as its bytes are complete. A safetensors source is read and cast in
pieces of :data:`PIECE` bytes, whatever the tensor's size; a ``.distcp``
source holds one tensor (or a batch of small tensors up to :data:`PIECE`
bytes) at a time. The part buffer is :data:`PIECE` bytes on local disk and
the part size (default 64 MiB) on S3. Other fsspec targets cannot assemble a
file from parts and buffer one whole file.

A safetensors source's ``config.json`` and ``generation_config.json`` are
carried over in the same commit (with ``torch_dtype`` updated when ``dtype``
casts tensors); other files (tokenizer, README) are not copied.

Example:
    >>> import tempfile, torch, safetensors.torch
    >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> safetensors.torch.save_file({"w": torch.ones(4), "step": torch.tensor(3)}, src + "/model.safetensors")
    >>> result = convert(src, dst, dtype="bf16", max_shard_size=8)
    >>> result.files
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    >>> from dcp_safetensors import read_checkpoint
    >>> {k: v.dtype for k, v in sorted(read_checkpoint(dst).tensors.items())}
    {'step': 'I64', 'w': 'BF16'}
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import time
import uuid
import warnings
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, is_dataclass
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
from dcp_safetensors.checksum import combine_runs, crc32, format_crc32
from dcp_safetensors.dtypes import to_safetensors_dtype, to_torch_dtype
from dcp_safetensors.errors import (
    ConfigurationError,
    DcpSafetensorsError,
    LayoutError,
    truncated,
)
from dcp_safetensors.format import tensor_nbytes
from dcp_safetensors.index import build_index
from dcp_safetensors.layout import (
    ChunkSpec,
    FileLayout,
    PartPlan,
    TensorSpec,
    parse_size,
    plan_layout,
)
from dcp_safetensors.mapping import check_prefix, place_key, without_prefix
from dcp_safetensors.names import (
    CONFIG_FILES,
    DCP_METADATA_FILE,
    INDEX_NAME,
    MODEL_GROUP,
    OBJECTS_FILE,
    SINGLE_FILE,
    SNAPSHOT_KEY,
    TRAINING_STATE_GROUP,
)
from dcp_safetensors.objects import encode_object
from dcp_safetensors.storage import Storage, is_url, open_storage
from dcp_safetensors.verification import ProgressCallback

__all__ = ["convert", "ConvertResult", "ConversionError", "PIECE", "CAST_DTYPES"]

logger = logging.getLogger("dcp_safetensors")

PIECE = 16 << 20
"""Bytes per read and cast of a safetensors source, per ``.distcp`` load batch, per local part."""

CAST_DTYPES: dict[str, str] = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
}
"""``dtype`` names :func:`convert` takes, and the safetensors dtype each means."""

_TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

_CASTABLE = frozenset({"F64", "F32", "F16", "BF16"})
"""Source dtypes ``dtype`` applies to. Integers and bools keep theirs; so do FP8 tensors, which are
quantized payloads whose meaning depends on scale tensors elsewhere in the checkpoint."""


class ConversionError(DcpSafetensorsError):
    """The source holds something this converter will not carry over (the message says what and where)."""


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote: the destination, its snapshot id, files and counts."""

    path: str
    snapshot: str
    files: list[str]
    tensors: int
    objects: int
    bytes_written: int
    seconds: float
    casts: dict[str, str] = field(default_factory=dict)
    """``{key: "F32->BF16"}`` for every tensor whose dtype changed."""


# --- sources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SourceTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class _Source(Protocol):
    description: str
    tensors: list[_SourceTensor]
    objects: dict[str, Any]
    model_prefix: str | None
    extra_files: dict[str, bytes]
    aliases: dict[str, str]
    """Tied keys stored once: ``{alias key: key of the stored tensor}``."""

    def read(self, keys: Sequence[str]) -> Iterator[tuple[str, Iterator[memoryview]]]:
        """Each key's bytes (source dtype, row-major) as consecutive views, in the order given.

        A view is valid until the next one is requested.
        """


class _SafetensorsSource:
    """Any HF safetensors checkpoint, read in pieces of at most :data:`PIECE` bytes."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None, model_prefix: str | None) -> None:
        self.ckpt = read_checkpoint(path, model_prefix=model_prefix, storage_options=storage_options)
        self.storage = open_storage(path, storage_options)
        who = "dcp_safetensors" if self.ckpt.written_by_us else "another tool"
        self.description = f"safetensors checkpoint written by {who}, {len(self.ckpt.headers)} files"
        self.aliases = dict(self.ckpt.aliases)
        self.tensors = [
            _SourceTensor(k, loc.dtype, loc.shape) for k, loc in self.ckpt.tensors.items() if k not in self.aliases
        ]
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
        loc = self.ckpt.tensors[key]
        nbytes = loc.nbytes
        for offset in range(0, nbytes, PIECE):
            view = buffer.data[: min(PIECE, nbytes - offset)]
            with truncated(self.storage, loc.file, f"tensor {key!r}"):
                self.storage.readinto(loc.file, loc.offset + offset, view)
            yield view


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


class _DistcpSource:
    """A torch ``.distcp`` checkpoint on local disk, loaded with ``dcp.load`` a batch at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader = _DistcpReader(path)
        metadata = self.reader.read_metadata()
        self.tensors = []
        object_keys = []
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                dtype = to_safetensors_dtype(md.properties.dtype, key=key)
                self.tensors.append(_SourceTensor(key, dtype, tuple(md.size)))
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


def _open_source(src: str, storage_options: dict[str, Any] | None, model_prefix: str | None) -> _Source:
    storage = open_storage(src, storage_options)
    if storage.exists(INDEX_NAME) or storage.exists(SINGLE_FILE):
        if storage.exists(DCP_METADATA_FILE):
            logger.warning("%s holds both safetensors and .distcp files; converting the safetensors", src)
        return _SafetensorsSource(src, storage_options, model_prefix)
    if storage.exists(DCP_METADATA_FILE):
        if is_url(src):
            raise ConfigurationError(
                f"{src}: converting a .distcp checkpoint from an object store is not supported; copy it to local disk first"
            )
        return _DistcpSource(src)
    return _SafetensorsSource(src, storage_options, model_prefix)  # raises CheckpointNotFoundError, saying what is there


# --- destination ---------------------------------------------------------------------------


class _PartSink:
    """Takes a file's bytes in order and writes each planned part as soon as it is complete.

    A part lying inside one incoming view is written from it directly; other
    parts are assembled in one reused buffer. Each part is CRC-32'd as written.
    """

    def __init__(self, writer: Any, parts: Mapping[str, Sequence[PartPlan]], on_written: Any) -> None:
        self.writer = writer
        self.parts_of = parts
        self.on_written = on_written
        size = max((p.end - p.start for ps in parts.values() for p in ps), default=0)
        self.buffer = np.empty(size, dtype=np.uint8).data  # pages are touched only when used
        self.etags: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        self.runs: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.pending: deque[PartPlan] = deque()
        self.fill = 0
        self.file = ""

    def start(self, file: str) -> None:
        self.file = file
        self.pending = deque(self.parts_of[file])
        self.fill = 0

    def feed(self, view: memoryview) -> None:
        while view.nbytes:
            if not self.pending:
                raise LayoutError(f"{self.file}: more bytes than the layout planned; refusing to commit")
            part = self.pending[0]
            length = part.end - part.start
            if self.fill == 0 and view.nbytes >= length:
                self._write(part, view[:length])
                view = view[length:]
                continue
            n = min(length - self.fill, view.nbytes)
            self.buffer[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == length:
                self._write(part, self.buffer[:length])
                self.fill = 0

    def _write(self, part: PartPlan, view: memoryview) -> None:
        self.pending.popleft()
        crc = crc32(view)
        self.etags[part.file].append((part.number, self.writer.write(part, [view])))
        self.runs[part.file].append((view.nbytes, crc))
        self.on_written(view.nbytes)

    def finish(self) -> str:
        """The file's checksum, once every part of it is written."""
        if self.pending:
            missing = sum(p.end - p.start for p in self.pending) - self.fill
            raise LayoutError(f"{self.file}: {missing} bytes the layout planned were never produced; refusing to commit")
        return format_crc32(combine_runs(self.runs[self.file]))


def _cast_pieces(pieces: Iterator[memoryview], src: str, dst: str) -> Iterator[memoryview]:
    if src == dst:
        yield from pieces
        return
    src_dtype, dst_dtype = to_torch_dtype(src), to_torch_dtype(dst)
    for view in pieces:
        cast = torch.frombuffer(view, dtype=src_dtype).to(dst_dtype)
        yield cast.view(torch.uint8).numpy().data


def _target_dtype(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        name = to_safetensors_dtype(dtype)
        if name not in _CASTABLE:
            raise ConfigurationError(f"dtype {dtype} is not a floating dtype to cast to; use bf16, fp16 or fp32")
        return name
    try:
        return CAST_DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigurationError(f"dtype {dtype!r} is not one of {', '.join(CAST_DTYPES)}") from None


def _with_dtype(config: bytes, dtype: str | None) -> bytes:
    """``config.json`` with its ``torch_dtype`` / ``dtype`` entry (where present) set to ``dtype``."""
    try:
        body = json.loads(config)
    except ValueError:
        return config
    if dtype is None or not isinstance(body, dict) or not {"torch_dtype", "dtype"} & body.keys():
        return config
    for k in ("torch_dtype", "dtype"):
        if k in body:
            body[k] = _TORCH_DTYPE_NAMES[dtype]
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def convert(
    src: str,
    dst: str,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
    model_prefix: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Write the checkpoint at ``src`` to ``dst`` as an HF safetensors checkpoint (see the module docstring).

    Args:
        src: a ``.distcp`` directory, or any safetensors checkpoint (directory or ``s3://`` URL).
        dst: the destination directory or ``s3://`` URL; committed as a save commits
            (an existing checkpoint there stays intact until the commit).
        max_shard_size: most tensor bytes per output file (``"5GB"``, ``"2GiB"``, an int).
        dtype: cast floating tensors (F64, F32, F16, BF16) to ``"bf16"``, ``"fp16"`` or
            ``"fp32"``; integers, bools and FP8 tensors keep their dtype.
        model_prefix: keys under ``"<prefix>."`` go to the HF files without the prefix,
            every other tensor to ``training_state/``, as ``SafetensorsWriter(model_prefix=)``
            does. For a safetensors source it is the prefix given to its weight-map keys
            (default: the prefix its save recorded).
        storage_options: fsspec options for ``s3://`` paths (source and destination).
        progress: ``progress(done_bytes, total_bytes)``, called as parts are written.

    Raises a :class:`~dcp_safetensors.errors.DcpSafetensorsError` subclass (or
    ``OSError``) naming the file or key; nothing is committed then.
    """
    started = time.perf_counter()
    parse_size(max_shard_size)
    target = _target_dtype(dtype)
    check_prefix(model_prefix, "model_prefix")
    source = _open_source(src, storage_options, model_prefix)
    prefix = model_prefix if model_prefix is not None else source.model_prefix
    logger.info("converting %s (%s)", src, source.description)

    specs: list[TensorSpec] = []
    source_dtype: dict[str, str] = {}
    casts: dict[str, str] = {}
    for t in source.tensors:
        out = target if target is not None and t.dtype in _CASTABLE else t.dtype
        if out != t.dtype:
            casts[t.key] = f"{t.dtype}->{out}"
        group, name = place_key(t.key, prefix)
        specs.append(TensorSpec(t.key, name, out, t.shape, group))
        source_dtype[t.key] = t.dtype
    storage: Storage = open_storage(dst, storage_options)
    max_part = storage.max_part if storage.max_part is not None else (PIECE if storage.min_part == 1 else None)
    snapshot = uuid.uuid4().hex
    layout = plan_layout(
        specs,
        [ChunkSpec(0, s.key, (0,) * len(s.shape), s.shape) for s in specs],
        max_shard_size=max_shard_size,
        metadata={"format": "pt", SNAPSHOT_KEY: snapshot},
        min_part=storage.min_part,
        max_part=max_part,
        world_size=1,
    )
    names = {s.key: s.name for s in specs}
    parts: dict[str, list[PartPlan]] = defaultdict(list)
    for p in layout.rank_plans[0].parts if layout.rank_plans else ():
        parts[p.file].append(p)
    total = sum(f.size for f in layout.files)
    logger.info(
        "planned %d files, %d tensors, %.1f MB, %d parts; snapshot %s",
        len(layout.files),
        len(specs),
        total / 1e6,
        sum(map(len, parts.values())),
        snapshot,
    )
    done = 0

    def on_written(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    session = storage.begin_save(snapshot, [f.name for f in layout.files])
    try:
        writer = storage.part_writer(session)
        sink = _PartSink(writer, parts, on_written)
        try:
            checksums = _stream(layout.files, {(s.group, s.name): s for s in specs}, source, source_dtype, sink)
        finally:
            writer.close()
        published = [f.name for f in layout.files]
        objects_file = None
        if source.objects:
            objects_file = OBJECTS_FILE
            records = {k: encode_object(v) for k, v in sorted(source.objects.items())}
            storage.write_small(session, objects_file, json.dumps(records, indent=1).encode())
            published.append(objects_file)
        for name, body in source.extra_files.items():
            storage.write_small(session, name, _with_dtype(body, target) if casts else body)
            published.append(name)
        index = build_index(
            snapshot=snapshot,
            weight_map=layout.weight_map(MODEL_GROUP),
            total_size=layout.total_size(MODEL_GROUP),
            files={f.name: (f.size, checksums[f.name]) for f in layout.files},
            extra_weight_map=layout.weight_map(TRAINING_STATE_GROUP),
            objects_file=objects_file,
            model_prefix=prefix,
            aliases={without_prefix(prefix, a): names[kept] for a, kept in sorted(source.aliases.items())},
        )
        storage.commit_save(session, published, dict(sink.etags), index)
    except BaseException:
        storage.abort_save(session)
        raise
    seconds = time.perf_counter() - started
    logger.info("committed %s: %d files, %.1f MB in %.2f s", dst, len(published), total / 1e6, seconds)
    return ConvertResult(
        dst, snapshot, [f.name for f in layout.files], len(specs), len(source.objects), total, seconds, casts
    )


def _stream(
    files: Sequence[FileLayout],
    spec_of: Mapping[tuple[str, str], TensorSpec],
    source: _Source,
    source_dtype: Mapping[str, str],
    sink: _PartSink,
) -> dict[str, str]:
    """Feed every file's header and tensors, in file order, through ``sink``; return the checksums."""
    order = [spec_of[f.group, e.name] for f in files for e in f.entries]
    produced = source.read([s.key for s in order])
    checksums = {}
    for f in files:
        sink.start(f.name)
        sink.feed(memoryview(f.header))
        for entry in f.entries:
            spec = spec_of[f.group, entry.name]
            key, pieces = next(produced)
            if key != spec.key:
                raise LayoutError(f"source produced tensor {key!r} where the layout expected {spec.key!r}")
            n = 0
            for view in _cast_pieces(pieces, source_dtype[key], spec.dtype):
                sink.feed(view)
                n += view.nbytes
            if n != entry.nbytes:
                raise LayoutError(f"tensor {key!r}: source produced {n} bytes, {f.name} holds {entry.nbytes}")
        checksums[f.name] = sink.finish()
    return checksums
