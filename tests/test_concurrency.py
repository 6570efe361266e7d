"""Concurrency: loads during overwrites see one whole snapshot; overlapping saves never hang or break each other.

Every test runs real processes (or threads where the point is one process): a writer loop
against a reader loop, a writer killed mid-publish, two writers, overlapping async saves.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from concurrency_cases import (
    die_while_publishing,
    hold_a_save_open,
    overlapping_async_saves,
    reader_loop,
    state,
    writer_loop,
)
from helpers import process_context

import dcp_safetensors
from dcp_safetensors import commit, verify
from dcp_safetensors.errors import CheckpointChangedError, ConcurrentSaveError
from dcp_safetensors.storage.local import LocalStorage

NUMEL = 256 << 10  # 1 MiB of fp32 per tensor: 24 files of 1 MiB with max_shard_size = 1 MiB


def loaded_step(path: str, numel: int = NUMEL, **options) -> float:
    target = state(-1, numel)
    dcp_safetensors.load(target, path, **options)
    values = {float(v) for t in target.values() for v in t.aminmax()}
    assert len(values) == 1, f"a mixed load: steps {sorted(values)}"
    return values.pop()


def run_reader_against_writer(path: str, steps: int, options: dict, tmp_path) -> tuple[dict, dict]:
    dcp_safetensors.save(state(0, NUMEL), path, max_shard_size=NUMEL * 4, **options)
    ctx = process_context()
    out = ctx.Queue()
    stop, go = str(tmp_path / "stop"), str(tmp_path / "go")
    reader = ctx.Process(target=reader_loop, args=(path, NUMEL, options, stop, out, go))
    writer = ctx.Process(target=writer_loop, args=(path, 1, steps, NUMEL, dict(options, max_shard_size=NUMEL * 4), out, go))
    reader.start()
    writer.start()
    deadline = time.monotonic() + 120
    while not (os.path.exists(go + ".reader") and os.path.exists(go + ".writer1")) and time.monotonic() < deadline:
        time.sleep(0.01)
    open(go, "w").close()  # both imported torch: the loops overlap from their first step
    first = out.get(timeout=600)
    open(stop, "w").close()
    second = out.get(timeout=120)
    writer.join(30)
    reader.join(30)
    written, read = (first, second) if "saved" in first else (second, first)
    return written, read


def test_a_reader_loop_against_a_writer_loop_never_mixes_and_never_breaks_the_writer(tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    written, read = run_reader_against_writer(path, 30, {}, tmp_path)
    with capsys.disabled():
        print(f"\nlocal: {read['attempts']} loads: {read['consistent']} consistent (steps {read['steps'][:3]}..."
              f"{read['steps'][-3:]}), refused {read['refused']}, mixed {len(read['mixed'])}, "
              f"longest refusal {max(read['refused_spans'], default=0) * 1e3:.1f} ms; "
              f"writer {len(written['saved'])} saves, {sum(written['durations']) / len(written['durations']):.3f} s each")
    assert written["failures"] == [], written["failures"]
    assert read["mixed"] == [] and read["other"] == [], (read["mixed"], read["other"][:3])
    assert read["consistent"] >= 5 and len(read["steps"]) >= 3, read  # the reader saw the saves go by
    assert read["refused"] == {}, read["refused"]  # a publish in flight is read through its record
    assert loaded_step(path) == 30.0
    verify(path)


@pytest.mark.parametrize("server", ["moto", "seaweedfs"])
def test_a_reader_loop_against_a_writer_loop_on_s3(tmp_path, server, request, capsys):
    if server == "moto":
        s3 = request.getfixturevalue("s3")
        path, options = s3.url(s3.prefix), {"storage_options": s3.storage_options}
    else:
        seaweed = request.getfixturevalue("seaweed")
        path, options = seaweed.url("reader-loop"), {"storage_options": seaweed.options()}
    written, read = run_reader_against_writer(path, 8, options, tmp_path)
    with capsys.disabled():
        print(f"\ns3 ({server}): {read['attempts']} loads: {read['consistent']} consistent, refused {read['refused']}, "
              f"mixed {len(read['mixed'])}, longest refusal {max(read['refused_spans'], default=0) * 1e3:.0f} ms")
    assert written["failures"] == [], written["failures"]
    assert read["mixed"] == [] and read["other"] == [], (read["mixed"], read["other"][:3])
    assert read["consistent"] >= 3, read
    assert loaded_step(path, **options) == 8.0


def test_a_load_during_a_publish_reads_the_new_snapshot_through_its_record(tmp_path, monkeypatch):
    """The writer is live and half-way through moving files: the load gets all of the new snapshot."""
    path = str(tmp_path)
    dcp_safetensors.save(state(1, NUMEL), path, max_shard_size=NUMEL * 4)
    moved, go_on = threading.Event(), threading.Event()
    original = LocalStorage.replace
    count = {"n": 0}

    def replace(self, src, dst):
        original(self, src, dst)
        if ".dcp_safetensors-staging-" in src and threading.current_thread().name == "writer":
            count["n"] += 1
            if count["n"] == 12:  # 12 of 24 data files are in place
                moved.set()
                go_on.wait(60)

    monkeypatch.setattr(LocalStorage, "replace", replace)
    writer = threading.Thread(target=dcp_safetensors.save, args=(state(2, NUMEL), path),
                              kwargs={"max_shard_size": NUMEL * 4}, name="writer")
    writer.start()
    assert moved.wait(60)
    assert not os.path.exists(os.path.join(path, commit.INDEX_NAME))  # no tool sees an index now
    assert loaded_step(path) == 2.0  # ours reads the committed snapshot through its staging
    staging = [e for e in os.listdir(path) if e.startswith(commit.STAGING_PREFIX)]
    assert len(staging) == 1 and os.path.exists(os.path.join(path, staging[0], commit.COMMIT_RECORD))  # left to its writer
    go_on.set()
    writer.join(60)
    assert loaded_step(path) == 2.0
    assert not [e for e in os.listdir(path) if e.startswith(".dcp_safetensors")]


def test_a_writer_killed_mid_publish_is_rolled_forward_by_a_reader(tmp_path):
    path = str(tmp_path)
    dcp_safetensors.save(state(1, NUMEL), path, max_shard_size=NUMEL * 4)
    proc = process_context().Process(target=die_while_publishing, args=(path, NUMEL, 10))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17  # died after the commit point, 10 files moved
    assert [e for e in os.listdir(path) if e.startswith(commit.STAGING_PREFIX)]
    assert loaded_step(path) == 2.0  # the reader finished the dead writer's publish
    assert not [e for e in os.listdir(path) if e.startswith(".dcp_safetensors")]
    assert os.path.exists(os.path.join(path, commit.INDEX_NAME))
    verify(path)


def test_a_second_writer_gets_a_clear_error_while_a_save_is_open_and_goes_on_once_it_is_gone(tmp_path):
    path = str(tmp_path / "ckpt")
    dcp_safetensors.save(state(1, NUMEL), path, max_shard_size=NUMEL * 4)
    ready, release = str(tmp_path / "ready"), str(tmp_path / "release")
    holder = process_context().Process(target=hold_a_save_open, args=(path, ready, release))
    holder.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ConcurrentSaveError, match=rf"another save \(host \S+, pid {holder.pid}, started .*is writing"):
        dcp_safetensors.save(state(2, NUMEL), path, max_shard_size=NUMEL * 4)
    assert loaded_step(path) == 1.0  # neither save was harmed
    holder.kill()  # a job that dies: its staging is abandoned, not live
    holder.join(30)
    dcp_safetensors.save(state(3, NUMEL), path, max_shard_size=NUMEL * 4)
    assert loaded_step(path) == 3.0
    assert not [e for e in os.listdir(path) if e.startswith(".dcp_safetensors")]


def test_two_writer_loops_on_one_directory_never_corrupt_it(tmp_path):
    """Two jobs saving to one directory at once: each save either commits or gets ConcurrentSaveError."""
    path = str(tmp_path / "ckpt")
    dcp_safetensors.save(state(0, NUMEL), path, max_shard_size=NUMEL * 4)
    ctx = process_context()
    out = ctx.Queue()
    writers = [ctx.Process(target=writer_loop, args=(path, first, 8, NUMEL, {"max_shard_size": NUMEL * 4}, out))
               for first in (100, 200)]
    for w in writers:
        w.start()
    results = [out.get(timeout=600) for _ in writers]
    for w in writers:
        w.join(30)
    failures = [f for r in results for f in r["failures"]]
    assert all(f.startswith("ConcurrentSaveError") for f in failures), failures
    assert sum(len(r["saved"]) for r in results) >= 2, results  # saves still commit between the refusals
    verify(path)
    assert loaded_step(path) in {float(s) for r in results for s in r["saved"]}


def test_a_replaced_object_fails_a_pinned_read_instead_of_mixing(s3):
    from dcp_safetensors.pinned import PinnedFiles
    from dcp_safetensors.storage import open_storage

    url = s3.url(s3.prefix)
    dcp_safetensors.save(state(1, 1024), url, storage_options=s3.storage_options)
    files = PinnedFiles(open_storage(url, s3.storage_options))
    files.read_range("model.safetensors", 0, 8)  # pinned to this version
    dcp_safetensors.save(state(2, 1024), url, storage_options=s3.storage_options)
    with pytest.raises(CheckpointChangedError, match="model.safetensors: replaced by another save"):
        files.read_range("model.safetensors", 8, 64)


@pytest.mark.parametrize("same_dir", [False, True], ids=["new-directories", "one-directory"])
def test_overlapping_async_saves_all_complete_with_the_state_at_their_call(ranks, tmp_path, same_dir, capsys):
    results = ranks(2).run(overlapping_async_saves, str(tmp_path), same_dir, 5)
    with capsys.disabled():
        print(f"\n5 overlapping async saves ({'one directory' if same_dir else 'new directories'}): returned in "
              f"{results[0]['returned_s']:.2f} s, all done in {results[0]['finished_s']:.2f} s")
    for rank, r in enumerate(results):
        assert r["errors"] == [], f"rank {rank}: {r['errors']}"
        assert all(r["matches"]) and r["matches"], f"rank {rank}: a checkpoint differs from the state at its call"


def test_a_load_during_an_s3_publish_reads_the_new_snapshot_through_its_record(s3, monkeypatch):
    """Uploads completed, old index deleted, new index not yet PUT, the writer alive: the load gets step 2."""
    from dcp_safetensors.storage.s3 import S3Storage

    url, options = s3.url(s3.prefix), {"storage_options": s3.storage_options}
    dcp_safetensors.save(state(1, 1024), url, max_shard_size=4096 * 4, **options)
    reached, go_on = threading.Event(), threading.Event()
    original = S3Storage.publish_index

    def publish(self, index, files):
        if threading.current_thread().name == "writer":
            reached.set()
            go_on.wait(60)
        original(self, index, files)

    monkeypatch.setattr(S3Storage, "publish_index", publish)
    writer = threading.Thread(target=dcp_safetensors.save, args=(state(2, 1024), url),
                              kwargs={"max_shard_size": 4096 * 4, **options}, name="writer")
    writer.start()
    assert reached.wait(60)
    assert commit.INDEX_NAME not in s3.keys(s3.prefix)  # no tool sees an index now
    target = state(-1, 1024)
    dcp_safetensors.load(target, url, **options)
    assert {float(v) for t in target.values() for v in t.aminmax()} == {2.0}
    assert any(k.endswith(commit.COMMIT_RECORD) for k in s3.keys(s3.prefix))  # left to its live writer
    go_on.set()
    writer.join(60)
    assert not any(k.startswith(".dcp_safetensors") for k in s3.keys(s3.prefix))


def test_an_s3_writer_killed_mid_publish_is_rolled_forward_by_a_reader_at_once(s3):
    from concurrency_cases import die_before_publishing_on_s3

    url, options = s3.url(s3.prefix), {"storage_options": s3.storage_options}
    dcp_safetensors.save(state(1, 1024), url, max_shard_size=4096 * 4, **options)
    proc = process_context().Process(target=die_before_publishing_on_s3, args=(url, 1024, options))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17
    started = time.monotonic()
    target = state(-1, 1024)
    dcp_safetensors.load(target, url, **options)
    # Its writer ran on this host and is gone: no lease to wait out.
    assert time.monotonic() - started < 10
    assert {float(v) for t in target.values() for v in t.aminmax()} == {2.0}
    assert commit.INDEX_NAME in s3.keys(s3.prefix)
    assert not any(k.startswith(".dcp_safetensors") for k in s3.keys(s3.prefix))


def test_overlapping_async_saves_on_s3_to_one_prefix(ranks, s3):
    results = ranks(2).run(overlapping_async_saves, s3.url(s3.prefix), True, 4, {"storage_options": s3.storage_options})
    for rank, r in enumerate(results):
        assert r["errors"] == [], f"rank {rank}: {r['errors']}"
        assert all(r["matches"]) and r["matches"], f"rank {rank}: the checkpoint differs from the state at its call"
    assert s3.open_uploads(s3.prefix) == []


def test_a_second_s3_writer_takes_over_and_the_first_gets_a_clear_error(seaweed, request, monkeypatch):
    """On S3 a second save cannot see the first before its commit: it aborts the first's uploads as
    abandoned and commits; the first fails with ConcurrentSaveError, and nothing mixed is published.
    (SeaweedFS: moto answers an UploadPart to an aborted upload with a 500, not S3's NoSuchUpload.)"""
    from dcp_safetensors.storage import s3 as object_storage

    url, options = seaweed.url(request.node.name), {"storage_options": seaweed.options()}
    dcp_safetensors.save(state(1, 1024), url, max_shard_size=4096 * 4, **options)
    writing, go_on = threading.Event(), threading.Event()
    original = object_storage._UploadPartWriter.write
    blocked = {"first": True}

    def write(self, part, views, crc32):
        if blocked.pop("first", False):
            writing.set()
            go_on.wait(60)
        return original(self, part, views, crc32)

    monkeypatch.setattr(object_storage._UploadPartWriter, "write", write)
    errors: list[BaseException] = []

    def first_save():
        try:
            dcp_safetensors.save(state(2, 1024), url, max_shard_size=4096 * 4, **options)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    first = threading.Thread(target=first_save)
    first.start()
    assert writing.wait(60)
    dcp_safetensors.save(state(3, 1024), url, max_shard_size=4096 * 4, **options)  # the restarted job
    go_on.set()
    first.join(120)
    assert len(errors) == 1 and isinstance(errors[0], ConcurrentSaveError), errors
    assert "aborted by someone else" in str(errors[0])
    assert loaded_step(url, 1024, **options) == 3.0
    assert seaweed.open_uploads(request.node.name) == []
