"""Processes for the concurrency tests: a writer loop, a reader loop, a writer that dies mid-publish.

Run in processes of their own (a real second process: locks, renames and open descriptors behave as
between two jobs). Results come back through a multiprocessing queue as plain dicts.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import torch

TENSORS = 24


def state(step: int, numel: int) -> dict[str, torch.Tensor]:
    """24 tensors, each filled with the step number: a load of one snapshot holds one number."""
    return {f"t{i:02d}": torch.full((numel,), float(step)) for i in range(TENSORS)}


def wait_for_go(go: str | None, role: str) -> None:
    """Say this process is ready (imports done), then wait for ``go``: the loops start together."""
    if go is None:
        return
    open(f"{go}.{role}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)


def writer_loop(path: str, first: int, steps: int, numel: int, options: dict[str, Any], out: Any,
                go: str | None = None) -> None:
    """Save steps ``first .. first + steps - 1`` to ``path``; report failures by type."""
    import dcp_safetensors

    wait_for_go(go, f"writer{first}")
    failures: list[str] = []
    saved: list[int] = []
    durations: list[float] = []
    for step in range(first, first + steps):
        started = time.perf_counter()
        try:
            dcp_safetensors.save(state(step, numel), path, **options)
            saved.append(step)
        except Exception as e:  # noqa: BLE001 - every failure is reported to the test
            failures.append(f"{type(e).__name__}: {e}")
        durations.append(time.perf_counter() - started)
    out.put({"saved": saved, "failures": failures, "durations": durations})


def reader_loop(path: str, numel: int, options: dict[str, Any], stop_file: str, out: Any, go: str | None = None) -> None:
    """Load ``path`` until ``stop_file`` exists; count consistent, refused and mixed loads."""
    import dcp_safetensors
    from dcp_safetensors.errors import DcpSafetensorsError

    wait_for_go(go, "reader")
    stats: dict[str, Any] = {"attempts": 0, "consistent": 0, "refused": {}, "mixed": [], "other": [], "steps": set(),
                             "refused_spans": []}
    refusing_since: float | None = None
    while not os.path.exists(stop_file):
        target = state(-1, numel)
        stats["attempts"] += 1
        started = time.perf_counter()
        try:
            dcp_safetensors.load(target, path, **options)
        except DcpSafetensorsError as e:
            name = type(e).__name__
            stats["refused"][name] = stats["refused"].get(name, 0) + 1
            refusing_since = refusing_since if refusing_since is not None else started
            continue
        except Exception as e:  # noqa: BLE001 - anything but our errors is a failure of the test
            stats["other"].append(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            continue
        if refusing_since is not None:
            stats["refused_spans"].append(started - refusing_since)
            refusing_since = None
        values = {float(v) for t in target.values() for v in t.aminmax()}
        if len(values) == 1:
            stats["consistent"] += 1
            stats["steps"].add(values.pop())
        else:
            stats["mixed"].append(sorted(values))
    stats["steps"] = sorted(stats["steps"])
    out.put(stats)


def die_while_publishing(path: str, numel: int, after_renames: int) -> None:
    """Save step 2 over ``path``, and die (SIGKILL-like ``os._exit``) after ``after_renames`` renames of
    the publish: the save is committed, half of its files are in place."""
    import dcp_safetensors
    from dcp_safetensors.storage.local import LocalStorage

    original = LocalStorage.replace
    count = {"n": 0}

    def replace(self: LocalStorage, src: str, dst: str) -> None:
        if ".dcp_safetensors-staging-" in src and "COMMIT" not in src:
            count["n"] += 1
            if count["n"] > after_renames:
                os._exit(17)
        original(self, src, dst)

    LocalStorage.replace = replace  # type: ignore[method-assign]
    dcp_safetensors.save(state(2, numel), path, max_shard_size=numel * 4)


def hold_a_save_open(path: str, ready_file: str, release_file: str) -> None:
    """Begin a save of ``path`` (staging created and claimed) and hold it until ``release_file`` exists."""
    from dcp_safetensors.storage.local import LocalStorage

    storage = LocalStorage(path)
    session = storage.begin_save("held", ["model.safetensors"])
    staging = session.staging  # before the ready file exists: the test goes on once it does
    with open(ready_file, "w") as f:
        f.write(staging)
    while not os.path.exists(release_file):
        time.sleep(0.01)
    storage.abort_save(session)


def overlapping_async_saves(root: str, same_dir: bool, count: int, options: dict[str, Any] | None = None) -> dict:
    """``count`` async saves in a row on every rank, no wait between them, each of a changed sharded state;
    then every future must complete and every checkpoint hold exactly the state at its call."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import dcp_safetensors

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(4 << 20, dtype=torch.float32).reshape(2048, 2048)  # 16 MiB, row-sharded
    live = {"w": distribute_tensor(full.clone(), mesh, [Shard(0)]), "b": torch.zeros(8)}
    started = time.perf_counter()
    futures, expected, paths = [], [], []
    with dcp_safetensors.AsyncSaver(max_pending=count) as saver:
        for i in range(count):
            path = os.path.join(root, "ckpt" if same_dir else f"step-{i}")
            futures.append(saver.save(live, path, **(options or {})))
            expected.append((live["w"].to_local().clone(), live["b"].clone()))
            paths.append(path)
            live["w"].to_local().add_(1.0)  # training goes on: the next call sees another state
            live["b"].add_(1.0)
        returned = time.perf_counter() - started
        errors = []
        for f in futures:
            try:
                f.result(timeout=120)
            except Exception as e:  # noqa: BLE001 - reported to the test
                errors.append(f"{type(e).__name__}: {e}")
    finished = time.perf_counter() - started
    matches = []
    check = paths[-1:] if same_dir else paths
    for path, (w, b) in zip(check, expected[-1:] if same_dir else expected):
        target = {"w": distribute_tensor(torch.zeros(2048, 2048), mesh, [Shard(0)]), "b": torch.zeros(8)}
        dcp_safetensors.load(target, path, **(options or {}))
        matches.append(bool(torch.equal(target["w"].to_local(), w) and torch.equal(target["b"], b)))
    return {"errors": errors, "matches": matches, "returned_s": returned, "finished_s": finished}


def die_before_publishing_on_s3(url: str, numel: int, options: dict[str, Any]) -> None:
    """Save step 2 to ``url`` and die once the commit record is PUT and the uploads are completed,
    before the index is published."""
    import dcp_safetensors
    from dcp_safetensors.storage.s3 import S3Storage

    def die(self: S3Storage, index: bytes, files: Any) -> None:
        os._exit(17)

    S3Storage.publish_index = die  # type: ignore[method-assign]
    dcp_safetensors.save(state(2, numel), url, max_shard_size=numel * 4, **options)
