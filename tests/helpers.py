"""What the tests share: free ports, the toy models, FSDP2 wrapping, and the docs' code blocks.

Three kinds of process import this module, so it holds plain functions and
classes only (no pytest fixtures, nothing that starts a process group):

* the pytest process (test modules and ``conftest.py``);
* the ranks of a ``rank_pool.RankPool``, through the per-rank case modules
  (``cases.py``, ``cli_cases.py``, ``planner_cases.py``, ...);
* scripts the tests start as subprocesses (``crash_worker.py``,
  ``async_process_worker.py``, ``scale_cases.py`` under torchrun), which find it
  next to themselves.

The models take their values from torch's global RNG: seed it with
``torch.manual_seed(seed)`` right before building one, on every rank and in the
test process alike, and all of them hold the same parameters. None of them is
meant to learn anything; each has the structure a test needs (a per-layer
``ModuleList``, a tied weight, fused experts, a bf16 head, pipeline stages).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


# --- the docs' code blocks ---------------------------------------------------------------

_FENCE = re.compile(r"^```([^`\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
_NOT_RUN = re.compile(r"<!--\s*not run\b:?(.*?)-->", re.S)


@dataclass(frozen=True)
class FencedBlock:
    """A fenced code block of a Markdown file (``tests/test_readme.py``, ``tests/test_doc_examples.py``)."""

    line: int
    """The line of the block's first line of code (1-based)."""
    info: str
    """The fence's info string: ``python``, ``sh``, ``json``, or ``""``."""
    code: str
    not_run: str | None
    """The reason of a ``<!-- not run: reason -->`` comment on the line right before the fence
    (``""`` if it gives none); ``None`` without one."""


def fenced_blocks(path: str) -> list[FencedBlock]:
    """Every fenced block of a Markdown file, in order (a closing fence is ``` alone on its line)."""
    with open(path) as f:
        text = f.read()
    blocks = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        note = _NOT_RUN.search(before)
        blocks.append(FencedBlock(line=text[: m.start()].count("\n") + 2, info=m.group(1).strip(), code=m.group(2),
                                  not_run=note.group(1).strip() if note else None))
    return blocks


def python_blocks(path: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ``python`` block of a Markdown file."""
    return [(b.line, b.code) for b in fenced_blocks(path) if b.info == "python"]


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


# --- processes ----------------------------------------------------------------------------

# What the fork server imports once, so that no process the tests start imports it again.
# The per-rank case modules come along (they import torch and the package at their top);
# a name that cannot be imported is skipped by the server.
PRELOAD = [
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "dcp_safetensors",
    "dcp_safetensors.storage.s3",
    "s3fs",
    "pytest",
    "helpers",
    "rank_pool",
    "cases",
    "concurrency_cases",
    "storage_contract_cases",
    "s3_faults_cases",
]


def process_context() -> multiprocessing.context.ForkServerContext:
    """The ``multiprocessing`` context of every process the test process starts (rank pools,
    writers and readers of the concurrency and storage tests, crash runs).

    A fork server: one process started on first use, which imports torch and the package
    (:data:`PRELOAD`), then forks each new process from that state. A spawned process is a
    fresh interpreter that imports them itself, 3-4 s of CPU each on two cores; a fork of the
    server is ready in a fraction of a second. The server holds no threads, sockets or process
    group of the test process (unlike a plain fork of it), and each child is a process of
    its own (its pid, its descriptors, its locks) as a spawned one is.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


# --- FSDP2 ------------------------------------------------------------------------------


def world_mesh():
    """A 1-D CPU device mesh of every rank of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def fully_shard_units(model: M, units: Iterable[nn.Module], mesh) -> M:
    """FSDP2 as training scripts apply it: ``fully_shard`` each of ``units`` (the layers), then
    ``model`` itself (the root, which takes every parameter left over). Returns ``model``.

    ``mesh`` is passed to every call: usually :func:`world_mesh`; ``None`` leaves the choice
    to ``fully_shard`` (a mesh of all ranks on the accelerator if there is one, else CPU).
    """
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_layers(model: M) -> M:
    """A transformers ``*ForCausalLM`` with FSDP2 on :func:`world_mesh` over each decoder layer
    (``model.model.layers``), then the whole."""
    return fully_shard_units(model, model.model.layers, world_mesh())


# --- toy models ---------------------------------------------------------------------------


class ToyModel(nn.Module):
    """Embedding, two linears in a ``ModuleList`` (FSDP2's units), a LayerNorm, an int64 buffer.

    ``head=True`` adds a bf16 ``head`` after the norm (a model of two dtypes; FSDP2 needs it
    in a unit of its own). Both variants draw the same values for the shared parameters.
    """

    def __init__(self, head: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(37, 16)
        self.layers = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 5)])
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 11, bias=False).to(torch.bfloat16) if head else None
        self.register_buffer("positions", torch.arange(7, dtype=torch.int64))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        h = self.norm(h)
        return h if self.head is None else self.head(h.to(torch.bfloat16))


def fsdp_toy(seed: int, head: bool = False) -> ToyModel:
    """A seeded :class:`ToyModel` under FSDP2 on :func:`world_mesh`: its layers (and head), then the root."""
    torch.manual_seed(seed)
    model = ToyModel(head=head)
    # The bf16 head in a unit of its own: the parameters of one FSDP2 unit share a dtype.
    units = [*model.layers, model.head] if head else model.layers
    return fully_shard_units(model, units, world_mesh())


class WithDraft(nn.Module):
    """A base model with two siblings sharing a prefix: ``draft`` and ``draft_head``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ToyModel()
        self.draft = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
        self.draft_head = nn.Linear(16, 4)


class WithExperts(nn.Module):
    """A tied embedding/head, fused expert parameters (``experts.gate_up_proj``/``down_proj``)
    and a ``draft`` submodule: every key or tensor a save planner may rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 6, 8))
        self.experts.down_proj = nn.Parameter(torch.randn(4, 8, 3))
        self.draft = nn.Linear(8, 8)


class Pipeline(nn.Module):
    """The whole model of a two-stage pipeline (``hardening_cases.STAGES`` splits it): stage 0
    holds embed + layers 0-1, stage 1 layers 2-3, norm, lm_head (bf16) and mtp; buffers in both."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.embed.register_buffer("positions", torch.arange(9))
        self.layers = nn.ModuleDict({str(i): nn.Linear(16, 16) for i in range(4)})
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 64, bias=False).to(torch.bfloat16)
        self.lm_head.register_buffer("scale", torch.full((3,), 0.5))
        self.mtp = nn.ModuleDict({"0": nn.Linear(32, 16)})


def small_mlp(width: int = 16) -> nn.Sequential:
    """``Linear(width, 32)``, ReLU, ``Linear(32, 8)`` and an int64 buffer ``steps``; a new ``width``
    changes the first layer's shape (a state dict whose layout must be planned again)."""
    model = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 8))
    model.register_buffer("steps", torch.arange(5))
    return model


def tp_mlp() -> nn.Sequential:
    """``Linear(12, 20)``, ReLU, ``Linear(20, 12)``: a colwise then a rowwise tensor-parallel pair."""
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12))
