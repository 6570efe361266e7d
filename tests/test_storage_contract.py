"""The storage contract (``dcp_safetensors.storage.base.Storage``), written once, run on every backend.

In the style of fsspec's ``tests/abstract``: each test states one promise of the contract and
runs on POSIX (``LocalStorage``), S3 on moto and S3 on SeaweedFS (``S3Storage``), and the
generic fsspec store where the promise applies to it. Crashes are real: a writer process
that leaves with ``os._exit`` in the phase under test.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import process_context
from storage_contract_cases import FILES, checksums, content, parts, save_until

from dcp_safetensors.commit import INDEX_NAME
from dcp_safetensors.errors import CheckpointChangedError, MissingFileError
from dcp_safetensors.layout import PartPlan
from dcp_safetensors.storage import Storage, open_storage

SMALL = "training_state/objects.json"


@dataclass
class Backend:
    kind: str
    location: str
    options: dict[str, Any]
    open_uploads: Any = None  # () -> list of uploads left open under the location (S3)

    def storage(self) -> Storage:
        return open_storage(self.location, self.options or None)


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def backend(request: pytest.FixtureRequest, tmp_path) -> Backend:
    name = request.node.name.replace("[", "-").replace("]", "")
    if request.param == "local":
        return Backend("local", str(tmp_path / "ckpt"), {})
    if request.param == "moto":
        s3 = request.getfixturevalue("s3")
        return Backend("s3", s3.url(name), s3.storage_options, lambda: s3.open_uploads(name))
    seaweed = request.getfixturevalue("seaweed")
    return Backend("s3", seaweed.url(name), seaweed.options(), lambda: seaweed.open_uploads(name))


def save(storage: Storage, version: int, *, threads: int = 1) -> None:
    """A whole save of ``version`` through the contract, parts written by ``threads`` at once."""
    session = storage.begin_save(f"v{version}", FILES)
    writer = storage.part_writer(session)
    work = [(f, p, v) for f in FILES for p, v in parts(storage, f, version)]
    with ThreadPoolExecutor(threads) as pool:
        tags = list(pool.map(lambda w: (w[0], w[1].number, writer.write(w[1], [w[2]], zlib.crc32(w[2])), zlib.crc32(w[2])), work))
    writer.close()
    etags: dict[str, list[tuple[int, Any, int]]] = {}
    for file, number, tag, crc in tags:
        etags.setdefault(file, []).append((number, tag, crc))
    storage.write_small(session, SMALL, b'{"version": %d}' % version)
    storage.commit_save(session, FILES + [SMALL], etags, b'{"version": %d}' % version, checksums(version))


def published(storage: Storage) -> int | None:
    """The version the storage holds, checking every file belongs to it; None if nothing is published."""
    if not storage.exists(INDEX_NAME):
        return None
    version = int(storage.read_range(INDEX_NAME, 0, storage.size(INDEX_NAME)).split(b":")[1].strip(b" }"))
    for file in FILES:
        assert storage.read_range(file, 0, storage.size(file)) == content(file, version), f"{file} is not of v{version}"
    assert storage.read_range(SMALL, 0, storage.size(SMALL)) == b'{"version": %d}' % version
    return version


def leftovers(backend: Backend, storage: Storage) -> list[str]:
    """What a save may leave behind: staging entries, and open uploads (S3)."""
    staged = [e for e in storage.listdir() if e.startswith(".dcp_safetensors")]
    return staged + [u["Key"] for u in (backend.open_uploads() if backend.open_uploads else [])]


def test_begin_save_changes_nothing_a_reader_sees(backend):
    storage = backend.storage()
    save(storage, 1)
    session = storage.begin_save("v2", FILES)
    assert session.snapshot == "v2" and session.staging
    assert published(backend.storage()) == 1
    storage.abort_save(session)


def test_concurrent_parts_commit_to_exact_files(backend):
    storage = backend.storage()
    save(storage, 1, threads=4)
    assert published(backend.storage()) == 1
    assert leftovers(backend, storage) == []


def test_a_resave_replaces_every_file_and_removes_stale_ones(backend):
    storage = backend.storage()
    save(storage, 1)
    stale = "model-00001-of-00009.safetensors"
    session = storage.begin_save("x", [stale])
    writer = storage.part_writer(session)
    tag = writer.write(PartPlan(stale, 1, 0, 4, 0), [memoryview(b"old!")], zlib.crc32(b"old!"))
    writer.close()
    storage.commit_save(session, [stale], {stale: [(1, tag, zlib.crc32(b"old!"))]}, b'{"version": 0}',
                        {stale: zlib.crc32(b"old!")})
    save(storage, 2)
    assert published(backend.storage()) == 2
    assert not storage.exists(stale)  # a file of an older snapshot the new index does not list


def test_abort_save_publishes_nothing_and_leaves_nothing(backend):
    storage = backend.storage()
    save(storage, 1)
    session = storage.begin_save("v2", FILES)
    writer = storage.part_writer(session)
    for file in FILES:
        for part, view in parts(storage, file, 2):
            writer.write(part, [view], zlib.crc32(view))
    writer.close()
    storage.write_small(session, SMALL, b'{"version": 2}')
    storage.abort_save(session)
    storage.abort_save(session)  # idempotent
    assert published(backend.storage()) == 1
    assert leftovers(backend, storage) == []


@pytest.mark.parametrize("phase", ["begun", "written", "committed"])
def test_recover_after_a_writer_died(backend, phase):
    """The next writer finishes a committed save and drops an uncommitted one; the previous
    checkpoint stays whole until then."""
    storage = backend.storage()
    save(storage, 1)
    proc = process_context().Process(
        target=save_until, args=(backend.kind, backend.location, backend.options, 2, phase)
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17
    fresh = backend.storage()
    if phase != "committed":
        assert published(fresh) == 1
    fresh.recover(writer=True)
    assert published(backend.storage()) == (2 if phase == "committed" else 1)
    assert leftovers(backend, fresh) == []


def test_a_reader_finishes_a_dead_writers_commit(backend):
    storage = backend.storage()
    save(storage, 1)
    proc = process_context().Process(
        target=save_until, args=(backend.kind, backend.location, backend.options, 2, "committed")
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17
    assert backend.storage().recover(writer=False) is None  # finished, not left to a live writer
    assert published(backend.storage()) == 2


def test_readinto_at_eof_raises_eoferror(backend):
    storage = backend.storage()
    save(storage, 1)
    file = FILES[0]
    size = storage.size(file)
    assert size == len(content(file, 1))
    with pytest.raises(EOFError):
        storage.readinto(file, size - 4, bytearray(8))
    with pytest.raises(EOFError):
        storage.read_range(file, size, 1)
    handle = storage.open_read(file)
    with pytest.raises(EOFError):
        handle.readinto(size - 1, bytearray(2))
    tail = bytearray(4)
    handle.readinto(size - 4, tail)
    assert bytes(tail) == content(file, 1)[-4:]
    handle.close()
    with pytest.raises(MissingFileError):
        storage.size("model-00009-of-00009.safetensors")
    with pytest.raises(MissingFileError):
        storage.open_read("model-00009-of-00009.safetensors")


def test_listing(backend):
    storage = backend.storage()
    assert storage.listdir() == [] and storage.listdir("nowhere") == []
    save(storage, 1)
    assert storage.listdir() == sorted(FILES + [INDEX_NAME, "training_state"])
    assert list(storage.walk_files("training_state")) == [SMALL]
    assert storage.exists(FILES[0]) and not storage.exists("model.safetensors")


def test_an_open_handle_reads_its_version_or_fails_after_a_resave(backend):
    """A reader's handle never serves another version's bytes: POSIX keeps the old inode readable;
    S3 refuses the read (If-Match) with CheckpointChangedError."""
    storage = backend.storage()
    save(storage, 1)
    handle = storage.open_read(FILES[0])
    first = bytearray(16)
    handle.readinto(0, first)
    save(backend.storage(), 2)
    rest = bytearray(64)
    if backend.kind == "local":
        handle.readinto(16, rest)
        assert bytes(first + rest) == content(FILES[0], 1)[:80]
    else:
        with pytest.raises(CheckpointChangedError, match="replaced by another save"):
            handle.readinto(16, rest)
    handle.close()


def test_the_generic_fsspec_store_writes_in_place_with_one_writer_per_file(tmp_path):
    """Any other fsspec URL: min_part is the whole file, no staging, the index last."""
    storage = open_storage(f"memory://{os.path.basename(tmp_path)}/ckpt")
    assert storage.min_part > 1 << 40
    save(storage, 1)
    save(storage, 2)
    assert published(storage) == 2
    assert storage.recover(writer=True) is None
