"""A checkpoint as a reader sees it: index, headers, tensors, objects, every one checked.

:func:`read_checkpoint` opens any HF safetensors checkpoint (ours, any
``save_pretrained`` / ``huggingface_hub`` output, single file or indexed,
or torch's per-rank ``shard-*`` files, :mod:`dcp_safetensors.torch_shards`) and
checks everything that can be checked without reading tensor data: the index
is well-formed and names no path outside the directory, every listed file
exists with the recorded size, every header obeys the format, every key the
index lists is in its file, and every file belongs to the index's snapshot.
:func:`open_checkpoint` does the same for a load, which goes on reading
through the files it pinned (:mod:`dcp_safetensors.pinned`).
:func:`check_snapshot` makes the checks and lists every problem;
``read_checkpoint`` raises the first.

Related modules: :mod:`dcp_safetensors.index` (the index's format),
:mod:`dcp_safetensors.ties` (:func:`infer_ties`, the tied keys a
``save_pretrained`` left out), :mod:`dcp_safetensors.verification`
(``verify``, ``verify_all``: the checks plus every checksum). ``infer_ties``,
``verify``, ``verify_all`` and ``VerifyReport`` are importable from here too.

Example:
    >>> import tempfile, torch, safetensors.torch
    >>> d = tempfile.mkdtemp()
    >>> safetensors.torch.save_file({"w": torch.ones(2)}, d + "/model.safetensors")
    >>> ckpt = read_checkpoint(d)
    >>> ckpt.tensors["w"].shape, ckpt.written_by_us
    ((2,), False)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dcp_safetensors.blocks import BlockTable, decode_tables
from dcp_safetensors.checksum import crc32, format_crc32
from dcp_safetensors.errors import (
    CheckpointChangedError,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    DcpSafetensorsError,
    FileSizeMismatchError,
    MissingFileError,
    MissingKeyError,
    SnapshotMismatchError,
    shrank,
)
from dcp_safetensors.format import (
    LENGTH_PREFIX,
    Header,
    header_length,
    parse_header,
)
from dcp_safetensors.index import Index, parse_index, read_json
from dcp_safetensors.layout import TensorLocation
from dcp_safetensors.mapping import with_prefix
from dcp_safetensors.names import (
    DCP_METADATA_FILE,
    INDEX_NAME,
    SINGLE_FILE,
    SNAPSHOT_KEY,
    STAGING_PREFIX,
)
from dcp_safetensors.objects import decode_object
from dcp_safetensors.pinned import PinnedFiles
from dcp_safetensors.storage import Storage, open_storage
from dcp_safetensors.ties import UnconfirmedTie, infer_ties
from dcp_safetensors.torch_shards import ChunkedTensor, chunked_tensors, torch_shard_files

if TYPE_CHECKING:
    from dcp_safetensors.verification import VerifyReport, verify, verify_all  # noqa: F401

Files = Storage | PinnedFiles
"""What the functions here read a checkpoint through: a backend, or one load's pinned view of it."""

__all__ = [
    "Files",
    "Checkpoint",
    "UnconfirmedTie",
    "Problem",
    "read_checkpoint",
    "open_snapshot",
    "open_checkpoint",
    "check_snapshot",
    "read_header",
    "infer_ties",
]

logger = logging.getLogger("dcp_safetensors")

_VERIFICATION = frozenset({"verify", "verify_all", "VerifyReport"})
"""Names once defined here, now in :mod:`dcp_safetensors.verification` (which imports this module)."""


def __getattr__(name: str) -> Any:
    """The names of :data:`_VERIFICATION`, for code that imports them from here."""
    if name in _VERIFICATION:
        from dcp_safetensors import verification

        return getattr(verification, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """Keys that are not in ``tensors`` but may be tied keys saved once (see :func:`~dcp_safetensors.ties.infer_ties`)."""
    staging: str | None = None
    """The staging directory this snapshot was read through: a live save was publishing it."""
    etags: dict[str, str] = field(default_factory=dict)
    """The version of each file that was read (object stores): other ranks read that version or fail."""
    blocks: dict[str, BlockTable] = field(default_factory=dict)
    """Each file's block checksums, as the save recorded them (:mod:`dcp_safetensors.blocks`); none for other tools' files."""
    chunked: dict[str, ChunkedTensor] = field(default_factory=dict)
    """Tensors stored in pieces, one per rank that wrote it (torch's per-rank HF output,
    :mod:`dcp_safetensors.torch_shards`); not in ``tensors``."""

    def location(self, key: str, offsets: Sequence[int]) -> TensorLocation:
        """Where the stored chunk of ``key`` that starts at ``offsets`` lies (a whole tensor's starts at the origin)."""
        chunked = self.chunked.get(key)
        return self.tensors[key] if chunked is None else chunked.chunk_at(offsets).location


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
    subclass naming the file); :func:`~dcp_safetensors.verification.verify_all` reports every problem.
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
            return _raise_first(check_snapshot(path, files, model_prefix)), files
        except _CHANGING as e:
            changing = _being_replaced(storage, files)
            files.close()
            if not changing or time.monotonic() > deadline:
                raise
            logger.debug("%s: a save replaced the checkpoint while it was opened (%s); opening it again", path, e)
            time.sleep(delay)
            delay = min(2 * delay, 0.2)
        except BaseException:
            files.close()  # a checkpoint that cannot be opened keeps no file open
            raise


def _being_replaced(storage: Storage, files: PinnedFiles) -> bool:
    """Whether a save is under way in the directory, or replaced the index ``files`` read."""
    if any(e.startswith(STAGING_PREFIX) for e in storage.listdir()):
        return True
    # The index the attempt read (from staging or not) against the one there now: a publish
    # that finished between the attempt and this check leaves no staging but another index.
    if files.is_open(INDEX_NAME):
        try:
            return bool(storage.read_range(INDEX_NAME, 0, storage.size(INDEX_NAME)) != files.read_range(INDEX_NAME, 0, files.size(INDEX_NAME)))
        except (DcpSafetensorsError, OSError):
            return True
    return False


Problem = DcpSafetensorsError | OSError
"""What a check reports: one of our errors, or an I/O error, each naming its file."""


def _raise_first(found: tuple[Checkpoint, list[Problem]]) -> Checkpoint:
    """The checkpoint :func:`check_snapshot` found, or its first problem raised."""
    ckpt, problems = found
    if problems:
        raise problems[0]
    return ckpt


def check_snapshot(path: str, files: PinnedFiles, model_prefix: str | None) -> tuple[Checkpoint, list[Problem]]:
    """Open and check the checkpoint at ``path`` through one load's ``files``: what could be read, and every problem.

    A problem that leaves nothing to check file by file (no checkpoint, an
    unreadable or malformed index, a file name outside the directory, a
    broken lone ``model.safetensors``) is raised. Every other problem is
    listed, in the order the checks meet them (each file's size, header and
    snapshot, in file order; the keys a file lacks, one problem per file;
    tied keys whose tensor is not saved; the non-tensor values), and what it
    concerns is left out of the checkpoint returned. ``model_prefix``: see
    :func:`read_checkpoint`.
    """
    found = _read_index(path, files)
    if found is None:
        return _check_torch_shards(path, files)
    index, known = found
    prefix = index.model_prefix if model_prefix is None else model_prefix
    keyed = {with_prefix(prefix, name): (name, file) for name, file in index.weight_map.items()}
    keyed.update((key, (key, file)) for key, file in index.extra_weight_map.items())
    names = sorted({file for _, file in keyed.values()} | set(index.files))
    headers, problems = _read_headers(files, names, index, known)
    tensors, missing = _locate(files, keyed, headers)
    aliases, dangling = _resolve_aliases(files, index.aliases, prefix, keyed, tensors)
    objects, broken = _read_objects(files, index.objects)
    blocks, unrecorded = _read_blocks(files, index)
    ckpt = Checkpoint(
        path,
        tensors,
        objects,
        headers,
        index.snapshot,
        index.ours,
        {file: index.files[file].get("checksum") for file in headers if file in index.files},
        prefix,
        index.format_version,
        aliases,
        staging=files.staging,
        etags={file: tag for file in headers if (tag := files.etag(file)) is not None},
        blocks=blocks,
    )
    return ckpt, problems + missing + dangling + broken + unrecorded


def _read_blocks(files: PinnedFiles, index: Index) -> tuple[dict[str, BlockTable], list[Problem]]:
    """The block checksums the save recorded (none before they were: the file checksums stand alone),
    checked against the record's size and CRC-32 in the index; a bad record is a problem."""
    record = index.block_checksums
    if record is None:
        return {}, []
    name = record["file"]
    try:
        size = files.size(name)
        if size != record["size"]:
            raise FileSizeMismatchError(f"{files.path(name)}: {size} bytes on storage, the index recorded {record['size']}")
        data = files.read_range(name, 0, size)
        found = format_crc32(crc32(data))
        if found != record["checksum"]:
            # Like a data file of another snapshot: while a save publishes, the open is retried.
            raise SnapshotMismatchError(
                f"{files.path(name)}: checksum {found} differs from {record['checksum']} recorded "
                "in the index: the block checksums of another save (a stale file, or a save publishing now), or "
                "the file changed after it was written"
            )
        names = sorted(index.files)
        return decode_tables(data, [(n, index.files[n]["size"], index.files[n]["blocks"]) for n in names], source=files.path(name)), []
    except (DcpSafetensorsError, OSError) as e:
        return {}, [e]


def _read_index(path: str, files: PinnedFiles) -> tuple[Index, dict[str, Header]] | None:
    """The checkpoint's index; for a lone ``model.safetensors``, one made of its header (returned too);
    ``None`` when there is neither."""
    if files.exists(INDEX_NAME):
        index = read_json(files, INDEX_NAME)
        return parse_index(index, source=files.path(INDEX_NAME), root=path), {}
    if files.exists(SINGLE_FILE):
        header = read_header(files, SINGLE_FILE)
        return Index({name: SINGLE_FILE for name in header.tensors}), {SINGLE_FILE: header}
    return None


def _check_torch_shards(path: str, files: PinnedFiles) -> tuple[Checkpoint, list[Problem]]:
    """:func:`check_snapshot` for a directory of torch's per-rank files (no index: every such file is read)."""
    names = torch_shard_files(files.listdir())
    if not names:
        raise CheckpointNotFoundError(_describe_directory(files))
    headers, problems = _read_headers(files, names, Index({}), {})
    whole, chunked, broken = chunked_tensors(headers, files.path("").rstrip("/"))
    logger.debug("%s: torch's per-rank HF files, %d files, %d tensors in pieces", path, len(headers), len(chunked))
    ckpt = Checkpoint(
        path,
        whole,
        {},
        headers,
        None,
        False,
        staging=files.staging,
        etags={file: tag for file in headers if (tag := files.etag(file)) is not None},
        chunked=chunked,
    )
    return ckpt, [*problems, *broken]


def _read_headers(
    files: PinnedFiles, names: list[str], index: Index, known: dict[str, Header]
) -> tuple[dict[str, Header], list[Problem]]:
    """The header of each file in ``names``, checked against ``index``; a file with a problem is
    left out and its problem listed (in the order of ``names``).

    Files are read concurrently: on S3 each is two round trips, and a 70B
    checkpoint has 30 files.
    """

    def probe(file: str) -> Header | Problem:
        try:
            return _check_file(files, file, index, known.get(file))
        except (DcpSafetensorsError, OSError) as e:
            return e

    with ThreadPoolExecutor(max(1, min(HEADER_THREADS, len(names))), thread_name_prefix="dcp-safetensors-headers") as pool:
        probed = list(pool.map(probe, names))
    headers = {file: result for file, result in zip(names, probed, strict=True) if isinstance(result, Header)}
    return headers, [result for result in probed if not isinstance(result, Header)]


def _check_file(files: PinnedFiles, file: str, index: Index, header: Header | None) -> Header:
    """``file``'s header (``header``, when already read), after checking the file's size and
    snapshot against what ``index`` recorded."""
    size = files.size(file)
    if file in index.files:
        want = index.files[file].get("size") if isinstance(index.files[file], dict) else None
        if want != size:
            raise FileSizeMismatchError(
                f"{files.path(file)}: {size} bytes on storage, the index recorded {want} (truncated or replaced)"
            )
    if header is None:
        with shrank(files, file):  # truncated in place between its size and its header read
            header = read_header(files, file, size)
    if index.ours:
        found = (header.metadata or {}).get(SNAPSHOT_KEY)
        if found != index.snapshot:
            raise SnapshotMismatchError(
                f"{files.path(file)}: belongs to save {found!r}, the index to save {index.snapshot!r} "
                "(a stale or foreign file; re-save or restore the matching file)"
            )
    return header


def _locate(
    files: PinnedFiles, keyed: dict[str, tuple[str, str]], headers: dict[str, Header]
) -> tuple[dict[str, TensorLocation], list[Problem]]:
    """Where each tensor of ``keyed`` (``{DCP key: (name in the file, file)}``) is; the names a
    file lacks are one problem per file, in file order. Files not in ``headers`` are skipped
    (their problem is listed already)."""
    tensors: dict[str, TensorLocation] = {}
    missing: dict[str, list[str]] = {}
    for key, (name, file) in keyed.items():
        header = headers.get(file)
        if header is None:
            continue
        entry = header.tensors.get(name)
        if entry is None:
            missing.setdefault(file, []).append(name)
        else:
            tensors[key] = TensorLocation(file, header.data_start + entry.begin, entry.dtype, entry.shape)
    return tensors, [_missing_keys(files.path(file), names) for file, names in sorted(missing.items())]


def _missing_keys(source: str, names: list[str]) -> MissingKeyError:
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    what = f"tensor {shown} listed in the index is" if len(names) == 1 else f"{len(names)} tensors listed in the index ({shown}) are"
    return MissingKeyError(f"{source}: {what} not in this file")


def _resolve_aliases(
    files: PinnedFiles,
    aliases: dict[str, Any],
    prefix: str | None,
    keyed: dict[str, tuple[str, str]],
    tensors: dict[str, TensorLocation],
) -> tuple[dict[str, str], list[Problem]]:
    """Add each tied key saved once to ``tensors``: ``{alias DCP key: DCP key of the stored tensor}``.

    An alias of a tensor the index does not list is a problem; one of a listed
    tensor that could not be located is skipped (its problem is listed already).
    """
    resolved: dict[str, str] = {}
    problems: list[Problem] = []
    for alias, kept in aliases.items():
        key = with_prefix(prefix, kept)
        if key in tensors:
            alias_key = with_prefix(prefix, alias)
            tensors[alias_key] = tensors[key]
            resolved[alias_key] = key
        elif key not in keyed:
            problems.append(MissingKeyError(f"{files.path(INDEX_NAME)}: tied key {alias!r} points at {kept!r}, which is not saved"))
    return resolved, problems


def _read_objects(files: PinnedFiles, name: str | None) -> tuple[dict[str, Any], list[Problem]]:
    """The non-tensor values in file ``name``; an unreadable file, or value, is a problem (and left out)."""
    if name is None:
        return {}, []
    try:
        records = read_json(files, name)
        if not isinstance(records, dict):
            raise CheckpointCorruptError(f"{files.path(name)}: not a JSON object")
    except (DcpSafetensorsError, OSError) as e:
        return {}, [e]
    objects: dict[str, Any] = {}
    problems: list[Problem] = []
    for key, record in records.items():
        try:
            objects[key] = decode_object(record, key=key, source=files.path(name))
        except DcpSafetensorsError as e:
            problems.append(e)
    return objects, problems
