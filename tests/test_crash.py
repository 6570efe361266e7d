"""A save SIGKILLed at any point leaves the old checkpoint or the new one, never a mix.

The crash matrix: one rank killed in each phase (planning, mid-write, written
but not committed, during the commit, after it) x world sizes 1, 2 and 4 x
local and S3 (moto). ``make test`` runs every phase on 2 local ranks and the
two S3 phases with the most to undo (mid-write, mid-publish); the whole
matrix (30 runs)::

    DCP_SAFETENSORS_CRASH_MATRIX=1 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/test_crash.py

(also ``make crash-matrix``). Each run prints its outcome.
"""

from __future__ import annotations

import os

import crash_worker
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import process_context

from dcp_safetensors import SafetensorsReader, SafetensorsWriter, read_checkpoint
from dcp_safetensors.commit import STAGING_PREFIX

FULL = os.environ.get("DCP_SAFETENSORS_CRASH_MATRIX") == "1"

# phase -> what the path holds after the kill
PHASES = {"planning": "old", "mid-write": "old", "before-commit": "old", "mid-publish": "new", "after-commit": "new"}
CASES = [
    (backend, world, phase)
    for backend in ("local", "s3")
    for world in (1, 2, 4)
    for phase in PHASES
    if FULL or (world == 2 and (backend == "local" or phase in ("mid-write", "mid-publish")))
]


def run_save(path, value: float, phase: str, kill_rank: int, options: dict | None, world: int, log) -> int:
    """``crash_worker.run`` in a process of its own (its ranks forked from it); its exit code."""
    proc = process_context().Process(
        target=crash_worker.run, args=(str(path), value, phase, kill_rank, options or {}, world, str(log))
    )
    proc.start()
    proc.join(240)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"the crash run did not end within 240 s:\n{log.read_text()[-3000:]}")
    return proc.exitcode


def save_in_process(path, value: float, options: dict | None) -> None:
    state = {f"w{i}": torch.full((512, 1024), value + i) for i in range(6)}
    writer = SafetensorsWriter(str(path), max_shard_size="3MB", storage_options=options)
    dcp.save(state, storage_writer=writer, no_dist=True)


def loaded_values(path, options: dict | None) -> set[float]:
    """The distinct values of every tensor offset by its index: one value means one snapshot."""
    target = {f"w{i}": torch.zeros(512, 1024) for i in range(6)}
    dcp.load(target, storage_reader=SafetensorsReader(str(path), storage_options=options), no_dist=True)
    bounds = [t.aminmax() for t in target.values()]  # one value: min == max (unique() sorts, 20x slower)
    return {float(lo) - i if lo == hi else float("nan") for i, (lo, hi) in enumerate(bounds)}


@pytest.mark.parametrize(("backend", "world", "phase"), CASES, ids=[f"{b}-{w}ranks-{p}" for b, w, p in CASES])
def test_sigkill_leaves_old_or_new(tmp_path, request, backend, world, phase):
    if backend == "s3":
        s3 = request.getfixturevalue("s3")
        path, options = s3.url(s3.prefix), s3.storage_options
    else:
        path, options = tmp_path / "ckpt", None
    save_in_process(path, 1.0, options)
    assert loaded_values(path, options) == {1.0}

    # mid-write: the last rank's pwrite on POSIX; on S3 the coordinator's first UploadPart (small
    # files are whole parts, and the layout may give every part to rank 0).
    kill_rank = world - 1 if phase == "mid-write" and backend == "local" else 0
    log = tmp_path / "crash_worker.log"
    assert run_save(path, 2.0, phase, kill_rank, options, world, log) != 0, "the save was meant to be killed"
    outcome = loaded_values(path, options)
    print(f"{backend} {world} ranks, rank {kill_rank} killed {phase}: loads {'old' if outcome == {1.0} else 'new' if outcome == {2.0} else outcome}")
    assert outcome == ({1.0} if PHASES[phase] == "old" else {2.0})
    assert len(read_checkpoint(str(path), storage_options=options).headers) > 1

    # The next save cleans up whatever the killed one left.
    save_in_process(path, 3.0, options)
    assert loaded_values(path, options) == {3.0}
    if backend == "s3":
        assert not s3.open_uploads(s3.prefix)
        assert not [k for k in s3.keys(s3.prefix) if k.startswith(STAGING_PREFIX)]
    else:
        assert not [p for p in os.listdir(path) if p.startswith(STAGING_PREFIX)]
