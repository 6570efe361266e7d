"""Helpers of the CLI tests: the console script in a process of its own, S3 options as CLI flags, and
per-rank cases run by ``rank_pool.RankPool`` on every rank of a gloo group."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import fsdp_toy, process_context
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.tensor import DTensor

SCRIPT = os.path.join(os.path.dirname(sys.executable), "dcp-safetensors")
CLI = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "dcp_safetensors.cli"]


def run_cli(*args: object, rc: int = 0, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run the ``dcp-safetensors`` command; check its exit code and that no traceback was printed.

    It runs as the console script runs it, ``sys.exit(cli.main())``, in a process of its own
    with its stdout and stderr in files, forked from ``helpers.process_context``'s server: a
    new interpreter would import torch and the package again, 3-4 s of each call. ``fresh``
    runs the installed console script itself, in a new interpreter (what a user types,
    anything printed while importing included).
    """
    argv = list(map(str, args))
    if fresh:
        p = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=180)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            proc = process_context().Process(target=_console_script, args=(argv, out, err))
            proc.start()
            proc.join(180)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            with open(out) as f_out, open(err) as f_err:
                p = subprocess.CompletedProcess(["dcp-safetensors", *argv], proc.exitcode, f_out.read(), f_err.read())
    assert p.returncode == rc, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def _console_script(argv: list[str], stdout: str, stderr: str) -> None:
    """What the console script does, with file descriptors 1 and 2 on ``stdout`` and ``stderr``."""
    from dcp_safetensors.cli import main

    for fd, name in ((1, stdout), (2, stderr)):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["dcp-safetensors", *argv]
    sys.exit(main())


def no_dist(fn, *args, **kwargs):
    """``dcp.save``/``dcp.load`` in this one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, no_dist=True, **kwargs)


def s3_cli_args(s3) -> list[str]:
    """The ``s3`` fixture's storage options as ``--storage-option`` flags."""
    opts = s3.storage_options
    pairs = [
        f"key={opts['key']}",
        f"secret={opts['secret']}",
        f"client_kwargs.endpoint_url={opts['client_kwargs']['endpoint_url']}",
        "client_kwargs.region_name=us-east-1",
        "skip_instance_cache=true",
    ]
    return [arg for pair in pairs for arg in ("--storage-option", pair)]


NON_TENSORS = {
    "step": 7,
    "cfg": {"lr": 0.01, "warmup": 0, "decay": 0.0, "on": False, "name": "toy"},
    "betas": (0.9, 0.999),
}


def save_fsdp2_distcp(path: str) -> dict[str, torch.Tensor] | None:
    """A 2-rank FSDP2 model and its AdamW state after one step, saved by torch's FileSystemWriter as
    ``{"model": ..., "optim": ..., **NON_TENSORS}``. Rank 0 returns every tensor, full, by DCP key."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = fsdp_toy(seed=0, head=True)  # with a bf16 head: two dtypes in the checkpoint
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(dist.get_rank())
    model(torch.randint(0, 37, (4, 6), generator=g)).float().square().mean().backward()
    optim.step()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, **NON_TENSORS}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path))
    flat, _ = flatten_state_dict(state)
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return full if dist.get_rank() == 0 else None
