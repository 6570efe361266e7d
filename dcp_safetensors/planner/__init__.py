"""Save and load planners: key mapping, dtype on save and on load, meta tensors, fused experts.

``SafetensorsSavePlanner`` and ``SafetensorsLoadPlanner`` subclass DCP's
default planners and change only what the key and tensor semantics need; pass
them as ``dcp.save(..., planner=...)`` / ``dcp.load(..., planner=...)``.

Modules, each importing only those above it:

* :mod:`.state_dict`: what both planners check and change in a state dict
  (Partial and misplaced DTensors, meta tensors, tied keys, renaming)
* :mod:`.fused`: fused MoE expert tensors as the per-expert pieces a rank holds
* :mod:`.save`: :class:`SafetensorsSavePlanner`
* :mod:`.load`: :class:`SafetensorsLoadPlanner`, with the rank-0 broadcast

The public names are importable from here, as from the single module this was.

Example:
    >>> import tempfile, torch, torch.distributed.checkpoint as dcp
    >>> from dcp_safetensors import SafetensorsWriter, SafetensorsReader
    >>> from dcp_safetensors.mapping import KeyMapping
    >>> path = tempfile.mkdtemp()
    >>> planner = SafetensorsSavePlanner(mapping=KeyMapping(strip_prefix="model"), dtype=torch.bfloat16)
    >>> _ = dcp.save({"model.w": torch.ones(2), "model.ids": torch.arange(2)},
    ...              storage_writer=SafetensorsWriter(path), planner=planner)
    >>> from dcp_safetensors import read_checkpoint
    >>> sorted((k, v.dtype) for k, v in read_checkpoint(path).tensors.items())
    [('ids', 'I64'), ('w', 'BF16')]
"""

from dcp_safetensors.planner.load import LoadPlanData, SafetensorsLoadPlanner
from dcp_safetensors.planner.save import ALIASES_KEY, MetaResolver, SafetensorsSavePlanner
from dcp_safetensors.planner.state_dict import tied_keys

__all__ = ["SafetensorsSavePlanner", "SafetensorsLoadPlanner", "MetaResolver", "LoadPlanData", "tied_keys", "ALIASES_KEY"]
