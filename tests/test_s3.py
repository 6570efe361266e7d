"""S3 through s3fs against a real S3 protocol server (moto) behind our counting, fault-injecting proxy."""

from __future__ import annotations

import json
import time

import pytest
import safetensors.torch
from cases import big_state, load_big, load_mixed, mixed_state, save_big, save_mixed, try_save_big

from dcp_safetensors import read_checkpoint, verify

MiB = 1 << 20


def options(s3, **extra) -> dict:
    # botocore's own retries off: our retry layer is the one under test.
    return {**s3.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}, **extra}


def uploaded_file_bytes(s3) -> int:
    return sum(len(s3.get(s3.prefix, k)) for k in s3.keys(s3.prefix) if k.endswith(".safetensors"))


def test_roundtrip_small_file_resharded(ranks, s3):
    url = s3.url(s3.prefix)
    ranks(4).run(save_mixed, url, "5GB", {"storage_options": options(s3)})
    assert s3.keys(s3.prefix) == ["block_checksums.crc32", "model.safetensors", "model.safetensors.index.json"]
    size = len(s3.get(s3.prefix, "model.safetensors"))
    assert size < 5 * MiB  # one part, smaller than S3's minimum
    # Plain tensors present on all 4 ranks and Replicate placements were uploaded once.
    assert s3.proxy.stats.requests["UploadPart"] == 1 and s3.proxy.stats.body_bytes["UploadPart"] == size
    loaded = safetensors.torch.load(s3.get(s3.prefix, "model.safetensors"))
    for key, t in mixed_state().items():
        assert safetensors.torch.save({key: loaded[key]}) == safetensors.torch.save({key: t}), key
    verify(url, storage_options=options(s3))
    for rank, ok in enumerate(ranks(2).run(load_mixed, url, "transpose", {"storage_options": options(s3)})):
        assert all(ok.values()), f"rank {rank}: {[k for k, v in ok.items() if not v]}"
    assert not s3.open_uploads(s3.prefix)


def test_small_slices_are_merged_into_5mib_parts(ranks, s3):
    """Each of 4 ranks holds 1.5 MiB of every 6 MiB tensor: bytes move so every part is >= 5 MiB."""
    url = s3.url(s3.prefix)
    shapes = [(1536, 1024)] * 3
    ranks(4).run(save_big, url, shapes, {"storage_options": options(s3)})
    stats = s3.proxy.stats
    files = uploaded_file_bytes(s3)
    assert stats.body_bytes["UploadPart"] == files  # every byte uploaded exactly once
    assert stats.requests["UploadPart"] <= -(-files // (5 * MiB)) + 1
    index_bytes = len(s3.get(s3.prefix, "model.safetensors.index.json"))
    total = sum(stats.body_bytes.values())
    assert abs(total - (files + index_bytes)) <= 0.01 * (files + index_bytes)
    assert not s3.open_uploads(s3.prefix)
    assert all(ranks(4).run(load_big, url, shapes, {"storage_options": options(s3)}))


def test_file_larger_than_max_part_has_several_parts_per_rank(ranks, s3):
    url = s3.url(s3.prefix)
    shapes = [(4096, 2048)]  # 32 MiB, 16 MiB per rank
    ranks(2).run(save_big, url, shapes, {"storage_options": options(s3), "max_part": 6 * MiB})
    assert s3.proxy.stats.requests["UploadPart"] >= 6
    assert s3.proxy.stats.body_bytes["UploadPart"] == uploaded_file_bytes(s3)
    assert all(ranks(2).run(load_big, url, shapes, {"storage_options": options(s3)}))
    ckpt = read_checkpoint(url, storage_options=options(s3))
    assert ckpt.tensors["big.0"].shape == (4096, 2048)


def test_transient_faults_are_retried(ranks, s3):
    def rule(op: str, n: int) -> str | None:
        if op == "UploadPart" and n % 2 == 0:
            return "500"
        if op == "GetObject" and n % 3 == 0:
            return "503"
        if op in ("PutObject", "CompleteMultipartUpload") and n % 2 == 1:
            return "drop"
        return None

    s3.proxy.faults.rule = rule
    url = s3.url(s3.prefix)
    shapes = [(1536, 1024)] * 2
    ranks(2).run(save_big, url, shapes, {"storage_options": options(s3)})
    assert all(ranks(2).run(load_big, url, shapes, {"storage_options": options(s3)}))
    injected = s3.proxy.stats.injected
    assert injected["UploadPart:500"] and injected["GetObject:503"] and injected["PutObject:drop"]
    s3.proxy.faults.rule = None
    verify(url, storage_options=options(s3))


def test_permanent_upload_failure_aborts_everything(ranks, s3):
    url = s3.url(s3.prefix)
    s3.proxy.faults.rule = lambda op, n: "500" if op == "UploadPart" else None
    results = ranks(2).run(try_save_big, url, [(1536, 1024)] * 2, {"storage_options": options(s3)})
    for failures in results:
        assert failures, "the save should have failed"
        name, message = next(iter(failures.values()))
        assert name == "StorageError" and "UploadPart" in message
    s3.proxy.faults.rule = None
    assert "model.safetensors.index.json" not in s3.keys(s3.prefix)
    assert not s3.open_uploads(s3.prefix)


def test_throttling_that_never_ends_fails_after_the_retries_naming_request_bucket_key_and_endpoint(s3):
    import torch

    import dcp_safetensors
    from dcp_safetensors.errors import StorageError

    s3.proxy.faults.rule = lambda op, n: "503" if op == "UploadPart" else None
    with pytest.raises(StorageError) as info:
        dcp_safetensors.save({"w": torch.ones(4)}, s3.url(s3.prefix), storage_options=options(s3))
    s3.proxy.faults.rule = None
    message = str(info.value)
    assert f"UploadPart 1 of {s3.url(s3.prefix)}/model.safetensors (bucket 'ckpt', key '{s3.prefix}/model.safetensors')" in message
    assert f"at http://127.0.0.1:{s3.proxy.port}: failed after 6 attempts: SlowDown" in message, message
    assert "fewer write_threads" in message
    assert s3.proxy.stats.injected["UploadPart:503"] == 6 * 2  # ours x botocore's (max_attempts 1: one retry)
    assert not s3.open_uploads(s3.prefix) and "model.safetensors.index.json" not in s3.keys(s3.prefix)


def test_a_rank_failing_to_pack_its_transfer_fails_every_rank_at_once_and_keeps_the_old_checkpoint(ranks, s3):
    """The packing of a transfer round runs before its all_to_all: a rank that raised there used to leave the
    others in the collective until the process group's timeout (10+ minutes); now all agree first."""
    from cases import save_big_failing_to_pack_on_rank_1

    url = s3.url(s3.prefix)
    shapes = [(1536, 1024)] * 2  # 3 MiB per rank per tensor: parts need bytes of both ranks
    ranks(2).run(save_big, url, shapes, {"storage_options": options(s3)})
    before = {k: s3.get(s3.prefix, k) for k in s3.keys(s3.prefix)}
    results = ranks(2).run(save_big_failing_to_pack_on_rank_1, url, [(1536, 1024)] * 3, {"storage_options": options(s3)})
    for rank, (seconds, failures) in enumerate(results):  # DCP raises every rank's failure on every rank
        assert seconds < 60, (rank, seconds)
        assert failures[1][0] == "MemoryError" and "injected" in failures[1][1], failures
        assert failures[0][0] == "RankFailedError" and "rank 1 failed before transfer round 1" in failures[0][1], failures
    assert {k: s3.get(s3.prefix, k) for k in s3.keys(s3.prefix)} == before
    assert not s3.open_uploads(s3.prefix)


def test_index_lists_every_file_with_size_and_checksum(ranks, s3):
    url = s3.url(s3.prefix)
    ranks(2).run(save_big, url, [(1024, 1024)] * 3, {"storage_options": options(s3), "max_shard_size": 5 * MiB})
    index = json.loads(s3.get(s3.prefix, "model.safetensors.index.json"))
    recorded = index["metadata"]["dcp_safetensors"]["files"]
    assert set(recorded) == {k for k in s3.keys(s3.prefix) if k.endswith(".safetensors")} and len(recorded) == 3
    for name, meta in recorded.items():
        assert meta["size"] == len(s3.get(s3.prefix, name))
    assert set(index["weight_map"]) == set(big_state([(1024, 1024)] * 3))


def test_resave_commit_reads_nothing_back_and_handles_files_together(ranks, s3):
    """Saving over a 3-file checkpoint: the commit works from the record it just PUT (no GET or
    HEAD of it or of the old index), creates and completes one upload per file, and deletes the
    old index and the record; the result loads."""
    url = s3.url(s3.prefix)
    shapes = [(1024, 1024)] * 3
    kwargs = {"storage_options": options(s3), "max_shard_size": 5 * MiB}
    ranks(2).run(save_big, url, shapes, kwargs)
    s3.proxy.stats.reset()
    ranks(2).run(save_big, url, shapes, kwargs)
    requests = s3.proxy.stats.requests
    assert requests["GetObject"] == 0 and requests["HEAD"] == 0, dict(requests)
    assert requests["CreateMultipartUpload"] == requests["CompleteMultipartUpload"] == 3
    # the old index, the commit record, and its emptied prefix (stores with directories keep one)
    assert requests["DeleteObject"] == 3
    assert [k for k in s3.keys(s3.prefix) if not k.startswith("model")] == ["block_checksums.crc32"]
    assert all(ranks(2).run(load_big, url, shapes, {"storage_options": options(s3)}))
    assert not s3.open_uploads(s3.prefix)


def test_one_storage_client_per_save_and_per_load(s3, monkeypatch):
    """Each step of a save (plan, write, commit) and of a load reuses one storage, so one S3
    client per rank: making one costs 0.1-0.3 s before its first request."""
    import torch
    import torch.distributed.checkpoint as dcp

    from dcp_safetensors import SafetensorsReader, SafetensorsWriter
    from dcp_safetensors.storage.s3 import S3Storage

    made = []
    original = S3Storage.__init__

    def counting(self, *args, **kwargs):
        made.append(args[0])
        original(self, *args, **kwargs)

    monkeypatch.setattr(S3Storage, "__init__", counting)
    url = s3.url(s3.prefix)
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    writer = SafetensorsWriter(url, storage_options=options(s3))
    dcp.save(sd, storage_writer=writer)
    assert made == [url]
    dcp.save(sd, storage_writer=writer, checkpoint_id=url + "-2")  # a new checkpoint: its own storage
    assert made == [url, url + "-2"]
    made.clear()
    out = {"w": torch.zeros(2, 3)}
    dcp.load(out, storage_reader=SafetensorsReader(url, storage_options=options(s3)))
    assert made == [url] and torch.equal(out["w"], sd["w"])


def test_opening_a_checkpoint_reads_each_header_in_one_get(ranks, s3):
    """Each data file costs one HEAD (its size) and one GET (prefix and header together)."""
    url = s3.url(s3.prefix)
    ranks(2).run(save_big, url, [(1024, 1024)] * 3, {"storage_options": options(s3), "max_shard_size": 5 * MiB})
    s3.proxy.stats.reset()
    ckpt = read_checkpoint(url, storage_options=options(s3))
    assert len(ckpt.headers) == 3
    requests = s3.proxy.stats.requests
    assert requests["GetObject"] == 3 + 2, dict(requests)  # the headers, the index and the block checksums
    assert requests["HEAD"] == 3 + 2, dict(requests)  # each file's version is pinned (ETag) before a read


def _small_tensors() -> dict:
    import torch

    dtypes = [torch.float32, torch.bfloat16, torch.uint8, torch.bool, torch.float64, torch.int16]
    g = torch.Generator().manual_seed(7)
    out = {}
    for i in range(300):
        dtype = dtypes[i % len(dtypes)]
        n = 1 + (i * 7) % 53  # odd sizes: neighbours sit at every alignment
        raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
        t = raw.view(dtype) if dtype is not torch.bool else raw % 2 == 1
        out[f"blocks.{i}.{'w' if i % 2 else 'b'}"] = t.reshape(-1, 1) if i % 5 == 0 else t
    return out


def test_small_tensors_are_read_in_batched_ranged_gets(s3, monkeypatch):
    """300 small tensors of six dtypes (every alignment): one ranged GET serves many, bytes exact,
    into contiguous and non-contiguous destinations; a smaller batch limit means more GETs."""
    import torch
    import torch.distributed.checkpoint as dcp

    from dcp_safetensors import SafetensorsReader, SafetensorsWriter
    from dcp_safetensors.storage.fsspec import FsspecStorage

    url = s3.url(s3.prefix)
    state = _small_tensors()
    dcp.save(state, storage_writer=SafetensorsWriter(url, storage_options=options(s3)))
    data_bytes = sum(t.numel() * t.element_size() for t in state.values())

    def load() -> tuple[dict, int]:
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        # Non-contiguous destinations take the copy path.
        out["blocks.0.b"] = torch.zeros(1, state["blocks.0.b"].shape[0], dtype=state["blocks.0.b"].dtype).t()
        s3.proxy.stats.reset()
        dcp.load(out, storage_reader=SafetensorsReader(url, storage_options=options(s3)))
        return out, s3.proxy.stats.requests["GetObject"]

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # bit for bit (random bits hold NaNs)
        flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*flat)

    out, gets = load()
    assert all(same(out[k], v) for k, v in state.items())
    assert gets == 1 + 1 + 1 + 1, gets  # the index, the block checksums, the header, one batch (all 300 tensors: ~12 KB)
    monkeypatch.setattr(FsspecStorage, "read_batch", 1024)
    out, gets = load()
    assert all(same(out[k], v) for k, v in state.items())
    assert 2 + data_bytes // 1024 <= gets <= 2 + 3 * (data_bytes // 1024 + 1), (gets, data_bytes)


def test_a_refusal_after_the_commit_point_keeps_the_committed_save(s3, monkeypatch):
    """The commit record is PUT, then deleting the old index is refused (a bucket policy without
    s3:DeleteObject): the save raises naming that request, but its uploads belong to the record
    now and are not aborted; the next reader completes the commit."""
    import torch

    import dcp_safetensors
    from dcp_safetensors.errors import StorageAccessError
    from dcp_safetensors.storage import record_commit

    # The record's writer is this live process, so the reader leaves the record to it until
    # the lease passes, then rolls it forward: a 2 s lease instead of 20 s of waiting.
    monkeypatch.setattr(record_commit, "PUBLISH_LEASE", 2.0)

    url = s3.url(s3.prefix)
    dcp_safetensors.save({"w": torch.ones(4)}, url, storage_options=options(s3))
    s3.proxy.faults.rule = lambda op, n: "403" if op == "DeleteObject" else None
    with pytest.raises(StorageAccessError, match=r"DeleteObject of s3://ckpt/.*/model.safetensors.index.json .*AccessDenied"):
        dcp_safetensors.save({"w": torch.full((4,), 2.0)}, url, storage_options=options(s3))
    s3.proxy.faults.rule = None
    assert len(s3.open_uploads(s3.prefix)) == 1  # the committed file's, left for the roll-forward
    state = {"w": torch.zeros(4)}
    dcp_safetensors.load(state, url, storage_options=options(s3))
    assert state["w"].tolist() == [2.0] * 4
    assert not s3.open_uploads(s3.prefix)
    assert [k for k in s3.keys(s3.prefix) if not k.startswith("model")] == ["block_checksums.crc32"]


def test_a_part_corrupted_in_flight_is_named_by_verify_where_the_server_takes_it(s3):
    """One bit of an UploadPart body flips between client and server. moto stores what arrives without checking
    its CRC-32 (SeaweedFS refuses such a part: test_s3_real.py), so the save commits: verify reading every byte
    (moto records the CRC-32 it is told, so its HEAD cannot vouch) finds that the file's CRC-32 is not the one
    the index records, and names the file."""
    import torch

    import dcp_safetensors
    from dcp_safetensors.errors import ChecksumMismatchError

    url = s3.url(s3.prefix)
    s3.proxy.faults.rule = lambda op, n: "flip" if op == "UploadPart" and n == 1 else None
    dcp_safetensors.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, url, storage_options=options(s3))
    s3.proxy.faults.rule = None
    assert s3.proxy.stats.injected["UploadPart:flip"] == 1
    with pytest.raises(ChecksumMismatchError, match=r"model.safetensors: bytes \d+-\d+ \(block \d+ of 5\)"):
        verify(url, storage_options=options(s3), read_data=True)
    # A load reading the flipped block fails the same way, without a verify first.
    with pytest.raises(ChecksumMismatchError, match=r"model.safetensors: bytes .*the load of 'w' fails"):
        dcp_safetensors.load({"w": torch.zeros(1 << 20)}, url, storage_options=options(s3))


def test_a_storage_option_the_client_refuses_fails_at_once_naming_the_options(s3):
    """An option s3fs passes on to a constructor that does not take it (region_name belongs in client_kwargs)
    is a ConfigurationError at the first request, not six retries of a "transient" TypeError."""
    import time

    import torch

    import dcp_safetensors
    from dcp_safetensors.errors import ConfigurationError

    started = time.perf_counter()
    with pytest.raises(ConfigurationError, match="storage client refused its arguments.*region_name.*storage_options"):
        dcp_safetensors.save({"w": torch.ones(4)}, s3.url(s3.prefix), storage_options=options(s3, region_name="x"))
    assert time.perf_counter() - started < 2



def test_a_server_that_dies_mid_save_fails_every_rank_fast_and_the_next_save_cleans_up(ranks, s3):
    """Every request dropped from the first UploadPart on, as when the server is killed: each rank fails within
    seconds (it took 163 s: six attempts per part, each with botocore's own retries, then as long again for the
    aborts), the previous checkpoint stays intact, and the next save aborts what this one left open."""
    from s3_proxy import S3Proxy

    proxy = S3Proxy("127.0.0.1", s3.moto_port)
    try:
        opts = {**s3.storage_options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}",
                                                         "region_name": "us-east-1"}}
        url = s3.url(s3.prefix)
        shapes = [(1536, 1024)] * 2
        ranks(2).run(save_big, url, shapes, {"storage_options": opts})
        before = {k: s3.get(s3.prefix, k) for k in s3.keys(s3.prefix)}
        dead = {"now": False}

        def rule(op: str, n: int) -> str | None:
            dead["now"] = dead["now"] or op == "UploadPart"
            return "drop" if dead["now"] else None

        proxy.faults.rule = rule
        started = time.perf_counter()
        results = ranks(2).run(try_save_big, url, shapes, {"storage_options": opts})
        seconds = time.perf_counter() - started
        assert seconds < 20, seconds  # the target: 15 s, with the aborts
        for failures in results:
            assert failures, "the save should have failed"
            for name, message in failures.values():
                assert name in ("StorageError", "RankFailedError"), (name, message)
            assert any("UploadPart" in m and "ConnectionClosedError" in m for _, m in failures.values()), failures
        proxy.faults.rule = None
        assert {k: s3.get(s3.prefix, k) for k in s3.keys(s3.prefix)} == before
        ranks(2).run(save_big, url, shapes, {"storage_options": opts})
        assert not s3.open_uploads(s3.prefix)
        assert all(ranks(2).run(load_big, url, shapes, {"storage_options": opts}))
    finally:
        proxy.close()
