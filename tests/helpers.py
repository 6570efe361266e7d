"""What the tests share: free ports.

Three kinds of process import this module, so it holds plain functions and
classes only (no pytest fixtures, nothing that starts a process group):

* the pytest process (test modules and ``conftest.py``);
* the ranks of a ``rank_pool.RankPool``, through the per-rank case modules
  (``cases.py``, ``cli_cases.py``, ``planner_cases.py``, ...);
* scripts the tests start as subprocesses (``crash_worker.py``,
  ``async_process_worker.py``, ``scale_cases.py`` under torchrun), which find it
  next to themselves.
"""

from __future__ import annotations

import socket

# --- ports ------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (all held until each is known, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One free port on 127.0.0.1 (a process group's MASTER_PORT, a server's listening port)."""
    return free_ports(1)[0]
