"""A writer process that dies in a given phase of a save, for the storage conformance suite.

It talks to the storage contract directly (``begin_save``, ``part_writer``, ``write_small``,
``commit_save``), as the writer's coordinator does, and leaves with ``os._exit`` where the
phase says: what it left behind is what a crashed job leaves.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

FILES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
PART = 6 << 20  # above S3's 5 MiB minimum: every file is two parts, the second shorter


def content(file: str, version: int) -> bytes:
    """The bytes of ``file`` in save ``version``: distinct per file and version."""
    seed = f"{file}:{version}:".encode()
    return (seed * (PART * 2 // len(seed) + 1))[: PART + 1000 + len(file)]


def parts(storage: Any, file: str, version: int) -> list[tuple[Any, memoryview]]:
    from dcp_safetensors.layout import PartPlan

    data = memoryview(content(file, version))
    cuts = [0, PART, len(data)] if storage.min_part > 1 else [0, PART // 2, PART, len(data)]
    if storage.min_part > 1 << 40:  # one writer per file
        cuts = [0, len(data)]
    return [(PartPlan(file, n + 1, start, end, 0), data[start:end]) for n, (start, end) in enumerate(zip(cuts, cuts[1:]))]


def save_until(kind: str, location: str, options: dict[str, Any], version: int, phase: str) -> None:
    """Save ``version`` and die at ``phase``: "begun", "written", "committed" (record durable,
    nothing published) or "published" (never dies)."""
    from dcp_safetensors.storage import open_storage

    storage = open_storage(location, options or None)
    if phase == "committed":
        _die_when_publishing(kind)
    session = storage.begin_save(f"v{version}", FILES)
    if phase == "begun":
        os._exit(17)
    writer = storage.part_writer(session)
    etags: dict[str, list[tuple[int, Any, int]]] = {}
    for file in FILES:
        for part, view in parts(storage, file, version):
            crc = zlib.crc32(view)
            etags.setdefault(file, []).append((part.number, writer.write(part, [view], crc), crc))
    writer.close()
    if phase == "written":
        os._exit(17)
    storage.write_small(session, "training_state/objects.json", b'{"version": %d}' % version)
    storage.commit_save(session, FILES + ["training_state/objects.json"], etags, b'{"version": %d}' % version,
                        checksums(version))


def checksums(version: int) -> dict[str, int]:
    """Each file's CRC-32, as the commit gets them."""
    return {file: zlib.crc32(content(file, version)) for file in FILES}


def _die_when_publishing(kind: str) -> None:
    """Die right after the commit point, before anything is published."""
    if kind == "local":
        from dcp_safetensors.storage.rename_commit import RenameCommit

        def die(self: Any, staging: str) -> None:
            os._exit(17)

        RenameCommit.roll_forward = die  # type: ignore[method-assign]
    else:
        from dcp_safetensors.storage.record_commit import RecordCommit

        def die_s3(self: Any, staging: str, record: Any, *, resumed: bool) -> None:
            os._exit(17)

        RecordCommit._publish = die_s3  # type: ignore[method-assign]
