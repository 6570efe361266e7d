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
