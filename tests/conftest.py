from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from rank_pool import RankPool  # noqa: E402


@pytest.fixture(scope="session")
def ranks() -> Iterator[Callable[[int], RankPool]]:
    """``ranks(n)``: a pool of ``n`` gloo ranks, shared by every test of the session."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        pool = pools.get(world_size)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close(kill=True)
            # Two cores: keep at most two worlds alive at once.
            for other in [w for w in pools if w != world_size][: max(0, len(pools) - 1)]:
                pools.pop(other).close()
            pool = pools[world_size] = RankPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close()


class S3Server:
    """moto's S3 server on 127.0.0.1 behind our counting, fault-injecting proxy."""

    bucket = "ckpt"

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer
        from rank_pool import free_port
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
