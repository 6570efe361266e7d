"""The S3 requests a save and a load make, on botocore's synchronous client.

:class:`~dcp_safetensors.storage.s3.S3Storage` keeps s3fs for what any fsspec
store does (listing, small PUTs, deletes) and sends its own requests, every
byte of a checkpoint among them (``UploadPart``, ranged ``GetObject``), through
:class:`S3Client`: one botocore client with the settings of the s3fs
filesystem it sits beside (credentials, endpoint, region, ``config_kwargs``,
``s3_additional_kwargs``, requester pays), called from the storage's threads.

Why not s3fs's own (aiobotocore) client for the bytes: measured on a
SeaweedFS server on the same host, 8 threads (``benchmarks/s3_clients.py``,
best of 3), a 16 MiB ``UploadPart`` cost 2.7 ms of client CPU per MB through
s3fs and 0.74 through botocore's (123 against 160 MB/s), an 8 MiB ranged GET
2.4 and 1.0 (384 against 763 MB/s); obstore's GETs 1.5 (607 MB/s), and it
cannot upload a part into another process's upload. Over ``http://``
botocore also hashes each body for its signature (1.8 ms/MB); the parts
carry a CRC-32 the server checks, so the client turns that off
(``payload_signing_enabled=False``, botocore's default over ``https://``)
unless ``config_kwargs`` says otherwise.

Example:
    >>> import s3fs
    >>> S3Client(s3fs.S3FileSystem(anon=True)).pool_size
    32
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Any

__all__ = ["S3Client"]

POOL_SIZE = 32
"""Connections kept open per client: a rank's write or read threads (8 by default) each hold one,
and file-level requests (creating, completing, aborting uploads) run 16 at once."""


_CLIENTS: dict[str, Any] = {}
"""botocore clients by s3fs filesystem token (its options): making one loads botocore's S3 model,
~0.1-0.5 s of CPU, which every SafetensorsWriter/Reader of a run would pay again (s3fs keeps its
filesystems the same way)."""
_CLIENTS_LOCK = threading.Lock()


def _forget_clients() -> None:
    """In a forked child: its parent's clients hold the parent's sockets, and a lock another thread may have held."""
    global _CLIENTS_LOCK
    _CLIENTS.clear()
    _CLIENTS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients)


class S3Client:
    """botocore's synchronous S3 client, set up as the s3fs filesystem ``fs`` sets up its own.

    Calls raise what s3fs raises for the same answer (``FileNotFoundError``,
    ``PermissionError``, ... with botocore's ``ClientError`` as the cause), so
    one error mapping serves both clients.

    Args:
        fs: the ``s3fs.S3FileSystem`` whose settings to use.
    """

    pool_size = POOL_SIZE

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self._valid: dict[str, frozenset[str]] = {}

    @property
    def client(self) -> Any:
        """The botocore client: one per process and set of filesystem options, made on first use."""
        key = self._fs._fs_token
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                client = _CLIENTS[key] = self._make()
            return client

    def _make(self) -> Any:
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        fs = self._fs
        client_kwargs = dict(fs.client_kwargs)
        init = {"aws_access_key_id": fs.key, "aws_secret_access_key": fs.secret, "aws_session_token": fs.token,
                "endpoint_url": fs.endpoint_url}
        init = {k: v for k, v in init.items() if v is not None and v != client_kwargs.get(k)}
        if "use_ssl" not in client_kwargs:
            init["use_ssl"] = fs.use_ssl
        # A deep copy: botocore rewrites a retries dict in place (max_attempts -> total_max_attempts),
        # which would change the user's storage_options, and with them the filesystem's token.
        config = copy.deepcopy(fs._prepare_config_kwargs())
        if fs.anon:
            secrets = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
            init = {k: v for k, v in init.items() if k not in secrets}
            client_kwargs = {k: v for k, v in client_kwargs.items() if k not in secrets}
            config["signature_version"] = UNSIGNED
        config.setdefault("max_pool_connections", POOL_SIZE)
        # Our retry layer (FsspecStorage.retry: backoff, and the endpoint breaker) is the one policy;
        # botocore's own retries on top multiplied a dead endpoint's wait (5 x a connect timeout per try).
        config.setdefault("retries", {"total_max_attempts": 1})
        config["s3"] = {"payload_signing_enabled": False, **config.get("s3", {})}
        session = botocore.session.Session(**fs.kwargs)  # what s3fs gives its AioSession (profile, ...)
        return session.create_client("s3", config=Config(**config), **init, **client_kwargs)

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to, for error messages (the configured one if no client can be made)."""
        try:
            return str(self.client.meta.endpoint_url)
        except Exception:  # noqa: BLE001 - the error being reported may be the client's own
            fs = self._fs
            return str(fs.endpoint_url or fs.client_kwargs.get("endpoint_url") or "the default AWS endpoint")

    def call(self, operation: str, **kwargs: Any) -> Any:
        """The S3 API call ``operation`` (botocore's snake_case name), with the filesystem's
        ``s3_additional_kwargs`` and requester-pays flag where the operation takes them."""
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        client = self.client
        extra = {**self._fs.s3_additional_kwargs, **self._fs.req_kw}
        if extra:
            valid = self._valid_keys(client, operation)
            kwargs = {**{k: v for k, v in extra.items() if k in valid}, **kwargs}
        try:
            return getattr(client, operation)(**kwargs)
        except ClientError as e:
            raise translate_boto_error(e) from e

    def _valid_keys(self, client: Any, operation: str) -> frozenset[str]:
        keys = self._valid.get(operation)
        if keys is None:
            model = client.meta.service_model.operation_model(client.meta.method_to_api_mapping[operation])
            keys = self._valid[operation] = frozenset(model.input_shape.members if model.input_shape else ())
        return keys
