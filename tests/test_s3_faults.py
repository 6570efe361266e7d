"""Object-store faults on a real server (issue 22): SeaweedFS killed (SIGKILL) or stopped (SIGSTOP) mid-save or mid-load.

Each test gets a server of its own (``SeaweedS3(restartable=True)``), fronted by a proxy whose
``on_request`` fires the fault at a chosen request, before that request goes on: the first
UploadPart, the commit record's PUT, the request right after that PUT, the first read of a data
file. A kill also cuts the proxy's connections and closes its port, so the clients meet what a
killed server's kernel does (connections reset, then refused). Then, on every rank, the call must
fail within seconds with an error that names the endpoint and says what happened; after a restart
(same data dir, same ports) the previous checkpoint must be there byte for byte (or, once the
commit record was written, the new one), and the next save must leave no open multipart upload and
no staging prefix.

Storage options are the defaults a user gets (s3fs's 5 s connect and 15 s read timeouts, the
endpoint breaker's 10 s window), except that the SIGSTOP test shortens the timeouts.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from email.message import Message

import pytest
import torch
from conftest import SeaweedS3
from s3_faults_cases import full_state, load_matches, save_state, try_load, try_save
from s3_proxy import Trigger

import dcp_safetensors
from dcp_safetensors.names import COMMIT_RECORD, STAGING_PREFIX
from dcp_safetensors.storage.breaker import UNREACHABLE_AFTER

SHAPES = [(1536, 1024)] * 2  # two 6 MiB fp32 tensors, row-sharded over 2 ranks: parts from both
OLD, NEW, NEXT = 100, 200, 300  # seeds of the checkpoint there before, of the save hit by the fault, of the one after
ISSUE_TARGET = 15.0  # seconds from a dead server to the error, on every rank (issue 22)
FULL_STORE_TARGET = 30.0  # seconds from a full disk to the error: each part's attempts re-send its bytes


@pytest.fixture
def server(tmp_path) -> Iterator[SeaweedS3]:
    """A SeaweedFS server of this test's own, to kill, stop and restart."""
    server = SeaweedS3(str(tmp_path), restartable=True)
    yield server
    server.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return request.node.name


def user_options(server: SeaweedS3, **config: object) -> dict:
    """What a user passes: credentials and endpoint; no timeouts or retries of ours unless ``config``."""
    options = {k: v for k, v in server.options().items() if k != "config_kwargs"}
    return {**options, "config_kwargs": config} if config else options


def arm(server: SeaweedS3, when: Callable[[str, str, Message], bool], action: Callable[[], None]) -> Trigger:
    """``action`` (kill or stop the server) at the first request ``when`` picks, before the server sees it."""
    assert server.front is not None
    trigger = server.front.faults.on_request = Trigger(when, action)
    return trigger


def objects(server: SeaweedS3, prefix: str) -> dict[str, bytes]:
    """Every object of the checkpoint, by key: the bytes a fault must not change."""
    return {key: server.get(prefix, key) for key in server.keys(prefix)}


def leftovers(server: SeaweedS3, prefix: str) -> list[str]:
    """Open multipart uploads and staging keys under the checkpoint (none once a save has finished)."""
    uploads = [f"open upload of {u['Key']}" for u in server.open_uploads(prefix)]
    return uploads + [key for key in server.keys(prefix) if key.startswith(STAGING_PREFIX)]


def failed_on_every_rank(results: list, fault: Trigger, within: float) -> list[str]:
    """Every rank's call failed, with our errors only, within ``within`` s of the fault: every message."""
    assert fault.at is not None, "the fault never fired"
    messages = []
    for rank, (_, ended, failures, _) in enumerate(results):
        assert failures, f"rank {rank}: the call succeeded despite the fault at {fault.request}"
        for name, message in failures.values():
            assert name in ("StorageError", "RankFailedError"), (rank, name, message)
            messages.append(message)
        seconds = ended - fault.at
        print(f"rank {rank}: failed {seconds:.1f} s after the fault at {fault.request}: {sorted(failures.items())}")
        assert seconds < within, (rank, seconds, failures)
    return messages


def says_unreachable(messages: list[str], endpoint: str) -> bool:
    """Whether an error names ``endpoint`` and says no server answers there (the endpoint breaker's verdict:
    a request that reaches no server is retried until the breaker judges the endpoint, not 6 times alone,
    so a killed server is always reported as such, not as one request's connection error)."""
    return any(f"the endpoint {endpoint} is unreachable" in m for m in messages)


def next_save_cleans_up(ranks, server: SeaweedS3, url: str, prefix: str, options: dict) -> None:
    """A save after the fault succeeds, leaves nothing over, and loads back."""
    ranks(2).run(save_state, url, SHAPES, NEXT, options)
    assert leftovers(server, prefix) == []
    assert all(ranks(2).run(load_matches, url, SHAPES, NEXT, options))


def test_a_server_killed_while_parts_upload_fails_every_rank_within_15_s_and_keeps_the_old_checkpoint(
    ranks, server, prefix
):
    """The server dies (SIGKILL) as the first part arrives: every rank must stop within the issue's 15 s
    saying the endpoint is unreachable, not retry each part and each abort on its own for minutes; the
    uploads it leaves open never replace a byte of the previous checkpoint, and the next save aborts them."""
    url, options = server.url(prefix), user_options(server)
    ranks(2).run(save_state, url, SHAPES, OLD, options)
    before = objects(server, prefix)
    fault = arm(server, lambda op, path, headers: op == "UploadPart", server.kill)
    messages = failed_on_every_rank(ranks(2).run(try_save, url, SHAPES, NEW, options), fault, ISSUE_TARGET)
    assert says_unreachable(messages, server.endpoint), messages
    print(f"restarted in {server.restart():.1f} s")
    assert objects(server, prefix) == before
    assert server.open_uploads(prefix), "the killed save's uploads stay open until the next save"
    next_save_cleans_up(ranks, server, url, prefix, options)


def test_a_server_killed_as_the_commit_record_arrives_fails_the_save_and_keeps_the_old_checkpoint(
    ranks, server, prefix
):
    """Killed when the commit record's PUT reaches the proxy, before the server has it: the save is not
    committed, so it must fail on every rank within 15 s, and after a restart the old checkpoint is
    intact (every upload still open, no index replaced) and the next save cleans up."""
    url, options = server.url(prefix), user_options(server)
    ranks(2).run(save_state, url, SHAPES, OLD, options)
    before = objects(server, prefix)
    fault = arm(server, lambda op, path, headers: op == "PutObject" and path.endswith(COMMIT_RECORD), server.kill)
    messages = failed_on_every_rank(ranks(2).run(try_save, url, SHAPES, NEW, options), fault, ISSUE_TARGET)
    assert says_unreachable(messages, server.endpoint), messages
    server.restart()
    assert objects(server, prefix) == before
    assert server.open_uploads(prefix), "the killed save's uploads stay open until the next save"
    next_save_cleans_up(ranks, server, url, prefix, options)


def test_a_server_killed_right_after_the_commit_record_fails_the_save_and_the_next_load_gets_the_new_checkpoint(
    ranks, server, prefix
):
    """Killed on the first request after the commit record's PUT was answered: the save is committed
    (the record holds everything needed to publish it), so it must still fail on every rank (it did not
    finish), and after a restart a load by another process gets the NEW tensors (the record rolled
    forward), and the next save leaves no staging prefix and no open upload. The save's error says it is
    committed. The writer (rank 0 of the pool) still lives, so the load leaves the record to it until its
    20 s lease has passed (PUBLISH_LEASE): 5.8-11 s measured."""
    url, options = server.url(prefix), user_options(server)
    ranks(2).run(save_state, url, SHAPES, OLD, options)
    recorded: list[str] = []

    def after_record(op: str, path: str, headers: Message) -> bool:
        if recorded:
            return True
        if op == "PutObject" and path.endswith(COMMIT_RECORD):
            recorded.append(path)  # this one goes through; the next request meets a dead server
        return False

    fault = arm(server, after_record, server.kill)
    messages = failed_on_every_rank(ranks(2).run(try_save, url, SHAPES, NEW, options), fault, ISSUE_TARGET)
    assert says_unreachable(messages, server.endpoint), messages
    assert any("This save is committed all the same" in m and "the next load or save" in m for m in messages), messages
    server.restart()
    assert any(key.startswith(STAGING_PREFIX) for key in server.keys(prefix)), "the record should be there"
    expected = full_state(SHAPES, NEW)
    loaded = {k: torch.zeros_like(v) for k, v in expected.items()}
    started = time.perf_counter()
    dcp_safetensors.load(loaded, url, storage_options=options)  # another process than the (live) writer
    print(f"the load after the restart took {time.perf_counter() - started:.1f} s")
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    next_save_cleans_up(ranks, server, url, prefix, options)


def test_a_server_killed_mid_load_fails_every_rank_within_15_s_naming_the_endpoint(ranks, server, prefix):
    """Killed at the first read of tensor bytes (after the index and the headers were read, while the ranks
    read): every rank's load must fail within 15 s saying the endpoint is unreachable; a load changes
    nothing, so after a restart every object is as it was."""
    url, options = server.url(prefix), user_options(server)
    ranks(2).run(save_state, url, SHAPES, OLD, options)
    before = objects(server, prefix)

    def reads_tensor_bytes(op: str, path: str, headers: Message) -> bool:
        # A header is read from byte 0; a tensor's bytes start past it.
        return op == "GetObject" and path.endswith(".safetensors") and not headers.get("Range", "").startswith("bytes=0-")

    fault = arm(server, reads_tensor_bytes, server.kill)
    messages = failed_on_every_rank(ranks(2).run(try_load, url, SHAPES, OLD, options), fault, ISSUE_TARGET)
    assert says_unreachable(messages, server.endpoint), messages
    server.restart()
    assert objects(server, prefix) == before
    assert all(ranks(2).run(load_matches, url, SHAPES, OLD, options))
    next_save_cleans_up(ranks, server, url, prefix, options)


def test_a_stopped_server_is_named_as_not_answering_and_serves_again_after_sigcont(ranks, server, prefix):
    """SIGSTOPped as the first part arrives, longer than the read timeout (2 s here): connections are
    still accepted, nothing is answered. Every rank must fail once the breaker's window has passed, saying
    the server stopped answering (not that it is unreachable); after SIGCONT the same server serves
    again with the old checkpoint intact, and the next save cleans up."""
    read_timeout = 2
    options = user_options(server, read_timeout=read_timeout, connect_timeout=2, retries={"max_attempts": 1})
    url = server.url(prefix)
    ranks(2).run(save_state, url, SHAPES, OLD, options)
    before = objects(server, prefix)
    fault = arm(server, lambda op, path, headers: op == "UploadPart", server.stop)
    try:
        # The window counts from when the first request that timed out was sent (at the stop), and
        # opens at the first timeout past it; then each rank waits for its parts in flight (their own
        # timeouts), and DCP gathers the errors. Counted from the first timeout's end instead, it took
        # 18-20 s; without the breaker, every part's 6 attempts and then every abort's ~20 s each.
        within = UNREACHABLE_AFTER + 2 * read_timeout + 5
        messages = failed_on_every_rank(ranks(2).run(try_save, url, SHAPES, NEW, options), fault, within)
        assert any(f"the endpoint {server.endpoint} stopped answering (its requests time out)" in m
                   for m in messages), messages
        assert not says_unreachable(messages, server.endpoint), messages
    finally:
        server.cont()
    assert objects(server, prefix) == before
    next_save_cleans_up(ranks, server, url, prefix, options)


def disk_full_at(log: str) -> float:
    """When (epoch seconds) the server first logged "no space left on device": glog's lines begin
    ``E1202 15:37:52.604660`` (month, day, local time; the year is this one)."""
    import datetime
    import re

    with open(log, errors="replace") as f:
        line = next(line for line in f if "no space left on device" in line)
    stamp = re.match(r"[IWEF](\d{4} \d{2}:\d{2}:\d{2}\.\d+)", line)
    assert stamp, line
    when = datetime.datetime.strptime(f"{datetime.date.today().year}{stamp.group(1)}", "%Y%m%d %H:%M:%S.%f")
    return when.timestamp()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[str]:
    """A 64 MiB tmpfs for a server's data (root may mount; a machine where it may not skips, saying so)."""
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs as the store's disk: {mounted.stderr.strip()}")
    try:
        yield str(data)
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_a_full_store_fails_every_rank_fast_saying_it_may_be_full_and_keeps_the_old_checkpoint(
    ranks, tmp_path, small_disk, prefix
):
    """SeaweedFS on a 64 MiB disk: a 134 MB save fills it. The server answers each write with 500
    InternalError, nothing more (measured), so every rank must fail within 30 s of the disk filling
    (by the server's log), and not only after every
    part has spent its retries (the issue: 112 s), saying the store may be out of disk space; the old
    checkpoint stays intact, and once the disk has room the next save succeeds and leaves nothing over."""
    server = SeaweedS3(str(tmp_path), restartable=True)
    try:
        url, options = server.url(prefix), user_options(server)
        ranks(2).run(save_state, url, SHAPES, OLD, options)
        before = objects(server, prefix)
        big = [(4096, 2048)] * 4  # 4 x 32 MiB fp32: twice what the disk holds
        results = ranks(2).run(try_save, url, big, NEW, options)
        full_at = disk_full_at(server.log)  # the server's first write that met a full disk
        for rank, (_, ended, failures, _) in enumerate(results):
            assert failures, f"rank {rank}: a save larger than the disk succeeded"
            seconds = time.time() - time.monotonic() + ended - full_at
            print(f"rank {rank}: failed {seconds:.1f} s after the disk filled: {sorted(failures.items())}")
            # 7.8 s measured alone, 22 s beside the suite's other worker (each attempt re-sends a 32 MiB part
            # that the server reads whole before refusing it); the issue's save retried for 112 s.
            assert seconds < FULL_STORE_TARGET, (rank, seconds)
            assert all(name in ("StorageError", "RankFailedError") for name, _ in failures.values()), failures
            assert any("may be out of disk space" in m and "InternalError" in m for _, m in failures.values()), failures
        assert objects(server, prefix) == before
        subprocess.run(["mount", "-o", "remount,size=512m", small_disk], check=True)
        server.restart()  # a volume server that met a full disk serves reads only until restarted
        ranks(2).run(save_state, url, big, NEXT, options)
        assert leftovers(server, prefix) == []
        assert all(ranks(2).run(load_matches, url, big, NEXT, options))
    finally:
        server.close()
