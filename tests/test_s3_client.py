"""The S3 client of our own requests (storage/s3_client.py): the s3fs filesystem's settings, on every request.

Requests go to the moto server behind the counting proxy; botocore's
``before-send`` event shows each request as it leaves, headers and all.
"""

from __future__ import annotations

import multiprocessing
import pickle

import pytest

from dcp_safetensors.errors import MissingFileError
from dcp_safetensors.storage.s3 import S3Storage


def options(s3, **extra) -> dict:
    return {**s3.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}, **extra}


def sent_headers(storage: S3Storage) -> list[tuple[str, dict[str, str]]]:
    """Every request the storage's client sends from now on: (operation, headers)."""
    sent: list[tuple[str, dict[str, str]]] = []

    def record(request, event_name, **kwargs):
        operation = event_name.rsplit(".", 1)[-1]
        sent.append((operation, {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}))

    storage.client.client.meta.events.register("before-send.s3", record)
    return sent


def upload_one_part(storage: S3Storage, name: str, data: bytes) -> None:
    import zlib

    from dcp_safetensors.layout import PartPlan

    session = storage.begin_save("snap", [name])
    try:
        part = PartPlan(file=name, number=1, start=0, end=len(data), rank=0)
        storage.part_writer(session).write(part, [memoryview(data)], zlib.crc32(data))
    finally:
        storage.abort_save(session)


def test_parts_are_sent_unsigned_with_their_crc32_and_the_filesystems_extra_arguments(s3):
    """Over http:// botocore would sign each body's SHA-256; the part's CRC-32 guards it instead.
    s3_additional_kwargs and requester pays go on the operations that take them, as s3fs does."""
    storage = S3Storage(s3.url(s3.prefix), options(s3, s3_additional_kwargs={"ServerSideEncryption": "AES256"},
                                                  requester_pays=True))
    sent = sent_headers(storage)
    upload_one_part(storage, "a.safetensors", b"x" * 1000)
    by_op = {op: h for op, h in sent}
    create, part = by_op["CreateMultipartUpload"], by_op["UploadPart"]
    assert create["x-amz-server-side-encryption"] == "AES256"  # UploadPart does not take it: not sent there
    assert "x-amz-server-side-encryption" not in part
    assert create["x-amz-request-payer"] == part["x-amz-request-payer"] == "requester"
    assert part["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert part["x-amz-checksum-crc32"]  # ours: botocore computed none (that would be x-amz-sdk-checksum-algorithm)


def test_payload_signing_stays_on_where_config_kwargs_asks_for_it(s3):
    import hashlib

    storage = S3Storage(s3.url(s3.prefix), options(s3, config_kwargs={"s3": {"payload_signing_enabled": True}}))
    sent = sent_headers(storage)
    upload_one_part(storage, "a.safetensors", b"y" * 1000)
    part = dict(sent)["UploadPart"]
    assert part["x-amz-content-sha256"] == hashlib.sha256(b"y" * 1000).hexdigest()


def test_one_client_per_process_and_settings(s3):
    """Making a botocore client loads its S3 model (0.1-0.5 s): every storage of one process and one
    set of options shares one; other options get their own; a pickled storage makes one on first use."""
    a = S3Storage(s3.url(s3.prefix), options(s3))
    b = S3Storage(s3.url(s3.prefix + "-other"), options(s3))
    c = S3Storage(s3.url(s3.prefix), options(s3, config_kwargs={"retries": {"max_attempts": 2}}))
    assert a.client.client is b.client.client
    assert c.client.client is not a.client.client
    assert c.client.client.meta.config.retries["total_max_attempts"] == 3  # config_kwargs reach it: 2 retries + 1
    copy = pickle.loads(pickle.dumps(a))
    assert copy.client.client is a.client.client  # same process, same settings


def _child_client_id(storage: S3Storage, out) -> None:

    try:
        storage.head("nothing-here")  # a request on the child's client
    except MissingFileError:
        out.put((id(storage.client.client), False))


def test_a_forked_child_makes_its_own_client(s3):
    """A child of fork must not send on its parent's pooled sockets."""

    storage = S3Storage(s3.url(s3.prefix), options(s3))
    parent = storage.client.client
    with pytest.raises(MissingFileError):
        storage.head("nothing-here")  # the parent's pool holds a connection now
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_client_id, args=(storage, out))
    child.start()
    child_id, exists = out.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and not exists
    assert child_id != id(parent)


def test_anonymous_access_signs_nothing():
    import s3fs
    from botocore import UNSIGNED

    from dcp_safetensors.storage.s3_client import S3Client

    client = S3Client(s3fs.S3FileSystem(anon=True, skip_instance_cache=True, client_kwargs={"region_name": "us-east-1"}))
    assert client.client.meta.config.signature_version is UNSIGNED
    assert client.client.meta.region_name == "us-east-1"


@pytest.mark.parametrize("extra", [{"region_name": "x"}, {"session_vars": 3}])
def test_session_options_the_client_refuses_name_storage_options(s3, extra):
    from dcp_safetensors.errors import ConfigurationError

    storage = S3Storage(s3.url(s3.prefix), options(s3, **extra))
    with pytest.raises(ConfigurationError, match="storage_options"):
        storage.head("a")


def test_the_users_storage_options_are_not_changed(s3):
    """botocore rewrites a ``retries`` dict in place; the client gets a copy."""
    import copy

    given = options(s3, config_kwargs={"retries": {"max_attempts": 2}, "s3": {"addressing_style": "path"}})
    before = copy.deepcopy(given)
    storage = S3Storage(s3.url(s3.prefix), given)
    with pytest.raises(MissingFileError):
        storage.head("nothing-here")
    assert given == before


@pytest.fixture
def own_proxy(s3):
    """A proxy of its own in front of the moto server, to kill or stall without touching other tests'."""
    from s3_proxy import S3Proxy

    proxy = S3Proxy("127.0.0.1", s3.moto_port)
    yield proxy
    proxy.close()


def through(s3, proxy, **extra) -> dict:
    return options(s3, client_kwargs={"endpoint_url": f"http://127.0.0.1:{proxy.port}", "region_name": "us-east-1"},
                   **extra)


def test_an_endpoint_that_reaches_no_server_fails_every_request_at_once_then_recovers(s3, own_proxy):
    """Refused/dropped connections for longer than the breaker's window: the request fails naming the endpoint
    and the last failure; the next ones fail without trying; once the window has passed and the server is back,
    requests go through again."""
    import time

    from dcp_safetensors.errors import StorageError
    from dcp_safetensors.storage.breaker import EndpointBreaker

    storage = S3Storage(s3.url(s3.prefix), through(s3, own_proxy))
    storage._breaker = EndpointBreaker(window=1.0)
    own_proxy.faults.rule = lambda op, n: "drop"
    started = time.perf_counter()
    with pytest.raises(StorageError, match=rf"the endpoint http://127.0.0.1:{own_proxy.port} is unreachable: no request "
                                           r"has reached it for \d s \(\d+ failed; the last, HeadObject of s3://"):
        storage.head("a.safetensors")
    assert 1.0 <= time.perf_counter() - started < 4  # the window, not 6 attempts x backoff
    tried = own_proxy.stats.requests["HEAD"]
    started = time.perf_counter()
    with pytest.raises(StorageError, match="is unreachable"):
        storage.abort_upload("a.safetensors", "some-upload")
    assert time.perf_counter() - started < 0.1 and own_proxy.stats.requests["HEAD"] == tried
    assert own_proxy.stats.requests["AbortMultipartUpload"] == 0  # not even tried
    own_proxy.faults.rule = None
    time.sleep(1.0)
    with pytest.raises(MissingFileError):  # the server answers again
        storage.head("a.safetensors")


def test_server_errors_are_answers_and_keep_the_breaker_closed(s3, own_proxy):
    """A 500 comes from a living server: six attempts with backoff, the server's error, no "unreachable"
    (the window is 0: one request reaching no server would open it)."""
    from dcp_safetensors.errors import StorageError
    from dcp_safetensors.storage.breaker import EndpointBreaker

    storage = S3Storage(s3.url(s3.prefix), through(s3, own_proxy, config_kwargs={}))  # botocore's retries: the default
    storage._breaker = EndpointBreaker(window=0.0)
    own_proxy.faults.rule = lambda op, n: "500"
    with pytest.raises(StorageError, match="failed after 6 attempts: 500") as info:  # a HEAD answer has no body
        storage.head("a.safetensors")
    assert "unreachable" not in str(info.value)
    assert own_proxy.stats.requests["HEAD"] == 6  # ours only: botocore retries nothing of its own


def test_a_stalled_server_is_named_as_stopped_answering_after_its_read_timeouts(s3, own_proxy):
    """A server that accepts connections and then says nothing (SIGSTOP): each request times out (read_timeout,
    here 0.5 s), is retried, and the breaker says the server stopped answering, not that it is unreachable."""
    import time

    from dcp_safetensors.errors import StorageError
    from dcp_safetensors.storage.breaker import EndpointBreaker

    storage = S3Storage(s3.url(s3.prefix), through(s3, own_proxy, config_kwargs={"read_timeout": 0.5}))
    storage._breaker = EndpointBreaker(window=1.0)
    own_proxy.faults.stall_s = 3.0
    own_proxy.faults.rule = lambda op, n: "stall"
    started = time.perf_counter()
    with pytest.raises(StorageError, match=rf"the endpoint http://127.0.0.1:{own_proxy.port} stopped answering \(its "
                                           r"requests time out\): no request has reached it for \d s .*ReadTimeoutError"):
        storage.head("a.safetensors")
    assert time.perf_counter() - started < 4
    own_proxy.faults.rule = None


def test_a_stalled_server_fails_after_one_round_of_timeouts_not_one_plus_the_window(s3, own_proxy):
    """The window counts from when the first request that timed out was *sent*: parallel requests to a
    stopped server (read_timeout 1.5 s, window 1 s) fail with the first round of timeouts, ~1.5 s, not after
    a timeout plus the window plus another timeout (4.5 s, as it did when the window began at the first
    timeout's end). One request alone is retried once first: a single timeout proves little."""
    import threading
    import time

    from dcp_safetensors.errors import StorageError
    from dcp_safetensors.storage.breaker import EndpointBreaker

    storage = S3Storage(s3.url(s3.prefix), through(s3, own_proxy, config_kwargs={"read_timeout": 1.5}))
    storage._breaker = EndpointBreaker(window=1.0)
    own_proxy.faults.stall_s = 6.0
    own_proxy.faults.rule = lambda op, n: "stall"
    ended: list[float] = []

    def head() -> None:
        with pytest.raises(StorageError, match="stopped answering"):
            storage.head("a.safetensors")
        ended.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=head) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ended) == 4 and max(ended) < 3.0, ended
    own_proxy.faults.rule = None


@pytest.mark.parametrize("fault, code", [("507", "InsufficientStorage"), ("quota", "QuotaExceeded")])
def test_a_full_store_or_a_quota_fails_at_once_as_storage_full(s3, own_proxy, fault, code):
    """507 (AWS, Ceph), XMinioStorageFull, QuotaExceeded: no retry frees space, so the first answer is a
    StorageFullError naming the request, bucket, key and endpoint, and what to do (a quota's 403 is not
    taken for bad credentials)."""
    from dcp_safetensors.errors import StorageFullError

    storage = S3Storage(s3.url(s3.prefix), through(s3, own_proxy))
    own_proxy.faults.rule = lambda op, n: fault if op == "UploadPart" else None
    with pytest.raises(StorageFullError, match=rf"UploadPart 1 of s3://.*bucket '.*', key '.*'\) at http://127.0.0.1:"
                                               rf"{own_proxy.port}: {code}: injected\. Not retried: free space"):
        upload_one_part(storage, "a.safetensors", b"x" * 100)
    assert own_proxy.stats.requests["UploadPart"] == 1


@pytest.mark.parametrize("fault, code, says", [
    ("500", "InternalError", "may be out of disk space"),
    ("503", "SlowDown", "kept asking to slow down: fewer write_threads"),
], ids=["full", "throttled"])
def test_a_write_failing_on_every_attempt_says_what_to_do_and_each_kind_of_retry_is_warned_once(
    s3, own_proxy, caplog, fault, code, says
):
    """SeaweedFS answers every write with 500 InternalError once its disk is full (measured): nothing in the
    answer says so; after the attempts, the error says the store may be full. Throttling (503 SlowDown) is
    backed off and, at the end, answered with advice. The retries of all requests log one WARNING per kind
    of error, not one per attempt."""
    import logging

    from dcp_safetensors.errors import StorageError

    storage = S3Storage(s3.url(s3.prefix), through(s3, own_proxy), retries=3)
    own_proxy.faults.rule = lambda op, n: fault if op in ("UploadPart", "GetObject") else None
    with caplog.at_level(logging.DEBUG, logger="dcp_safetensors"):
        with pytest.raises(StorageError, match=f"failed after 3 attempts: {code}.*{says}"):
            upload_one_part(storage, "a.safetensors", b"x" * 100)
        for _ in range(2):
            with pytest.raises(StorageError, match=f"GetObject .* failed after 3 attempts: {code}") as info:
                storage.read_range("a.safetensors", 0, 10)
            assert "disk space" not in str(info.value)  # a read that fails so is no sign of a full store
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "attempt" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"further retries after {code} are logged at DEBUG" in warnings[0].getMessage()
    assert sum("attempt 2 failed" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 3
    own_proxy.faults.rule = None


def test_a_save_stalled_by_the_server_is_warned_by_the_watchdog_then_completes(s3, own_proxy, caplog):
    """A single-process dcp.save whose first UploadPart the server leaves unanswered for 2.5 s (then drops):
    with stall_warning=1 s the rank logs a WARNING naming the save and what it waits on, the part is sent
    again, and the save completes bit-exact."""
    import logging

    import safetensors.torch
    import torch
    import torch.distributed.checkpoint as dcp

    from dcp_safetensors import SafetensorsWriter

    opts = through(s3, own_proxy, config_kwargs={"read_timeout": 10})
    own_proxy.faults.stall_s = 2.5
    own_proxy.faults.rule = lambda op, n: "stall" if op == "UploadPart" and n == 1 else None
    tensor = torch.arange(1 << 20, dtype=torch.float32)
    url = s3.url(s3.prefix)
    with caplog.at_level(logging.INFO, logger="dcp_safetensors"):
        dcp.save({"w": tensor}, storage_writer=SafetensorsWriter(url, storage_options=opts, stall_warning=1.0))
    own_proxy.faults.rule = None
    stalls = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no progress" in r.getMessage()]
    assert stalls and stalls[0].startswith(f"save of {url} (rank 0): 0.0 of 4.2 MB (0%), no progress for 1 s while "
                                           "writing"), stalls
    data = s3.get(s3.prefix, "model.safetensors")
    assert torch.equal(safetensors.torch.load(data)["w"], tensor)


def test_the_unreachable_window_comes_from_the_environment_and_a_bad_value_is_refused(monkeypatch):
    from dcp_safetensors.errors import ConfigurationError
    from dcp_safetensors.storage.breaker import UNREACHABLE_AFTER, EndpointBreaker

    monkeypatch.delenv("DCP_SAFETENSORS_UNREACHABLE_AFTER", raising=False)
    assert EndpointBreaker().window == UNREACHABLE_AFTER
    monkeypatch.setenv("DCP_SAFETENSORS_UNREACHABLE_AFTER", "3.5")
    assert EndpointBreaker().window == 3.5
    for bad in ("0", "-2", "ten"):
        monkeypatch.setenv("DCP_SAFETENSORS_UNREACHABLE_AFTER", bad)
        with pytest.raises(ConfigurationError, match=rf"DCP_SAFETENSORS_UNREACHABLE_AFTER='{bad}': give the seconds"):
            EndpointBreaker()


def test_once_a_write_failed_on_every_attempt_the_other_writes_of_the_save_are_not_retried(s3, own_proxy):
    """A full store fails every write alike: after one part spent its attempts, another part in flight stops at
    its next retry (naming the first failure) instead of re-sending its bytes 6 times; reads still retry, and
    the next save (a storage of its own) tries afresh."""
    from dcp_safetensors.errors import StorageError

    storage = S3Storage(s3.url(s3.prefix), through(s3, own_proxy), retries=3)
    own_proxy.faults.rule = lambda op, n: "500" if op in ("UploadPart", "HEAD") else None
    with pytest.raises(StorageError, match="UploadPart 1 .* failed after 3 attempts: InternalError"):
        upload_one_part(storage, "a.safetensors", b"x" * 100)
    first = own_proxy.stats.requests["UploadPart"]
    per_attempt = first // 3  # what the proxy counts of one attempt
    assert first == 3 * per_attempt > 0
    with pytest.raises(StorageError, match=r"UploadPart 1 of .*b\.safetensors.*: InternalError: .*; not retried, as another "
                                           r"write of this save failed on every attempt: UploadPart 1 of .*a\.safetensors"):
        upload_one_part(storage, "b.safetensors", b"y" * 100)
    assert own_proxy.stats.requests["UploadPart"] == 4 * per_attempt  # one attempt, not three
    with pytest.raises(StorageError, match="HeadObject .* failed after 3 attempts"):
        storage.head("a.safetensors")
    with pytest.raises(StorageError, match="failed after 3 attempts"):
        upload_one_part(S3Storage(s3.url(s3.prefix), through(s3, own_proxy), retries=3), "c.safetensors", b"z")
    assert own_proxy.stats.requests["UploadPart"] == 7 * per_attempt
    own_proxy.faults.rule = None
