"""A save SIGKILLed at any point leaves the old checkpoint or the new one, never a mix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_safetensors import SafetensorsReader, SafetensorsWriter, read_checkpoint
from dcp_safetensors.commit import STAGING_PREFIX

WORKER = os.path.join(os.path.dirname(__file__), "crash_worker.py")


def run_save(path, value: float, phase: str = "none", kill_rank: int = -1) -> int:
    proc = subprocess.run(
        [sys.executable, WORKER, str(path), str(value), phase, str(kill_rank)],
        capture_output=True,
        timeout=120,
    )
    return proc.returncode


def save_in_process(path, value: float) -> None:
    state = {f"w{i}": torch.full((512, 1024), value + i) for i in range(6)}
    dcp.save(state, storage_writer=SafetensorsWriter(str(path), max_shard_size="3MB"), no_dist=True)


def loaded_values(path) -> set[float]:
    """The distinct values of every tensor offset by its index: one value means one snapshot."""
    target = {f"w{i}": torch.zeros(512, 1024) for i in range(6)}
    dcp.load(target, storage_reader=SafetensorsReader(str(path)), no_dist=True)
    return {float((t - i).unique().item()) if t.unique().numel() == 1 else float("nan") for i, t in enumerate(target.values())}


@pytest.mark.parametrize(
    ("phase", "kill_rank", "expected"),
    [
        ("mid-write", 1, "old"),
        ("mid-write", 0, "old"),
        ("before-commit", 0, "old"),
        ("mid-publish", 0, "new"),
        ("after-commit", 0, "new"),
    ],
)
def test_sigkill_leaves_old_or_new(tmp_path, phase, kill_rank, expected):
    save_in_process(tmp_path, 1.0)
    assert loaded_values(tmp_path) == {1.0}

    assert run_save(tmp_path, 2.0, phase, kill_rank) != 0, "the save was meant to be killed"
    assert loaded_values(tmp_path) == ({1.0} if expected == "old" else {2.0})
    ckpt = read_checkpoint(str(tmp_path))
    assert len(ckpt.headers) > 1

    # The next save cleans up whatever the killed one left.
    save_in_process(tmp_path, 3.0)
    assert loaded_values(tmp_path) == {3.0}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(STAGING_PREFIX)]
