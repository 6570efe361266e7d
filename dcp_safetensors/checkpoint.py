"""A checkpoint directory as a reader sees it: index, headers, tensors, objects.

:func:`read_checkpoint` opens any HF safetensors checkpoint (ours, any
``save_pretrained`` / ``huggingface_hub`` output, single file or indexed) and
checks everything that can be checked without reading tensor data: the index
is well-formed and names no path outside the directory, every listed file
exists with the recorded size, every header obeys the format, every key the
index lists is in its file, and every file belongs to the index's snapshot.
:func:`verify` adds every file's checksum and raises the first problem;
:func:`verify_all` reports every problem. :func:`summarize` describes a
checkpoint (``dcp-safetensors inspect``). :func:`build_index` writes the
index that a save commits. :func:`infer_ties` adds the tied keys a
``save_pretrained`` left out, from the model's ``config.json``, for the reader.

Example:
    >>> import tempfile, torch, safetensors.torch
    >>> d = tempfile.mkdtemp()
    >>> safetensors.torch.save_file({"w": torch.ones(2)}, d + "/model.safetensors")
    >>> ckpt = read_checkpoint(d)
    >>> ckpt.tensors["w"].shape, ckpt.written_by_us
    ((2,), False)
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dcp_safetensors.checksum import crc32, format_crc32
from dcp_safetensors.errors import (
    CheckpointChangedError,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    DcpSafetensorsError,
    FileSizeMismatchError,
    InvalidIndexError,
    MissingFileError,
    MissingKeyError,
    SnapshotMismatchError,
    UnsafePathError,
    shrank,
)
from dcp_safetensors.format import (
    LENGTH_PREFIX,
    Header,
    header_length,
    parse_header,
    tensor_nbytes,
)
from dcp_safetensors.layout import natural_key
from dcp_safetensors.mapping import under_prefix, with_prefix
from dcp_safetensors.names import (
    BLOCK_KEY,
    CONFIG_FILE,
    DCP_METADATA_FILE,
    INDEX_NAME,
    OBJECTS_FILE,
    SINGLE_FILE,
    SNAPSHOT_KEY,
    STAGING_PREFIX,
    TRAINING_STATE_DIR,
)
from dcp_safetensors.objects import decode_object, is_json_exact
from dcp_safetensors.pinned import PinnedFiles
from dcp_safetensors.storage import Storage, open_storage

Files = Storage | PinnedFiles
"""What the functions here read a checkpoint through: a backend, or one load's pinned view of it."""

__all__ = [
    "FORMAT_VERSION",
    "SNAPSHOT_KEY",
    "SINGLE_FILE",
    "OBJECTS_FILE",
    "TensorLocation",
    "UnconfirmedTie",
    "Checkpoint",
    "build_index",
    "read_checkpoint",
    "infer_ties",
    "verify",
    "verify_all",
    "VerifyReport",
    "summarize",
]

logger = logging.getLogger("dcp_safetensors")

FORMAT_VERSION = 1

OUTPUT_EMBEDDING = "lm_head.weight"
"""The output embedding of transformers' language models: the key ``save_pretrained`` leaves out when it is tied."""

_INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
"""The input embeddings transformers ties ``lm_head.weight`` to (``model.embed_tokens``, ``transformer.wte``,
``gpt_neox.embed_in``, ...); used for architectures the installed transformers does not know."""

_PARAMETER = re.compile(r"[\w.]+\.(?:weight|bias)")
"""A ``_tied_weights_keys`` entry naming one parameter, not a pattern over a module's parameters."""


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes are: ``file``, absolute byte ``offset``, dtype name and shape."""

    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class UnconfirmedTie:
    """A key the checkpoint lacks that may be tied to ``twin`` (a stored key); ``reason`` says why the reader cannot tell."""

    twin: str
    reason: str


@dataclass
class Checkpoint:
    """A validated checkpoint: tensors by DCP key, non-tensor values, files and their headers."""

    root: str
    tensors: dict[str, TensorLocation]
    objects: dict[str, Any]
    headers: dict[str, Header]
    snapshot: str | None
    written_by_us: bool
    checksums: dict[str, str] = field(default_factory=dict)
    model_prefix: str | None = None
    format_version: int | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    """Tied keys saved once: ``{alias DCP key: DCP key of the stored tensor}`` (both are in ``tensors``)."""
    unconfirmed: dict[str, UnconfirmedTie] = field(default_factory=dict)
    """Keys that are not in ``tensors`` but may be tied keys saved once (see :func:`infer_ties`)."""
    staging: str | None = None
    """The staging directory this snapshot was read through: a live save was publishing it."""
    etags: dict[str, str] = field(default_factory=dict)
    """The version of each file that was read (object stores): other ranks read that version or fail."""


def build_index(
    *,
    snapshot: str,
    weight_map: Mapping[str, str],
    total_size: int,
    files: Mapping[str, tuple[int, str]],
    extra_weight_map: Mapping[str, str],
    objects_file: str | None,
    model_prefix: str | None,
    aliases: Mapping[str, str] | None = None,
) -> bytes:
    """The bytes of ``model.safetensors.index.json`` for a save.

    ``files`` maps each file to ``(size, checksum)``; ``aliases`` maps a tied
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
        "files": {f: {"size": size, "checksum": crc} for f, (size, crc) in sorted(files.items())},
        "extra_weight_map": {k: extra_weight_map[k] for k in sorted(extra_weight_map, key=natural_key)},
        "objects": objects_file,
        "aliases": dict(aliases or {}),
    }
    index = {
        "metadata": {"total_size": total_size, BLOCK_KEY: block},
        "weight_map": {k: weight_map[k] for k in sorted(weight_map, key=natural_key)},
    }
    return (json.dumps(index, indent=2) + "\n").encode()


def _safe_name(name: object, root: str) -> str:
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


def _describe_directory(storage: Files) -> str:
    entries = storage.listdir()
    if not entries:
        return f"{storage.path('')}: no checkpoint here (the directory is empty or missing)"
    if DCP_METADATA_FILE in entries or any(e.endswith(".distcp") for e in entries):
        return (
            f"{storage.path('')}: holds a torch.distributed.checkpoint (.distcp) checkpoint, not safetensors; "
            f"convert it with `dcp-safetensors convert {storage.path('')} DST` or load it with FileSystemReader"
        )
    if any(e.endswith(".bin") or e.endswith(".pt") for e in entries):
        return (
            f"{storage.path('')}: holds pickled weights ({', '.join(e for e in entries if e.endswith(('.bin', '.pt')))}) "
            "but no safetensors; convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    return f"{storage.path('')}: no {INDEX_NAME} or {SINGLE_FILE}; found {', '.join(entries[:10])}"


def _read_json(storage: Files, name: str) -> Any:
    raw = storage.read_range(name, 0, storage.size(name))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidIndexError(f"{storage.path(name)}: not valid JSON ({str(e)[:200]})") from None


HEADER_THREADS = 16
"""Files whose size and header are read at once when a checkpoint is opened."""

HEADER_READ = 256 << 10
"""First read of a file: its length prefix and, for all but the largest headers, the header too."""


def read_header(storage: Files, name: str, size: int | None = None) -> Header:
    """Read and validate one file's header (``size``: the file's, when already known).

    One read of the file's first :data:`HEADER_READ` bytes holds the length
    prefix and, mostly, the header (a request on S3 costs a round trip); a
    longer header is read on once its length is checked against the file.
    """
    size = storage.size(name) if size is None else size
    source = storage.path(name)
    head = storage.read_range(name, 0, min(size, HEADER_READ))
    n = header_length(head, size, source=source)
    if LENGTH_PREFIX + n > len(head):
        head += storage.read_range(name, len(head), LENGTH_PREFIX + n - len(head))
    return parse_header(head[: LENGTH_PREFIX + n], size, source=source)


def read_checkpoint(
    path: str, *, model_prefix: str | None = None, storage_options: dict[str, Any] | None = None
) -> Checkpoint:
    """Open and validate the checkpoint at ``path``, a directory or an fsspec URL (see the module docstring).

    ``model_prefix`` is prepended (with a dot) to every weight-map key to form
    the DCP key; by default it is the prefix the save recorded, or none.
    Raises the first problem found (a :class:`~dcp_safetensors.errors.DcpSafetensorsError`
    subclass naming the file); :func:`verify_all` reports every problem.
    """
    ckpt, files = open_checkpoint(path, open_storage(path, storage_options), model_prefix)
    files.close()
    return ckpt


RETRY_SECONDS = 30.0
"""How long opening a checkpoint goes on retrying while a save replaces it (one publish, even on S3)."""

_CHANGING = (SnapshotMismatchError, MissingFileError, FileSizeMismatchError, CheckpointNotFoundError, CheckpointChangedError)
"""What a reader meets when a save publishes while it opens the checkpoint."""


def open_snapshot(storage: Storage) -> PinnedFiles:
    """The current snapshot of ``storage``'s checkpoint, for one load.

    Commits whose writer died are rolled forward first; a committed save whose
    writer still publishes it is read through its staging copy.
    """
    return PinnedFiles(storage, staging=storage.recover(writer=False))


def open_checkpoint(path: str, storage: Storage, model_prefix: str | None) -> tuple[Checkpoint, PinnedFiles]:
    """:func:`read_checkpoint`, and the open files every later read of it must go through.

    A save that publishes while the checkpoint is opened makes one attempt meet
    files of two snapshots; the open is then retried (for up to
    :data:`RETRY_SECONDS`) while the directory shows a save under way or the
    index changed, so the result is one whole snapshot, the old or the new.
    """
    deadline = time.monotonic() + RETRY_SECONDS
    delay = 0.01
    while True:
        files = open_snapshot(storage)
        try:
            return _read_checkpoint(path, files, model_prefix, None), files
        except _CHANGING as e:
            changing = _being_replaced(storage, files)
            files.close()
            if not changing or time.monotonic() > deadline:
                raise
            logger.debug("%s: a save replaced the checkpoint while it was opened (%s); opening it again", path, e)
            time.sleep(delay)
            delay = min(2 * delay, 0.2)


def _being_replaced(storage: Storage, files: PinnedFiles) -> bool:
    """Whether a save is under way in the directory, or replaced the index ``files`` read."""
    if any(e.startswith(STAGING_PREFIX) for e in storage.listdir()):
        return True
    if files.staging is None and files.is_open(INDEX_NAME):
        try:
            return bool(storage.read_range(INDEX_NAME, 0, storage.size(INDEX_NAME)) != files.read_range(INDEX_NAME, 0, files.size(INDEX_NAME)))
        except (DcpSafetensorsError, OSError):
            return True
    return False


_Problem = DcpSafetensorsError | OSError
"""What a check reports: one of our errors, or an I/O error, each naming its file."""


def _read_checkpoint(
    path: str,
    storage: PinnedFiles,
    model_prefix: str | None,
    problems: list[_Problem] | None,
) -> Checkpoint:
    """:func:`read_checkpoint` through one load's ``files``; with a ``problems`` list, per-file
    problems are appended there and the file skipped, instead of raised. Index-level problems
    always raise."""
    block: dict[str, Any] = {}
    known: dict[str, Header] = {}  # headers already read
    if storage.exists(INDEX_NAME):
        index = _read_json(storage, INDEX_NAME)
        source = storage.path(INDEX_NAME)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise InvalidIndexError(f"{source}: no 'weight_map' object")
        weight_map = index["weight_map"]
        meta = index.get("metadata") or {}
        if not isinstance(meta, dict):
            raise InvalidIndexError(f"{source}: 'metadata' is not an object")
        block = meta.get(BLOCK_KEY) or {}
        if not isinstance(block, dict):
            raise InvalidIndexError(f"{source}: 'metadata.{BLOCK_KEY}' is not an object")
    elif storage.exists(SINGLE_FILE):
        known[SINGLE_FILE] = read_header(storage, SINGLE_FILE)
        weight_map = {name: SINGLE_FILE for name in known[SINGLE_FILE].tensors}
    else:
        raise CheckpointNotFoundError(_describe_directory(storage))

    ours = bool(block)
    snapshot = block.get("snapshot") if ours else None
    if model_prefix is None:
        model_prefix = block.get("model_prefix")
    extra = block.get("extra_weight_map") or {}
    recorded = block.get("files") or {}
    if not all(isinstance(m, dict) for m in (extra, recorded)):
        raise InvalidIndexError(f"{storage.path(INDEX_NAME)}: malformed '{BLOCK_KEY}' block")

    keyed: dict[str, tuple[str, str]] = {}
    for name, file in weight_map.items():
        keyed[with_prefix(model_prefix, name)] = (name, _safe_name(file, path))
    for key, file in extra.items():
        keyed[key] = (key, _safe_name(file, path))

    def probe(file: str) -> Header | _Problem:
        try:
            size = storage.size(file)
            if file in recorded:
                want = recorded[file].get("size") if isinstance(recorded[file], dict) else None
                if want != size:
                    raise FileSizeMismatchError(
                        f"{storage.path(file)}: {size} bytes on storage, the index recorded {want} (truncated or replaced)"
                    )
            header = known[file] if file in known else read_header(storage, file, size)
            if ours:
                found = (header.metadata or {}).get(SNAPSHOT_KEY)
                if found != snapshot:
                    raise SnapshotMismatchError(
                        f"{storage.path(file)}: belongs to save {found!r}, the index to save {snapshot!r} "
                        "(a stale or foreign file; re-save or restore the matching file)"
                    )
            return header
        except (DcpSafetensorsError, OSError) as e:
            return e

    # Files are probed concurrently: on S3 each is two round trips, and a 70B checkpoint
    # has 30 files; problems are still raised or reported in file order.
    files = sorted({f for _, f in keyed.values()} | set(map(lambda f: _safe_name(f, path), recorded)))
    with ThreadPoolExecutor(max(1, min(HEADER_THREADS, len(files))), thread_name_prefix="dcp-safetensors-headers") as pool:
        probed = list(pool.map(probe, files))
    headers: dict[str, Header] = {}
    checksums: dict[str, str] = {}
    for file, result in zip(files, probed, strict=True):
        if not isinstance(result, Header):
            if problems is None:
                raise result
            problems.append(result)
            continue
        if file in recorded:
            checksums[file] = recorded[file].get("checksum")
        headers[file] = result

    tensors: dict[str, TensorLocation] = {}
    missing: dict[str, list[str]] = {}
    for key, (name, file) in keyed.items():
        if file not in headers:  # its file's problem is already reported
            continue
        entry = headers[file].tensors.get(name)
        if entry is None:
            if problems is None:
                raise MissingKeyError(f"{storage.path(file)}: tensor {name!r} listed in the index is not in this file")
            missing.setdefault(file, []).append(name)
            continue
        tensors[key] = TensorLocation(file, headers[file].data_start + entry.begin, entry.dtype, entry.shape)
    for file, names in sorted(missing.items()):
        assert problems is not None  # ``missing`` fills only when collecting
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        what = f"tensor {shown} listed in the index is" if len(names) == 1 else f"{len(names)} tensors listed in the index ({shown}) are"
        problems.append(MissingKeyError(f"{storage.path(file)}: {what} not in this file"))

    aliases = block.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise InvalidIndexError(f"{storage.path(INDEX_NAME)}: 'aliases' is not an object")
    alias_keys: dict[str, str] = {}
    for alias, kept in aliases.items():
        key = with_prefix(model_prefix, kept)
        if key not in tensors:
            if key in keyed and problems is not None:  # its file or entry is already reported
                continue
            error = MissingKeyError(f"{storage.path(INDEX_NAME)}: tied key {alias!r} points at {kept!r}, which is not saved")
            if problems is None:
                raise error
            problems.append(error)
            continue
        alias_key = with_prefix(model_prefix, alias)
        tensors[alias_key] = tensors[key]
        alias_keys[alias_key] = key

    objects: dict[str, Any] = {}
    objects_file = block.get("objects")
    if objects_file:
        objects_file = _safe_name(objects_file, path)
        try:
            records = _read_json(storage, objects_file)
            if not isinstance(records, dict):
                raise CheckpointCorruptError(f"{storage.path(objects_file)}: not a JSON object")
        except (DcpSafetensorsError, OSError) as e:
            if problems is None:
                raise
            problems.append(e)
            records = {}
        for k, v in records.items():
            try:
                objects[k] = decode_object(v, key=k, source=storage.path(objects_file))
            except DcpSafetensorsError as e:
                if problems is None:
                    raise
                problems.append(e)
    version = block.get("format_version") if ours else None
    etags = {f: tag for f in headers if (tag := storage.etag(f)) is not None}
    return Checkpoint(
        path, tensors, objects, headers, snapshot, ours, checksums, model_prefix, version, alias_keys,
        staging=storage.staging, etags=etags,
    )


def infer_ties(ckpt: Checkpoint, storage: Files) -> None:
    """Add to ``ckpt`` the tied keys a transformers ``save_pretrained`` left out of its files.

    ``save_pretrained`` writes a tied pair once (no ``lm_head.weight`` when
    ``tie_word_embeddings`` is true) and records no alias. As ``from_pretrained``
    does, the model's ``config.json`` says whether it ties its embeddings, and
    its class's ``_tied_weights_keys`` (``{"lm_head.weight":
    "model.embed_tokens.weight"}``, ``{"lm_head.weight": "transformer.wte.weight"}``)
    which keys; for a class the installed transformers does not know (custom
    code) ``lm_head.weight`` pairs with the one input embedding among the keys.
    A tie confirmed so becomes an alias (in ``aliases`` and ``tensors``). One
    that only the key names suggest (no ``config.json``, or one that does not
    set ``tie_word_embeddings``) goes to ``unconfirmed``, so that reading it
    can fail with a message saying why. Our own checkpoints record every key
    they left out in the index, and are left as they are.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> from dcp_safetensors.storage import open_storage
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"model.embed_tokens.weight": torch.ones(4, 2)}, d + "/model.safetensors")
        >>> ckpt = read_checkpoint(d)
        >>> infer_ties(ckpt, open_storage(d))
        >>> ckpt.unconfirmed["lm_head.weight"].twin
        'model.embed_tokens.weight'
        >>> with open(d + "/config.json", "w") as f:
        ...     _ = f.write('{"architectures": ["MyCustomForCausalLM"], "tie_word_embeddings": true}')
        >>> ckpt = read_checkpoint(d)
        >>> infer_ties(ckpt, open_storage(d))
        >>> ckpt.aliases
        {'lm_head.weight': 'model.embed_tokens.weight'}
    """
    if ckpt.written_by_us:
        return
    names = {name for key in ckpt.tensors if (name := under_prefix(ckpt.model_prefix, key)) is not None}
    config, reason = _read_config(storage)
    tied = pairs = None
    if config is not None:
        tied = _ties_embeddings(config)
        if tied is False:
            return
        if tied:
            pairs = _model_ties(config)
        else:
            reason = f"{storage.path(CONFIG_FILE)} does not set tie_word_embeddings"
    if pairs is None:
        inputs = [n for n in names if _INPUT_EMBEDDING.search(n)]
        pairs = {OUTPUT_EMBEDDING: inputs[0]} if len(inputs) == 1 else {}
    for target, source in pairs.items():
        if (target in names) == (source in names):
            continue  # both saved (an untied save), or neither (not this checkpoint's keys)
        # from_pretrained ties either way round: whichever key of the pair was saved serves both.
        alias, kept = (target, source) if source in names else (source, target)
        alias, kept = with_prefix(ckpt.model_prefix, alias), with_prefix(ckpt.model_prefix, kept)
        if tied:
            ckpt.tensors[alias] = ckpt.tensors[kept]
            ckpt.aliases[alias] = kept
        else:
            ckpt.unconfirmed[alias] = UnconfirmedTie(kept, reason)


def _read_config(storage: Files) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint's ``config.json``, or None and why there is none to use."""
    if not storage.exists(CONFIG_FILE):
        return None, f"{storage.path(CONFIG_FILE)} does not exist"
    try:
        config = _read_json(storage, CONFIG_FILE)
    except InvalidIndexError as e:
        return None, str(e)
    if not isinstance(config, dict):
        return None, f"{storage.path(CONFIG_FILE)} is not a JSON object"
    return config, ""


def _ties_embeddings(config: dict[str, Any]) -> bool | None:
    """``tie_word_embeddings`` as transformers reads it from ``config``; None if it cannot be told."""
    for scope in (config, config.get("text_config")):
        if isinstance(scope, dict) and isinstance(scope.get("tie_word_embeddings"), bool):
            return bool(scope["tie_word_embeddings"])
    # Configs saved before transformers 5 leave out a value equal to their class's default.
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    try:
        from transformers import AutoConfig

        value = getattr(AutoConfig.for_model(model_type), "tie_word_embeddings", None)
    except (ImportError, ValueError, KeyError):  # no transformers, or a model type it does not know
        return None
    return value if isinstance(value, bool) else None


def _model_ties(config: dict[str, Any]) -> dict[str, str] | None:
    """``{target: source}`` the model class of ``config`` ties (its ``_tied_weights_keys``).

    None when the installed transformers does not know the class (custom code),
    or names only the tied targets (transformers 4). Entries that are patterns
    over a module's parameters are left out: only the model's own parameter
    names expand them, and the checkpoint lacks the targets.
    """
    try:
        import transformers
    except ImportError:
        return None
    for arch in config.get("architectures") or ():
        try:
            cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        except (ImportError, RuntimeError):  # its modeling module needs a package that is not installed
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            continue
        mapping = cls._tied_weights_keys
        if mapping is None:
            return {}
        if isinstance(mapping, dict):
            return {t: s for t, s in mapping.items() if _PARAMETER.fullmatch(t) and _PARAMETER.fullmatch(s)}
        return None
    return None


ProgressCallback = Callable[[int, int], object]
"""``progress(done_bytes, total_bytes)``: called with ``(0, total)`` first, then as bytes are done."""


@dataclass
class VerifyReport:
    """What :func:`verify_all` found.

    ``checkpoint`` holds what could be opened (``None`` when the index itself
    is unusable); ``problems`` lists every problem, each naming its file;
    ``bytes_checked`` counts the bytes read for checksums.
    """

    checkpoint: Checkpoint | None
    problems: list[_Problem]
    files_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_checksums(
    ckpt: Checkpoint,
    storage: PinnedFiles,
    chunk_size: int,
    progress: ProgressCallback | None,
    problems: list[_Problem] | None,
) -> tuple[int, int]:
    """CRC-32 every file that has a recorded checksum; raise the first mismatch, or append each
    to ``problems``. Returns ``(files, bytes)`` read."""
    files = sorted(ckpt.checksums.items())
    sizes = [ckpt.headers[f].file_size for f, _ in files]
    total = sum(sizes)
    if progress is not None:
        progress(0, total)
    buf = bytearray(min(chunk_size, max(sizes, default=0)))
    done = read = 0
    for (file, want), size in zip(files, sizes):
        crc = 0
        try:
            with shrank(storage, file):
                for offset in range(0, size, chunk_size):
                    view = memoryview(buf)[: min(chunk_size, size - offset)]
                    storage.readinto(file, offset, view)
                    crc = crc32(view, crc)
                    read += view.nbytes
                    if progress is not None:
                        progress(done + offset + view.nbytes, total)
            if format_crc32(crc) != want:
                raise ChecksumMismatchError(
                    f"{storage.path(file)}: checksum {format_crc32(crc)} differs from {want} recorded at save time "
                    "(the file's bytes changed after it was written)"
                )
        except (DcpSafetensorsError, OSError) as e:
            if problems is None:
                raise
            problems.append(e)
        done += size
        if progress is not None:
            progress(done, total)
    return len(files), read


def verify(
    path: str,
    *,
    chunk_size: int = 16 << 20,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> Checkpoint:
    """Every check :func:`read_checkpoint` makes, plus every file's checksum (reads every byte).

    Raises a :class:`~dcp_safetensors.errors.CheckpointCorruptError` subclass
    naming the first broken file; returns the checkpoint if intact. Checkpoints
    written by other tools carry no checksums: their structure is checked.
    :func:`verify_all` reports every problem instead of the first.
    ``progress(done_bytes, total_bytes)`` is called as the checksums are read.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, d + "/model.safetensors")
        >>> sorted(verify(d).headers)
        ['model.safetensors']
    """
    ckpt, files = open_checkpoint(path, open_storage(path, storage_options), None)
    try:
        _check_checksums(ckpt, files, chunk_size, progress, None)
    finally:
        files.close()
    return ckpt


def verify_all(
    path: str,
    *,
    chunk_size: int = 16 << 20,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Like :func:`verify`, but report every problem rather than raise the first.

    Each broken file is reported once (a file whose size, header or snapshot is
    wrong is not also checksummed); every intact file is checksummed. A problem
    that leaves nothing to check file by file (no checkpoint at ``path``, an
    unreadable index) is the only problem reported.

    Example:
        >>> import tempfile, torch, torch.distributed.checkpoint as dcp
        >>> from dcp_safetensors import SafetensorsWriter
        >>> d = tempfile.mkdtemp()
        >>> _ = dcp.save({"a": torch.ones(4), "b": torch.zeros(4)}, no_dist=True,
        ...              storage_writer=SafetensorsWriter(d, max_shard_size=16))
        >>> verify_all(d).ok
        True
        >>> for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        ...     with open(f"{d}/{name}", "r+b") as f:
        ...         _ = f.seek(-1, 2); _ = f.write(b"!")
        >>> [type(p).__name__ for p in verify_all(d).problems]
        ['ChecksumMismatchError', 'ChecksumMismatchError']
    """
    problems: list[_Problem] = []
    files = open_snapshot(open_storage(path, storage_options))
    try:
        try:
            ckpt = _read_checkpoint(path, files, None, problems)
        except (DcpSafetensorsError, OSError) as e:
            return VerifyReport(None, [e])
        count, nbytes = _check_checksums(ckpt, files, chunk_size, progress, problems)
    finally:
        files.close()
    return VerifyReport(ckpt, problems, count, nbytes)


def summarize(ckpt: Checkpoint) -> dict[str, Any]:
    """A JSON-serialisable description of ``ckpt`` (what ``dcp-safetensors inspect --json`` prints).

    ``tensors`` are the weights of the HF files; ``training_state`` the tensors
    kept out of the weight map (``training_state/``); ``aliases`` the tied keys
    saved once (each with the key whose bytes it shares); ``objects`` the
    non-tensor values, each with its type and its ``value`` when JSON holds it
    exactly, else its ``repr``.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"w": torch.ones(2, 3)}, d + "/model.safetensors")
        >>> s = summarize(read_checkpoint(d))
        >>> s["written_by"], s["tensors"][0], s["totals"]["tensor_bytes"]
        ('other', {'key': 'w', 'dtype': 'F32', 'shape': [2, 3], 'bytes': 24, 'file': 'model.safetensors'}, 24)
    """
    files = []
    count: dict[str, int] = {}
    tensor_bytes: dict[str, int] = {}
    stored = {k: loc for k, loc in ckpt.tensors.items() if k not in ckpt.aliases}
    for loc in stored.values():
        count[loc.file] = count.get(loc.file, 0) + 1
        tensor_bytes[loc.file] = tensor_bytes.get(loc.file, 0) + loc.nbytes
    for name in sorted(ckpt.headers, key=natural_key):
        h = ckpt.headers[name]
        entry: dict[str, Any] = {
            "name": name,
            "size": h.file_size,
            "tensors": count.get(name, 0),
            "tensor_bytes": tensor_bytes.get(name, 0),
        }
        if name in ckpt.checksums:
            entry["checksum"] = ckpt.checksums[name]
        files.append(entry)
    model: list[dict[str, Any]] = []
    state: list[dict[str, Any]] = []
    for key in sorted(stored, key=natural_key):
        loc = stored[key]
        row = {"key": key, "dtype": loc.dtype, "shape": list(loc.shape), "bytes": loc.nbytes, "file": loc.file}
        (state if loc.file.startswith(TRAINING_STATE_DIR + "/") else model).append(row)
    objects = []
    for key in sorted(ckpt.objects, key=natural_key):
        value = ckpt.objects[key]
        shown = {"value": value} if is_json_exact(value) else {"repr": repr(value)[:1000]}
        objects.append({"key": key, "type": type(value).__name__, **shown})
    return {
        "path": ckpt.root,
        "written_by": "dcp_safetensors" if ckpt.written_by_us else "other",
        "format_version": ckpt.format_version,
        "snapshot": ckpt.snapshot,
        "model_prefix": ckpt.model_prefix,
        "files": files,
        "tensors": model,
        "training_state": state,
        "objects": objects,
        "aliases": [{"key": a, "same_as": ckpt.aliases[a]} for a in sorted(ckpt.aliases, key=natural_key)],
        "totals": {
            "tensors": len(model),
            "training_state_tensors": len(state),
            "objects": len(objects),
            "tensor_bytes": sum(r["bytes"] for r in model + state),
            "file_bytes": sum(f["size"] for f in files),
            "files": len(files),
        },
    }
