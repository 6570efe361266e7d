"""The index of a checkpoint, ``model.safetensors.index.json``: written by a save, parsed by a reader.

HF tools read ``weight_map`` (tensor name -> file) and ``metadata.total_size``;
what dcp_safetensors adds lives under ``metadata.dcp_safetensors``
(:data:`~dcp_safetensors.names.BLOCK_KEY`): the format version, the snapshot
id, the model prefix, each file's size and checksum, the training-state
tensors kept out of the weight map, the file of non-tensor values and the
tied keys saved once. :func:`build_index` writes it; :func:`parse_index`
checks a decoded one and returns an :class:`Index` whose every file name is
safe to open (:func:`safe_name`).

Example:
    >>> raw = build_index(snapshot="s", weight_map={"w": "model.safetensors"}, total_size=8,
    ...     files={"model.safetensors": (96, "crc32:00000000")}, extra_weight_map={},
    ...     objects_file=None, model_prefix="model")
    >>> index = parse_index(json.loads(raw), source="/ckpt/model.safetensors.index.json", root="/ckpt")
    >>> index.weight_map, index.ours, index.snapshot, index.model_prefix
    ({'w': 'model.safetensors'}, True, 's', 'model')
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dcp_safetensors.errors import InvalidIndexError, UnsafePathError
from dcp_safetensors.layout import natural_key
from dcp_safetensors.names import BLOCK_KEY, INDEX_NAME

if TYPE_CHECKING:
    from dcp_safetensors.checkpoint import Files

__all__ = ["FORMAT_VERSION", "Index", "build_index", "parse_index", "safe_name", "read_json"]

FORMAT_VERSION = 1
"""The version of our block that a save writes."""


@dataclass(frozen=True)
class Index:
    """What an index records, checked (see :func:`parse_index`); for a checkpoint without
    one (a lone ``model.safetensors``), just the ``weight_map``.

    ``ours``: the index has our block (a save of this package wrote it); the
    other fields but ``weight_map`` come from that block, as recorded.
    """

    weight_map: dict[str, str]
    """Tensor name in the HF files -> file."""
    ours: bool = False
    snapshot: Any = None
    model_prefix: Any = None
    format_version: Any = None
    extra_weight_map: dict[str, str] = field(default_factory=dict)
    """DCP key of a tensor kept out of the weight map (training state) -> file."""
    files: dict[str, Any] = field(default_factory=dict)
    """File -> ``{"size": bytes, "checksum": "crc32:..."}`` as recorded at save time."""
    aliases: dict[str, Any] = field(default_factory=dict)
    """Tied name saved once -> name of the tensor it shares (both without the model prefix)."""
    objects: str | None = None
    """The file of non-tensor values, if any."""
    block_checksums: dict[str, Any] | None = None
    """The record of block checksums: ``{"file", "size", "checksum", "max_block"}`` (saves since block
    checksums; each of ``files`` then has its ``"blocks"`` count)."""


def build_index(
    *,
    snapshot: str,
    weight_map: Mapping[str, str],
    total_size: int,
    files: Mapping[str, tuple[int, str] | tuple[int, str, int]],
    extra_weight_map: Mapping[str, str],
    objects_file: str | None,
    model_prefix: str | None,
    aliases: Mapping[str, str] | None = None,
    block_checksums: Mapping[str, Any] | None = None,
) -> bytes:
    """The bytes of ``model.safetensors.index.json`` for a save.

    ``files`` maps each file to ``(size, checksum)`` or ``(size, checksum,
    blocks)`` (its number of blocks in the ``block_checksums`` record, whose
    name, size, checksum and longest block are given); ``aliases`` maps a tied
    key that was not written to the key it shares memory with. HF tools read
    ``metadata.total_size`` and ``weight_map``; the rest lives under
    ``metadata.dcp_safetensors``.

    Example:
        >>> idx = json.loads(build_index(snapshot="s", weight_map={"w": "model.safetensors"},
        ...     total_size=8, files={"model.safetensors": (96, "crc32:00000000")},
        ...     extra_weight_map={}, objects_file=None, model_prefix=None))
        >>> idx["weight_map"], idx["metadata"]["total_size"]
        ({'w': 'model.safetensors'}, 8)
    """
    block = {
        "format_version": FORMAT_VERSION,
        "snapshot": snapshot,
        "model_prefix": model_prefix,
        "files": {f: _file_record(*record) for f, record in sorted(files.items())},
        "extra_weight_map": {k: extra_weight_map[k] for k in sorted(extra_weight_map, key=natural_key)},
        "objects": objects_file,
        "aliases": dict(aliases or {}),
    }
    if block_checksums is not None:
        block["block_checksums"] = dict(block_checksums)
    index = {
        "metadata": {"total_size": total_size, BLOCK_KEY: block},
        "weight_map": {k: weight_map[k] for k in sorted(weight_map, key=natural_key)},
    }
    return (json.dumps(index, indent=2) + "\n").encode()


def _file_record(size: int, checksum: str, blocks: int | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"size": size, "checksum": checksum}
    if blocks is not None:
        record["blocks"] = blocks
    return record


def parse_index(index: Any, *, source: str, root: str) -> Index:
    """Check a decoded index (``source`` names it in errors) of the checkpoint at ``root``.

    Raises :class:`~dcp_safetensors.errors.InvalidIndexError` for a malformed
    index or block, :class:`~dcp_safetensors.errors.UnsafePathError` for a file
    name that points outside the checkpoint directory (the weight map's, then
    the training state's, the recorded files', the objects file).
    """
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise InvalidIndexError(f"{source}: no 'weight_map' object")
    meta = index.get("metadata") or {}
    if not isinstance(meta, dict):
        raise InvalidIndexError(f"{source}: 'metadata' is not an object")
    block = meta.get(BLOCK_KEY) or {}
    if not isinstance(block, dict):
        raise InvalidIndexError(f"{source}: 'metadata.{BLOCK_KEY}' is not an object")
    extra = block.get("extra_weight_map") or {}
    recorded = block.get("files") or {}
    if not all(isinstance(m, dict) for m in (extra, recorded)):
        raise InvalidIndexError(f"{source}: malformed '{BLOCK_KEY}' block")
    weight_map = {name: safe_name(file, root) for name, file in index["weight_map"].items()}
    extra = {key: safe_name(file, root) for key, file in extra.items()}
    for file in recorded:
        safe_name(file, root)
    aliases = block.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise InvalidIndexError(f"{source}: 'aliases' is not an object")
    objects = block.get("objects")
    blocks = block.get("block_checksums")
    if blocks is not None:
        if not (
            isinstance(blocks, dict)
            and isinstance(blocks.get("size"), int)
            and isinstance(blocks.get("checksum"), str)
            and all(isinstance(r, dict) and isinstance(r.get("blocks"), int) and isinstance(r.get("size"), int) for r in recorded.values())
        ):
            raise InvalidIndexError(f"{source}: malformed 'block_checksums' record or per-file block counts")
        blocks = dict(blocks, file=safe_name(blocks.get("file"), root))
    return Index(
        weight_map,
        ours=bool(block),
        snapshot=block.get("snapshot"),
        model_prefix=block.get("model_prefix"),
        format_version=block.get("format_version"),
        extra_weight_map=extra,
        files=recorded,
        aliases=aliases,
        objects=safe_name(objects, root) if objects else None,
        block_checksums=blocks,
    )


def safe_name(name: object, root: str) -> str:
    """``name`` if it is a relative path inside the checkpoint at ``root``, else :class:`~dcp_safetensors.errors.UnsafePathError`.

    Example:
        >>> safe_name("training_state/state.safetensors", "/ckpt")
        'training_state/state.safetensors'
        >>> safe_name("../x.safetensors", "/ckpt")
        Traceback (most recent call last):
        ...
        dcp_safetensors.errors.UnsafePathError: /ckpt/model.safetensors.index.json: file name '../x.safetensors' points outside the checkpoint directory
    """
    if (
        not isinstance(name, str)
        or not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or posixpath.normpath(name) != name
        or name.split("/")[0] == ".."
    ):
        raise UnsafePathError(
            f"{posixpath.join(root, INDEX_NAME)}: file name {str(name)[:200]!r} points outside the checkpoint directory"
        )
    return name


def read_json(files: Files, name: str) -> Any:
    """The JSON value in file ``name`` (the index, the objects, ``config.json``); InvalidIndexError if it is not JSON."""
    raw = files.read_range(name, 0, files.size(name))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidIndexError(f"{files.path(name)}: not valid JSON ({str(e)[:200]})") from None
