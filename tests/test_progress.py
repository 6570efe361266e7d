"""The progress watchdog (dcp_safetensors/progress.py): a stalled save or load says so; a long one reports its rate."""

from __future__ import annotations

import logging
import time

import pytest

from dcp_safetensors.progress import Progress


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "dcp_safetensors"]


def test_a_stall_is_warned_with_the_bytes_done_and_what_the_rank_waits_on_then_its_end(caplog):
    """No byte for ``stall_warning`` seconds: a WARNING naming the operation, rank, bytes done and the phase;
    again after as long once more; once bytes flow, an INFO line says for how long they had not."""
    caplog.set_level(logging.DEBUG, logger="dcp_safetensors")
    with Progress("save of s3://b/step-1", 3 << 20, rank=1, stall_warning=0.4, report_every=None) as progress:
        progress.add(1 << 20)
        progress.doing = "exchanging bytes with the other ranks"
        time.sleep(1.1)
        warnings = messages(caplog, logging.WARNING)
        progress.add(2 << 20)
        time.sleep(0.3)  # the watcher sees the bytes (it looks every 0.1 s), not yet another stall
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("save of s3://b/step-1 (rank 1): 1.0 of 3.1 MB (33%), no progress for 0 s while "
                                  "exchanging bytes with the other ranks"), warnings[0]
    assert "read_timeout" in warnings[0] and "still waiting" in warnings[0]
    assert "no progress for 1 s" in warnings[1]
    resumed = [m for m in messages(caplog, logging.INFO) if "progressing again" in m]
    assert resumed == ["save of s3://b/step-1 (rank 1): 3.1 of 3.1 MB (100%): progressing again after 1 s without"]
    assert len(messages(caplog, logging.WARNING)) == 2  # none after the bytes came


def test_steady_progress_is_never_warned_and_a_long_operation_reports_its_rate_on_rank_0_only(caplog):
    caplog.set_level(logging.DEBUG, logger="dcp_safetensors")
    for rank in (0, 1):
        with Progress("load of /ckpt", 100 << 20, rank=rank, stall_warning=0.5, report_every=0.3) as progress:
            for _ in range(8):
                progress.add(1 << 20)
                time.sleep(0.1)
    assert messages(caplog, logging.WARNING) == []
    info = [m for m in messages(caplog, logging.INFO) if "MB/s so far" in m]
    debug = [m for m in messages(caplog, logging.DEBUG) if "MB/s so far" in m]
    assert info and all(m.startswith("load of /ckpt (rank 0): ") for m in info), info
    assert debug and all(m.startswith("load of /ckpt (rank 1): ") for m in debug), debug


def test_no_thread_without_anything_to_watch_and_stop_is_idempotent():
    progress = Progress("save of /x", 0, rank=0, stall_warning=None, report_every=None)
    progress.start()
    assert progress._thread is None
    progress.add(5)
    progress.stop()
    progress.stop()
    assert progress.done == 5


def test_the_user_guide_shows_the_warning_as_it_is_logged(caplog):
    """docs/user-guide.md quotes a stall warning: it must be the text the watchdog logs (numbers aside)."""
    import os
    import re

    caplog.set_level(logging.WARNING, logger="dcp_safetensors")
    with Progress("save of s3://ckpt/run/step-1000", 3 << 20, rank=3, stall_warning=0.2, report_every=None) as p:
        p.add(1 << 20)
        time.sleep(0.35)
    logged = messages(caplog, logging.WARNING)[0]
    guide = open(os.path.join(os.path.dirname(__file__), "..", "docs", "user-guide.md")).read()
    quoted = next(line for line in guide.splitlines() if line.startswith("WARNING save of"))

    def numbers_out(text: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "N", text)

    assert numbers_out(quoted) == "WARNING " + numbers_out(logged)
