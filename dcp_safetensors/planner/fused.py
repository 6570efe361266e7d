"""Fused MoE expert tensors planned as the per-expert pieces a rank holds.

:func:`match_fused` finds the tensors a :class:`~dcp_safetensors.experts.FusedExperts`
rule matches, :func:`local_pieces` cuts this rank's shard of one into
per-expert views, and :class:`FusedSource` presents those pieces to DCP's
save planning as write items. Both planners key the views by :data:`PieceKey`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import _create_chunk_list
from torch.distributed.tensor import DTensor

from dcp_safetensors.errors import ConfigurationError
from dcp_safetensors.experts import ExpertPiece, FusedExperts, expert_pieces

__all__ = ["PieceKey", "match_fused", "local_pieces", "FusedSource"]

logger = logging.getLogger("dcp_safetensors.planner")  # the planners' logger

PieceKey = tuple[str, tuple[int, ...]]
"""``(checkpoint key, offsets)`` of one piece: where a planner finds its view from DCP's ``MetadataIndex``."""


def match_fused(
    rules: tuple[FusedExperts, ...], state_dict: dict[str, Any], strict: bool
) -> dict[str, tuple[FusedExperts, str]]:
    """``{key: (rule, prefix)}`` for every tensor a fused-expert rule matches.

    A rule that matches no key is likely a typo or the wrong model family: a
    warning, or with ``strict`` an error.
    """
    found = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        for rule in rules:
            prefix = rule.match(key)
            if prefix is not None:
                found[key] = (rule, prefix)
                break
    unused = [r.fused for r in rules if all(rule is not r for rule, _ in found.values())]
    if unused:
        message = f"hf_experts: no key matches {', '.join(repr(u) for u in unused)}"
        if strict:
            raise ConfigurationError(f"{message}; the state dict has {len(state_dict)} keys, e.g. {next(iter(state_dict), None)!r}")
        logger.warning("%s", message)
    return found


def local_pieces(key: str, rule: FusedExperts, prefix: str, tensor: torch.Tensor) -> list[tuple[ExpertPiece, torch.Tensor]]:
    """The per-expert pieces of ``tensor`` this rank holds, each with a view of its local data."""
    if isinstance(tensor, DTensor):
        if tensor.device_mesh.get_coordinate() is None:  # not on this rank's (pipeline stage's) mesh
            return []
        local = tensor.to_local()
    else:
        local = tensor
    chunks = _create_chunk_list(tensor)
    if len(chunks) != 1:
        raise ConfigurationError(f"fused expert tensor {key!r}: {len(chunks)} local chunks; expected one (a DTensor or a tensor)")
    (chunk,) = chunks
    out = []
    for piece in expert_pieces(rule, prefix, tuple(tensor.shape), tuple(chunk.offsets), tuple(chunk.sizes)):
        if math.prod(piece.sizes) == 0:  # an empty per-expert tensor: declared, no bytes
            out.append((piece, local.new_empty(piece.sizes)))
            continue
        view = local[piece.index]
        out.append((piece, view.transpose(-2, -1) if piece.transpose else view))
    return out


class FusedSource:
    """A fused expert tensor presented to DCP as the per-expert pieces this rank holds.

    DCP asks each state-dict value for its write items (``__create_write_items__``,
    the protocol DTensor implements), so the pieces enter the local plan, DCP's
    dedup and its validation like any other chunk.
    """

    def __init__(self, pieces: list[tuple[ExpertPiece, torch.Tensor]], properties: TensorProperties) -> None:
        self.pieces = pieces
        self.properties = properties

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(p.name, torch.Size(p.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(p.offsets), sizes=torch.Size(p.sizes)),
                    properties=self.properties,
                    size=torch.Size(p.shape),
                ),
            )
            for p, _ in self.pieces
        ]
