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
__version__ = "0.1.0"
