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
writer or reader (:func:`recover`). The writer holds a ``flock`` on its staging
directory until it is done, so nobody rolls forward, or deletes, the work of a
save whose process still lives; a reader meeting a live publish reads the new
snapshot through its record instead (:class:`~dcp_safetensors.pinned.PinnedFiles`).

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
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dcp_safetensors.errors import CheckpointCorruptError, ConcurrentSaveError
from dcp_safetensors.names import (
    BUILDING_PREFIX,
    COMMIT_RECORD,
    INDEX_NAME,
    LOCK_FILE,  # noqa: F401 (storage.local reads it here)
    STAGING_PREFIX,
    TRAINING_STATE_DIR,
)

if TYPE_CHECKING:
    from dcp_safetensors.storage.local import LocalStorage

__all__ = ["INDEX_NAME", "STAGING_PREFIX", "staging_name", "stale_files", "commit", "roll_forward", "recover"]

logger = logging.getLogger("dcp_safetensors")

PUBLISH_WAIT = 120.0
"""Seconds a writer waits for another live save to finish publishing before it gives up."""
# Files a save owns and replaces, as save_pretrained replaces its shards; nothing else is deleted.
_OWNED_TOP_LEVEL = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


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


def recover(storage: LocalStorage, *, writer: bool, own: str | None = None) -> str | None:
    """Finish what crashed saves left, and find the saves still running.

    Whether a save's process lives is told by the ``flock`` it holds on its
    staging directory's lock file (the kernel drops it when the process dies):

    ============================  ===============================  ===============================
    staging directory             its process died                 its process lives
    ============================  ===============================  ===============================
    committed (has the record)    rolled forward, by whoever       readers read through it (the
                                  claims it first                  name is returned); writers wait
                                                                   for the publish to end
    uncommitted                   writers delete it                writers raise
                                                                   ConcurrentSaveError
    ============================  ===============================  ===============================

    ``own`` is the calling writer's staging, skipped. Where the filesystem
    cannot lock, writers act as if every other save were dead (one writer per
    directory) and readers as if it were alive (they never publish).
    """
    publishing: str | None = None
    for entry in storage.listdir():
        if entry.startswith(BUILDING_PREFIX):
            if writer:
                _remove_if_abandoned(storage, entry)
            continue
        if not entry.startswith(STAGING_PREFIX) or entry == own:
            continue
        claim = storage.claim(entry)
        if claim is not None and not claim.certain and not writer:
            claim.release()
            claim = None
        if claim is None:
            if writer:
                _wait_for_publish(storage, entry)
            elif storage.exists(posixpath.join(entry, COMMIT_RECORD)):
                publishing = entry
            continue
        try:
            # Checked under the claim: a writer may have committed, then died, since the listing.
            if storage.exists(posixpath.join(entry, COMMIT_RECORD)):
                logger.warning("completing the commit of %s left by an interrupted save", entry)
                roll_forward(storage, entry)
            elif writer:
                logger.warning("removing %s left by an interrupted save that never committed", entry)
                storage.remove_tree(entry)
        finally:
            claim.release()
    return publishing


def _remove_if_abandoned(storage: LocalStorage, entry: str) -> None:
    claim = storage.claim(entry)
    if claim is not None:
        storage.remove_tree(entry)
        claim.release()


def _wait_for_publish(storage: LocalStorage, staging: str) -> None:
    """A writer meeting another live save: wait while that one publishes; raise while it writes."""
    deadline = time.monotonic() + PUBLISH_WAIT
    delay = 0.01
    while True:
        if not storage.exists(posixpath.join(staging, COMMIT_RECORD)):
            if not storage.exists(staging):
                return  # published meanwhile
            raise ConcurrentSaveError(
                f"{storage.path(staging)}: another save ({storage.owner(staging)}) is writing this checkpoint "
                "directory; this save stopped before touching it. Save to another directory, or wait for that "
                "save to finish (if its job is gone, its staging directory is removed by the next save)"
            )
        claim = storage.claim(staging)
        if claim is not None:
            claim.release()
            recover(storage, writer=True)  # its process died while publishing: finish it
            return
        if time.monotonic() > deadline:
            raise ConcurrentSaveError(
                f"{storage.path(staging)}: another save ({storage.owner(staging)}) has been publishing this "
                f"checkpoint for over {PUBLISH_WAIT:.0f} s; this save stopped before touching it"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
