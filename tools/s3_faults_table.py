"""Object-store faults with a user's default settings: how long until every rank knows, what it is told, what is left.

Out of CI (minutes: a SeaweedFS server per fault, and a 90 s SIGSTOP). For each fault, a fresh
SeaweedFS server (``tests/conftest.py``'s ``SeaweedS3(restartable=True)``: the ``weed`` binary of
the test extra, behind a proxy that fires the fault at a chosen request) and 2 gloo ranks
(``torch.multiprocessing`` spawn, kept for the whole run) that:

1. save an "old" checkpoint: an FSDP2-like state of fp32 tensors, ``Shard(0)`` DTensors over the
   2 ranks, ``--mib`` in all (default 256 MiB, 268 MB), with ``SafetensorsWriter`` and
   ``dcp.save``;
2. save a new state (or load the old one) while the fault strikes;
3. after a restart (or SIGCONT), save a third state.

Storage options are what a user passes: key, secret, endpoint, region. Nothing else: s3fs's
5 s connect and 15 s read timeouts, the package's one retry policy (botocore's and s3fs's own retries off), its endpoint breaker
(10 s). Faults:

* ``planning``: killed at the save's first request (it plans, then asks the store first);
* ``parts``: killed at the first ``UploadPart``;
* ``before-record``: killed as the commit record's PUT arrives (before the server has it);
* ``after-record``: killed at the first request after the record's PUT was answered;
* ``load``: killed at the first read of tensor bytes of a load of the old checkpoint;
* ``sigstop``: SIGSTOP at the first ``UploadPart``, SIGCONT ``--stop-seconds`` (90) later;
* ``missing-bucket``: the save names a bucket the server does not have.

Prints a Markdown table: per rank, seconds from the fault to the error (or to the end of a
call that succeeded); the error type and the first 150 characters of its message; whether
the old checkpoint is intact afterwards (every object's bytes; after ``after-record``,
whether a load gets the new save instead, rolled forward from its record); and what is
left (open multipart uploads, staging keys) after the next save.

    .venv/bin/python tools/s3_faults_table.py [--mib 256] [--stop-seconds 90] [--only parts,load] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from email.message import Message
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

OLD, NEW, NEXT = 1, 2, 3  # seeds of the checkpoint there before, of the call the fault hits, of the save after
ROWS, COLS = 2048, 1024  # 8 MiB fp32 tensors
PREFIX = "c"  # short: the first 150 characters of a message name the object after it
WORLD = 2


# --- ranks ------------------------------------------------------------------------------------


def rank_main(rank: int, world: int, port: int, tasks: Any, results: Any) -> None:
    """One rank: runs ``(op, url, shapes, seed, options)`` tasks (op "save" or "load") until None."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    import s3_faults_cases as cases

    while (task := tasks.get()) is not None:
        op, url, shapes, seed, options = task
        call = cases.try_save if op == "save" else cases.try_load
        results.put((rank, tuple(call(url, shapes, seed, options))))
    dist.destroy_process_group()


class Ranks:
    """``WORLD`` spawned ranks in one gloo group, kept across faults (as a training job's are)."""

    def __init__(self) -> None:
        import torch.multiprocessing as mp
        from helpers import free_port

        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(WORLD)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [ctx.Process(target=rank_main, args=(r, WORLD, port, self._tasks[r], self._results), daemon=True)
                       for r in range(WORLD)]
        for p in self._procs:
            p.start()

    def run(self, op: str, url: str, shapes: list[tuple[int, int]], seed: int, options: dict,
            timeout: float) -> list[tuple]:
        """Every rank's ``Outcome`` as a tuple ``(started, ended, failures, value)``, in rank order."""
        for q in self._tasks:
            q.put((op, url, shapes, seed, options))
        out: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(out) < WORLD:
            try:
                rank, outcome = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() < deadline and all(p.is_alive() for p in self._procs):
                    continue
                raise TimeoutError(f"{op}: ranks {sorted(set(range(WORLD)) - set(out))} gave no answer "
                                   f"within {timeout:.0f} s") from None
            out[rank] = outcome
        return [out[r] for r in range(WORLD)]

    def close(self) -> None:
        for p, q in zip(self._procs, self._tasks, strict=True):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


# --- faults -----------------------------------------------------------------------------------


def _first_request(op: str, path: str, headers: Message) -> bool:
    return True


def _first_part(op: str, path: str, headers: Message) -> bool:
    return op == "UploadPart"


def _record(op: str, path: str, headers: Message) -> bool:
    from dcp_safetensors.names import COMMIT_RECORD

    return op == "PutObject" and path.split("?")[0].endswith(COMMIT_RECORD)


def _after_record() -> Callable[[str, str, Message], bool]:
    seen: list[bool] = []

    def when(op: str, path: str, headers: Message) -> bool:
        if seen:
            return True
        if _record(op, path, headers):
            seen.append(True)  # the record goes through; the next request meets a dead server
        return False

    return when


def _tensor_bytes(op: str, path: str, headers: Message) -> bool:
    # A header is read from byte 0; a tensor's bytes start past it.
    return op == "GetObject" and path.split("?")[0].endswith(".safetensors") and not headers.get("Range", "").startswith("bytes=0-")


@dataclass(frozen=True)
class Fault:
    name: str
    title: str
    op: str  # the call the fault hits: "save" or "load"
    when: Callable[[], Callable[[str, str, Message], bool]] | None  # a fresh predicate per run; None: from the start
    action: str  # "kill", "stop", or "" (the fault is in the call itself)


FAULTS = [
    Fault("planning", "killed at the save's first request (planning)", "save", lambda: _first_request, "kill"),
    Fault("parts", "killed while parts upload (first UploadPart)", "save", lambda: _first_part, "kill"),
    Fault("before-record", "killed mid-commit, before the record (its PUT arriving)", "save", lambda: _record, "kill"),
    Fault("after-record", "killed mid-commit, after the record (next request)", "save", _after_record, "kill"),
    Fault("load", "killed mid-load (first read of tensor bytes)", "load", lambda: _tensor_bytes, "kill"),
    Fault("sigstop", "SIGSTOP {stop:.0f} s during a save (first UploadPart)", "save", lambda: _first_part, "stop"),
    Fault("missing-bucket", "missing bucket", "save", None, ""),
]


# --- one fault --------------------------------------------------------------------------------


def objects(server: Any, prefix: str) -> dict[str, str]:
    """Every object under ``prefix``: its SHA-256."""
    return {key: hashlib.sha256(server.get(prefix, key)).hexdigest() for key in server.keys(prefix)}


def leftovers(server: Any, prefix: str) -> list[str]:
    from dcp_safetensors.names import STAGING_PREFIX

    uploads = [f"open upload {u['Key'][len(prefix) + 1:]}" for u in server.open_uploads(prefix)]
    staging = sorted({key.split("/")[0] for key in server.keys(prefix) if key.startswith(STAGING_PREFIX)})
    return uploads + staging


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _errors(outcomes: list[tuple]) -> str:
    """The failing ranks' errors: the first real one (not another rank's news of it), its type and 150 characters."""
    failures: dict[int, tuple[str, str]] = {}
    for _, _, found, _ in outcomes:
        failures.update(found or {})
    if not failures:
        return "none: the call succeeded"
    ranks = sorted(failures)
    first = next((r for r in ranks if failures[r][0] != "RankFailedError"), ranks[0])
    kinds = ", ".join(f"r{r} {failures[r][0]}" for r in ranks)
    name, message = failures[first]
    return f"{kinds}; r{first}: `{name}`: {message[:150]}"


def run_fault(fault: Fault, ranks: Ranks, shapes: list[tuple[int, int]], stop_seconds: float, log: Callable[[str], None]) -> dict:
    from conftest import SeaweedS3
    from s3_proxy import Trigger

    root = tempfile.mkdtemp(prefix="s3-faults-")
    server = SeaweedS3(root, restartable=True)
    assert server.front is not None
    row = {"fault": fault.title.format(stop=stop_seconds)}
    try:
        url = server.url(PREFIX)
        options = {"key": server.key, "secret": server.secret,
                   "client_kwargs": {"endpoint_url": server.endpoint, "region_name": "us-east-1"}}
        old = ranks.run("save", url, shapes, OLD, options, timeout=600)
        assert all(o[2] is None for o in old), old
        log(f"{fault.name}: old checkpoint saved in {max(o[1] - o[0] for o in old):.1f} s")
        before = objects(server, PREFIX)
        trigger = None
        resumed = threading.Event()
        if fault.when is not None:
            action = server.kill if fault.action == "kill" else server.stop
            trigger = server.front.faults.on_request = Trigger(fault.when(), action)
        if fault.action == "stop":
            def resume() -> None:  # SIGCONT stop_seconds after the stop
                while trigger.at is None and not resumed.is_set():
                    time.sleep(0.05)
                if trigger.at is not None:
                    resumed.wait(max(0.0, trigger.at + stop_seconds - time.monotonic()))
                server.cont()
                resumed.set()
            threading.Thread(target=resume, daemon=True).start()
        target = server.url(PREFIX, bucket="no-such-bucket") if fault.name == "missing-bucket" else url
        seed = NEW if fault.op == "save" else OLD
        try:
            outcomes = ranks.run(fault.op, target, shapes, seed, options, timeout=stop_seconds + 300)
        finally:
            resumed.set()
        start_of = (lambda o: trigger.at) if trigger is not None else (lambda o: o[0])
        if trigger is not None and trigger.at is None:
            row["times"] = "the fault never fired"
        else:
            row["times"] = ", ".join(f"r{r} {o[1] - start_of(o):.1f}{'' if o[2] else ' (succeeded)'}"
                                     for r, o in enumerate(outcomes))
        row["error"] = _errors(outcomes)
        log(f"{fault.name}: {row['times']}; {row['error'][:300]}")
        if fault.action == "kill":
            log(f"{fault.name}: restarted in {server.restart():.1f} s")
        saved = fault.op == "save" and not any(o[2] for o in outcomes)
        if fault.name == "after-record" or saved:
            # Replaced by the new save: committed (its record rolls forward), or finished despite the fault.
            loaded = ranks.run("load", url, shapes, NEW, options, timeout=300)
            new = all(o[2] is None and o[3] for o in loaded)
            how = "the save finished" if saved else "committed: rolled forward from its record"
            row["intact"] = (f"replaced ({how}): a load gets the new tensors ({max(o[1] - o[0] for o in loaded):.1f} s)"
                             if new else f"NO: the load after it: {_errors(loaded)}")
        else:
            row["intact"] = "yes (every object's bytes)" if objects(server, PREFIX) == before else "NO: objects changed"
        after = ranks.run("save", url, shapes, NEXT, options, timeout=600)
        if any(o[2] for o in after):
            row["leftovers"] = f"the next save failed: {_errors(after)}"
        else:
            left = leftovers(server, PREFIX)
            row["leftovers"] = "none" if not left else "; ".join(left)
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)
    return row


def table(rows: list[dict], mib: int, stop_seconds: float) -> str:
    lines = [
        f"{WORLD} ranks, {mib} MiB fp32 as Shard(0) DTensors ({mib * 2**20 / 1e6:.0f} MB), SeaweedFS "
        "on 127.0.0.1, storage options: key, secret, endpoint_url, region only (s3fs's 5 s connect and 15 s "
        "read timeouts, the endpoint breaker's 10 s window).",
        "",
        "| fault | seconds from the fault to the error, per rank | error (failing ranks; type and first 150 characters) "
        "| old checkpoint intact | left over after the next save |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {_cell(r['fault'])} | {_cell(r['times'])} | {_cell(r['error'])} | {_cell(r['intact'])} "
                     f"| {_cell(r['leftovers'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the saved state (8 MiB tensors)")
    parser.add_argument("--stop-seconds", type=float, default=90.0, help="how long the sigstop fault stops the server")
    parser.add_argument("--only", default="", help=f"comma-separated faults, of: {', '.join(f.name for f in FAULTS)}")
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args()
    chosen = [f for f in FAULTS if not args.only or f.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {f.name for f in FAULTS}
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    shapes = [(ROWS, COLS)] * max(1, args.mib * 2**20 // (ROWS * COLS * 4))

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    ranks = Ranks()
    rows = []
    try:
        for fault in chosen:
            try:
                rows.append(run_fault(fault, ranks, shapes, args.stop_seconds, log))
            except Exception as e:  # noqa: BLE001 - the ranks may be stuck: new ones for the next fault
                log(f"{fault.name}: {type(e).__name__}: {e}")
                rows.append({"fault": fault.title.format(stop=args.stop_seconds), "times": "-", "error": "-",
                             "intact": "-", "leftovers": f"tool error: {type(e).__name__}: {e}"})
                ranks.close()
                ranks = Ranks()
    finally:
        ranks.close()
    out = table(rows, args.mib, args.stop_seconds)
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
