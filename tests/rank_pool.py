"""A pool of N gloo ranks started once and reused by many test cases.

Process and torch start-up dominate on two cores, so each world size gets one
pool per test session (its ranks forked from ``helpers.process_context``'s server,
which has imported torch already); a case is a module-level function run on every rank
with ``pool.run(fn, *args)``. A case that fails on a rank raises here with
that rank's traceback; a case that hangs past its timeout kills the pool (the
next case starts a fresh one) and raises naming the ranks still running.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from helpers import free_port, process_context


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - report everything, the pool lives on
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` processes in one gloo group, running cases on request."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = process_context()
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 180) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the per-rank results in rank order."""
        for q in self._tasks:
            q.put((fn, args))
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() < deadline and all(p.is_alive() for p in self._procs):
                    continue
                pending = sorted(set(range(self.world_size)) - set(out) - set(errors))
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                self.close(kill=True)
                raise TimeoutError(
                    f"{fn.__name__}: ranks {pending} did not finish within {timeout} s (dead ranks: {dead})"
                ) from None
            (out if ok else errors)[rank] = value
        if errors:
            self.broken = True  # a rank may have left a collective half-done
            rank = min(errors)
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}; rank {rank}:\n{errors[rank]}")
        return [out[r] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        close_pools([self], kill)

    def _ask_to_leave(self) -> None:
        self.broken = True
        for p, q in zip(self._procs, self._tasks, strict=False):
            if p.is_alive():
                q.put(None)

    def _join(self, timeout: float) -> None:
        for p in self._procs:
            p.join(timeout=timeout)
            if p.is_alive():
                p.kill()
                p.join()


def close_pools(pools: list[RankPool], kill: bool = False) -> None:
    """End the ranks of ``pools`` (at once with ``kill``): every rank is asked to leave before
    any is waited for, so their shutdowns overlap; a rank still there after 10 s is killed."""
    for pool in pools:
        pool.broken = True
        if not kill:
            pool._ask_to_leave()
    for pool in pools:
        pool._join(timeout=0 if kill else 10)
