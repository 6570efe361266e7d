"""One judgement per storage that its endpoint stopped answering: then every request fails at once.

Without it each request retried on its own: with a dead server, every part of
a save spent its six attempts (and botocore's own, each waiting out a connect
timeout), then every rank retried every abort the same way: minutes before
the user learnt that the server was gone. The breaker counts only failures
that reached no server (refused or dropped connections, timeouts); any answer,
an error one included, shows the server lives and resets it. Such failures
are retried until the breaker judges them (a request's attempt count does not
apply: a server restarting for 5 s is waited for, one gone for good is not).
Once at least two requests have failed so and none has been answered since
the first of them was sent, :data:`UNREACHABLE_AFTER` seconds before, it
opens: requests fail at once for the next ``UNREACHABLE_AFTER`` seconds,
naming the endpoint and the last failure, then one may try again (a later
save). Counting from when the first failed request was *sent* makes a
stopped server (each request waits out its read timeout, 15 s) fail after one
round of timeouts, not after one timeout plus the window.

Example:
    >>> breaker = EndpointBreaker(window=0.0)
    >>> breaker.answered()  # the server answered (a success or an error of its own)
    >>> breaker.check()     # closed: requests go ahead
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

from dcp_safetensors.errors import ConfigurationError, StorageError

__all__ = ["EndpointBreaker", "UNREACHABLE_AFTER", "reached_no_server", "unreachable_after"]

UNREACHABLE_AFTER = 10.0
"""Seconds of nothing but failed connections after which an endpoint counts as unreachable, unless the
environment variable ``DCP_SAFETENSORS_UNREACHABLE_AFTER`` says otherwise (set it alike on every rank:
torchrun passes the environment on)."""

WINDOW_VARIABLE = "DCP_SAFETENSORS_UNREACHABLE_AFTER"


def unreachable_after() -> float:
    """The breaker's window: ``$DCP_SAFETENSORS_UNREACHABLE_AFTER`` seconds, else :data:`UNREACHABLE_AFTER`.

    Example:
        >>> unreachable_after() == UNREACHABLE_AFTER or WINDOW_VARIABLE in os.environ
        True
    """
    value = os.environ.get(WINDOW_VARIABLE)
    if value is None:
        return UNREACHABLE_AFTER
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigurationError(f"{WINDOW_VARIABLE}={value!r}: give the seconds (a positive number) after which "
                                 "an S3 endpoint that answers no request counts as unreachable")
    return seconds

_NO_SERVER = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "ServerDisconnectedError", "ClientConnectorError", "ServerTimeoutError",
})  # fmt: skip
"""botocore's, urllib3's and aiohttp's errors for a request no server answered (by class name: no import)."""


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and what it wraps (s3fs and botocore wrap a socket's error two or three deep)."""
    seen: BaseException | None = e
    for _ in range(4):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def reached_no_server(e: BaseException) -> bool:
    """Whether ``e`` (or what it wraps) is a connection refused, dropped or timed out, not a server's answer."""
    return any(isinstance(x, (ConnectionError, TimeoutError)) or type(x).__name__ in _NO_SERVER for x in _chain(e))


def _timed_out(e: BaseException) -> bool:
    """Whether ``e`` is a timeout (a server that accepts connections and then says nothing: stopped, overloaded)."""
    return any(isinstance(x, TimeoutError) or type(x).__name__ in ("ReadTimeoutError", "ConnectTimeoutError")
               for x in _chain(e))


class EndpointBreaker:
    """Shared by every request of one storage (all its threads): see the module docstring."""

    def __init__(self, window: float | None = None) -> None:
        self.window = unreachable_after() if window is None else window
        self._lock = threading.Lock()
        self._since: float | None = None  # when the first request that failed since the last answer was sent
        self._answered = 0.0  # when a request was last answered
        self._failures = 0
        self._opened: tuple[float, str] | None = None

    def check(self) -> None:
        """Raise the open breaker's error, if it opened less than ``window`` seconds ago."""
        with self._lock:
            if self._opened is not None and time.monotonic() - self._opened[0] < max(self.window, 1.0):
                raise StorageError(self._opened[1])

    def answered(self) -> None:
        """A server answered: the endpoint is reachable."""
        with self._lock:
            self._since, self._failures, self._opened = None, 0, None
            self._answered = time.monotonic()

    def failed(self, request: str, endpoint: str, e: BaseException, sent: float | None = None) -> None:
        """A request sent at ``sent`` (``time.monotonic()``; default now) reached no server; raise
        StorageError once two or more have failed so and none has been answered for ``window`` seconds."""
        with self._lock:
            now = time.monotonic()
            sent = max(now if sent is None else sent, self._answered)  # not before the server last answered
            self._since = sent if self._since is None else min(self._since, sent)
            self._failures += 1
            if now - self._since < self.window or (self._failures < 2 and self.window > 0):
                return
            state = "stopped answering (its requests time out)" if _timed_out(e) else "is unreachable"
            message = (
                f"the endpoint {endpoint} {state}: no request has reached it for {now - self._since:.0f} s "
                f"({self._failures} failed; the last, {request}: {type(e).__name__}: {e}). Every request of this "
                "save or load stops now (a save that had not committed publishes nothing; the next save cleans up "
                "its uploads). Check that the server runs and that storage_options' endpoint_url points at it"
            )
            self._opened = (now, message)
        raise StorageError(message) from e
