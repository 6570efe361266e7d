"""S3 against SeaweedFS, a real object store that checks every request's signature (moto does not).

Errors a user meets on a real server (a wrong secret, no credentials, a missing bucket) raise
our types at once, naming the request, bucket and key, on every rank; round trips compare
bytes, so this tier checks correctness too.
"""

from __future__ import annotations

import json
import re
import socket
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
import safetensors.torch
import torch
from botocore import UNSIGNED
from botocore.config import Config
from cases import api_big, as_bytes, big_state, load_big, random_tensor, save_big

import dcp_safetensors
from dcp_safetensors import saving, verify
from dcp_safetensors.checksum import crc32_base64
from dcp_safetensors.errors import (
    BucketNotFoundError,
    ChecksumMismatchError,
    StorageAccessError,
    StorageError,
)
from dcp_safetensors.names import BLOCK_KEY
from dcp_safetensors.verification import verify_all

MiB = 1 << 20
SHAPES = [(2048, 1024)] * 2  # two 8 MiB tensors, row-sharded: each of 2 ranks uploads parts of its own


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("[", "-").replace("]", "")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def test_a_wrong_secret_fails_save_and_load_at_once_naming_request_bucket_and_key(seaweed, prefix):
    url = seaweed.url(prefix)
    state = {"w": torch.arange(6.0)}
    started = time.perf_counter()
    with pytest.raises(StorageAccessError) as saving:
        dcp_safetensors.save(state, url, storage_options=seaweed.options(secret="wrong"))
    assert time.perf_counter() - started < 10
    dcp_safetensors.save(state, url, storage_options=seaweed.options())
    started = time.perf_counter()
    with pytest.raises(StorageAccessError) as loading:
        dcp_safetensors.load({"w": torch.zeros(6)}, url, storage_options=seaweed.options(secret="wrong"))
    assert time.perf_counter() - started < 10
    for error in (saving.value, loading.value):
        message = str(error)
        assert isinstance(error, StorageError)
        assert f"ListObjectsV2 of {url} (bucket 'ckpt', key '{prefix}') at {seaweed.endpoint}" in message, message
        assert "SignatureDoesNotMatch" in message and "Not retried: check the credentials" in message
        print(message)


def test_no_credentials_at_all_fail_at_once(seaweed, prefix, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # botocore would ask 169.254.169.254 next
    options = {k: v for k, v in seaweed.options().items() if k not in ("key", "secret")}
    started = time.perf_counter()
    with pytest.raises(StorageAccessError, match="NoCredentialsError: Unable to locate credentials") as info:
        dcp_safetensors.save({"w": torch.ones(2)}, seaweed.url(prefix), storage_options=options)
    assert time.perf_counter() - started < 10
    assert "bucket 'ckpt'" in str(info.value) and "AWS_ACCESS_KEY_ID" in str(info.value)


def test_a_missing_bucket_fails_save_and_load_naming_the_bucket(seaweed, prefix):
    url = seaweed.url(prefix, bucket="no-such-bucket")
    started = time.perf_counter()
    with pytest.raises(BucketNotFoundError) as saving:
        dcp_safetensors.save({"w": torch.ones(2)}, url, storage_options=seaweed.options())
    with pytest.raises(BucketNotFoundError) as loading:
        dcp_safetensors.load({"w": torch.zeros(2)}, url, storage_options=seaweed.options())
    assert time.perf_counter() - started < 10
    for error in (saving.value, loading.value):
        message = str(error)
        assert f"(bucket 'no-such-bucket', key '{prefix}') at {seaweed.endpoint}" in message, message
        assert "NoSuchBucket: The specified bucket does not exist. Not retried: check the bucket name" in message
        print(message)
    assert "no-such-bucket" not in [b["Name"] for b in seaweed.client.list_buckets()["Buckets"]]


def test_access_denied_fails_at_once_naming_request_bucket_and_key(seaweed, prefix):
    """Anonymous requests may use only the open bucket: the server's own AccessDenied, not a proxy's."""
    options = {"anon": True, "client_kwargs": {"endpoint_url": seaweed.endpoint, "region_name": "us-east-1"},
               "skip_instance_cache": True}
    url = seaweed.url(prefix)
    dcp_safetensors.save({"w": torch.ones(2)}, url, storage_options=seaweed.options())
    started = time.perf_counter()
    with pytest.raises(StorageAccessError) as info:
        dcp_safetensors.load({"w": torch.zeros(2)}, url, storage_options=options)
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "(bucket 'ckpt', key " in message and f"at {seaweed.endpoint}" in message, message
    assert "AccessDenied" in message and "Not retried: check the credentials" in message, message


def test_saves_after_a_refused_one_plan_afresh(seaweed, prefix):
    """DCP caches a save's global plan before the writer's global step, and each rank's final
    plan only after it: once that step is refused (a missing bucket here), saves of the earlier
    state dict and of the refused one must not reuse either plan."""
    earlier, refused = {"w": torch.arange(4.0)}, {"w": torch.arange(6.0), "b": torch.ones(2)}
    dcp_safetensors.save(earlier, seaweed.url(f"{prefix}/1"), storage_options=seaweed.options())
    with pytest.raises(BucketNotFoundError):
        dcp_safetensors.save(refused, seaweed.url(prefix, bucket="no-such-bucket"), storage_options=seaweed.options())
    dcp_safetensors.save(earlier, seaweed.url(f"{prefix}/2"), storage_options=seaweed.options())
    dcp_safetensors.save(refused, seaweed.url(f"{prefix}/3"), storage_options=seaweed.options())
    for n, state in ((1, earlier), (2, earlier), (3, refused)):
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp_safetensors.load(out, seaweed.url(f"{prefix}/{n}"), storage_options=seaweed.options())
        assert all(same(out[k], v) for k, v in state.items()), n


def test_a_2_rank_save_with_a_wrong_secret_raises_on_both_ranks(ranks, seaweed, prefix):
    url = seaweed.url(prefix)
    bad = seaweed.options(secret="wrong")
    for rank, (seconds, kind, message) in enumerate(ranks(2).run(api_big, "save", url, SHAPES, [bad, bad], timeout=60)):
        assert kind == "StorageAccessError", (rank, kind, message)
        assert f"ListObjectsV2 of {url} (bucket 'ckpt', key '{prefix}')" in message and seconds < 10
    assert seaweed.keys(prefix) == [] and not seaweed.open_uploads(prefix)


def test_a_wrong_secret_on_one_rank_fails_its_uploads_and_reads_on_both_ranks_and_keeps_the_checkpoint(ranks, seaweed, prefix):
    """Rank 0 plans and commits with good credentials, rank 1 uploads (then reads) with a wrong
    secret: the status exchange makes both ranks raise rank 1's error, every upload is aborted,
    and the checkpoint saved before is untouched and still loads."""
    url = seaweed.url(prefix)
    good, bad = seaweed.options(), seaweed.options(secret="wrong")
    ranks(2).run(save_big, url, SHAPES, {"storage_options": good})
    before = {k: seaweed.get(prefix, k) for k in seaweed.keys(prefix)}
    for call, request in (("save", "UploadPart"), ("load", "GetObject")):
        for rank, (seconds, kind, message) in enumerate(ranks(2).run(api_big, call, url, SHAPES, [good, bad], timeout=60)):
            assert kind == "StorageAccessError", (call, rank, kind, message)
            assert f"{request} " in message and "(bucket 'ckpt', key " in message and seconds < 10, message
            assert "SignatureDoesNotMatch" in message
            print(f"{call} rank {rank}: {message}")
    assert not seaweed.open_uploads(prefix)
    assert {k: seaweed.get(prefix, k) for k in seaweed.keys(prefix)} == before
    assert all(ranks(2).run(load_big, url, SHAPES, {"storage_options": good}))


def test_roundtrip_1_rank_bytes_in_the_file_and_back(seaweed, prefix):
    url = seaweed.url(prefix)
    state = {
        "embed": random_tensor((3072, 1024), torch.float32, 1),  # 12 MiB: three 6 MiB parts
        "norm": random_tensor((1024,), torch.bfloat16, 2),
        "codes": random_tensor((77, 3), torch.int8, 3),
        "mask": random_tensor((5,), torch.bool, 4),
        "fp8": random_tensor((16, 16), torch.float8_e4m3fn, 5),
    }
    dcp_safetensors.save(state, url, storage_options=seaweed.options(), max_part=6 * MiB)
    stored = safetensors.torch.load(seaweed.get(prefix, "model.safetensors"))
    assert stored.keys() == state.keys() and all(same(stored[k], v) for k, v in state.items())
    verify(url, storage_options=seaweed.options())
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp_safetensors.load(out, url, storage_options=seaweed.options())
    assert all(same(out[k], v) for k, v in state.items())
    assert not seaweed.open_uploads(prefix)


def test_roundtrip_2_ranks_bytes_in_the_files_and_back(ranks, seaweed, prefix):
    url = seaweed.url(prefix)
    kwargs = {"storage_options": seaweed.options(), "max_part": 6 * MiB, "max_shard_size": 9 * MiB}
    ranks(2).run(save_big, url, SHAPES, kwargs)
    files = [k for k in seaweed.keys(prefix) if k.endswith(".safetensors")]
    assert len(files) == 2
    stored = {k: v for f in files for k, v in safetensors.torch.load(seaweed.get(prefix, f)).items()}
    full = big_state(SHAPES)
    assert stored.keys() == full.keys() and all(same(stored[k], v) for k, v in full.items())
    verify(url, storage_options=seaweed.options())
    assert all(ranks(2).run(load_big, url, SHAPES, {"storage_options": seaweed.options()}))
    assert not seaweed.open_uploads(prefix)


def test_the_server_holds_every_file_with_our_full_object_crc32(ranks, seaweed, prefix):
    """Parts go up with their CRC-32 and each upload completes as a full-object CRC-32, which the server
    checks on receipt: a HEAD of each file gives back the CRC-32 the index records."""
    url = seaweed.url(prefix)
    kwargs = {"storage_options": seaweed.options(), "max_part": 6 * MiB, "max_shard_size": 9 * MiB}
    ranks(2).run(save_big, url, SHAPES, kwargs)
    index = json.loads(seaweed.get(prefix, "model.safetensors.index.json"))
    recorded = {f: entry["checksum"] for f, entry in index["metadata"][BLOCK_KEY]["files"].items()}
    files = [k for k in seaweed.keys(prefix) if k.endswith(".safetensors")]
    assert len(files) == 2 and sorted(recorded) == sorted(files)
    for name in files:
        head = seaweed.client.head_object(Bucket=seaweed.bucket, Key=f"{prefix}/{name}", ChecksumMode="ENABLED")
        assert head["ChecksumType"] == "FULL_OBJECT", head
        assert head["ChecksumCRC32"] == crc32_base64(zlib.crc32(seaweed.get(prefix, name)))
        assert f"crc32:{zlib.crc32(seaweed.get(prefix, name)):08x}" == recorded[name]
    # verify takes the server's checked CRC-32 instead of reading; read_data reads every byte anyway.
    by_head = verify_all(url, storage_options=seaweed.options())
    assert by_head.ok and by_head.files_checked == by_head.files_checked_by_store == 2 and by_head.bytes_checked == 0
    by_read = verify_all(url, storage_options=seaweed.options(), read_data=True)
    assert by_read.ok and by_read.files_checked_by_store == 0
    assert by_read.bytes_checked == sum(len(seaweed.get(prefix, f)) for f in files)
    # An object replaced after the save (one byte of its data changed, same size and header) is named.
    name = sorted(files)[0]
    body = bytearray(seaweed.get(prefix, name))
    body[-1] ^= 1
    seaweed.client.put_object(Bucket=seaweed.bucket, Key=f"{prefix}/{name}", Body=bytes(body))
    with pytest.raises(ChecksumMismatchError, match=name):
        verify(url, storage_options=seaweed.options())


def test_the_cli_says_which_files_the_store_checked(seaweed, prefix, capsys):
    """`dcp-safetensors verify` on S3 says how many files the store's CRC-32 checked without reading;
    with --read-data it reads them all."""
    from dcp_safetensors.cli import main

    url = seaweed.url(prefix)
    dcp_safetensors.save({"w": random_tensor((256, 256), torch.float32, 3)}, url, storage_options=seaweed.options())
    flags = ["--no-progress", "--storage-option", f"key={seaweed.key}", "--storage-option", f"secret={seaweed.secret}",
             "--storage-option", f"client_kwargs.endpoint_url={seaweed.endpoint}",
             "--storage-option", "client_kwargs.region_name=us-east-1"]
    assert main(["verify", url, *flags]) == 0
    assert "matches the one recorded at save (0 files read, 0 B; 1 file by the store's full-object CRC-32, without reading)" \
        in capsys.readouterr().out
    assert main(["verify", url, *flags, "--read-data"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"matches the one recorded at save \(1 file read, 262\.\d\d kB\)", out) and "by the store" not in out, out


def test_a_part_whose_bytes_differ_from_its_crc32_is_refused_and_nothing_is_published(seaweed, prefix, monkeypatch):
    """The server checks each part against the CRC-32 computed as its bytes were read (here made wrong, as
    bytes changed in transit would make it): BadDigest, retried, then a StorageError naming the part and the
    object; the previous checkpoint stays byte-exact, and no upload is left open."""
    url = seaweed.url(prefix)
    old = {"w": random_tensor((2048, 1024), torch.float32, 7)}  # 8 MiB: two parts of 6 and 2 MiB
    dcp_safetensors.save(old, url, storage_options=seaweed.options(), max_part=6 * MiB)
    before = seaweed.get(prefix, "model.safetensors")
    monkeypatch.setattr(saving, "crc32", lambda data, value=0: zlib.crc32(data, value) ^ 1)
    new = {"w": random_tensor((2048, 1024), torch.float32, 8)}
    started = time.perf_counter()
    with pytest.raises(StorageError) as caught:
        dcp_safetensors.save(new, url, storage_options=seaweed.options(), max_part=6 * MiB)
    message = str(caught.value)
    assert "UploadPart" in message and f"{prefix}/model.safetensors" in message and "BadDigest" in message, message
    assert time.perf_counter() - started < 30
    assert seaweed.get(prefix, "model.safetensors") == before
    assert not seaweed.open_uploads(prefix)
    monkeypatch.undo()
    out = {"w": torch.zeros(2048, 1024)}
    dcp_safetensors.load(out, url, storage_options=seaweed.options())
    assert same(out["w"], old["w"])


def test_a_commit_record_of_a_version_before_checksums_is_rolled_forward(seaweed, prefix):
    """A save by an earlier version (its upload made without a checksum algorithm; its record listing
    [number, ETag] pairs and no CRC-32) whose writer died past the commit point is published by the next
    load, completed as it was made: committed bytes are never lost to an upgrade."""
    import subprocess

    from dcp_safetensors.commit import CommitRecord, staging_name
    from dcp_safetensors.names import COMMIT_RECORD

    body = safetensors.torch.save({"w": torch.arange(6.0)})
    key = f"{prefix}/model.safetensors"
    upload = seaweed.client.create_multipart_upload(Bucket=seaweed.bucket, Key=key)["UploadId"]
    etag = seaweed.client.upload_part(Bucket=seaweed.bucket, Key=key, UploadId=upload, PartNumber=1, Body=body)["ETag"]
    index = json.dumps({"metadata": {"total_size": 24}, "weight_map": {"w": "model.safetensors"}}).encode()
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = CommitRecord("old", ["model.safetensors"], writer={"host": socket.gethostname(), "pid": dead.pid},
                          uploads={"model.safetensors": {"upload_id": upload, "parts": [[1, etag]]}}, index=index)
    seaweed.client.put_object(Bucket=seaweed.bucket, Key=f"{prefix}/{staging_name('old')}/{COMMIT_RECORD}",
                              Body=record.encode())
    out = {"w": torch.zeros(6)}
    dcp_safetensors.load(out, seaweed.url(prefix), storage_options=seaweed.options())
    assert torch.equal(out["w"], torch.arange(6.0))
    assert seaweed.get(prefix, "model.safetensors") == body
    assert not seaweed.open_uploads(prefix)


def test_a_save_aborts_every_upload_left_open_beyond_the_first_page(seaweed, prefix):
    """A page and 3 more uploads an interrupted save left open under the checkpoint, more than one
    page of ListMultipartUploads (1,000 on AWS; the paging proxy asks SeaweedFS for pages of
    ``seaweed.upload_page``, 50): the next save aborts them all, and none under a neighbouring prefix.

    The uploads go to 7 files in turn, so the page ends inside one file's uploads (the next
    page starts from both markers), as 1,003 uploads in pages of 1,000 would.
    """
    bucket = seaweed.open_bucket
    left_open = seaweed.upload_page + 3
    # Unsigned requests (the bucket is open): the paging proxy may set their page size.
    anon = boto3.client("s3", endpoint_url=seaweed.endpoint, region_name="us-east-1", config=Config(signature_version=UNSIGNED))
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        keys = [f"{prefix}/model-{i % 7 + 1:05d}-of-00007.safetensors" for i in range(left_open)] + [f"{prefix}-next/model.safetensors"]
        list(pool.map(lambda key: anon.create_multipart_upload(Bucket=bucket, Key=key), keys))
    created = time.perf_counter() - started
    proxy = seaweed.paging_proxy
    proxy.stats.reset()
    options = {
        "anon": True,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}},
        "skip_instance_cache": True,
    }
    started = time.perf_counter()
    dcp_safetensors.save({"w": torch.arange(4.0)}, seaweed.url(prefix, bucket), storage_options=options)
    print(f"created {left_open + 1} uploads in {created:.1f} s; the save aborted {left_open} in {time.perf_counter() - started:.1f} s")
    assert seaweed.open_uploads(prefix, bucket) == []
    assert [u["Key"] for u in seaweed.open_uploads(f"{prefix}-next", bucket)] == [f"{prefix}-next/model.safetensors"]
    assert proxy.stats.requests["ListMultipartUploads"] == 2  # pages of 50 and 3
    assert proxy.stats.requests["AbortMultipartUpload"] == left_open
    out = {"w": torch.zeros(4)}
    dcp_safetensors.load(out, seaweed.url(prefix, bucket), storage_options=options)
    assert out["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
