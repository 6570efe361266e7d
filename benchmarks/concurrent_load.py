"""Loads during overwrites: a reader loop against a writer loop on one checkpoint directory.

A writer process saves 24 tensors, each filled with its step number, into one directory
``--saves`` times (``max_shard_size`` = one tensor: 24 files). A reader process loads that
directory in a loop with ``dcp_safetensors.load``; a poller thread in it watches whether the
index exists (what transformers or vLLM, which know nothing of staging, would find). Both
processes start their loops together, after their imports.

Reported: loads attempted, consistent (one step), refused (our errors, by type), mixed
(several steps in one state dict: must be 0), and the windows without an index.

    python benchmarks/concurrent_load.py --dir /dev/shm/x --saves 40
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from typing import Any

TENSORS = 24


def _state(step: int, numel: int) -> dict[str, Any]:
    import torch

    return {f"t{i:02d}": torch.full((numel,), float(step)) for i in range(TENSORS)}


def _wait(go: str, role: str) -> None:
    open(f"{go}.{role}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.001)


def writer(path: str, saves: int, numel: int, go: str, out: Any) -> None:
    import dcp_safetensors

    _wait(go, "writer")
    times, failures = [], []
    for step in range(1, saves + 1):
        started = time.perf_counter()
        try:
            dcp_safetensors.save(_state(step, numel), path, max_shard_size=numel * 4)
        except Exception as e:  # noqa: BLE001 - reported
            failures.append(f"{type(e).__name__}: {e}")
        times.append(time.perf_counter() - started)
    out.put({"role": "writer", "times": times, "failures": failures})


def reader(path: str, numel: int, go: str, stop: str, out: Any) -> None:
    import dcp_safetensors
    from dcp_safetensors.errors import DcpSafetensorsError

    index = os.path.join(path, "model.safetensors.index.json")
    gaps: list[float] = []

    def poll() -> None:
        missing_since = None
        while not os.path.exists(stop):
            present = os.path.exists(index)
            now = time.perf_counter()
            if not present and missing_since is None:
                missing_since = now
            elif present and missing_since is not None:
                gaps.append(now - missing_since)
                missing_since = None
            time.sleep(0.0005)  # a busy loop would starve the loads of the GIL

    _wait(go, "reader")
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stats: dict[str, Any] = {"role": "reader", "attempts": 0, "consistent": 0, "refused": {}, "mixed": 0,
                             "other": [], "load_s": []}
    while not os.path.exists(stop):
        target = _state(-1, numel)
        stats["attempts"] += 1
        started = time.perf_counter()
        try:
            dcp_safetensors.load(target, path)
        except DcpSafetensorsError as e:
            stats["refused"][type(e).__name__] = stats["refused"].get(type(e).__name__, 0) + 1
            continue
        except Exception as e:  # noqa: BLE001 - reported
            stats["other"].append(f"{type(e).__name__}: {e}")
            continue
        stats["load_s"].append(time.perf_counter() - started)
        steps = {float(v) for t in target.values() for v in t.aminmax()}
        stats["consistent" if len(steps) == 1 else "mixed"] += 1
    poller.join()
    stats["index_gaps_ms"] = [g * 1e3 for g in gaps]
    out.put(stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="parent directory (default: a temporary one)")
    parser.add_argument("--saves", type=int, default=40)
    parser.add_argument("--tensor-mib", type=float, default=1.0)
    args = parser.parse_args()
    import dcp_safetensors

    root = tempfile.mkdtemp(dir=args.dir)
    path = os.path.join(root, "ckpt")
    numel = int(args.tensor_mib * (1 << 20)) // 4
    dcp_safetensors.save(_state(0, numel), path, max_shard_size=numel * 4)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go, stop = os.path.join(root, "go"), os.path.join(root, "stop")
    procs = [ctx.Process(target=reader, args=(path, numel, go, stop, out)),
             ctx.Process(target=writer, args=(path, args.saves, numel, go, out))]
    for p in procs:
        p.start()
    while not (os.path.exists(go + ".reader") and os.path.exists(go + ".writer")):
        time.sleep(0.01)
    open(go, "w").close()
    first = out.get()
    open(stop, "w").close()
    second = out.get()
    for p in procs:
        p.join()
    w, r = (first, second) if first["role"] == "writer" else (second, first)
    shutil.rmtree(root)
    loads = sorted(r["load_s"])
    print(f"writer: {len(w['times'])} saves of {TENSORS} files x {args.tensor_mib} MiB, "
          f"median {sorted(w['times'])[len(w['times']) // 2] * 1e3:.0f} ms, failures {w['failures']}")
    print(f"reader: {r['attempts']} loads attempted: {r['consistent']} consistent, refused {r['refused'] or 0}, "
          f"mixed {r['mixed']}, other {r['other'][:2]}; median load {loads[len(loads) // 2] * 1e3:.0f} ms, max {loads[-1] * 1e3:.0f} ms")
    gaps = r["index_gaps_ms"]
    print(f"index absent (what tools without our reader see): {len(gaps)} windows, "
          f"median {sorted(gaps)[len(gaps) // 2] if gaps else 0:.1f} ms, max {max(gaps, default=0):.1f} ms; "
          "our reader: no window (it reads a publish in flight through its record)")


if __name__ == "__main__":
    main()
