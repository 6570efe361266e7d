"""The commit on POSIX (:class:`RenameCommit`): a durable record in the staging directory, then renames.

The protocol is :mod:`dcp_safetensors.commit`'s; this is its implementation
with :class:`~dcp_safetensors.storage.local.LocalStorage`'s primitives
(``fsync``, ``rename``, the ``flock`` on a staging directory's lock file), and
the recovery that finishes what crashed saves left.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from dcp_safetensors.commit import Commit, CommitRecord, stale_files
from dcp_safetensors.errors import ConcurrentSaveError
from dcp_safetensors.names import BUILDING_PREFIX, COMMIT_RECORD, INDEX_NAME, STAGING_PREFIX
from dcp_safetensors.storage.base import PartTags, SaveSession

if TYPE_CHECKING:
    from dcp_safetensors.storage.local import LocalStorage

__all__ = ["RenameCommit"]

PUBLISH_WAIT = 120.0
"""Seconds a writer waits for another live save to finish publishing before it gives up."""

logger = logging.getLogger("dcp_safetensors.storage.local")  # the POSIX storage's logger


class RenameCommit(Commit):
    """The commit on POSIX: a durable record in the staging directory, then renames into place.

    1. every rank writes into the staging directory and ``fsync``s its files;
    2. the coordinator writes the new index into staging, then ``COMMIT.json``
       (via a temporary name and a rename), and ``fsync``s staging: **the commit point**;
    3. :meth:`roll_forward` unlinks the old index, moves the data files, moves
       the index last, ``fsync``s, deletes stale files and removes staging.

    Example:
        >>> import tempfile, os
        >>> from dcp_safetensors.storage.local import LocalStorage
        >>> s = LocalStorage(tempfile.mkdtemp())
        >>> session = s.begin_save("abc", ["model.safetensors"])
        >>> s.write_file(session.staging + "/model.safetensors", b"data")
        >>> s.commit_save(session, ["model.safetensors"], {}, b"{}", {})
        >>> sorted(os.listdir(s.root))
        ['model.safetensors', 'model.safetensors.index.json']
    """

    def __init__(self, storage: LocalStorage) -> None:
        self.storage = storage

    def commit(self, session: SaveSession, files: Sequence[str], etags: PartTags, index: bytes,
               checksums: Mapping[str, int]) -> None:
        s, staging = self.storage, session.staging
        s.fsync_dir(staging)
        s.write_file(posixpath.join(staging, INDEX_NAME), index)
        for d in {posixpath.dirname(f) for f in files if posixpath.dirname(f)}:
            s.fsync_dir(posixpath.join(staging, d))
        record = CommitRecord(session.snapshot, list(files)).encode()
        s.write_file(posixpath.join(staging, COMMIT_RECORD + ".tmp"), record)
        s.replace(posixpath.join(staging, COMMIT_RECORD + ".tmp"), posixpath.join(staging, COMMIT_RECORD))
        s.fsync_dir(staging)
        session.committed = True
        logger.debug("committed snapshot %s (%d files)", session.snapshot, len(files))
        self.roll_forward(staging)

    def roll_forward(self, staging: str) -> None:
        s = self.storage
        files = CommitRecord.read(s, staging).files
        staged_index = posixpath.join(staging, INDEX_NAME)
        if s.exists(staged_index):
            s.remove(INDEX_NAME)
            s.fsync_dir()
        for f in files:
            if s.exists(posixpath.join(staging, f)):
                s.replace(posixpath.join(staging, f), f)
        for d in {posixpath.dirname(f) for f in files if posixpath.dirname(f)}:
            s.fsync_dir(d)
        if s.exists(staged_index):
            s.replace(staged_index, INDEX_NAME)
        s.fsync_dir()
        stale = stale_files(s, files)
        for f in stale:
            s.remove(f)
        s.remove(posixpath.join(staging, COMMIT_RECORD))
        s.remove_tree(staging)
        logger.debug("published %s; removed %d stale files", staging, len(stale))

    def recover(self, *, writer: bool, own: str | None = None) -> str | None:
        """Finish what crashed saves left, and find the saves still running.

        Whether a save's process lives is told by the ``flock`` it holds on its
        staging directory's lock file:

        ============================  ===============================  ===============================
        staging directory             its process died                 its process lives
        ============================  ===============================  ===============================
        committed (has the record)    rolled forward, by whoever       readers read through it (the
                                      claims it first                  name is returned); writers wait
                                                                       for the publish to end
        uncommitted                   writers delete it                writers raise
                                                                       ConcurrentSaveError
        ============================  ===============================  ===============================

        Where the filesystem cannot lock, writers act as if every other save
        were dead (one writer per directory) and readers as if it were alive
        (they never publish).
        """
        s = self.storage
        publishing: str | None = None
        for entry in s.listdir():
            if entry.startswith(BUILDING_PREFIX):
                if writer:
                    self._remove_if_abandoned(entry)
                continue
            if not entry.startswith(STAGING_PREFIX) or entry == own:
                continue
            claim = s.claim(entry)
            if claim is not None and not claim.certain and not writer:
                claim.release()
                claim = None
            if claim is None:
                if writer:
                    self._wait_for_publish(entry)
                elif s.exists(posixpath.join(entry, COMMIT_RECORD)):
                    publishing = entry
                continue
            try:
                # Checked under the claim: a writer may have committed, then died, since the listing.
                if s.exists(posixpath.join(entry, COMMIT_RECORD)):
                    logger.warning("completing the commit of %s left by an interrupted save", entry)
                    self.roll_forward(entry)
                elif writer:
                    logger.warning("removing %s left by an interrupted save that never committed", entry)
                    s.remove_tree(entry)
            finally:
                claim.release()
        return publishing

    def _remove_if_abandoned(self, entry: str) -> None:
        claim = self.storage.claim(entry)
        if claim is not None:
            self.storage.remove_tree(entry)
            claim.release()

    def _wait_for_publish(self, staging: str) -> None:
        """A writer meeting another live save: wait while that one publishes; raise while it writes."""
        s = self.storage
        deadline = time.monotonic() + PUBLISH_WAIT
        delay = 0.01
        while True:
            if not s.exists(posixpath.join(staging, COMMIT_RECORD)):
                if not s.exists(staging):
                    return  # published meanwhile
                raise ConcurrentSaveError(
                    f"{s.path(staging)}: another save ({s.owner(staging)}) is writing this checkpoint "
                    "directory; this save stopped before touching it. Save to another directory, or wait for that "
                    "save to finish (if its job is gone, its staging directory is removed by the next save)"
                )
            claim = s.claim(staging)
            if claim is not None:  # its process died while publishing: finish it
                try:
                    if s.exists(posixpath.join(staging, COMMIT_RECORD)):
                        self.roll_forward(staging)
                finally:
                    claim.release()
                return
            if time.monotonic() > deadline:
                raise ConcurrentSaveError(
                    f"{s.path(staging)}: another save ({s.owner(staging)}) has been publishing this "
                    f"checkpoint for over {PUBLISH_WAIT:.0f} s; this save stopped before touching it"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
