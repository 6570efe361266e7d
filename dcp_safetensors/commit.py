"""The commit protocol on POSIX storage: staging directory, commit record, roll-forward.

(Object stores follow the same protocol with their own primitives: see
:mod:`dcp_safetensors.storage.fsspec`.)

Renaming N files is not atomic, so the commit does not depend on it:

1. every rank writes into ``<root>/.dcp_safetensors-staging-<snapshot>/`` and
   ``fsync``s its files; nothing outside staging is touched;
2. the coordinator writes the new index into staging, then the commit record
   ``COMMIT.json`` (file names to publish), ``fsync``s both and the staging
   directory. **A durable commit record is the commit point.**
3. :func:`roll_forward` publishes: it unlinks the old index first (so a tool
   that knows nothing of staging sees no index rather than a mix of old and
   new files), moves the data files into place, moves the index last,
   ``fsync``s the directory, deletes files of the old snapshot that the new
   index does not list, and removes staging. Every step is idempotent.

A crash before step 2 leaves the old checkpoint untouched (the next save
deletes the abandoned staging); a crash after it is rolled forward by the next
writer or reader (:func:`recover`). Readers only roll forward committed
staging, never delete another writer's work in progress.

Example:
    >>> import tempfile, os
    >>> from dcp_safetensors.storage import LocalStorage
    >>> s = LocalStorage(tempfile.mkdtemp())
    >>> staging = staging_name("abc")
    >>> s.write_file(staging + "/model.safetensors", b"data")
    >>> commit(s, "abc", ["model.safetensors"], b"{}")
    >>> sorted(os.listdir(s.root))
    ['model.safetensors', 'model.safetensors.index.json']
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dcp_safetensors.errors import CheckpointCorruptError

if TYPE_CHECKING:
    from dcp_safetensors.storage.local import LocalStorage

__all__ = ["INDEX_NAME", "STAGING_PREFIX", "staging_name", "stale_files", "commit", "roll_forward", "recover"]

logger = logging.getLogger("dcp_safetensors")

INDEX_NAME = "model.safetensors.index.json"
STAGING_PREFIX = ".dcp_safetensors-staging-"
COMMIT_RECORD = "COMMIT.json"
TRAINING_STATE_DIR = "training_state"
# Files a save owns and replaces, as save_pretrained replaces its shards; nothing else is deleted.
_OWNED_TOP_LEVEL = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def is_owned_file(name: str) -> bool:
    """Whether a top-level file belongs to a save (replaced or removed by the next one).

    Example:
        >>> is_owned_file("model-00001-of-00002.safetensors"), is_owned_file("config.json")
        (True, False)
    """
    return bool(_OWNED_TOP_LEVEL.match(name)) or name == INDEX_NAME


def stale_files(storage: Any, published: Sequence[str]) -> list[str]:
    """Files of older snapshots that a save publishing ``published`` removes (model shards, training state)."""
    keep = set(published)
    stale = [f for f in storage.listdir() if _OWNED_TOP_LEVEL.match(f) and f not in keep]
    return stale + [f for f in storage.walk_files(TRAINING_STATE_DIR) if f not in keep]


def staging_name(snapshot: str) -> str:
    """The staging directory of a save, relative to the checkpoint root."""
    return STAGING_PREFIX + snapshot


def commit(storage: LocalStorage, snapshot: str, files: Sequence[str], index: bytes) -> None:
    """Make the save ``snapshot`` (its ``files`` already durable in staging) the checkpoint."""
    staging = staging_name(snapshot)
    storage.write_file(posixpath.join(staging, INDEX_NAME), index)
    for d in {posixpath.dirname(f) for f in files if posixpath.dirname(f)}:
        storage.fsync_dir(posixpath.join(staging, d))
    record = json.dumps({"snapshot": snapshot, "files": list(files)}).encode()
    storage.write_file(posixpath.join(staging, COMMIT_RECORD + ".tmp"), record)
    storage.replace(posixpath.join(staging, COMMIT_RECORD + ".tmp"), posixpath.join(staging, COMMIT_RECORD))
    storage.fsync_dir(staging)
    logger.debug("committed snapshot %s (%d files)", snapshot, len(files))
    roll_forward(storage, staging)


def _read_record(storage: LocalStorage, staging: str) -> list[str]:
    name = posixpath.join(staging, COMMIT_RECORD)
    try:
        record = json.loads(storage.read_range(name, 0, storage.size(name)))
        files = record["files"]
        if not all(isinstance(f, str) for f in files):
            raise TypeError("file names must be strings")
        return files
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{storage.path(name)}: unreadable commit record ({e})") from None


def roll_forward(storage: LocalStorage, staging: str) -> None:
    """Publish a committed staging directory (idempotent; safe to repeat after a crash)."""
    files = _read_record(storage, staging)
    staged_index = posixpath.join(staging, INDEX_NAME)
    if storage.exists(staged_index):
        storage.remove(INDEX_NAME)
        storage.fsync_dir()
    for f in files:
        if storage.exists(posixpath.join(staging, f)):
            storage.replace(posixpath.join(staging, f), f)
    for d in {posixpath.dirname(f) for f in files if posixpath.dirname(f)}:
        storage.fsync_dir(d)
    if storage.exists(staged_index):
        storage.replace(staged_index, INDEX_NAME)
    storage.fsync_dir()
    stale = stale_files(storage, files)
    for f in stale:
        storage.remove(f)
    storage.remove(posixpath.join(staging, COMMIT_RECORD))
    storage.remove_tree(staging)
    logger.debug("published %s; removed %d stale files", staging, len(stale))


def recover(storage: LocalStorage, *, discard_uncommitted: bool) -> None:
    """Finish every committed save left by a crash; with ``discard_uncommitted``, delete abandoned staging.

    Writers pass ``discard_uncommitted=True`` (one writer per directory at a
    time); readers pass False so they never delete a save still in progress.
    """
    for entry in storage.listdir():
        if not entry.startswith(STAGING_PREFIX):
            continue
        if storage.exists(posixpath.join(entry, COMMIT_RECORD)):
            logger.warning("completing the commit of %s left by an interrupted save", entry)
            roll_forward(storage, entry)
        elif discard_uncommitted:
            logger.warning("removing %s left by an interrupted save that never committed", entry)
            storage.remove_tree(entry)
