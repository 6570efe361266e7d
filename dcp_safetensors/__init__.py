"""dcp_safetensors: torch.distributed.checkpoint straight to and from Hugging Face safetensors.

Every rank writes its own shard bytes into their final place in HF-compatible
``model-0000K-of-0000N.safetensors`` files plus ``model.safetensors.index.json``:
no gather to rank 0, no consolidation pass, a crash-safe commit.

Example:
    >>> import tempfile, torch, torch.distributed.checkpoint as dcp
    >>> from dcp_safetensors import SafetensorsWriter, SafetensorsReader, verify
    >>> path = tempfile.mkdtemp()
    >>> _ = dcp.save({"w": torch.ones(3)}, storage_writer=SafetensorsWriter(path))
    >>> sorted(verify(path).tensors)
    ['w']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcp_safetensors.api import AsyncSaver, async_save, load, save, save_submodule
    from dcp_safetensors.checkpoint import read_checkpoint
    from dcp_safetensors.errors import (
        CheckpointCorruptError,
        CheckpointNotFoundError,
        ConfigurationError,
        DcpSafetensorsError,
        LayoutError,
    )
    from dcp_safetensors.experts import ExpertSplit, FusedExperts
    from dcp_safetensors.mapping import KeyMapping
    from dcp_safetensors.planner import SafetensorsLoadPlanner, SafetensorsSavePlanner
    from dcp_safetensors.reader import SafetensorsReader
    from dcp_safetensors.verification import verify
    from dcp_safetensors.writer import SafetensorsWriter

_HOME = {
    "save": "api", "load": "api", "async_save": "api", "AsyncSaver": "api", "save_submodule": "api",
    "SafetensorsSavePlanner": "planner", "SafetensorsLoadPlanner": "planner",
    "KeyMapping": "mapping", "FusedExperts": "experts", "ExpertSplit": "experts",
    "SafetensorsWriter": "writer", "SafetensorsReader": "reader",
    "read_checkpoint": "checkpoint", "verify": "verification",
    "DcpSafetensorsError": "errors", "CheckpointCorruptError": "errors", "CheckpointNotFoundError": "errors",
    "ConfigurationError": "errors", "LayoutError": "errors",
}  # fmt: skip
"""The module of each public name: imported on first use, so ``dcp-safetensors --help``, ``inspect``
and ``verify`` start without torch (seconds, hundreds of MB), which only saving and loading need."""


__all__ = [
    "save",
    "load",
    "async_save",
    "AsyncSaver",
    "save_submodule",
    "SafetensorsSavePlanner",
    "SafetensorsLoadPlanner",
    "KeyMapping",
    "FusedExperts",
    "ExpertSplit",
    "SafetensorsWriter",
    "SafetensorsReader",
    "read_checkpoint",
    "verify",
    "DcpSafetensorsError",
    "CheckpointCorruptError",
    "CheckpointNotFoundError",
    "ConfigurationError",
    "LayoutError",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'dcp_safetensors' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dcp_safetensors.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


__version__ = "0.1.0"
