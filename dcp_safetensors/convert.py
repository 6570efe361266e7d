"""Convert a checkpoint to HF safetensors in one streaming pass: ``dcp-safetensors convert``.

Sources (:mod:`dcp_safetensors.sources`): a torch ``.distcp`` checkpoint,
loaded a few tensors at a time with no code run from it, or any HF
safetensors checkpoint (ours or another tool's, single file or indexed, local
or ``s3://``), re-sharded to another ``max_shard_size`` and/or cast to
another floating dtype.

The destination (local or ``s3://``) is written exactly as
:class:`~dcp_safetensors.SafetensorsWriter` writes it, with the same pieces:
:func:`~dcp_safetensors.layout.plan_layout` plans files, tensor order, headers
and parts (one "rank" holding every full tensor), and
:class:`~dcp_safetensors.saving.LayoutSave` writes the parts and commits
(aborting on any error); every header carries a fresh snapshot id and every
file a CRC-32 computed while writing.

Memory stays bounded: tensors stream in file order and each part is written
as soon as its bytes are complete. A safetensors source is read and cast in
pieces of :data:`~dcp_safetensors.sources.PIECE` bytes, whatever the tensor's size; a ``.distcp``
source holds one tensor (or a batch of small tensors up to ``PIECE``
bytes) at a time. The part buffer is ``PIECE`` bytes on local disk and
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

import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dcp_safetensors.blocks import BlockReport, planned_starts
from dcp_safetensors.dtypes import to_safetensors_dtype, to_torch_dtype
from dcp_safetensors.errors import ConfigurationError, ConversionError, LayoutError
from dcp_safetensors.hf_config import with_torch_dtype
from dcp_safetensors.layout import (
    ChunkSpec,
    Extents,
    FileLayout,
    PartPlan,
    TensorSpec,
    parse_size,
    plan_layout,
)
from dcp_safetensors.mapping import check_prefix, place_key, without_prefix
from dcp_safetensors.names import MODEL_GROUP, SNAPSHOT_KEY, TRAINING_STATE_DIR
from dcp_safetensors.objects import encode_object
from dcp_safetensors.saving import LayoutSave, WrittenPart, WrittenParts, write_part
from dcp_safetensors.sources import PIECE, Source, open_source
from dcp_safetensors.storage import Storage, open_storage
from dcp_safetensors.verification import ProgressCallback

__all__ = ["convert", "ConvertResult", "ConversionError", "CAST_DTYPES"]  # ConversionError: where it was first documented

logger = logging.getLogger("dcp_safetensors")

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

_CASTABLE = frozenset({"F64", "F32", "F16", "BF16"})
"""Source dtypes ``dtype`` applies to. Integers and bools keep theirs; so do FP8 tensors, which are
quantized payloads whose meaning depends on scale tensors elsewhere in the checkpoint."""


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
    """``{key: "F32->BF16"}`` for every tensor whose dtype changed (weights only)."""
    model_prefix: str | None = None
    """The prefix whose keys went to the HF files (given, recorded by the source's save, or detected)."""
    model_prefix_detected: bool = False
    """Whether ``model_prefix`` was picked from a ``.distcp`` source's keys (none was given)."""

    @property
    def weight_files(self) -> list[str]:
        """The HF files (``training_state/`` excluded)."""
        return [f for f in self.files if not f.startswith(TRAINING_STATE_DIR + "/")]


# --- destination ---------------------------------------------------------------------------


class _PartSink:
    """Takes a file's bytes in order and writes each planned part as soon as it is complete.

    A part lying inside one incoming view is written from it directly; other
    parts are assembled in one reused buffer. Each part is CRC-32'd as written.
    """

    def __init__(
        self, writer: Any, parts: Mapping[str, Sequence[PartPlan]], planned: Mapping[str, tuple[np.ndarray, int]], on_written: Any
    ) -> None:
        self.writer = writer
        self.planned = planned
        self.blocks: list[BlockReport] = []
        self.parts_of = parts
        self.on_written = on_written
        size = max((p.end - p.start for ps in parts.values() for p in ps), default=0)
        self.buffer = np.empty(size, dtype=np.uint8).data  # pages are touched only when used
        self.written: list[WrittenPart] = []
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
        self.written.append(write_part(self.writer, part, [view]))
        self.blocks.append(BlockReport.of([(part.file, None, Extents(part.start, view.nbytes), view)], planned=self.planned))
        self.on_written(view.nbytes)

    def finish(self) -> None:
        """Check that every part of the file was written."""
        if self.pending:
            missing = sum(p.end - p.start for p in self.pending) - self.fill
            raise LayoutError(f"{self.file}: {missing} bytes the layout planned were never produced; refusing to commit")


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
        dtype: cast the model's floating weights (F64, F32, F16, BF16) to ``"bf16"``,
            ``"fp16"`` or ``"fp32"``; integers, bools and FP8 tensors keep their dtype, and
            so does every ``training_state/`` tensor (optimizer moments, step counters).
        model_prefix: keys under ``"<prefix>."`` go to the HF files without the prefix,
            every other tensor to ``training_state/``, as ``SafetensorsWriter(model_prefix=)``
            does. For a safetensors source it is the prefix given to its weight-map keys
            (default: the prefix its save recorded). Without one, a source holding optimizer
            state gets :func:`nested_model_prefix`.
        storage_options: fsspec options for ``s3://`` paths (source and destination).
        progress: ``progress(done_bytes, total_bytes)``, called as parts are written.

    Raises a :class:`~dcp_safetensors.errors.DcpSafetensorsError` subclass (or
    ``OSError``) naming the file or key; nothing is committed then.
    """
    started = time.perf_counter()
    parse_size(max_shard_size)
    target = _target_dtype(dtype)
    check_prefix(model_prefix, "model_prefix")
    source = open_source(src, storage_options, model_prefix)
    prefix = model_prefix if model_prefix is not None else source.model_prefix
    detected = False
    if prefix is None:
        prefix = nested_model_prefix(src, [t.key for t in source.tensors])
        detected = prefix is not None
        if detected:
            logger.info("%s: model prefix %r detected (its other keys go to training_state/)", src, prefix)
    logger.info("converting %s (%s)", src, source.description)

    specs: list[TensorSpec] = []
    source_dtype: dict[str, str] = {}
    casts: dict[str, str] = {}
    for t in source.tensors:
        group, name = place_key(t.key, prefix)
        # Weights only: optimizer moments and step counters keep their precision (a BF16
        # step counter is exact only up to 256).
        out = target if target is not None and t.dtype in _CASTABLE and group == MODEL_GROUP else t.dtype
        if out != t.dtype:
            casts[t.key] = f"{t.dtype}->{out}"
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
    save = LayoutSave(storage, layout, snapshot)
    try:
        writer = storage.part_writer(save.session)
        planned = {f.name: (starts, f.size) for f, starts in zip(layout.files, planned_starts(layout).values(), strict=True)}
        sink = _PartSink(writer, parts, planned, on_written)
        try:
            _stream(layout.files, {(s.group, s.name): s for s in specs}, source, source_dtype, sink)
        finally:
            writer.close()
    except BaseException:
        save.abort()
        raise
    save.commit(
        [WrittenParts.of(sink.written)],
        objects={k: encode_object(v) for k, v in source.objects.items()},
        extra_files={name: with_torch_dtype(body, target) if casts else body for name, body in source.extra_files.items()},
        model_prefix=prefix,
        aliases={without_prefix(prefix, a): names[kept] for a, kept in sorted(source.aliases.items())},
        blocks=sink.blocks,
    )
    seconds = time.perf_counter() - started
    logger.info("committed %s: %d files, %.1f MB in %.2f s", dst, len(layout.files), total / 1e6, seconds)
    return ConvertResult(
        dst, snapshot, [f.name for f in layout.files], len(specs), len(source.objects), total, seconds, casts,
        prefix, detected,
    )


OPTIMIZER_MARKERS = frozenset({"exp_avg", "exp_avg_sq", "momentum_buffer", "param_groups", "max_exp_avg_sq"})
"""Key segments of torch optimizers' state (Adam/AdamW, SGD, their param groups)."""


def nested_model_prefix(src: str, keys: Sequence[str]) -> str | None:
    """The model's prefix in a state dict that nests model and optimizer state; None without optimizer state.

    ``dcp.save({"model": ..., "optim": ...})`` flattens to ``model.<name>`` and
    ``optim.state.<name>.exp_avg``: without a prefix, every optimizer tensor would
    become a "weight" of the HF files. With optimizer state present and a top-level
    ``model`` group free of it, that group is the model; otherwise nothing can be
    picked safely and ConfigurationError says what to pass.

    Example:
        >>> nested_model_prefix("ckpt", ["model.w", "optim.state.model.w.exp_avg", "optim.state.model.w.step"])
        'model'
        >>> nested_model_prefix("ckpt", ["model.layers.0.w", "lm_head.weight"]) is None
        True
    """
    optimizer = [k for k in keys if OPTIMIZER_MARKERS.intersection(k.split("."))]
    if not optimizer:
        return None
    groups = sorted({k.split(".", 1)[0] for k in keys})
    if MODEL_GROUP in groups and MODEL_GROUP not in {k.split(".", 1)[0] for k in optimizer}:
        return MODEL_GROUP
    example = optimizer[0]
    raise ConfigurationError(
        f"{src}: holds optimizer state (e.g. {example!r}) next to the weights, under top-level groups "
        f"{', '.join(groups)}: pass model_prefix (--model-prefix) naming the model's group, whose keys become "
        "the HF weights; the rest goes to training_state/"
    )


def _stream(
    files: Sequence[FileLayout],
    spec_of: Mapping[tuple[str, str], TensorSpec],
    source: Source,
    source_dtype: Mapping[str, str],
    sink: _PartSink,
) -> None:
    """Feed every file's header and tensors, in file order, through ``sink``."""
    order = [spec_of[f.group, e.name] for f in files for e in f.entries]
    produced = source.read([s.key for s in order])
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
        sink.finish()
