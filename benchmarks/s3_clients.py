"""What an S3 client costs per byte: UploadPart and ranged GetObject through each client, on SeaweedFS.

The evidence behind :mod:`dcp_safetensors.storage.s3_client`'s choice. One
process, 8 threads, as one rank of a save or a load: ``--mib`` MiB of 16 MiB
parts into a multipart upload (each part with its CRC-32, as our writer
sends them), then the same bytes back as 8 MiB ranged GETs ``If-Match`` the
object's ETag (as our reader asks). Per client: the wall time, this
process's CPU (client threads and event loops included) and the server's
CPU, each per MB, the minimum over ``--rounds`` rounds in alternating order.

Clients:

* ``s3fs``: s3fs's aiobotocore client, ``call_s3`` from threads (what the
  storage used before); GETs through its event loop.
* ``botocore``: botocore's synchronous client (what the storage uses now),
  payload signing off (the part's CRC-32 guards the bytes).
* ``botocore_signed``: the same, signing each body's SHA-256 (botocore's
  default over ``http://``; over ``https://`` it signs none).
* ``obstore``: GETs only (obstore 0.12 cannot upload a part into another
  process's multipart upload); skipped when it is not installed.

    python benchmarks/s3_clients.py --mib 256 --rounds 3 --out bench_out/s3_clients.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

CLIENTS = ["s3fs", "botocore", "botocore_signed", "obstore"]
PART = 16 << 20
RANGE = 8 << 20
THREADS = 8


def _cpu(server) -> tuple[float, float]:
    """CPU seconds so far: this process's (every thread), the server's."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    t = server.cpu_times()
    return me.ru_utime + me.ru_stime, t.user + t.system


def _timed(server, fn: Callable[[int], object], n: int, nbytes: int) -> dict:
    cpu0, srv0 = _cpu(server)
    start = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(fn, range(n)))
    wall = time.perf_counter() - start
    cpu1, srv1 = _cpu(server)
    mb = nbytes / 1e6
    return {"s": wall, "mb_s": mb / wall, "client_ms_per_mb": (cpu1 - cpu0) / mb * 1e3,
            "server_ms_per_mb": (srv1 - srv0) / mb * 1e3}


def _uploader(client: str, seaweed, key: str, upload_id: str, data: bytes, crc: str) -> Callable[[int], object] | None:
    args = {"Bucket": seaweed.bucket, "Key": key, "UploadId": upload_id, "ChecksumAlgorithm": "CRC32", "ChecksumCRC32": crc}
    if client == "s3fs":
        fs = _s3fs(seaweed)
        return lambda i: fs.call_s3("upload_part", PartNumber=i + 1, Body=data, **args)
    if client.startswith("botocore"):
        c = _botocore(seaweed, signed=client == "botocore_signed")
        return lambda i: c.upload_part(PartNumber=i + 1, Body=data, **args)
    return None


def _getter(client: str, seaweed, key: str, etag: str) -> Callable[[int], object]:
    def rng(i: int) -> str:
        return f"bytes={i * RANGE}-{(i + 1) * RANGE - 1}"

    if client == "s3fs":
        import fsspec.asyn

        fs = _s3fs(seaweed)

        async def get(i: int) -> bytes:
            response = await fs._call_s3("get_object", Bucket=seaweed.bucket, Key=key, Range=rng(i), IfMatch=etag)
            async with response["Body"] as body:
                return bytes(await body.read())

        return lambda i: fsspec.asyn.sync(fs.loop, get, i)
    if client.startswith("botocore"):
        c = _botocore(seaweed, signed=client == "botocore_signed")
        return lambda i: c.get_object(Bucket=seaweed.bucket, Key=key, Range=rng(i), IfMatch=etag)["Body"].read()
    import obstore
    from obstore.store import S3Store

    store = S3Store(seaweed.bucket, endpoint=seaweed.endpoint, access_key_id=seaweed.key, secret_access_key=seaweed.secret,
                    region="us-east-1", virtual_hosted_style_request=False, client_options={"allow_http": True})
    return lambda i: bytes(obstore.get_range(store, key, start=i * RANGE, length=RANGE))


def _s3fs(seaweed):
    import s3fs

    return s3fs.S3FileSystem(**seaweed.options())


def _botocore(seaweed, *, signed: bool):
    import botocore.session
    from botocore.config import Config

    config = Config(max_pool_connections=32, s3={"payload_signing_enabled": signed})
    return botocore.session.Session().create_client(
        "s3", endpoint_url=seaweed.endpoint, region_name="us-east-1", aws_access_key_id=seaweed.key,
        aws_secret_access_key=seaweed.secret, config=config)


def run(mib: int, rounds: int, clients: list[str]) -> list[dict]:
    """Each client's upload and GET costs (minimum over ``rounds``)."""
    import psutil
    from conftest import SeaweedS3

    try:
        import obstore  # noqa: F401
    except ImportError:
        clients = [c for c in clients if c != "obstore"]
    root = tempfile.mkdtemp(prefix="bench-s3-clients-")
    seaweed = SeaweedS3(root)
    server = psutil.Process(seaweed.proc.pid)
    admin = _botocore(seaweed, signed=False)
    n = max(1, (mib << 20) // PART)
    data = os.urandom(PART)
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    results = {c: {"client": c, "upload": [], "get": []} for c in clients}
    try:
        for r in range(rounds):
            for client in clients if r % 2 == 0 else clients[::-1]:
                key = f"{client}-{r}"
                upload_id = admin.create_multipart_upload(Bucket=seaweed.bucket, Key=key, ChecksumAlgorithm="CRC32",
                                                          ChecksumType="FULL_OBJECT")["UploadId"]
                up = _uploader(client, seaweed, key, upload_id, data, crc)
                if up is not None:
                    results[client]["upload"].append(_timed(server, up, n, n * PART))
                else:  # a client that cannot upload parts reads an object another one wrote
                    for i in range(n):
                        admin.upload_part(Bucket=seaweed.bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=data)
                parts = admin.list_parts(Bucket=seaweed.bucket, Key=key, UploadId=upload_id)["Parts"]
                admin.complete_multipart_upload(
                    Bucket=seaweed.bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]})
                etag = admin.head_object(Bucket=seaweed.bucket, Key=key)["ETag"]
                results[client]["get"].append(_timed(server, _getter(client, seaweed, key, etag), n * PART // RANGE, n * PART))
    finally:
        seaweed.close()
        shutil.rmtree(root, ignore_errors=True)
    out = []
    for res in results.values():
        for op in ("upload", "get"):
            if res[op]:
                res[op + "_best"] = min(res[op], key=lambda x: x["s"])
        out.append(res)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=CLIENTS)
    parser.add_argument("--out", default="bench_out/s3_clients.json")
    args = parser.parse_args()
    results = run(args.mib, args.rounds, args.clients)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"mib": args.mib, "part_bytes": PART, "range_bytes": RANGE, "threads": THREADS, "rounds": args.rounds,
                   "results": results}, f, indent=2)
    print(f"{args.mib} MiB, {THREADS} threads, 16 MiB parts / 8 MiB ranged GETs, SeaweedFS; best of {args.rounds} rounds")
    print("| client | upload MB/s | upload client ms/MB | upload server ms/MB | GET MB/s | GET client ms/MB | GET server ms/MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        u, g = r.get("upload_best"), r["get_best"]
        up = f"{u['mb_s']:.0f} | {u['client_ms_per_mb']:.2f} | {u['server_ms_per_mb']:.2f}" if u else "- | - | -"
        print(f"| {r['client']} | {up} | {g['mb_s']:.0f} | {g['client_ms_per_mb']:.2f} | {g['server_ms_per_mb']:.2f} |")


if __name__ == "__main__":
    main()
